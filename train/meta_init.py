"""Meta-device initialization (`train.meta_init`): no rank ever holds the whole model.

The model is built on the meta device (shapes only), parallelized there (EP, FSDP2, pipeline stages), and only then
given memory (`to_empty`) and values. The values are those of the model's own `init_weights()` (DeepSeek's
init: normal matrices, unit norms, zero biases): `init_plan` records, on the meta model, which in-place fill
`init_weights` applies to which tensor (`normal_(0, std)`, `fill_(1)`, `zero_()`), and `materialize` replays each
fill on a full-size tensor on the device, one tensor at a time, and keeps this rank's part of it (its FSDP/EP
shard, or all of it). Every tensor's random draw comes from its own generator, seeded from the run's seed and the
tensor's name, so the weights are the same under every layout, and a rank skips the tensors it does not hold
(another pipeline stage's layers) without shifting anyone's draws. They are not the same draw as building the
model on the device (whose constructors consume the global generator first): a meta-initialized run is
reproducible against meta-initialized runs.

Peak memory while materializing: this rank's shards plus the largest single tensor, in full.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

_FILLS = {"normal_", "uniform_", "fill_", "zero_", "ones_", "zeros_", "trunc_normal_"}
_RANDOM = {"normal_", "uniform_", "trunc_normal_"}
Fill = tuple[str, object, tuple, dict]  # (tensor name, the torch function or Tensor method name, args, kwargs)


class _RecordFills(TorchFunctionMode):
    """Records the in-place fills (Tensor methods and `torch.nn.init` functions) applied to each tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, object, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _FILLS:
            rest = {k: v for k, v in kwargs.items() if k not in ("tensor", "generator")}
            target = kwargs["tensor"] if "tensor" in kwargs else args[0]
            method = func.__name__ if getattr(func, "__module__", None) != "torch.nn.init" else func
            self.calls.append((id(target), method, tuple(args[1:] if "tensor" not in kwargs else args), rest))
        return func(*args, **kwargs)


def init_plan(model: nn.Module) -> list[Fill]:
    """(tensor name, fill, args, kwargs) of every in-place fill `model.init_weights()` applies, in order; checks
    that every parameter and buffer gets one (a tensor left out would hold garbage after `to_empty`)."""
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    with _RecordFills() as rec, torch.no_grad():
        model.init_weights()
    plan = [(names[i], fill, args, kwargs) for i, fill, args, kwargs in rec.calls if i in names]
    missing = sorted(set(names.values()) - {name for name, *_ in plan})
    if missing:
        raise ValueError(f"train.meta_init: init_weights() leaves {len(missing)} tensors uninitialized: {missing[:5]}")
    return plan


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def materialize(module: nn.Module, plan: list[Fill], device: torch.device, seed: int) -> None:
    """Give `module` (parallelized, on the meta device) memory on `device` and the values of `plan` (see the module
    docstring). `module` may hold a subset of the planned tensors (a pipeline rank's view)."""
    module.to_empty(device=device)
    held = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    for name, fill, args, kwargs in plan:
        t = held.get(name)
        if t is None:
            continue
        full = torch.empty(t.shape, dtype=t.dtype, device=device)  # a DTensor's shape is the global one
        if getattr(fill, "__name__", fill) in _RANDOM:
            kwargs = {**kwargs, "generator": _generator(seed, name, device)}
        if isinstance(fill, str):
            getattr(full, fill)(*args, **kwargs)
        else:
            fill(full, *args, **kwargs)
        if isinstance(t, DTensor):
            # this rank's part, cut locally (src_data_rank=None: every rank made the same full tensor)
            t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local())
        else:
            t.copy_(full)
