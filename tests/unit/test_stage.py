"""The run-directory contract: manifest contents, a work key derived from the config fields read, skip-if-unchanged,
re-run after a change or a crash, resume only of the same work, and one launch at a time."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace

import pytest

from pipeline.config import Config, RunConfig, WandbConfig
from pipeline.stage import StageBusyError, StageRun, read_manifest


def _cfg(tmp_path, name="r1") -> Config:
    cfg = Config(run=RunConfig(name=name, root=str(tmp_path)), wandb=WandbConfig(mode="disabled"))
    cfg.train.ema_decay = 0.0  # the toy stage's branch starts off
    return cfg


def _work(cfg):
    """The toy stage's computation: reads two fields, and one more on a branch."""
    out = cfg.train.steps * cfg.train.optim.lr
    if cfg.train.ema_decay > 0:
        out += cfg.train.ema_every
    return out


def _execute(cfg, inputs=None, work=_work, **kw):
    stage = StageRun(cfg, "toy", inputs=inputs or {}, **kw)
    if stage.up_to_date():
        return stage.previous_metrics()
    with stage:
        value = work(cfg)
        out = stage.dir / "result.txt"
        out.write_text(str(value))
        stage.tracker.log({"loss": 1.5}, step=1)
        return stage.finish(outputs={"result": out}, metrics={"score": 3})


