"""Quantize once per optimizer step and once per shared input (kernels/caches.py), without ever going stale.

Each test counts the quantizations the caches actually computed, and checks the results are the very bits an
uncached computation gives (the torch backend is deterministic, so ``torch.equal``).
"""

import copy

import torch
from torch import nn

from kernels.caches import ActQuantCache, WeightCache
from kernels.fp8_linear import FP8GroupedMM, FP8Linear, convert_to_fp8, fp8_grouped_mm, fp8_linear
from model.moe import MLP
from model.transformer import DeepseekV3
from tests.kernels.tiny_model import tiny_config


def step(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    y.float().square().sum().backward()
    return y.detach()


def test_weight_quantized_once_per_optimizer_step(device):
    torch.manual_seed(0)
    backend = "triton" if device == "cuda" else "torch"  # the interpreted kernels run in the tests below
    layer = FP8Linear(96, 48, bias=False, device=device, backend=backend)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    xs = [torch.randn(9, 96, device=device, requires_grad=True) for _ in range(2)]
    cache = layer.weight_cache
    for s in range(2):
        for x in xs:  # gradient accumulation: two micro-batches, one weight
            step(layer, x)
        assert cache.quantizations == s + 1 and cache.transpositions == s + 1
        w_before = layer.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(layer.weight.detach(), w_before)
    y_cached = layer(xs[0]).detach()
    y_fresh = fp8_linear(xs[0].detach(), layer.weight.detach().clone(), backend=backend)  # no cache at all
    assert cache.quantizations == 3 and torch.equal(y_cached, y_fresh)


def test_weight_cache_sees_in_place_edits_and_moves():
    """copy_ (an EMA swap, load_state_dict), in-place arithmetic and .to() all invalidate the cached FP8 weight."""
    torch.manual_seed(1)
    layer = FP8Linear(64, 48, bias=False, backend="torch")
    x = torch.randn(5, 64)
    y0 = layer(x).detach()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # exact in e4m3: every scale doubles
    assert torch.equal(layer(x).detach(), 2 * y0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64))
    y2 = layer(x).detach()
    assert torch.equal(y2, fp8_linear(x, layer.weight.detach().clone(), backend="torch"))
    layer.load_state_dict({"weight": torch.randn(48, 64)})
    assert not torch.equal(layer(x).detach(), y2)
    layer.to(torch.float64).to(torch.float32)  # same values, new storage
    layer(x)
    assert layer.weight_cache.quantizations == 5


def test_a_weight_that_is_not_the_layers_own_is_never_cached():
    """FSDP2 hands the layer an all-gathered tensor whose version it keeps constant while refilling it: such a
    tensor (anything but the layer's own Parameter) is quantized afresh on every call."""
    torch.manual_seed(2)
    own = nn.Parameter(torch.randn(32, 64))
    cache = WeightCache(own)
    gathered = torch.randn(32, 64)
    x = torch.randn(3, 64)
    y1 = fp8_linear(x, gathered, backend="torch", weight_cache=cache)
    with torch.autograd._unsafe_preserve_version_counter(gathered):  # what FSDP2 does to its buffers
        gathered.copy_(torch.randn(32, 64))
    y2 = fp8_linear(x, gathered, backend="torch", weight_cache=cache)
    assert cache.quantizations == 2 and not torch.equal(y1, y2)
    assert torch.equal(y2, fp8_linear(x, gathered.clone(), backend="torch"))


