"""The run-directory contract: manifest contents, skip-if-unchanged, re-run after a change or a crash."""

import json
from types import SimpleNamespace

import pytest

from pipeline.stage import StageRun, read_manifest


def _cfg(tmp_path, name="r1"):
    return SimpleNamespace(
        run=SimpleNamespace(name=name, root=str(tmp_path)),
        wandb=SimpleNamespace(mode="disabled", project="p", entity=None),
    )


def _execute(cfg, config, inputs, payload="out"):
    stage = StageRun(cfg, "toy", config=config, inputs=inputs)
    if stage.up_to_date():
        return stage.previous_metrics()
    with stage:
        out = stage.dir / "result.txt"
        out.write_text(payload)
        stage.tracker.log({"loss": 1.5}, step=1)
        return stage.finish(outputs={"result": out}, metrics={"score": 3})


def test_manifest_records_config_code_hashes_metrics_and_time(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("input")
    metrics = _execute(_cfg(tmp_path), {"lr": 0.1}, {"src": src})
    assert metrics["score"] == 3 and "skipped" not in metrics
    m = read_manifest(tmp_path / "r1" / "toy")
    assert m["stage"] == "toy" and m["config"] == {"lr": 0.1}
    assert set(m["code"]) == {"sha", "dirty"}
    assert len(m["inputs"]["src"]["sha256"]) == 64 and len(m["outputs"]["result"]["sha256"]) == 64
    assert m["wall_time_s"] >= 0 and m["metrics"]["score"] == 3
    rows = [json.loads(line) for line in (tmp_path / "r1" / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 1.5


def test_unchanged_stage_is_skipped_and_changes_rerun_it(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("input")
    cfg = _cfg(tmp_path)
    _execute(cfg, {"lr": 0.1}, {"src": src})
    assert _execute(cfg, {"lr": 0.1}, {"src": src}).get("skipped") is True
    assert "skipped" not in _execute(cfg, {"lr": 0.2}, {"src": src})  # config changed
    assert _execute(cfg, {"lr": 0.2}, {"src": src}).get("skipped") is True
    src.write_text("new input")
    assert "skipped" not in _execute(cfg, {"lr": 0.2}, {"src": src})  # input changed
    (tmp_path / "r1" / "toy" / "result.txt").write_text("tampered")
    assert "skipped" not in _execute(cfg, {"lr": 0.2}, {"src": src})  # output damaged


def test_stage_killed_before_finish_is_not_skipped(tmp_path):
    cfg = _cfg(tmp_path)
    _execute(cfg, {"a": 1}, {})
    stage = StageRun(cfg, "toy", config={"a": 1}, inputs={})
    with pytest.raises(KeyboardInterrupt), stage:
        raise KeyboardInterrupt  # crash after the old manifest was invalidated, before finish()
    assert read_manifest(tmp_path / "r1" / "toy") is None
    assert "skipped" not in _execute(cfg, {"a": 1}, {})


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input 'shards' not found"):
        StageRun(_cfg(tmp_path), "toy", config={}, inputs={"shards": tmp_path / "nope"})


def _crash_with_checkpoint(cfg, config, inputs, name="step_5"):
    """Enter the stage, write a checkpoint, and die before finish()."""
    stage = StageRun(cfg, "toy", config=config, inputs=inputs)
    stage.__enter__()
    (stage.dir / "checkpoints" / name).mkdir(parents=True)
    stage.__exit__(None, None, None)
    return stage.dir


def test_checkpoints_resume_only_under_the_config_and_inputs_that_wrote_them(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("input")
    cfg = _cfg(tmp_path)
    d = _crash_with_checkpoint(cfg, {"steps": 10}, {"src": src})
    with StageRun(cfg, "toy", config={"steps": 10}, inputs={"src": src}):  # the same work: resume it
        assert (d / "checkpoints" / "step_5").is_dir() and not (d / "superseded").exists()
    (d / "metrics.jsonl").write_text('{"step": 5}\n')
    with StageRun(cfg, "toy", config={"steps": 20}, inputs={"src": src}):  # another schedule: start over
        assert not (d / "checkpoints").exists()
        (moved,) = (d / "superseded").iterdir()
        assert (moved / "checkpoints" / "step_5").is_dir() and (moved / "metrics.jsonl").read_text() == '{"step": 5}\n'
        assert (d / "metrics.jsonl").read_text() == ""  # the new attempt's log starts empty
    _crash_with_checkpoint(cfg, {"steps": 20}, {"src": src}, name="step_7")
    src.write_text("other data")
    with StageRun(cfg, "toy", config={"steps": 20}, inputs={"src": src}):  # same config, new input: start over
        assert not (d / "checkpoints").exists() and len(list((d / "superseded").iterdir())) == 2


def test_checkpoints_without_a_record_of_their_work_are_not_resumed(tmp_path):
    cfg = _cfg(tmp_path)
    stray = tmp_path / "r1" / "toy" / "checkpoints" / "step_3"
    stray.mkdir(parents=True)
    with StageRun(cfg, "toy", config={"a": 1}, inputs={}) as stage:
        assert not (stage.dir / "checkpoints").exists()
        assert json.loads((stage.dir / "in_progress.json").read_text()) == stage.work_key


def test_resume_none_starts_over_and_an_explicit_checkpoint_keeps_its_folder(tmp_path):
    cfg = _cfg(tmp_path)
    d = _crash_with_checkpoint(cfg, {"steps": 10}, {})
    named = d / "checkpoints" / "step_5"
    with StageRun(cfg, "toy", config={"steps": 20}, inputs={}, resume=str(named)):  # extend a run on purpose
        assert named.is_dir()
    with StageRun(cfg, "toy", config={"steps": 20}, inputs={}, resume="none"):
        assert not (d / "checkpoints").exists() and len(list((d / "superseded").iterdir())) == 1


def test_a_layout_section_is_not_part_of_the_work(tmp_path):
    cfg = _cfg(tmp_path)
    stage = StageRun(cfg, "toy", config={"steps": 10, "parallel": {"dp": 4}}, inputs={}, layout=("parallel",))
    stage.__enter__()
    (stage.dir / "checkpoints" / "step_5").mkdir(parents=True)
    stage.__exit__(None, None, None)
    with StageRun(cfg, "toy", config={"steps": 10, "parallel": {"dp": 2}}, inputs={}, layout=("parallel",)):
        assert (stage.dir / "checkpoints" / "step_5").is_dir()  # saved on 4 ranks, resumed on 2
    with StageRun(cfg, "toy", config={"steps": 10, "parallel": {"dp": 1}}, inputs={}):  # no layout: another config
        assert not (stage.dir / "checkpoints").exists()
