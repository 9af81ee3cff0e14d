"""Host syncs per optimizer step of the pretraining loop, counted on CPU by the calls that would block on a GPU.

    python -m bench.host_syncs                              # single process and 2-rank FSDP+EP, log_every 1 and 10
    python -m bench.host_syncs --layouts single --log-every 1

On a GPU, every read of a device value by the host (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `.cpu()`,
`.numpy()`, `.to("cpu")`, `nonzero`, boolean-mask indexing, `bincount`, `unique`) waits for the queued kernels:
a "host sync". A CPU has no queue, so these calls cost nothing here, but their count is the same program property:
`torch.cuda.set_sync_debug_mode("warn")` is the GPU-side truth, this count is its CPU proxy. A
`TorchFunctionMode` counts each such call on a tensor that would live on the GPU (tests/dist/host_tensors.py tracks
which do) made while the real loop (`train.pretrain.run`) trains the `tiny` preset on the e2e tests' synthetic
corpus, and attributes it to the file of the first repository frame on the stack (or `torch` for torch's own).
On a CPU the EMA takes its CPU path (a plain lerp after `.to("cpu")`, counted as device -> host copies); on a GPU
it copies to pinned host memory without blocking (train/ema.py), which this count cannot see: its column is apart.
Per step = (count over S2 steps - count over S1 steps) / (S2 - S1), so setup, the final evaluation and checkpoints
cancel out (both runs evaluate and save only at their last step).

Rows go to bench/results/host_syncs.csv (one per layout and log_every).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from tests.dist.host_tensors import HostTensorMode, is_host, repo_caller

REPO = Path(__file__).resolve().parents[1]
_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}
_SYNC_OPS = {"nonzero", "argwhere", "masked_select", "unique", "bincount", "repeat_interleave", "equal"}
LAYOUTS = {  # name -> (processes, overrides)
    "single": (1, []),
    "fsdp_ep": (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
}


class SyncCounter(HostTensorMode):
    """Counts the calls that read a device tensor on the host, by repository file of the caller. Which tensors are
    device tensors is tracked by `HostTensorMode` (tests/dist/host_tensors.py): reading a host tensor (an optimizer's
    step counter, a batch before `.to(device)`) costs no sync on a GPU either."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sync = name in _SYNC_METHODS or name in _SYNC_OPS
        if name == "to":  # a copy to the host (D2H)
            dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
            sync = isinstance(dev, str) and torch.device(dev).type == "cpu" and not kwargs.get("non_blocking")
        if name == "__getitem__" and len(args) > 1:  # a boolean mask index has a data-dependent shape
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            sync = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and not is_host(i) for i in idx)
        elif sync:
            sync = bool(args) and isinstance(args[0], torch.Tensor) and not is_host(args[0])
        if sync:
            caller = repo_caller()
            self.counts[caller.split(":")[0] if caller else "torch"] += 1
        return super().__torch_function__(func, types, args, kwargs)


def _data(root: Path) -> list[str]:
    from data.prepare import run as prepare
    from pipeline.config import compose
    from tests.e2e.corpus import write_corpus

    corpus = write_corpus(root / "corpus.jsonl")
    overrides = [
        f"run.root={root}",
        "wandb.mode=disabled",
        "data=smoke",
        f"data.sources=[{{kind: files, paths: ['{corpus}'], path_field: path}}]",
        "data.decontam.enabled=false",
        "data.tokenizer.vocab_size=512",
    ]
    prepare(compose([*overrides, "run.name=base"]))
    return overrides


def count(overrides: list[str], name: str, steps: int, log_every: int) -> Counter:
    """Host syncs of one run of `steps` steps (this process's)."""
    import shutil

    from pipeline.config import compose
    from train.pretrain import run

    root = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.root=")))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not (root / name / "data").exists():
        shutil.copytree(root / "base" / "data", root / name / "data")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    train = [
        "train=smoke",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        f"train.log_every={log_every}",
        "train.export_hf=false",
        "train.resume=none",
        f"run.name={name}",
    ]
    cfg = compose([*overrides, *train])
    with SyncCounter() as counter:
        run(cfg)
    return counter.counts


def worker(overrides: list[str], layout: str, s1: int, s2: int, log_every: int, out: Path) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    extra = LAYOUTS[layout][1]
    c1 = count([*overrides, *extra], f"{layout}_{s1}_{log_every}", s1, log_every)
    c2 = count([*overrides, *extra], f"{layout}_{s2}_{log_every}", s2, log_every)
    per_step = {k: (c2[k] - c1[k]) / (s2 - s1) for k in sorted(set(c1) | set(c2))}
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(per_step))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--log-every", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--steps", nargs=2, type=int, default=[10, 30], help="S1 S2")
    ap.add_argument("--label", default="", help="a note for the rows (e.g. 'before')")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    s1, s2 = args.steps
    if args.worker:
        overrides, layout, log_every, out = args.worker
        worker(json.loads(overrides), layout, s1, s2, int(log_every), Path(out))
        return
    from bench.common import append_result

    with tempfile.TemporaryDirectory() as tmp:
        overrides = _data(Path(tmp))
        for layout in args.layouts:
            nproc = LAYOUTS[layout][0]
            for log_every in args.log_every:
                out = Path(tmp) / f"{layout}_{log_every}.json"
                cell = [
                    "--steps",
                    str(s1),
                    str(s2),
                    "--worker",
                    json.dumps(overrides),
                    layout,
                    str(log_every),
                    str(out),
                ]
                launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "bench.host_syncs", *cell]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
                env.setdefault("PYTHONPATH", str(REPO))
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    raise RuntimeError(f"{layout} failed:\n{proc.stderr[-4000:]}")
                per_step = json.loads(out.read_text())
                row = {
                    "layout": layout,
                    "nproc": nproc,
                    "log_every": log_every,
                    "syncs_per_step": sum(per_step.values()),
                    **{f"syncs_{k}": v for k, v in per_step.items()},
                    "label": args.label,
                }
                append_result("host_syncs", row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