def test_shared_input_quantized_once_for_gate_and_up(device):
    torch.manual_seed(3)
    mlp = MLP(64, 96).to(device)
    ref_mlp = copy.deepcopy(mlp)
    convert_to_fp8(mlp, backend="triton")
    convert_to_fp8(ref_mlp, backend="triton")
    ref_mlp.up_proj.act_cache = ActQuantCache()  # unshared: quantizes x twice
    shared = mlp.gate_proj.act_cache
    assert mlp.up_proj.act_cache is shared and mlp.down_proj.act_cache is not shared
    x = torch.randn(2, 13, 64, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = step(mlp, x), step(ref_mlp, x_ref)
    assert shared.quantizations == 1 and shared.requantizations == 1  # forward once, Wgrad's transpose once
    assert ref_mlp.gate_proj.act_cache.quantizations == ref_mlp.up_proj.act_cache.quantizations == 1
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    for p, q in zip(mlp.parameters(), ref_mlp.parameters()):
        assert torch.equal(p.grad, q.grad)
    x2 = x.detach().clone()
    step(mlp, x2)
    with torch.no_grad():
        x2.mul_(3.0)  # same tensor, new contents: its version moved on
    step(mlp, x2)
    assert shared.quantizations == 3


def test_cache_entries_die_with_their_tensors():
    cache = ActQuantCache()
    x = torch.randn(4, 64)
    fp8_linear(x, torch.randn(16, 64), backend="torch", act_cache=cache)
    assert cache._fwd is not None
    del x
    assert cache._fwd is None  # nothing kept alive past the input


def test_model_shares_inputs_of_mla_and_experts():
    """In the model: q_a_proj/kv_a_proj_with_mqa share one quantization, and so do the experts' gate and up."""
    torch.manual_seed(4)
    model = convert_to_fp8(DeepseekV3(tiny_config()), backend="torch")
    attn = model.model.layers[0].self_attn
    assert attn.q_a_proj.act_cache is attn.kv_a_proj_with_mqa.act_cache
    ids = torch.randint(0, 96, (2, 12))
    model(ids, ids).loss.backward()
    assert attn.q_a_proj.act_cache.quantizations == 1
    experts = next(m for m in model.modules() if isinstance(getattr(m, "grouped_mm", None), FP8GroupedMM))
    gm = experts.grouped_mm
    assert gm.act_cache.quantizations == 2  # gate and up share x; down reads h
    assert gm.act_cache.requantizations == 2
    assert [c.quantizations for c in gm.weight_caches] == [1, 1, 1]


def test_grouped_weight_cache_across_micro_batches(device):
    torch.manual_seed(5)
    E, N, K = 3, 48, 64
    w = nn.Parameter(torch.randn(E, N, K, device=device) * 0.1)
    gm = FP8GroupedMM("triton", owners=(w,))
    offsets = torch.tensor([0, 5, 5, 12], device=device)
    for _ in range(3):
        x = torch.randn(12, K, device=device, requires_grad=True)
        gm(x, w, offsets).sum().backward()
    assert gm.weight_caches[0].quantizations == 1 and gm.weight_caches[0].transpositions == 1
    y = gm(x, w, offsets)
    assert torch.equal(y, fp8_grouped_mm(x, w.detach().clone(), offsets, backend="triton"))


def test_deepcopy_gives_fresh_caches_bound_to_the_copied_weights():
    torch.manual_seed(6)
    layer = FP8Linear(64, 32, bias=False, backend="torch")
    x = torch.randn(3, 64)
    layer(x)
    twin = copy.deepcopy(layer)
    assert twin.weight_cache._owner() is twin.weight
    with torch.no_grad():
        twin.weight.mul_(-1.0)
    assert torch.equal(twin(x), -layer(x))


def test_inference_mode_results_never_reach_training():
    """Generation runs under inference_mode (GRPO rollouts, then a training step on the same weights): what the
    cache made there are inference tensors, which autograd cannot save, so training gets its own quantization."""
    torch.manual_seed(7)
    layer = FP8Linear(64, 32, bias=False, backend="torch")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y_inf = layer(x)
        layer(x)  # cached within inference mode
    assert layer.weight_cache.quantizations == 1
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.sum().backward()  # would raise if an inference tensor had been saved
    assert layer.weight_cache.quantizations == 2 and torch.equal(y.detach(), y_inf)
