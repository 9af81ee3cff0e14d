"""Quantization kernels: bit-exact against torch's own float8_e4m3fn cast and against kernels.reference.

Tolerance: none. Every byte of the e4m3 output and every scale (fp32, or ue8m0 exponent byte) must be equal; NaN
is compared by position (its sign/payload byte is not part of the contract). Both cast paths are tested against
torch: the bit-built one everywhere, the native one on a GPU (the interpreter's own cast is wrong, so there it
is only checked where that cast is exact, which shows the native branch is wired right).
"""

import pytest
import torch

from kernels import quant
from kernels import reference as ref

FP8 = torch.float8_e4m3fn


def assert_same_fp8(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor | None = None) -> None:
    assert got.dtype == FP8 and want.dtype == FP8 and got.shape == want.shape
    got_f, want_f = got.float().cpu(), want.float().cpu()
    nan = want_f.isnan()
    assert torch.equal(got_f.isnan(), nan), "NaN positions differ"
    bad = (got.view(torch.uint8).cpu() != want.view(torch.uint8).cpu()) & ~nan
    if bad.any():
        where = bad.nonzero()[:8].tolist()
        inputs = x.flatten()[bad.flatten()][:8].tolist() if x is not None else "?"
        raise AssertionError(f"{int(bad.sum())} bytes differ at {where}; inputs {inputs}")


def cast_test_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # log-spread over e4m3's whole range and beyond: 2^-14 (below the smallest subnormal 2^-9) to 2^10
    exps = torch.randint(-14, 11, (20000,), generator=g).float()
    logspread = (
        (torch.rand(20000, generator=g) + 1.0)
        * torch.exp2(exps)
        * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    )
    every_e4m3 = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = every_e4m3[every_e4m3.isfinite()].unique()  # sorted, includes subnormals and +-448
    ties = (finite[1:] + finite[:-1]) / 2  # exact midpoints: round-half-to-even decides
    near_ties = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    special = torch.tensor(
        [
            0.0,
            -0.0,
            448.0,
            -448.0,
            448.5,
            463.9,
            464.0,
            470.0,
            480.0,
            -500.0,
            1e6,
            -1e30,
            3e38,
            float("inf"),
            float("-inf"),
            float("nan"),
            2**-9,
            2**-10,
            3 * 2**-10,
            2**-6 - 2**-10,
            2**-6 - 2**-11,
            1e-40,
            -1e-45,
            2**-126,
        ],
    )
    return torch.cat([logspread, finite, ties, near_ties, special])


def test_cast_matches_torch_bit_for_bit(device):
    x = cast_test_values()
    want = x.clamp(-448.0, 448.0).to(FP8)  # torch's RNE cast, saturated (torch's own cast turns >=480 into NaN)
    assert_same_fp8(quant.cast_to_e4m3(x.to(device), native=False), want, x)  # the bit-built path
    assert_same_fp8(quant.cast_to_e4m3(x.to(device)), want, x)  # the default path of this machine (the switch)
    assert quant.NATIVE is (device == "cuda")
    # the reference helper is the same thing
    assert_same_fp8(ref.cast_to_e4m3(x), want, x)


@pytest.mark.gpu
def test_native_cast_matches_torch_on_gpu():
    """The hardware conversion (cvt.rn.satfinite) and the native bf16 store give torch's bits."""
    x = cast_test_values().cuda()
    want = x.clamp(-448.0, 448.0).to(FP8)
    assert_same_fp8(quant.cast_to_e4m3(x, native=True), want, x.cpu())
    q, s = quant.act_quant(x[:19968].view(156, 128), native=True)
    xb = quant.act_dequant(q, s, torch.bfloat16, native=True)
    assert torch.equal(xb, quant.act_dequant(q, s, torch.float32).to(torch.bfloat16))


def test_native_branch_agrees_where_the_interpreter_cast_is_exact(device):
    """Finite e4m3 values that are not NaN are cast exactly by every backend: there both paths must agree."""
    every = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    exact = every[every.isfinite()]
    exact = torch.cat([exact, exact * 0 + 448.0, torch.tensor([500.0, -1e6])])  # and saturation, done by the clamp
    native = quant.cast_to_e4m3(exact.to(device), native=True)
    built = quant.cast_to_e4m3(exact.to(device), native=False)
    assert_same_fp8(native, built, exact)


