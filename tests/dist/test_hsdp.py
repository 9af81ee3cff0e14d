"""The pretraining loop under every data-parallel layout on 4 gloo ranks, against a single-process run.

Layouts (tests/dist/dist_common.py LAYOUTS_4): DDP-like (dp_replicate=4), FSDP (dp_shard=4), HSDP 2x2, FSDP + EP
(ep=2 borrowed from dp_shard=4), HSDP + EP. (dp_shard=2 and dp_replicate=2 on 2 ranks run in test_elastic.py.)
All layouts run in ONE torchrun launch (tests/dist/layouts_worker.py); each writes its own run directory.

Checked per layout: the logged loss and gradient norm of every step (rtol 1e-5), and the parameters and AdamW
moments of the final checkpoint read back into one process (atol 1e-5, rtol 1e-4): the same model, data order and
updates as the single-process run, whatever the sharding. Also that the data-parallel loader consumed exactly the
sequences the single process did (the checkpoint's global `consumed` count).

HSDP + EP with precision=bf16 (FSDP MixedPrecisionPolicy: bf16 parameters for compute, fp32 gradient reduction)
against the fp32 reference: losses within 2e-2 relative (bf16 keeps 8 mantissa bits; four steps of drift), and the
checkpoint holds fp32 master weights, fp32 AdamW moments and the fp32 router bias.

HSDP + EP built on the meta device (`train.meta_init`: each rank materializes only its shards) against a
meta-initialized single process, with the same tolerances as the other layouts.
"""

import json

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.dist.dist_common import (
    LAYOUTS_4,
    MICRO_MODEL,
    MICRO_TRAIN,
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

STEPS = ["train.steps=4", "train.ckpt_every=4", "train.eval_every=4"]  # one evaluation and checkpoint, at the end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.config import compose
    from train.pretrain import run

    root = tmp_path_factory.mktemp("hsdp")
    overrides = [*prepare_data(root), *MICRO_MODEL, *MICRO_TRAIN, *STEPS]
    for name in ["single", "single_meta", *LAYOUTS_4]:
        clone_run(root, name)
    run(compose([*overrides, "run.name=single"]))
    run(compose([*overrides, "run.name=single_meta", "train.meta_init=true"]))
    torchrun(4, [str(REPO / "tests/dist/layouts_worker.py"), json.dumps(overrides), *LAYOUTS_4])
    return root


@pytest.mark.parametrize("layout", [k for k in LAYOUTS_4 if not k.endswith("bf16")])
def test_layout_matches_single_process(runs, layout):
    ref = "single_meta" if layout.endswith("meta") else "single"
    want, got = metrics(runs / ref), metrics(runs / layout)
    bad = compare_steps(got, want)
    ckpt = "pretrain/checkpoints/step_000004"
    p_want, m_want, s_want = load_checkpoint(runs / ref / ckpt)
    p_got, m_got, s_got = load_checkpoint(runs / layout / ckpt)
    bad += compare_params(p_got, p_want, m_want, atol=1e-5, rtol=1e-4)
    bad += compare_tensors(m_got, m_want, atol=1e-5, rtol=1e-4)
    assert s_got["loader"] == s_want["loader"] and s_got["loader"]["consumed"] == 4 * 8, (s_got, s_want)
    assert not bad, f"{layout}: {len(bad)} mismatches\n" + "\n".join(bad[:30])


def test_meta_init_draws_its_own_weights(runs):
    """Not vacuous: the meta-initialized runs start from other weights than the device-built ones."""
    assert metrics(runs / "single_meta")[1]["loss"] != metrics(runs / "single")[1]["loss"]


def test_hsdp_ep_bf16_mixed_precision(runs):
    want, got = metrics(runs / "single"), metrics(runs / "hsdp2x2_ep2_bf16")
    bad = compare_steps(got, want, keys=("loss",), rtol=2e-2)
    assert not bad, "\n".join(bad)
    assert got[4]["loss"] < got[1]["loss"], "bf16 run did not learn"
    # the dtypes the checkpoint stores, from its DCP metadata
    meta = FileSystemReader(str(runs / "hsdp2x2_ep2_bf16" / "pretrain/checkpoints/step_000004")).read_metadata()
    dtypes = {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")}
    bias = [k for k in dtypes if k.endswith("e_score_correction_bias")]
    assert bias and all(str(dtypes[k]) == "torch.float32" for k in bias), {k: dtypes[k] for k in bias}
    not_fp32 = {k: str(d) for k, d in dtypes.items() if str(d) != "torch.float32" and not k.startswith("optim.state")}
    assert not not_fp32, not_fp32
