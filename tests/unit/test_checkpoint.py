"""DCP checkpoints: round trip, atomicity, keep-last-N, corrupt newest falls back to the previous one, EMA."""

import os

import pytest
import torch

from train.checkpoint import CheckpointError, CheckpointManager
from train.ema import EMA


def _model_opt(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(4, 6)).sum().backward()
    opt.step()
    return m, opt


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_round_trip_model_optimizer_ema_state_and_rng(tmp_path):
    m, opt = _model_opt(0)
    ema = EMA(m, 0.9)
    mgr = CheckpointManager(tmp_path, keep_last=3)
    torch.manual_seed(123)
    path = mgr.save(5, m, opt, {"loader": {"consumed": 40}}, {"hidden_size": 8}, ema.shadow)
    expected_draw = torch.rand(3)
    m2, opt2 = _model_opt(1)
    ema2 = EMA(m2, 0.9)
    state = mgr.load(path, m2, opt2, ema2.shadow)
    assert state == {"loader": {"consumed": 40}, "step": 5}
    assert _equal(m, m2)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)
    assert torch.equal(torch.rand(3), expected_draw), "RNG state not restored"
    assert (path / "model_config.json").is_file()


def test_keep_last_and_ordering(tmp_path):
    m, opt = _model_opt(0)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for s in (1, 2, 3, 10):
        mgr.save(s, m, opt, {}, {})
    assert [p.name for p in mgr.checkpoints()] == ["step_000003", "step_000010"]


def test_partial_write_is_ignored_and_cleaned(tmp_path):
    m, opt = _model_opt(0)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, m, opt, {}, {})
    (tmp_path / ".tmp-step_000002").mkdir()  # what a crash during save leaves
    (tmp_path / ".tmp-step_000002" / "__0_0.distcp").write_bytes(b"half")
    assert [p.name for p in mgr.checkpoints()] == ["step_000001"]
    CheckpointManager(tmp_path)  # a new run cleans it
    assert not (tmp_path / ".tmp-step_000002").exists()


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    m, opt = _model_opt(0)
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, m, opt, {"tag": "good"}, {})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    newest = mgr.save(2, m, opt, {"tag": "newest"}, {})
    shard = next(newest.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    with pytest.raises(CheckpointError, match="failed to load"):
        mgr.load(newest, *_model_opt(2))
    m3, opt3 = _model_opt(3)
    path, state = mgr.load_latest_valid(m3, opt3)
    assert path.name == "step_000001" and state["tag"] == "good"
    assert "skipping corrupt checkpoint" in caplog.text


def test_incomplete_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_000007").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path).load(tmp_path / "step_000007", torch.nn.Linear(2, 2))


def test_ema_tracks_and_swaps_without_touching_live_weights():
    m = torch.nn.Linear(3, 3)
    ema = EMA(m, decay=0.5)
    start = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m, 1)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    live = m.weight.detach().clone()
    with ema.swapped_in(m):
        assert torch.allclose(m.weight, start + 1.0)
    assert torch.equal(m.weight, live)
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(m, 1.0)


def test_async_save_is_finalized_by_wait_and_round_trips(tmp_path):
    m, opt = _model_opt(0)
    mgr = CheckpointManager(tmp_path, keep_last=0, async_save=True)
    path = mgr.save(3, m, opt, {"bad_steps": 0}, {"hidden_size": 8})
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():  # training goes on while the files are written: the checkpoint holds the state saved
        for p in m.parameters():
            p.add_(1.0)
    mgr.wait()
    assert mgr.checkpoints() == [path] and not list(tmp_path.glob(".tmp-*"))
    m2, opt2 = _model_opt(1)
    assert CheckpointManager(tmp_path).load(path, m2, opt2) == {"bad_steps": 0, "step": 3}
    assert all(torch.equal(saved[k], v) for k, v in m2.state_dict().items())


def test_cuda_rng_state_is_saved_and_restored_when_there_is_a_gpu(monkeypatch):
    """On a GPU each rank's CUDA generator goes into rng_rank<r>.json (emulated: torch.cuda's RNG calls faked)."""
    import json

    import torch.cuda as cuda

    from train.checkpoint import rng_state_json, set_rng_state_json

    state = {"rng": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "get_rng_state", lambda: state["rng"].clone())
    monkeypatch.setattr(cuda, "set_rng_state", lambda t: state.__setitem__("rng", t.clone()))
    saved = json.loads(json.dumps(rng_state_json()))  # as written to the file
    assert saved["cuda"] == list(range(16))
    state["rng"] = torch.zeros(16, dtype=torch.uint8)
    set_rng_state_json(saved)
    assert torch.equal(state["rng"], torch.arange(16, dtype=torch.uint8))