SHAPES = [(1, 1), (3, 96), (5, 128), (33, 200), (130, 257)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_act_quant_matches_reference(shape, dtype, fmt, device):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, (shape[0], 1), generator=g))).to(dtype)
    x[0, : min(3, shape[1])] = 0.0  # a zero prefix; and for the (1, 1) case an all-zero tile
    q, s = quant.act_quant(x.to(device), fmt)
    q_ref, s_ref = ref.act_quant_ref(x, fmt)
    assert s.shape == (shape[0], -(-shape[1] // 128)) and s.dtype == ref.scale_dtype(fmt)
    assert torch.equal(s.cpu(), s_ref), f"scales differ, max {(s.cpu() - s_ref).abs().max()}"
    assert_same_fp8(q, q_ref, x)
    x_back = quant.act_dequant(q, s).cpu()
    assert torch.equal(x_back, ref.act_dequant_ref(q_ref, s_ref))
    x_bf16 = quant.act_dequant(q, s, torch.bfloat16).cpu()  # kernel-side RNE rounding to bf16
    assert torch.equal(x_bf16, x_back.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (130, 257), (256, 64)])
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("in_fmt", ["fp32", "ue8m0"])
def test_act_quant_transposed_matches_reference(shape, fmt, in_fmt, device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * 5
    q, s = quant.act_quant_t(x.to(device), fmt=fmt)
    q_ref, s_ref = ref.act_quant_t_ref(x, fmt=fmt)
    assert q.shape == (shape[1], shape[0]) and s.shape == (shape[1], -(-shape[0] // 128))
    assert torch.equal(s.cpu(), s_ref)
    assert_same_fp8(q, q_ref)
    # rows padded to whole 128-token tiles, zeros in the padding (the grouped Wgrad reads whole tiles)
    Mp = -(-shape[0] // 128) * 128
    assert q.stride() == (Mp, 1)
    padding = q.as_strided((shape[1], Mp - shape[0]), (Mp, 1), q.storage_offset() + shape[0])
    assert bool((padding.view(torch.uint8) == 0).all())
    # fused dequantize -> transpose -> requantize of a cached e4m3 activation (its scales in either format)
    xq, xs = ref.act_quant_ref(x, in_fmt)
    q2, s2 = quant.act_quant_t(xq.to(device), xs.to(device), fmt=fmt)
    q2_ref, s2_ref = ref.act_quant_t_ref(xq, xs, fmt=fmt)
    assert torch.equal(s2.cpu(), s2_ref)
    assert_same_fp8(q2, q2_ref)


def test_quant_reads_row_strided_inputs_in_place(device):
    """A slice of a wider activation is quantized through its row stride, with the same bits as a copy."""
    wide = torch.randn(40, 300, generator=torch.Generator().manual_seed(6)).to(device)
    view = wide[:, 50:250]
    q, s = quant.act_quant(view)
    q_ref, s_ref = ref.act_quant_ref(view.cpu().contiguous())
    assert torch.equal(s.cpu(), s_ref)
    assert_same_fp8(q, q_ref)


def test_quant_addresses_past_2_31(device):
    """int64 row offsets: the launchers read row-strided inputs in place, and rows 2^23 elements apart put the last
    of 260 rows 2.2e9 elements from the first (int32 offsets would wrap); quantized like a dense copy."""
    M, K, stride = 260, 128, 1 << 23
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(12))
    big = torch.empty((M - 1) * stride + K, dtype=torch.float32, device=device)  # untouched pages cost nothing
    x_far = big.as_strided((M, K), (stride, 1))
    x_far.copy_(x.to(device))
    q, s = quant.act_quant(x_far)
    q_ref, s_ref = ref.act_quant_ref(x)
    assert torch.equal(s.cpu(), s_ref)
    assert_same_fp8(q, q_ref)
    qt, st = quant.act_quant_t(x_far)
    qt_ref, st_ref = ref.act_quant_t_ref(x)
    assert torch.equal(st.cpu(), st_ref)
    assert_same_fp8(qt, qt_ref)


@pytest.mark.parametrize("shape", [(64, 96), (200, 300), (3, 70, 130)])
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_weight_quant_matches_reference(shape, fmt, device):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    q, s = quant.weight_quant(w.to(device), fmt)
    q_ref, s_ref = ref.weight_quant_ref(w, fmt)
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    assert torch.equal(s.cpu(), s_ref)
    assert_same_fp8(q, q_ref, w.float())


def test_reference_numerics_from_first_principles():
    """The reference itself: scale = amax/448 per tile, zero padding is inert, ue8m0 scales are 2^k >= amax/448."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 200, generator=g)
    q, s = ref.act_quant_ref(x)
    amax = torch.stack([x[:, :128].abs().amax(1), x[:, 128:].abs().amax(1)], dim=1)
    assert torch.equal(s, amax / 448.0)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((7,), 448.0))  # the max element maps to 448
    padded = torch.nn.functional.pad(x, (0, 56))
    q_pad, s_pad = ref.act_quant_ref(padded)
    assert torch.equal(q_pad[:, :200].view(torch.uint8), q.view(torch.uint8)) and torch.equal(s_pad, s)
    # dequantization error is at most half an e4m3 ulp (relative 2^-4) in the normal range
    err = (ref.act_dequant_ref(q, s) - x).abs()
    assert bool((err <= x.abs() * 2.0**-4 + s.repeat_interleave(128, 1)[:, :200] * 2.0**-10).all())
    _, e2 = ref.act_quant_ref(x, "ue8m0")
    s2 = ref.decode_scale(e2)
    assert e2.dtype == torch.uint8 and torch.equal(s2, torch.exp2(e2.double() - 127).float())
    assert bool((s2 >= s).all()) and bool((s2 < 2 * s).all())
    assert torch.isnan(ref.decode_scale(torch.tensor([255], dtype=torch.uint8))).all()
    q0, s0 = ref.act_quant_ref(torch.zeros(2, 5))
    assert bool((q0.float() == 0).all()) and bool(torch.isfinite(s0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter warns on NaN arithmetic
def test_nan_and_inf_propagate_like_the_reference(device):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    x[0, 5] = float("nan")  # tile (0, 0) becomes NaN entirely (its scale is NaN)
    x[1, 200] = float("inf")  # tile (1, 1): scale inf, the inf element NaN, the others 0
    x[2, 3] = float("-inf")
    for fmt in ("fp32", "ue8m0"):
        q, s = quant.act_quant(x.to(device), fmt)
        q_ref, s_ref = ref.act_quant_ref(x, fmt)
        s, s_ref = ref.decode_scale(s.cpu()), ref.decode_scale(s_ref)  # ue8m0 stores NaN and Inf as 255 (NaN)
        assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.isinf(), s_ref.isinf())
        assert_same_fp8(q, q_ref, x)
        assert bool(q_ref[0, :128].float().isnan().all())
        qt, st = quant.act_quant_t(x.to(device), fmt=fmt)
        qt_ref, st_ref = ref.act_quant_t_ref(x, fmt=fmt)
        assert torch.equal(ref.decode_scale(st.cpu()).isnan(), ref.decode_scale(st_ref).isnan())
        assert_same_fp8(qt, qt_ref)


def test_launchers_refuse_bad_inputs():
    with pytest.raises(ValueError, match="x_MK"):
        quant.act_quant(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x_MK"):
        quant.act_quant(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="s_MKt"):
        quant.act_quant_t(torch.zeros(4, 130).to(FP8), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="s_MKt"):
        quant.act_quant_t(torch.zeros(4, 130).to(FP8), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale format"):
        quant.act_quant(torch.zeros(2, 3), "e8m0")
    with pytest.raises(ValueError, match="w must be"):
        quant.weight_quant(torch.zeros(5))
    with pytest.raises(ValueError, match="float32"):
        quant.cast_to_e4m3(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="output dtype"):
        quant.act_dequant(torch.zeros(2, 3).to(FP8), torch.ones(2, 1), torch.float64)
    q, s = quant.act_quant(torch.zeros(0, 96))
    assert q.shape == (0, 96) and s.shape == (0, 1)
