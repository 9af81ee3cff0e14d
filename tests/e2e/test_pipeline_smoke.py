"""`python -m pipeline experiment=smoke`: the whole chain at micro scale with W&B offline, each stage's W&B run read
back from W&B's own run file; then a re-run that changes only W&B settings and skips every stage."""

import json
import subprocess
import sys

import pytest

from pipeline.__main__ import STAGES
from pipeline.lineage import artifact_name
from pipeline.wandb_records import read_run, run_files
from pipeline.wandb_sync import plan

pytestmark = pytest.mark.slow

ALL_STAGES = [*STAGES, "student_base"]
# the tables and figures each stage logs (beyond its history rows and artifacts)
TABLES = {"data": {"samples", "filter_counts"}, "sft": {"samples"}, "rl": {"samples"}, "distill": {"traces"}}
FIGURES = {"pretrain": {"expert_load", "curves"}, "report": {"loss_curves", "expert_load"}}


def _pipeline(root, env, *extra):
    cmd = [sys.executable, "-m", "pipeline", "experiment=smoke", f"run.root={root}", "wandb.mode=offline", *extra]
    env = {k: v for k, v in env.items() if k != "WANDB_MODE"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _wandb_run(stage_dir):
    """The stage's W&B record and what its newest offline segment holds."""
    rec = json.loads((stage_dir / "wandb_run.json").read_text())
    (segment,) = run_files(stage_dir, rec["id"])  # one launch, one segment
    return rec, read_run(segment)


def test_smoke_pipeline_records_every_stage_in_wandb_then_resumes_as_a_no_op(tmp_path, child_env, monkeypatch):
    r = _pipeline(tmp_path, child_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    record = json.loads((run_dir / "pipeline.json").read_text())
    manifests = {s: json.loads((run_dir / s / "manifest.json").read_text()) for s in ALL_STAGES}
    produced, producer = {}, {}  # artifact name -> digest (from the W&B run files), -> stage
    for stage in ALL_STAGES:
        m = manifests[stage]
        assert m["stage"] == stage and m["code"]["sha"]
        if stage in STAGES:
            assert record["stages"][stage]["returncode"] == 0 and not record["stages"][stage]["skipped"]
            assert record["stages"][stage]["peak_rss_mb"] > 0
        rec, c = _wandb_run(run_dir / stage)
        assert (c.run_id, c.group, c.job_type) == (m["wandb_run"], "smoke", stage) and c.exited and c.complete
        assert c.rows >= 1, f"{stage}: no history"
        assert TABLES.get(stage, set()) <= set(c.tables), f"{stage}: tables {sorted(c.tables)}"
        assert FIGURES.get(stage, set()) <= set(c.images), f"{stage}: figures {sorted(c.images)}"
        assert c.summary["wandb_failures"] == 0 and m["metrics"]["wandb_failures"] == 0
        # every output is one artifact `<run>-<stage>-<output>`, with the digest the manifest recorded
        arts = {a["name"]: a["digest"] for a in c.artifacts}
        for out, entry in m["outputs"].items():
            assert arts[artifact_name("smoke", stage, out)] == entry["wandb_digest"], (stage, out)
        produced |= arts
        producer |= dict.fromkeys(arts, stage)
    # the per-step curves: every training step logged once
    assert read_run(run_files(run_dir / "pretrain")[-1]).history_steps == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio_batch/layer0"} <= _wandb_run(
        run_dir / "pretrain"
    )[1].history_keys
    assert {"reward_mean", "accuracy"} <= _wandb_run(run_dir / "rl")[1].history_keys
    assert any(t.startswith("samples_") for t in _wandb_run(run_dir / "eval")[1].tables)
    # the precision bench's row of this run: every stage's wall time, the precision each stage ran, the metrics
    import bench.precision_pipeline as precision_bench

    row = precision_bench.summarize("fp32", run_dir)
    assert all(isinstance(row[f"{s}_wall_s"], float) for s in precision_bench.STAGES) and row["total_wall_s"] > 0
    assert row["stage_precisions"] == "pretrain:fp32 sft:fp32 rl:fp32 distill:fp32 eval:fp32"
    assert isinstance(row["pretrain_val_bpb"], float) and isinstance(row["rl_humaneval_pass_at_1"], float)

    # lineage: what each stage consumed is what an upstream stage produced, byte for byte (same digest)
    edges = set()
    for stage in ALL_STAGES:
        rec, _ = _wandb_run(run_dir / stage)
        for e in rec["consumed"]:
            if e["external"]:
                continue
            assert produced.get(e["name"]) == e["digest"], f"{stage} consumed {e['name']} that nobody produced"
            edges.add((producer[e["name"]], stage))
    chain = [("data", "pretrain"), ("pretrain", "sft"), ("sft", "rl"), ("rl", "distill"), ("distill", "eval")]
    assert {*chain, ("student_base", "distill"), ("data", "student_base"), ("eval", "report")} <= edges
    # `make wandb-sync` uploads producers first, so each replayed edge finds its artifact already there
    order = [r["job_type"] for r in plan(tmp_path)]
    assert all(order.index(a) < order.index(b) for a, b in edges), order

    # the work keys are what the stages read: eval depends on the kernels and determinism, no stage on W&B or names
    assert {"kernels.backend", "run.deterministic", "precision"} <= set(manifests["eval"]["reads"])
    assert {"run.deterministic", "run.seed", "train.steps", "model.n_routed_experts"} <= set(
        manifests["pretrain"]["reads"]
    )
    for stage, m in manifests.items():
        assert not [k for k in m["reads"] if k.startswith(("wandb.", "run.name", "run.root", "pipeline."))], stage
    assert not [k for k in manifests["pretrain"]["reads"] if k.startswith(("sft.", "rl.", "eval.", "distill."))]
    # the distilled student starts from its own pretrained base, a stage of its own
    base, dist = manifests["student_base"], manifests["distill"]
    assert base["config"]["model"]["n_routed_experts"] == 0
    assert base["inputs"]["train_shards"] == manifests["pretrain"]["inputs"]["train_shards"]
    assert dist["inputs"]["student_base"]["sha256"] == base["outputs"]["checkpoint"]["sha256"]

    mtimes = {s: (run_dir / s / "manifest.json").stat().st_mtime for s in STAGES}
    again = _pipeline(tmp_path, child_env, "wandb.project=elsewhere", "wandb.system_metrics=true")
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((run_dir / "pipeline.json").read_text())
    for stage in STAGES:
        assert "skipped_at" in record["stages"][stage], f"{stage} ran again although only W&B settings changed"
        assert (run_dir / stage / "manifest.json").stat().st_mtime == mtimes[stage]

    # a bench that reads a finished run, at micro scale (it broke unseen once rl.lm_mix defaulted to 1)
    import bench.common
    from bench.distill_vs_rl import main as distill_vs_rl

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path / "results")  # not the repository's bench/results
    argv = ["--run", str(run_dir), "--sft-steps", "2", "--rl-steps", "1", "--eval-n", "4", "--seeds", "0", "1"]
    rows = distill_vs_rl([*argv, "--overrides", "experiment=smoke"])
    arms = {"student_sft_ref", "student_sft_ref+grpo", "student_distill", "student_distill+kd"}
    assert arms <= {r["arm"] for r in rows} and (tmp_path / "results" / "distill_vs_rl_summary.csv").is_file()
