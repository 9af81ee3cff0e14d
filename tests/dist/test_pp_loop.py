"""The pretraining loop under pipeline parallelism, against single-process runs of the same loop on the same data.

Layouts (tests/dist/dist_common.py LAYOUTS_PP_2 / LAYOUTS_PP_4; the micro model with 4 decoder layers):

    pp2_1f1b              2 ranks, Schedule1F1B, 2 stages (MTP off: 1F1B refuses it)
    pp2_dualpipev_mtp     2 ranks, ScheduleDualPipeV, 4 stages in a V, MTP on (computed on pp rank 0)
    pp2_resume            2 ranks: steps 1-2 under 1F1B, then extended from that checkpoint under DualPipeV, whose
                          stages cut the layers differently (rank 0: layers 0-1, then layers 0 and 3)
    pp2_fsdp2             4 ranks, pp=2 x dp_shard=2 (FSDP2 on each stage), 1F1B
    pp2_fsdp2_dualpipev   4 ranks, pp=2 x dp_shard=2, DualPipeV (micro_batch_size=1: 4 micro-batches per rank)
    pp2_1f1b_bf16         2 ranks, 1F1B under autocast bf16 (the residual stream between stages stays fp32)
    pp2_fsdp2_bf16        4 ranks, 1F1B x FSDP2 with bf16 parameters (the hidden state between stages is bf16)
    pp2_fsdp2_meta        4 ranks, 1F1B x FSDP2 built on the meta device (each rank materializes its stage's shards)

Each is compared with the single-process run of its model and micro-batch size (single_mtp, single, single_mb1).
Checked (fp32): the logged loss, gradient norm (reduced across pp ranks and dp shards) and validation loss of
every step within rtol 1e-5 (the reduction order differs); the parameters, router biases (the aux-free update
from the pipeline stages' expert loads) and AdamW moments of the final DCP checkpoint, read back into one process,
within atol 1e-5, rtol 1e-4; the loader's consumed count; and that the resumed piece did resume. The bf16 layouts
against the fp32 reference, loosely (losses rtol 2e-2, as tests/dist/test_hsdp.py), and they must learn. They run
at debug level DETAIL (tests/dist/layouts_worker.py), under which the schedules check every tensor's dtype and shape
against the buffers declared between stages (a bf16 hidden state received into an fp32 buffer was NaN on every step).
Two torchrun launches (2 and 4 processes) plus four single-process runs: about 70 s on 2 cores.
"""

import json

import pytest

from tests.dist.dist_common import (
    LAYOUTS_PP_2,
    LAYOUTS_PP_4,
    MICRO_MODEL,
    MICRO_TRAIN,
    PP_MODEL,
    REPO,
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

STEPS = ["train.steps=4", "train.ckpt_every=4", "train.eval_every=2"]
REFERENCE = {  # layout (run directory) -> the single-process run it must follow
    "pp2_1f1b": "single",
    "pp2_dualpipev_mtp": "single_mtp",
    "pp2_resume": "single",
    "pp2_fsdp2": "single",
    "pp2_fsdp2_dualpipev": "single_mb1",
    "pp2_fsdp2_meta": "single_meta",
}
BF16 = [k for k in [*LAYOUTS_PP_2, *LAYOUTS_PP_4] if k.endswith("bf16")]  # against "single", loosely
SINGLE = {
    "single": ["model.num_nextn_predict_layers=0"],
    "single_mtp": [],
    "single_mb1": ["model.num_nextn_predict_layers=0", "train.micro_batch_size=1"],
    "single_meta": ["model.num_nextn_predict_layers=0", "train.meta_init=true"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.config import compose
    from train.pretrain import run

    root = tmp_path_factory.mktemp("pp_loop")
    overrides = [*prepare_data(root), *MICRO_MODEL, *MICRO_TRAIN, *PP_MODEL, *STEPS]
    for name in [*SINGLE, *REFERENCE, *BF16]:
        clone_run(root, name)
    for name, extra in SINGLE.items():
        run(compose([*overrides, f"run.name={name}", *extra]))
    worker = str(REPO / "tests/dist/layouts_worker.py")
    logs = torchrun(2, [worker, json.dumps(overrides), *LAYOUTS_PP_2]).stdout
    logs += torchrun(4, [worker, json.dumps(overrides), *LAYOUTS_PP_4]).stdout
    return root, logs


@pytest.mark.parametrize("layout", list(REFERENCE))
def test_pipeline_loop_matches_single_process(runs, layout):
    root, _ = runs
    ref = REFERENCE[layout]
    want, got = metrics(root / ref), metrics(root / layout)
    bad = compare_steps(got, want, keys=("loss", "ce_loss", "mtp_loss", "grad_norm"))
    bad += compare_steps({s: got[s] for s in (2, 4)}, {s: want[s] for s in (2, 4)}, keys=("val_loss", "val_loss_ema"))
    assert got[4]["expert_bias"] and len(got[4]["expert_bias"]) == len(want[4]["expert_bias"])
    ckpt = "pretrain/checkpoints/step_000004"
    p_want, m_want, s_want = load_checkpoint(root / ref / ckpt)
    p_got, m_got, s_got = load_checkpoint(root / layout / ckpt)
    bad += compare_params(p_got, p_want, m_want, atol=1e-5, rtol=1e-4)
    bad += compare_tensors(m_got, m_want, atol=1e-5, rtol=1e-4)
    assert s_got["loader"] == s_want["loader"] and s_got["loader"]["consumed"] == 4 * 8, (s_got, s_want)
    assert not bad, f"{layout}: {len(bad)} mismatches\n" + "\n".join(bad[:30])


@pytest.mark.parametrize("layout", BF16)
def test_bf16_pipeline_trains_like_the_fp32_reference(runs, layout):
    root, _ = runs
    want, got = metrics(root / "single"), metrics(root / layout)
    bad = compare_steps(got, want, keys=("loss", "ce_loss"), rtol=2e-2)
    bad += compare_steps({s: got[s] for s in (2, 4)}, {s: want[s] for s in (2, 4)}, keys=("val_loss",), rtol=2e-2)
    assert not bad, "\n".join(bad)
    assert got[4]["loss"] < got[1]["loss"] - 0.1, "the bf16 pipeline did not learn"


def test_resume_under_another_schedule(runs):
    root, logs = runs
    assert "resumed from" in logs and "step_000002 at step 2" in logs, logs[-3000:]
    ckpts = sorted(p.name for p in (root / "pp2_resume" / "pretrain" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000002", "step_000004"], ckpts


def test_mtp_trained_under_dualpipev(runs):
    root, _ = runs
    got = metrics(root / "pp2_dualpipev_mtp")
    assert all(got[s]["mtp_loss"] > 0 for s in got), "MTP must be part of the pipeline's loss"
