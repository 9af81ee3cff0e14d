"""How an FP8 GEMM accumulates, stated as numbers: the error models the kernel tests take their tolerances from.

Every GEMM here computes ``C = sum_t s_t * D_t`` over the 128-deep slices t of K, where ``D_t`` is the dot
product of one slice of exact e4m3 values and ``s_t`` the product of the two tiles' scales (the promotion step,
``kernels/fp8_gemm.py``). Two machines run the Triton kernels, and they form ``D_t`` differently:

- ``INTERPRETER`` (Triton on CPU, ``TRITON_INTERPRET=1``): ``tl.dot`` is a numpy FP32 matmul. Products of e4m3
  values are exact in FP32 (8 significant bits), so the only error is FP32 rounding of the sums.
- ``HOPPER`` (an NVIDIA GPU): the WGMMA instructions of one slice accumulate in a Tensor-Core register that keeps
  about 14 significant bits (DeepSeek-V3 report, section 3.3.2: "around 14 bits" on H800; 13 stored mantissa
  bits, as others measured). Modelled as in ``bench/fp8_accumulation.py``: ``bits`` significant bits, truncated
  toward zero after each update, one update per ``group`` products (summed exactly first; ``group=4`` is
  calibrated there to the report's "nearly 2%" at K=4096 without promotion). Across slices the kernel adds in
  FP32, as in the interpreter.

Bounds (``AccumulationModel.bound``). Write ``P = |A| @ |B|^T`` for the dequantized operands: the sum of the
magnitudes of the products, which bounds every partial sum in any order. Each truncation loses less than one
unit in the last of ``bits`` places of the running sum, i.e. ``< 2^(1 - bits) * P_t``; a slice of 128 has
``128 / group`` updates. FP32 sums of n terms err by at most ``n * 2^-24`` of the sum of magnitudes (any order,
with or without FMA). So, per element::

    interpreter: |C - C_exact| <= (128 + 2 + Kt) * 2^-24 * P
    hopper:      |C - C_exact| <= ((128 / group) * 2^(1 - bits) + (2 + Kt) * 2^-24) * P

(2: the two scale multiplications; Kt: the FP32 sum over slices), with a 1% margin for the second-order terms.
These are worst cases *under the model*: a kernel that passes on a GPU passes because its error is what a
14-bit accumulator makes, and one that drops a slice, misreads a scale or crosses an expert boundary fails
(``tests/kernels/test_accumulation.py`` checks both against ``emulate_gemm``, this model run on the CPU).

Shape legend: M rows of A/C, N rows of B = columns of C, K reduction dim, Kt = ceil(K / 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.reference import TILE, act_dequant_ref, cdiv, weight_dequant_ref

FP32_UNIT = 2.0**-24  # unit roundoff of FP32 round-to-nearest
MARGIN = 1.01  # second-order terms of the bounds


@dataclass(frozen=True)
class AccumulationModel:
    """How one 128-deep slice is summed: ``bits`` significant bits (None: FP32), one update per ``group`` products."""

    name: str
    bits: int | None
    group: int = 1

    def slice_error(self) -> float:
        """Bound on the error of one slice's dot product, relative to its sum of |products|."""
        if self.bits is None:
            return TILE * FP32_UNIT
        return (TILE // self.group) * 2.0 ** (1 - self.bits)

    def bound(self, a_abs_MK: torch.Tensor, b_abs_NK: torch.Tensor, K: int | None = None) -> torch.Tensor:
        """Per-element bound on ``|C - C_exact|`` (float64 ``[M, N]``) from the dequantized operands' magnitudes.

        ``K`` (default: the operands' width) sets the number of slices summed in FP32.
        """
        K = a_abs_MK.shape[1] if K is None else K
        rel = self.slice_error() + (2 + cdiv(max(K, 1), TILE)) * FP32_UNIT
        P_MN = a_abs_MK.double().abs() @ b_abs_NK.double().abs().T
        return MARGIN * rel * P_MN


INTERPRETER = AccumulationModel("interpreter", bits=None)
HOPPER = AccumulationModel("hopper", bits=14, group=4)


def model_for(device: torch.device | str) -> AccumulationModel:
    """The model of the machine that runs the Triton kernels on ``device``: a CUDA GPU, else the interpreter."""
    return HOPPER if torch.device(device).type == "cuda" else INTERPRETER


def truncate_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep ``bits`` significant bits of fp32 ``x`` (the implicit one included), truncating toward zero."""
    mask = ~((1 << (24 - bits)) - 1)
    return (x.view(torch.int32) & mask).view(torch.float32)


def limited_sum(a_MK: torch.Tensor, b_NK: torch.Tensor, bits: int, group: int = 1) -> torch.Tensor:
    """``sum_k a[:, k] b[:, k]`` in a ``bits``-bit accumulator updated once per ``group`` products (each group
    summed exactly first; products of e4m3 values are exact in fp32)."""
    acc_MN = torch.zeros(a_MK.shape[0], b_NK.shape[0])
    for k in range(0, a_MK.shape[1], group):
        partial_MN = a_MK[:, k : k + group].double() @ b_NK[:, k : k + group].double().T
        acc_MN = truncate_to_bits((acc_MN.double() + partial_MN).float(), bits)
    return acc_MN


def emulate_gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    *,
    b_blockwise: bool,
    model: AccumulationModel = HOPPER,
) -> torch.Tensor:
    """``A @ B^T`` as our kernels compute it on a machine of ``model``: each 128-slice summed by the model, then
    scaled and added in FP32 (fp32 ``[M, N]``). Operands as for ``kernels.fp8_gemm.fp8_gemm_nt``; CPU only."""
    a_MK = a_q.float()
    b_NK = b_q.float()
    a32_MK = act_dequant_ref(torch.ones_like(a_q, dtype=torch.float32), a_s)  # the scale of each element
    b32_NK = (weight_dequant_ref if b_blockwise else act_dequant_ref)(torch.ones_like(b_q, dtype=torch.float32), b_s)
    (M, K), N = a_MK.shape, b_NK.shape[0]
    acc_MN = torch.zeros(M, N)
    for k0 in range(0, K, TILE):
        sl = slice(k0, min(k0 + TILE, K))
        if model.bits is None:
            d_MN = a_MK[:, sl] @ b_NK[:, sl].T
        else:
            d_MN = limited_sum(a_MK[:, sl], b_NK[:, sl], model.bits, model.group)
        acc_MN += d_MN * a32_MK[:, k0, None] * b32_NK[None, :, k0]
    return acc_MN
