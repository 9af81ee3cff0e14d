"""Worker for tests/dist/test_collectives_on_device.py: the real pretraining loop (`train.pretrain.run`) under the
layouts named on the command line, each run with `HostTensorMode` and `CollectiveCheck` installed
(tests/dist/host_tensors.py), so that every collective this repository's code calls is checked for host tensors
(what NCCL refuses). Every rank's findings are gathered; rank 0 writes them as JSON to argv[2].

    torchrun --standalone --nproc_per_node=4 tests/dist/collectives_worker.py '<json overrides>' out.json hsdp2x2_ep2 ...
"""

import json
import sys

import torch
import torch.distributed as dist

from pipeline.config import compose
from tests.dist.dist_common import LAYOUTS, layout_overrides
from tests.dist.host_tensors import CollectiveCheck, HostTensorMode
from train.pretrain import run


def main() -> None:
    overrides, out, names = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    found: dict = {}
    with HostTensorMode(), CollectiveCheck() as check:  # the control: a host tensor handed to a collective here
        dist.all_reduce(torch.zeros(1))
        dist.all_reduce(torch.zeros(1, device=torch.device("cpu")))  # made on the device: passes
    found["control"] = {"calls": dict(check.calls), "violations": check.violations}
    for name in names:
        cfg = compose([*overrides, f"run.name={name}", *layout_overrides(LAYOUTS[name])])
        with HostTensorMode(), CollectiveCheck() as check:
            run(cfg)
        found[name] = {"calls": dict(check.calls), "violations": check.violations}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, found)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(ranks, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
