"""Every tensor the training loop hands to a collective lives on the training device (NCCL carries CUDA tensors only).

gloo accepts host and device tensors alike, and on a CPU-only machine both are CPU tensors, so this test tracks where
each tensor would live on a GPU by how it was made (tests/dist/host_tensors.py: a factory call without `device=`,
`from_numpy`, `.cpu()` make host tensors; the model's parameters, the batches moved `.to(device)` and everything
computed from them are device tensors), and checks every collective called from this repository's code while the
real loop trains the micro model (tests/dist/dist_common.py) for 2 steps with a validation and a checkpoint:

    hsdp2x2_ep2          4 ranks: HSDP + EP (the loop's reduction, EP's all-to-alls, gradient clipping)
    pp2_fsdp2            4 ranks: 1F1B x FSDP2 (the pipeline's reduction and validation, the router-bias all-reduce)
    pp2_fsdp2_dualpipev  4 ranks: DualPipeV x FSDP2 (forward-only validation's send/recv)

The check cannot pass vacuously: the worker's control call (`all_reduce` of a `torch.zeros(1)` made without a
device) must be caught, and each layout must have run the collectives named above. On the loop as it was before
this test (scalars reduced through `torch.tensor([...])`, expert loads copied `.cpu()` before their all-reduce) it
reports them. One torchrun launch of 4 processes: about 60 s on 2 cores.
"""

import json

import pytest

from tests.dist.dist_common import MICRO_MODEL, MICRO_TRAIN, PP_MODEL, REPO, clone_run, prepare_data, torchrun

pytestmark = pytest.mark.dist

LAYOUTS = {  # name -> collectives (called from this repository's code) each must have been checked for
    "hsdp2x2_ep2": {"all_reduce", "all_to_all_single"},
    "pp2_fsdp2": {"all_reduce"},
    "pp2_fsdp2_dualpipev": {"all_reduce", "send", "recv"},
}
STEPS = ["train.steps=2", "train.ckpt_every=2", "train.eval_every=2", "model.num_nextn_predict_layers=0"]


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("collectives")
    overrides = [*prepare_data(root), *MICRO_MODEL, *MICRO_TRAIN, *PP_MODEL, *STEPS]
    for name in LAYOUTS:
        clone_run(root, name)
    out = root / "found.json"
    torchrun(4, [str(REPO / "tests/dist/collectives_worker.py"), json.dumps(overrides), str(out), *LAYOUTS])
    return json.loads(out.read_text())


def test_the_check_catches_a_host_tensor(found):
    for rank in found:
        assert rank["control"]["calls"] == {"all_reduce": 2}
        assert len(rank["control"]["violations"]) == 1 and "collectives_worker.py" in rank["control"]["violations"][0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_collective_of_the_loop_gets_device_tensors(found, layout):
    for r, rank in enumerate(found):
        calls, violations = rank[layout]["calls"], rank[layout]["violations"]
        assert LAYOUTS[layout] <= set(calls), f"rank {r} {layout}: collectives checked {calls}"
        assert not violations, f"rank {r} {layout}: {len(violations)} host tensors in collectives\n" + "\n".join(
            sorted(set(violations))
        )