def test_manifest_records_what_was_read_code_hashes_metrics_and_time(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("input")
    cfg = _cfg(tmp_path)
    metrics = _execute(cfg, {"src": src})
    assert metrics["score"] == 3 and "skipped" not in metrics
    m = read_manifest(tmp_path / "r1" / "toy")
    assert m["stage"] == "toy"
    assert m["reads"] == {"train.steps": cfg.train.steps, "train.optim.lr": cfg.train.optim.lr, "train.ema_decay": 0.0}
    assert m["config"] == {"train": {"steps": cfg.train.steps, "optim": {"lr": cfg.train.optim.lr}, "ema_decay": 0.0}}
    assert set(m["code"]) == {"sha", "dirty"}
    assert len(m["inputs"]["src"]["sha256"]) == 64 and len(m["outputs"]["result"]["sha256"]) == 64
    assert m["wall_time_s"] >= 0 and m["metrics"]["score"] == 3
    rows = [json.loads(line) for line in (tmp_path / "r1" / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 1.5


def test_a_field_read_reruns_the_stage_and_a_field_not_read_does_not(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("input")
    cfg = _cfg(tmp_path)
    _execute(cfg, {"src": src})
    assert _execute(cfg, {"src": src}).get("skipped") is True
    # never read by this stage: another stage's setting, W&B, the stage list
    other = replace(cfg, rl=replace(cfg.rl, steps=cfg.rl.steps + 1), wandb=WandbConfig(mode="disabled", project="x"))
    assert _execute(other, {"src": src}).get("skipped") is True
    lr = replace(cfg, train=replace(cfg.train, optim=replace(cfg.train.optim, lr=0.5)))
    assert "skipped" not in _execute(lr, {"src": src})  # a read field changed
    assert _execute(lr, {"src": src}).get("skipped") is True
    # the branch: ema_decay decides whether ema_every is read; turning it on re-runs and records the new read
    ema = replace(lr, train=replace(lr.train, ema_decay=0.9))
    assert "skipped" not in _execute(ema, {"src": src})
    assert "train.ema_every" in read_manifest(tmp_path / "r1" / "toy")["reads"]
    src.write_text("new input")
    assert "skipped" not in _execute(ema, {"src": src})  # input changed
    (tmp_path / "r1" / "toy" / "result.txt").write_text("tampered")
    assert "skipped" not in _execute(ema, {"src": src})  # output damaged


@pytest.mark.parametrize(
    "hand_over",
    [
        lambda c: asdict(c.model),  # a whole section given to library code
        lambda c: replace(c.model, vocab_size=7),  # a derived copy reads every other field
        lambda c: c.model == c.model,
        lambda c: __import__("copy").deepcopy(c.model),
        lambda c: __import__("pickle").dumps(c.model),
    ],
    ids=["asdict", "replace", "eq", "deepcopy", "pickle"],
)
def test_a_section_handed_over_whole_counts_every_field_as_read(tmp_path, hand_over):
    cfg = _cfg(tmp_path)
    _execute(cfg, work=hand_over)
    reads = read_manifest(tmp_path / "r1" / "toy")["reads"]
    assert {f"model.{k}" for k in asdict(cfg.model)} - {"model.vocab_size"} <= set(reads)
    assert not any(k.startswith(("train.", "rl.")) for k in reads)
    changed = replace(cfg, model=replace(cfg.model, n_routed_experts=cfg.model.n_routed_experts + 1))
    assert "skipped" not in _execute(changed, work=hand_over)


def test_identity_and_tracking_fields_are_never_part_of_the_key(tmp_path):
    def reads_everything_about_the_run(c):
        return (c.run.name, c.run.root, c.run.seed, c.wandb.project, c.pipeline.stages)

    cfg = _cfg(tmp_path)
    _execute(cfg, work=reads_everything_about_the_run)
    assert read_manifest(tmp_path / "r1" / "toy")["reads"] == {"run.seed": 0}
    renamed_project = replace(cfg, wandb=WandbConfig(mode="disabled", project="elsewhere"))
    assert _execute(renamed_project, work=reads_everything_about_the_run).get("skipped") is True
    reseeded = replace(cfg, run=replace(cfg.run, seed=1))
    assert "skipped" not in _execute(reseeded, work=reads_everything_about_the_run)


def test_a_write_records_the_value_the_field_had(tmp_path):
    def overwrite(c):
        c.train.steps = 3  # a stage that adjusts its config in place still depends on the composed value

    cfg = _cfg(tmp_path)
    steps = cfg.train.steps
    _execute(cfg, work=overwrite)
    assert read_manifest(tmp_path / "r1" / "toy")["reads"] == {"train.steps": steps}


def test_recording_leaves_the_config_classes_as_they_were(tmp_path):
    from train.config import TrainConfig

    before = dict(vars(TrainConfig))
    _execute(_cfg(tmp_path))
    assert dict(vars(TrainConfig)) == before


def test_stage_killed_before_finish_is_not_skipped(tmp_path):
    cfg = _cfg(tmp_path)
    _execute(cfg)
    stage = StageRun(cfg, "toy", inputs={})
    with pytest.raises(KeyboardInterrupt), stage:
        raise KeyboardInterrupt  # crash after the old manifest was invalidated, before finish()
    assert read_manifest(tmp_path / "r1" / "toy") is None
    assert "skipped" not in _execute(cfg)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input 'shards' not found"):
        StageRun(_cfg(tmp_path), "toy", inputs={"shards": tmp_path / "nope"})


def _crash_with_checkpoint(cfg, inputs, name="step_5", work=_work, **kw):
    """Enter the stage, read the config, write a checkpoint, and die before finish()."""
    stage = StageRun(cfg, "toy", inputs=inputs, **kw)
    stage.__enter__()
    work(cfg)
    (stage.dir / "checkpoints" / name).mkdir(parents=True)
    stage.__exit__(None, None, None)
    return stage.dir


def _steps(cfg, n):
    return replace(cfg, train=replace(cfg.train, steps=n))


def test_checkpoints_resume_only_under_the_config_and_inputs_that_wrote_them(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("input")
    cfg = _cfg(tmp_path)
    d = _crash_with_checkpoint(_steps(cfg, 10), {"src": src})
    progress = json.loads((d / "in_progress.json").read_text())
    assert progress["reads"]["train.steps"] == 10 and progress["wandb_id"]  # written as the stage read its config
    with StageRun(_steps(cfg, 10), "toy", inputs={"src": src}) as stage:  # the same work: resume it
        assert (d / "checkpoints" / "step_5").is_dir() and not (d / "superseded").exists()
        assert stage.wandb_id == progress["wandb_id"]  # and continue its W&B run
    (d / "metrics.jsonl").write_text('{"step": 5}\n')
    with StageRun(_steps(cfg, 20), "toy", inputs={"src": src}) as stage:  # another schedule: start over
        assert not (d / "checkpoints").exists()
        (moved,) = (d / "superseded").iterdir()
        assert (moved / "checkpoints" / "step_5").is_dir() and (moved / "metrics.jsonl").read_text() == '{"step": 5}\n'
        assert (d / "metrics.jsonl").read_text() == ""  # the new attempt's log starts empty
        assert stage.wandb_id != progress["wandb_id"]  # under a new W&B run
    _crash_with_checkpoint(_steps(cfg, 20), {"src": src}, name="step_7")
    src.write_text("other data")
    with StageRun(_steps(cfg, 20), "toy", inputs={"src": src}):  # same config, new input: start over
        assert not (d / "checkpoints").exists()
        assert any((m / "checkpoints" / "step_7").is_dir() for m in (d / "superseded").iterdir())


def test_a_field_not_read_does_not_stop_a_resume(tmp_path):
    cfg = _cfg(tmp_path)
    d = _crash_with_checkpoint(cfg, {})
    with StageRun(replace(cfg, sft=replace(cfg.sft, steps=cfg.sft.steps + 1)), "toy", inputs={}):
        assert (d / "checkpoints" / "step_5").is_dir()


def test_checkpoints_without_a_record_of_their_work_are_not_resumed(tmp_path):
    cfg = _cfg(tmp_path)
    stray = tmp_path / "r1" / "toy" / "checkpoints" / "step_3"
    stray.mkdir(parents=True)
    with StageRun(cfg, "toy", inputs={}) as stage:
        assert not (stage.dir / "checkpoints").exists()
        assert json.loads((stage.dir / "in_progress.json").read_text())["reads"] == {}


def test_resume_none_starts_over_and_an_explicit_checkpoint_keeps_its_folder(tmp_path):
    cfg = _cfg(tmp_path)
    d = _crash_with_checkpoint(_steps(cfg, 10), {})
    named = d / "checkpoints" / "step_5"
    with StageRun(_steps(cfg, 20), "toy", inputs={}, resume=str(named)):  # extend a run on purpose
        assert named.is_dir()
    with StageRun(_steps(cfg, 20), "toy", inputs={}, resume="none"):
        assert not (d / "checkpoints").exists() and len(list((d / "superseded").iterdir())) == 1


def test_a_layout_section_is_not_part_of_the_work(tmp_path):
    def reads_layout(c):
        return c.train.steps, c.parallel.dp_shard

    cfg = _cfg(tmp_path)
    d = _crash_with_checkpoint(cfg, {}, work=reads_layout, layout=("parallel",))
    other_layout = replace(cfg, parallel=replace(cfg.parallel, dp_shard=cfg.parallel.dp_shard + 1))
    with StageRun(other_layout, "toy", inputs={}, layout=("parallel",)):
        assert (d / "checkpoints" / "step_5").is_dir()  # saved on N ranks, resumed on M
    _crash_with_checkpoint(cfg, {}, name="step_6", work=reads_layout, layout=("parallel",))
    with StageRun(other_layout, "toy", inputs={}):  # without the layout exemption: another config
        assert not (d / "checkpoints").exists()


HOLD = """
import sys, time
from pipeline.config import Config, RunConfig, WandbConfig
from pipeline.stage import StageRun
cfg = Config(run=RunConfig(name="r1", root=sys.argv[1]), wandb=WandbConfig(mode="disabled"))
with StageRun(cfg, "toy", inputs={}):
    print("entered", flush=True)
    time.sleep(120)
"""


def test_a_second_launch_of_a_running_stage_is_refused_naming_its_pid_and_kill_9_frees_it(tmp_path, child_env):
    cmd = [sys.executable, "-c", textwrap.dedent(HOLD), str(tmp_path)]
    holder = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=child_env)
    try:
        assert holder.stdout.readline().strip() == b"entered"
        (tmp_path / "r1" / "toy" / "manifest.json").write_text("{}")  # a second launch must not touch this
        t0 = time.time()
        with pytest.raises(StageBusyError, match=rf"stage 'toy' of run 'r1' is already running \(pid {holder.pid} "):
            StageRun(_cfg(tmp_path), "toy", inputs={}).__enter__()
        assert time.time() - t0 < 2, "refused at once, not after waiting"
        assert (tmp_path / "r1" / "toy" / "manifest.json").read_text() == "{}"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with StageRun(_cfg(tmp_path), "toy", inputs={}):  # the kernel released the lock with the process
        pass
