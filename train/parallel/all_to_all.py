"""Autograd-aware all-to-all with uneven splits, optionally asynchronous and optionally FP8 on the wire.

Why a custom autograd op
------------------------
Expert parallelism moves token rows between ranks twice per MoE layer: *dispatch* (each token to the ranks that own
its experts) and *combine* (expert outputs back home). Both are ``all_to_all_single`` with uneven split sizes:
rank r sends ``input_splits[j]`` rows to rank j and receives ``output_splits[j]`` rows from it. The op is linear, and
its adjoint is the same op with the splits swapped: a row sent r -> j in forward carries its gradient j -> r in
backward. So backward is one reverse all-to-all of the incoming gradient.

torch's functional collectives have ``all_to_all_single_autograd`` (it works on gloo here), but we need two things
it does not give: an explicit start/wait pair, so the shared experts compute while the dispatch is in flight
(DeepSeek-V3 overlaps communication with computation), and a quantized payload.

Start / wait
------------
``all_to_all_start`` launches the collective (``async_op=True``) on a detached payload and returns a
``PendingAllToAll``; ``wait()`` blocks on the work, decodes the payload and returns a tensor that autograd links to
the original input through ``_AllToAllFinish``: the graph is built at wait time, the bytes moved at start time.

Payload ("wire") formats
------------------------
- ``None``: the input dtype as is.
- ``"bfloat16"``: cast before sending, cast back to the input dtype on arrival (DeepSeek-V3's combine).
- ``"fp8"``: per-token (row) quantization to float8_e4m3fn with an fp32 scale amax/448, the scale's 4 bytes
  appended to the row, the whole row sent as uint8 (gloo has no fp8 dtype), dequantized on arrival
  (DeepSeek-V3 sends dispatched activations in FP8). Gradients are sent back in bfloat16 (straight-through:
  the quantization is treated as the identity in backward).

Legend: N rows sent, M rows received, D features per row, R ranks in the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PendingAllToAll", "all_to_all", "all_to_all_start", "dequantize_rows_fp8", "quantize_rows_fp8"]

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
WIRE_FORMATS = (None, "bfloat16", "fp8")


def quantize_rows_fp8(x_ND: Tensor) -> Tensor:
    """Rows of ``x_ND`` as uint8 [N, D + 4]: D e4m3 bytes, then the row's fp32 scale (amax / 448) as 4 bytes."""
    amax_N1 = x_ND.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale_N1 = amax_N1 / FP8_MAX
    q_ND = (x_ND.detach().float() / scale_N1).to(torch.float8_e4m3fn)
    return torch.cat([q_ND.view(torch.uint8), scale_N1.reshape(-1).view(torch.uint8).view(-1, 4)], dim=-1)


def dequantize_rows_fp8(packed_ND4: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize_rows_fp8``: uint8 [N, D + 4] -> [N, D] in ``dtype``."""
    q_ND = packed_ND4[:, :-4].contiguous().view(torch.float8_e4m3fn)
    scale_N1 = packed_ND4[:, -4:].clone(memory_format=torch.contiguous_format).view(torch.float32)  # fresh storage
    return (q_ND.float() * scale_N1).to(dtype)


def _encode(x_ND: Tensor, wire: str | None) -> Tensor:
    if wire is None:
        return x_ND.detach().contiguous()
    if wire == "bfloat16":
        return x_ND.detach().to(torch.bfloat16).contiguous()
    return quantize_rows_fp8(x_ND)


def _decode(buf: Tensor, wire: str | None, dtype: torch.dtype) -> Tensor:
    if wire == "fp8":
        return dequantize_rows_fp8(buf, dtype)
    return buf.to(dtype)


def _exchange(x: Tensor, output_splits: list[int], input_splits: list[int], group, async_op: bool):
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=async_op)
    return out, work


class _AllToAllFinish(torch.autograd.Function):
    """Forward: wait for the in-flight exchange and decode it (``x`` itself is only the autograd anchor).
    Backward: send the gradient back along the reverse route."""

    @staticmethod
    def forward(ctx, x_ND, pending: PendingAllToAll):
        ctx.route = (pending.input_splits, pending.output_splits, pending.group)
        ctx.grad_wire = "bfloat16" if pending.wire == "fp8" else pending.wire
        pending.work.wait()
        return _decode(pending.buffer, pending.wire, x_ND.dtype)

    @staticmethod
    def backward(ctx, grad_MD):
        output_splits, input_splits, group = ctx.route  # reversed: what arrived goes back where it came from
        buf, _ = _exchange(_encode(grad_MD, ctx.grad_wire), output_splits, input_splits, group, async_op=False)
        return buf.to(grad_MD.dtype), None


class PendingAllToAll:
    """An all-to-all in flight; ``wait()`` returns the received rows [M, D], differentiable w.r.t. the input."""

    def __init__(self, x_ND: Tensor, output_splits: list[int], input_splits: list[int], group, wire: str | None):
        self.x_ND, self.group, self.wire = x_ND, group, wire
        self.output_splits, self.input_splits = output_splits, input_splits
        self.buffer, self.work = _exchange(_encode(x_ND, wire), output_splits, input_splits, group, async_op=True)

    def wait(self) -> Tensor:
        return _AllToAllFinish.apply(self.x_ND, self)


def _check(x_ND: Tensor, output_splits: list[int], input_splits: list[int], group, wire: str | None) -> None:
    if wire not in WIRE_FORMATS:
        raise ValueError(f"wire must be one of {WIRE_FORMATS}, got {wire!r}")
    world = dist.get_world_size(group)
    if len(output_splits) != world or len(input_splits) != world:
        raise ValueError(f"need {world} split sizes, got output {len(output_splits)}, input {len(input_splits)}")
    if sum(input_splits) != x_ND.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)} but the input has {x_ND.shape[0]} rows")
    if wire == "fp8" and x_ND.dim() != 2:
        raise ValueError(f"fp8 wire format quantizes rows of a 2-D tensor, got shape {tuple(x_ND.shape)}")


def all_to_all_start(
    x_ND: Tensor, output_splits: list[int], input_splits: list[int], group=None, wire: str | None = None
) -> PendingAllToAll:
    """Launch an uneven all-to-all of the rows of ``x_ND``; compute something else, then call ``.wait()``."""
    _check(x_ND, output_splits, input_splits, group, wire)
    return PendingAllToAll(x_ND, list(output_splits), list(input_splits), group, wire)


def all_to_all(
    x_ND: Tensor, output_splits: list[int], input_splits: list[int], group=None, wire: str | None = None
) -> Tensor:
    """Synchronous, differentiable uneven all-to-all: rank r sends ``x_ND[rows for j]`` to every rank j."""
    return all_to_all_start(x_ND, output_splits, input_splits, group, wire).wait()
