"""The routed experts' grouped matmul: rows sorted by expert, each contiguous group times its expert's weight.

    y[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e].T        for every expert e

`grouped_mm` is one operator (`torch.ops.deepseek_repro.grouped_mm`, a `torch.library.custom_op`) with its own
backward (two more grouped matmuls: dX per group dY @ W, dW per group dY^T @ X). Inside, it runs `torch._grouped_mm`
where this torch build has it for the operands at hand (CPU in fp32 and bf16, CUDA in bf16; K and N multiples of 16
bytes): one call for all experts, with the offsets left on the device, so no host sync. Elsewhere it runs the
readable reference, one matmul per non-empty expert (`grouped_mm_reference`, which reads the offsets on the host).
Being one opaque operator with a shape-only fake implementation, it traces under `torch.compile` (and
`FakeTensorMode`) without a graph break or a data-dependent shape, whichever path runs inside (torch's own
`_grouped_mm` has no fake kernel for fp32).

Shape legend: M rows, K input features, N output features, E experts (groups), E1 = E + 1 offsets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_mm_reference(x_MK: Tensor, w_ENK: Tensor, offsets_E1: Tensor) -> Tensor:
    """[M, N] = per group e: x_MK[offsets[e]:offsets[e+1]] @ w_ENK[e].T (rows sorted by expert, contiguous).

    offsets_E1: int64 [E+1], offsets[0] = 0, offsets[E] = M. The reference: a loop over the experts that received
    rows (one host sync to read the offsets); empty groups cost nothing. Differentiable by autograd itself.
    """
    E = w_ENK.shape[0]
    bounds = offsets_E1.tolist()
    assert len(bounds) == E + 1 and bounds[0] == 0 and bounds[E] == x_MK.shape[0], (bounds, x_MK.shape, E)
    sizes = [bounds[e + 1] - bounds[e] for e in range(E)]
    # split (not slicing): its backward concatenates the row gradients instead of summing E full-size zero tensors
    pieces = [x_e @ w_ENK[e].T for e, x_e in enumerate(torch.split(x_MK, sizes)) if sizes[e] > 0]
    if not pieces:  # nothing routed here (e.g. everything dropped): an empty result that keeps the graph
        return x_MK @ w_ENK[0].T
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def torch_grouped_mm_supports(x_MK: Tensor, w_ENK: Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands here: CPU fp32/bf16 or CUDA bf16, same dtype, rows of K and
    N elements both multiples of 16 bytes (its alignment rule; the operands are made contiguous and fresh or
    parameter storages start aligned). Decided from dtypes and shapes only."""
    if not hasattr(torch, "_grouped_mm") or x_MK.dtype != w_ENK.dtype or x_MK.device != w_ENK.device:
        return False
    dtypes = (torch.float32, torch.bfloat16) if x_MK.device.type == "cpu" else (torch.bfloat16,)
    if x_MK.device.type not in ("cpu", "cuda") or x_MK.dtype not in dtypes or x_MK.shape[0] == 0:
        return False
    N, K, size = w_ENK.shape[1], w_ENK.shape[2], w_ENK.element_size()
    return (N * size) % 16 == 0 and (K * size) % 16 == 0


def _ends(offsets_E1: Tensor) -> Tensor:
    return offsets_E1[1:].to(torch.int32)


def _bounds(offsets_E1: Tensor) -> list[tuple[int, int]]:
    b = offsets_E1.tolist()
    return list(zip(b[:-1], b[1:]))


@torch.library.custom_op("deepseek_repro::grouped_mm", mutates_args=())
def _grouped_mm_nt(x_MK: Tensor, w_ENK: Tensor, offsets_E1: Tensor) -> Tensor:
    if torch_grouped_mm_supports(x_MK, w_ENK):
        return torch._grouped_mm(x_MK.contiguous(), w_ENK.contiguous().transpose(-2, -1), offs=_ends(offsets_E1))
    return grouped_mm_reference(x_MK, w_ENK, offsets_E1).clone()


@torch.library.custom_op("deepseek_repro::grouped_mm_dx", mutates_args=())
def _grouped_mm_nn(dy_MN: Tensor, w_ENK: Tensor, offsets_E1: Tensor) -> Tensor:
    """dX: per group dy_e @ w_e."""
    if torch_grouped_mm_supports(dy_MN, w_ENK):
        return torch._grouped_mm(dy_MN.contiguous(), w_ENK.contiguous(), offs=_ends(offsets_E1))
    out_MK = dy_MN.new_zeros(dy_MN.shape[0], w_ENK.shape[2])
    for e, (a, b) in enumerate(_bounds(offsets_E1)):
        if b > a:
            out_MK[a:b] = dy_MN[a:b] @ w_ENK[e]
    return out_MK


@torch.library.custom_op("deepseek_repro::grouped_mm_dw", mutates_args=())
def _grouped_mm_tn(dy_MN: Tensor, x_MK: Tensor, offsets_E1: Tensor) -> Tensor:
    """dW: per group dy_e^T @ x_e ([E, N, K]; zero for an expert without rows)."""
    E, N, K = offsets_E1.shape[0] - 1, dy_MN.shape[1], x_MK.shape[1]
    w_like = x_MK.new_empty(E, N, K)
    if torch_grouped_mm_supports(x_MK, w_like):
        return torch._grouped_mm(dy_MN.contiguous().t(), x_MK.contiguous(), offs=_ends(offsets_E1))
    out_ENK = x_MK.new_zeros(E, N, K)
    for e, (a, b) in enumerate(_bounds(offsets_E1)):
        if b > a:
            out_ENK[e] = dy_MN[a:b].T @ x_MK[a:b]
    return out_ENK


@_grouped_mm_nt.register_fake
def _(x_MK: Tensor, w_ENK: Tensor, offsets_E1: Tensor) -> Tensor:
    return x_MK.new_empty(x_MK.shape[0], w_ENK.shape[1])


@_grouped_mm_nn.register_fake
def _(dy_MN: Tensor, w_ENK: Tensor, offsets_E1: Tensor) -> Tensor:
    return dy_MN.new_empty(dy_MN.shape[0], w_ENK.shape[2])


@_grouped_mm_tn.register_fake
def _(dy_MN: Tensor, x_MK: Tensor, offsets_E1: Tensor) -> Tensor:
    return x_MK.new_empty(offsets_E1.shape[0] - 1, dy_MN.shape[1], x_MK.shape[1])


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x_MK, w_ENK, offsets_E1 = inputs
    ctx.save_for_backward(x_MK, w_ENK, offsets_E1)


def _backward(ctx, dy_MN: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x_MK, w_ENK, offsets_E1 = ctx.saved_tensors
    dx = _grouped_mm_nn(dy_MN, w_ENK, offsets_E1) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_tn(dy_MN, x_MK, offsets_E1).to(w_ENK.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm_nt.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x_MK: Tensor, w_ENK: Tensor, offsets_E1: Tensor) -> Tensor:
    """[M, N] = per group e: x_MK[offsets[e]:offsets[e+1]] @ w_ENK[e].T, offsets_E1 int64 [E+1] from 0 to M.

    One operator with its own backward: `torch._grouped_mm` inside where supported (`torch_grouped_mm_supports`,
    no host sync), else the loop of `grouped_mm_reference` (see the module docstring)."""
    return _grouped_mm_nt(x_MK, w_ENK, offsets_E1)
