"""The accumulation models the kernel tests take their tolerances from (kernels/accumulation.py), checked on the CPU.

A GPU test passes for the right reason when its bound holds for what the hardware does and fails for what a bug
does. Here the hardware is the model run in PyTorch (``emulate_gemm``: a 14-bit truncating accumulator per
128-slice, with the calibrated update group of 4 and the harsher one of 1), on the kernel tests' own shapes:

- the model's bound holds for the emulated hardware on every entry;
- the tolerance the GPU tests used to have (1e-5 of ||a|| ||b||, exact FP32 inside a slice) does not: it fails
  on a large share of entries, for the wrong reason;
- typical kernel bugs (16 elements of K dropped, a dropped slice, one scale tile off by one row, a row given the next
  expert's weight) exceed the model's bound on most entries.
"""

import pytest
import torch

from kernels import reference as ref
from kernels.accumulation import HOPPER, INTERPRETER, AccumulationModel, emulate_gemm, limited_sum

SHAPES = [(64, 64, 64), (130, 200, 300), (128, 256, 384), (3, 300, 130)]
HOPPER_G1 = AccumulationModel("hopper, one update per product", bits=14, group=1)


def operands(M: int, N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-8, 8, (M, 1), generator=g))
    (a_q, a_s), (b_q, b_s) = ref.act_quant_ref(a), ref.weight_quant_ref(torch.randn(N, K, generator=g))
    a64, b64 = ref.act_dequant_ref(a_q, a_s).double(), ref.weight_dequant_ref(b_q, b_s).double()
    return (a_q, a_s, b_q, b_s), a64, b64


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_emulated_hopper_lies_within_the_hopper_bound_not_the_old_one(M, N, K):
    args, a64, b64 = operands(M, N, K, seed=M + N + K)
    c64 = a64 @ b64.T
    bound = HOPPER.bound(a64, b64)
    old_bound = 1e-5 * a64.norm(dim=1)[:, None] * b64.norm(dim=1)[None, :]
    for hw in (HOPPER, HOPPER_G1):
        err = (emulate_gemm(*args, b_blockwise=True, model=hw).double() - c64).abs()
        assert bool((err <= bound).all()), f"{hw.name}: max err/bound {(err / bound).max():.2f}"
        if hw is HOPPER and K > 64:  # at K=64 the 14 bits still hold most products exactly
            assert (err > old_bound).double().mean() > 0.2, "the old FP32-in-slice tolerance would have held"
    exact = emulate_gemm(*args, b_blockwise=True, model=INTERPRETER).double()
    assert bool(((exact - c64).abs() <= INTERPRETER.bound(a64, b64)).all())


def corruptions(args, K: int) -> dict[str, torch.Tensor]:
    """What typical kernel bugs would compute instead of the GEMM (exactly, so only the bug shows)."""
    a_q, a_s, b_q, b_s = args
    a64, b64 = ref.act_dequant_ref(a_q, a_s).double(), ref.weight_dequant_ref(b_q, b_s).double()
    shifted_s = a_s.clone()
    shifted_s[:, 0] = a_s[:, 0].roll(1)  # slice 0 read with the previous row's scale
    return {
        "last 16 of K dropped": a64[:, : K - 16] @ b64[:, : K - 16].T,  # one vector of a partial tile
        "dropped first slice": a64[:, 128:] @ b64[:, 128:].T,
        "scale of the wrong row": ref.act_dequant_ref(a_q, shifted_s).double() @ b64.T,
        "next expert's weight": a64 @ b64.roll(1, dims=0).T,
    }


@pytest.mark.parametrize("M,N,K", [s for s in SHAPES if s[2] > 128])  # two slices at least
def test_typical_bugs_exceed_the_hopper_bound(M, N, K):
    args, a64, b64 = operands(M, N, K, seed=7 * K)
    c64, bound = a64 @ b64.T, HOPPER.bound(a64, b64)
    for bug, wrong in corruptions(args, K).items():
        caught = ((wrong - c64).abs() > bound).double().mean().item()
        assert caught > 0.5, f"{bug}: only {caught:.0%} of entries exceed the bound"


def test_limited_sum_truncates_to_the_stated_bits():
    """14 significant bits: 1 + 2^-13 survives, 1 + 2^-14 is truncated away; the sum of 8 ones is exact."""
    one = torch.ones(1, 2)
    assert limited_sum(one, torch.tensor([[1.0, 2.0**-13]]), bits=14).item() == 1 + 2.0**-13
    assert limited_sum(one, torch.tensor([[1.0, 2.0**-14]]), bits=14).item() == 1.0
    assert limited_sum(torch.ones(1, 8), torch.ones(1, 8), bits=14, group=4).item() == 8.0
