"""The distillation stage end to end at micro scale: teacher resolution (rl, else sft), traces with provenance, the
student's checkpoints and metrics, skip on re-run, trace reuse and student resume, online logit distillation.

The micro teacher is freshly initialised and would almost never answer correctly, so its sampler is replaced by an
oracle (right answer for sample 0 and 1, wrong for 2, unfinished for 3); everything else is the real stage.
"""

import json
import logging
import shutil

import pytest

import distill.traces
from data.tokenizer import load_tokenizer
from distill.run import resolve_teacher
from distill.run import run as run_distill
from pipeline.config import compose
from tests.unit.micro import make_micro_run, micro_overrides, oracle
from train.checkpoint import read_model_config

pytestmark = pytest.mark.usefixtures("one_thread")

# the micro run has no pretraining shards, so no student base: these tests start the student from random weights
# (the student base, student_init=pretrain, runs in the smoke pipeline: tests/e2e)
SCRATCH = ["distill.student_init=scratch"]


def _setup(tmp_path, monkeypatch, teacher_stage="rl"):
    from datasets import load_from_disk

    run = make_micro_run(tmp_path)
    shutil.copytree(run / "pretrain", run / teacher_stage)
    tok = load_tokenizer(run / "data" / "tokenizer.json")
    rows = load_from_disk(str(run / "data" / "reasoning"))["train"].to_list()
    calls = []

    def fake_sampler(model, t, stop_token_ids, precision="fp32"):
        calls.append(model)
        return oracle(tok, rows)

    monkeypatch.setattr(distill.traces, "model_sampler", fake_sampler)
    return run, calls


def test_stage_writes_traces_student_and_manifest_then_skips(tmp_path, monkeypatch):
    run, calls = _setup(tmp_path, monkeypatch)
    cfg = compose(micro_overrides(tmp_path) + SCRATCH)
    res = run_distill(cfg)
    d = run / "distill"
    prov = json.loads((d / "traces" / "provenance.json").read_text())
    assert prov["teacher_source"] == "rl" and prov["teacher_checkpoint"].endswith("rl/checkpoints/step_000001")
    assert prov["stats"]["acceptance_rate"] == pytest.approx(0.5) and prov["sampling"]["cache_topk"] == 8
    assert res["acceptance_rate"] == pytest.approx(0.5) and res["n_traces"] == cfg.distill.traces.n_prompts
    ckpt = d / "checkpoints" / "step_000004"
    mc = read_model_config(ckpt)
    assert mc["n_routed_experts"] == 0 and mc["vocab_size"] == load_tokenizer(
        run / "data" / "tokenizer.json"
    ).get_vocab_size(with_added_tokens=True)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["acceptance_rate"] == pytest.approx(0.5)
    assert "teacher_eval_accuracy" in rows[0]
    assert {r["step"] for r in rows if "eval_accuracy" in r} == {2, 4}
    assert all("kd_loss" in r and r["kd_loss"] >= 0 for r in rows if r["step"] > 0)
    for key in ("teacher_activated_params", "student_activated_params", "activated_params_ratio", "accuracy_ratio"):
        assert key in res
    man = json.loads((d / "manifest.json").read_text())
    assert set(man["outputs"]) == {"traces", "checkpoint"}
    assert set(man["inputs"]) == {"tokenizer", "reasoning", "teacher"}
    assert len(calls) == 1
    again = run_distill(cfg)
    assert again["skipped"] and len(calls) == 1


def test_falls_back_to_sft_teacher(tmp_path, monkeypatch, caplog):
    run, _ = _setup(tmp_path, monkeypatch, teacher_stage="sft")
    cfg = compose(micro_overrides(tmp_path) + SCRATCH)
    path, source = resolve_teacher(run, cfg.distill)
    assert source == "sft" and path.parent == run / "sft" / "checkpoints"
    assert "no RL checkpoint" in caplog.text
    (run / "sft").rename(run / "elsewhere")
    with pytest.raises(FileNotFoundError, match="no teacher"):
        resolve_teacher(run, cfg.distill)


def test_traces_reused_and_student_resumed_with_online_kd(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    run, calls = _setup(tmp_path, monkeypatch)
    base = micro_overrides(tmp_path) + SCRATCH + ["distill.kd_mode=online"]
    run_distill(compose(base + ["distill.steps=2"]))
    assert len(calls) == 1
    ckpt = run / "distill" / "checkpoints" / "step_000002"
    res = run_distill(compose(base + ["distill.steps=3", f"distill.resume={ckpt}"]))  # extend the student
    out = caplog.text
    assert len(calls) == 1 and "reusing" in out and "distill: resumed from" in out
    assert res["steps"] == 3 and res["kd_loss"] >= 0
    assert (run / "distill" / "checkpoints" / "step_000003").is_dir()


def test_topk_mode_without_cache_is_refused():
    with pytest.raises(ValueError, match="distill: kd_mode=topk needs traces.cache_topk > 0"):  # when composed
        compose(["experiment=smoke", "distill.traces.cache_topk=0"])
    with pytest.raises(ValueError, match="kd_mode must be one of"):
        compose(["distill.kd_mode=reverse"])


def test_student_preset_is_smaller_than_teacher_preset():
    from model.config import load_preset
    from model.info import model_info

    t, s = model_info(load_preset("tiny")).activated, model_info(load_preset("student")).activated
    assert s <= t / 3, f"student activates {s:,} parameters per token, tiny {t:,}"


@pytest.mark.slow
def test_untrained_teacher_with_the_real_sampler(tmp_path):
    """No oracle: the micro teacher samples through the generation engine, gets (almost surely) nothing right, and
    the smoke config's fallback trains the student on reference traces; without the fallback the stage refuses."""
    run = make_micro_run(tmp_path)
    shutil.copytree(run / "pretrain", run / "rl")
    res = run_distill(compose(micro_overrides(tmp_path) + SCRATCH))
    prov = json.loads((run / "distill" / "traces" / "provenance.json").read_text())
    assert prov["stats"]["samples"] == 16 * 4
    if prov["stats"]["accepted"] == 0:
        assert prov["fallback"] == "reference" and res["n_traces"] == 0 and res["n_examples"] == 16
    else:
        assert prov["fallback"] is None
    shutil.rmtree(run / "distill")
    if prov["stats"]["accepted"] == 0:
        with pytest.raises(ValueError, match="accepted no trace"):
            run_distill(compose(micro_overrides(tmp_path) + SCRATCH + ["distill.traces.fallback_to_reference=false"]))
