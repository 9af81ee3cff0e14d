"""Which tensors live on the host: an emulation of "device != CPU" on a CPU-only machine, for the NCCL-safety test
(tests/dist/test_collectives_on_device.py) and the host-sync count (bench/host_syncs.py).

On a GPU, a tensor made by a factory without `device=` (`torch.tensor([...])`, `torch.zeros(n)`), by
`torch.from_numpy`, or copied back by `.cpu()` / `.to("cpu")` lives in host memory, and NCCL refuses it ("No
backend type associated with device type cpu"); everything computed from the model's parameters and the batches
moved `.to(device)` lives on the GPU. On a CPU both are CPU tensors, and gloo takes either, so a test on CPU cannot
see the difference, unless it tracks it. `HostTensorMode` (a `TorchFunctionMode`) does, by provenance:

- host: factory calls without a `device` argument, `from_numpy` / `frombuffer`, `.cpu()`, `.to("cpu")` (a string),
  `.pin_memory()`;
- device: factory calls with a `device` argument (any), `.to(<torch.device>)`, and all other tensors (parameters,
  buffers moved with the model, autograd's gradients);
- any other op: its outputs are host when an input of more than 0 dimensions is host, or when every tensor input is
  (a 0-dim host tensor combined with device tensors is legal on CUDA); `copy_` and item assignment keep the
  destination's side.

`CollectiveCheck` then wraps the tensor collectives of `torch.distributed` and records every call made from this
repository's code (torch's own, e.g. FSDP's, are FSDP's business) whose tensors include a host tensor. (`isend` /
`irecv` are left alone: `P2POp` checks their identity, and only torch's pipelining calls them.)
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[2]
_FACTORIES = {
    "tensor",
    "as_tensor",
    "asarray",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "range",
    "linspace",
    "logspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "randperm",
    "scalar_tensor",
    "empty_strided",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "randint_like",
}
_HOST_MAKERS = {"from_numpy", "frombuffer", "cpu", "pin_memory"}
_KEEP_DESTINATION = {"copy_", "__setitem__"}
_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "gather",
    "scatter",
)


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_on_host", False)


def _mark(out, host: bool) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            t._on_host = host


def repo_caller(depth: int = 2) -> str | None:
    """`path:line` of the innermost frame of this repository's code above the caller (None: none)."""
    f = sys._getframe(depth)
    while f is not None:
        path = Path(f.f_code.co_filename)
        if REPO in path.parents and ".venv" not in path.parts and path.name != "host_tensors.py":
            return f"{path.relative_to(REPO)}:{f.f_lineno}"
        f = f.f_back
    return None


class HostTensorMode(TorchFunctionMode):
    """Tags every tensor made while active as host or device (see the module docstring): `is_host(t)`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _FACTORIES:
            _mark(out, "device" not in kwargs and (is_host(args[0]) if name.endswith("_like") else True))
        elif name in _HOST_MAKERS:
            _mark(out, True)
        elif name == "to":
            dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
            if dev is not None:
                _mark(out, isinstance(dev, str) and torch.device(dev).type == "cpu")
            elif is_host(args[0]):
                _mark(out, True)
        elif name in _KEEP_DESTINATION:
            pass
        else:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            hosts = [t for t in tensors if is_host(t)]
            if hosts and (any(t.dim() > 0 for t in hosts) or len(hosts) == len(tensors)):
                _mark(out, True)
        return out


class CollectiveCheck:
    """While active, every tensor collective of `torch.distributed` called from this repository's code is checked:
    `calls` counts them by op, `violations` lists those given a host tensor (op, caller, shapes)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.violations: list[str] = []
        self._saved: dict = {}

    def __enter__(self) -> CollectiveCheck:
        for name in _COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original):
        def checked(*args, **kwargs):
            caller = repo_caller()
            if caller is not None:
                self.calls[name] += 1
                tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                host = [tuple(t.shape) for t in tensors if is_host(t)]
                if host:
                    self.violations.append(f"{name} at {caller}: host tensor(s) of shape {host}")
            return original(*args, **kwargs)

        return checked

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
