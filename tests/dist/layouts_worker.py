"""Worker for tests/dist/test_hsdp.py and test_pp_loop.py: ONE torchrun launch trains the micro model with the
real pretraining loop (`train.pretrain.run`) under every layout named on the command line (dist_common.LAYOUTS),
one after the other, each into its own run directory (root/<layout>/pretrain). The pytest side compares them with
a single-process run.

    torchrun --standalone --nproc_per_node=4 tests/dist/layouts_worker.py '<json overrides>' ddp4 fsdp4 ...

The process group is created here once and reused by every run (`run` leaves a caller's group alone), which saves
a torchrun launch (5-7 s on 2 cores) per layout. A bf16 layout runs at debug level DETAIL: the pipelining schedules
then check every tensor sent between stages against the buffers declared for it (dtype, shape). (Not every layout:
under DETAIL, torch 2.13's DualPipeV with MTP trips on a stride of the balance loss's gradient.)
"""

import json
import logging
import sys

import torch.distributed as dist

from pipeline.config import compose
from tests.dist.dist_common import LAYOUTS, layout_overrides
from train.pretrain import run


def main() -> None:
    overrides, names = json.loads(sys.argv[1]), sys.argv[2:]
    root = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.root="))
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:  # the stages' messages ("resumed from ...") on stdout, as Hydra's job logging gives a CLI
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    for name in names:
        layout = [o.replace("{root}", root) for o in layout_overrides(LAYOUTS[name])]  # a layout may name a checkpoint
        cfg = compose([*overrides, f"run.name={name}", *layout])
        dist.set_debug_level(dist.DebugLevel.DETAIL if name.endswith("bf16") else dist.DebugLevel.OFF)
        result = run(cfg)
        if dist.get_rank() == 0:
            print(f"{name}: {result}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
