"""Elastic resume of the pretraining loop: 4 ranks -> 2 -> 1 -> 2, against one uninterrupted single-process run.

One run directory is trained in four pieces, each extending the run (`train.steps` grows, so it names the checkpoint
to continue: `train.resume=<path>`) from the checkpoint the previous piece wrote on a different number of processes
and layout:

    steps 1-2: 4 ranks, HSDP 2x2 + EP 2     steps 3-4: 2 ranks, FSDP (dp_shard=2)
    steps 5-6: 1 process                     steps 7-8: 2 ranks, DDP-like (dp_replicate=2)

DCP reshards model, AdamW and EMA state to each new layout; the loader resumes from the global `consumed` count
(data/loader.py), so the pieces together read exactly the single run's sequence stream. Checked: every step's
loss and gradient norm equal the uninterrupted run's (rtol 1e-5): a repeated or skipped sequence, or a state not
restored, changes the loss of the step that reads it; every checkpoint's `consumed` is 8 sequences per step; the
final parameters and AdamW moments equal the uninterrupted run's (atol 1e-5, rtol 1e-4).
"""

import json

import pytest

from tests.dist.dist_common import (
    MICRO_MODEL,
    MICRO_TRAIN,
    clone_run,
    compare_params,
    compare_steps,
    compare_tensors,
    load_checkpoint,
    metrics,
    prepare_data,
    torchrun,
)

pytestmark = pytest.mark.dist

PIECES = [  # (processes, parallel overrides, last step of the piece)
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"], 2),
    (2, ["parallel.dp_replicate=1", "parallel.dp_shard=2"], 4),
    (1, [], 6),
    (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], 8),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.config import compose
    from train.pretrain import run

    root = tmp_path_factory.mktemp("elastic")
    base = [*prepare_data(root), *MICRO_MODEL, *MICRO_TRAIN]
    clone_run(root, "straight")
    clone_run(root, "elastic")
    run(compose([*base, "run.name=straight", "train.steps=8"]))
    logs, prev = [], None
    for nproc, layout, last in PIECES:
        overrides = [*base, "run.name=elastic", f"train.steps={last}", *layout]
        if prev:  # each piece extends the run (train.steps grows), so it names the checkpoint it continues
            overrides.append(f"train.resume={root}/elastic/pretrain/checkpoints/step_{prev:06d}")
        prev = last
        if nproc == 1:
            run(compose(overrides))
        else:
            proc = torchrun(nproc, ["-m", "train.pretrain", *overrides])
            logs.append(proc.stdout)
    return root, logs


def test_resumed_pieces_follow_the_uninterrupted_trajectory(runs):
    root, logs = runs
    want, got = metrics(root / "straight"), metrics(root / "elastic")
    bad = compare_steps(got, want, keys=("loss", "ce_loss", "grad_norm"))
    assert not bad, "\n".join(bad)
    assert sum("resumed from" in log for log in logs) == 2, "the 2-rank pieces must have resumed"


def test_loader_consumed_counts_every_sequence_once(runs):
    root, _ = runs
    ckpts = sorted((root / "elastic" / "pretrain" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{s:06d}" for s in (2, 4, 6, 8)]
    for c in ckpts:
        state = json.loads((c / "trainer_state.json").read_text())
        assert state["loader"]["consumed"] == 8 * state["step"], (c.name, state["loader"])


def test_final_weights_and_optimizer_match(runs):
    root, _ = runs
    ckpt = "pretrain/checkpoints/step_000008"
    p_want, m_want, _ = load_checkpoint(root / "straight" / ckpt)
    p_got, m_got, _ = load_checkpoint(root / "elastic" / ckpt)
    bad = compare_params(p_got, p_want, m_want, atol=1e-5, rtol=1e-4) + compare_tensors(
        m_got, m_want, atol=1e-5, rtol=1e-4
    )
    assert not bad, "\n".join(bad[:30])
