"""Optimizer steps of a tiny DeepSeek-V3 with every FP8 GEMM on the Triton kernels (interpreted on CPU), against
the same steps on the PyTorch references and against the high-precision model.

Both FP8 runs quantize to the same bits and differ only in accumulation. Tolerances (relative), in the
interpreter: per-step loss 1e-5 between backends; first-step gradients 1e-4 per parameter (Frobenius); after the
steps, each parameter's difference between backends <= 1e-3 of its update. On a GPU, 4x what the accumulation
model predicts for the same steps (every GEMM emulated with a 14-bit accumulator, kernels/accumulation.py).
FP8 vs FP32 loss within 2%.
A second test checks convergence: FP8 (torch backend) tracks FP32 over 20 steps.
The tiny model has no MTP module here only to keep the interpreter's launch count (the cost) down; MTP's
eh_proj and layer are covered by tests/kernels/test_fp8_linear.py on the torch backend.
"""

import copy

import pytest
import torch

from kernels.fp8_linear import convert_to_fp8, fp8_modules
from model.config import ModelConfig
from model.transformer import DeepseekV3
from tests.kernels.gemm_bounds import emulated_ops
from tests.kernels.tiny_model import tiny_config as shared_tiny_config

STEPS = 2


def tiny_config() -> ModelConfig:
    return shared_tiny_config(vocab_size=128, num_attention_heads=2, num_key_value_heads=2, num_nextn_predict_layers=0)


def train(
    model: DeepseekV3, batches: list[torch.Tensor], lr: float = 1e-3
) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, first_grads = [], {}
    for ids in batches:
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not first_grads:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def differences(run_a, run_b, start: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest per-step loss, first-step gradient and final-parameter differences between two runs of train()."""
    (loss_a, grad_a, m_a), (loss_b, grad_b, m_b) = run_a, run_b
    out = {"loss": max(abs(a - b) / abs(b) for a, b in zip(loss_a, loss_b)), "grad": 0.0, "param": 0.0}
    for (name, p_a), p_b in zip(m_a.named_parameters(), m_b.parameters()):
        g_err = ((grad_a[name] - grad_b[name]).norm() / grad_b[name].norm().clamp(min=1e-30)).item()
        update = (p_b.detach().cpu() - start[name]).norm()
        p_err = ((p_a.detach().cpu() - p_b.detach().cpu()).norm() / update.clamp(min=1e-30)).item()
        out["grad"], out["param"] = max(out["grad"], g_err), max(out["param"], p_err)
    return out


def fp8_run(base: DeepseekV3, batches, backend: str, device) -> tuple:
    model = convert_to_fp8(copy.deepcopy(base).to(device), backend=backend)
    return (*train(model, [b.to(device) for b in batches]), model)


def hopper_prediction(base: DeepseekV3, batches) -> dict[str, float]:
    """How far the accumulation model says a GPU run drifts from the FP32-accumulating torch backend: the same
    steps on the CPU with every GEMM emulated (tests/kernels/gemm_bounds.py: emulated_ops)."""
    import kernels.fp8_linear as fl

    emulated, ops_for = emulated_ops(), fl.ops_for
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    reference = fp8_run(base, batches, "torch", "cpu")
    fl.ops_for = lambda backend: emulated if backend == "torch" else ops_for(backend)
    try:
        predicted = fp8_run(base, batches, "torch", "cpu")
    finally:
        fl.ops_for = ops_for
    return differences(predicted, reference, start)


# triton vs torch in the interpreter: the same bits, FP32 sums in another order
INTERPRETER_TOL = {"loss": 1e-5, "grad": 1e-4, "param": 1e-3}


@pytest.mark.slow
def test_tiny_model_trains_the_same_on_triton_and_torch_backends(device):
    """Interpreter: within INTERPRETER_TOL. GPU: within 4x what the Hopper accumulation model predicts for these
    very steps (``hopper_prediction``), and no tighter than the interpreter's tolerance."""
    torch.manual_seed(0)
    base = DeepseekV3(tiny_config())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 13), generator=g) for _ in range(STEPS)]
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    tri, tor = fp8_run(base, batches, "triton", device), fp8_run(base, batches, "torch", device)
    # 2 layers x 5 attention projections, 3 dense-MLP and 3 shared-expert linears, 1 routed-experts block
    assert len(fp8_modules(tri[2])) == 17
    loss_hp = train(copy.deepcopy(base).to(device), [b.to(device) for b in batches])[0]
    print("losses: triton", tri[0], "torch", tor[0], "fp32", loss_hp)
    for b, c in zip(tor[0], loss_hp):
        assert abs(b - c) <= 0.02 * abs(c), (tor[0], loss_hp)
    tol = dict(INTERPRETER_TOL)
    if device == "cuda":
        predicted = hopper_prediction(base, batches)
        tol = {k: max(v, 4 * predicted[k]) for k, v in tol.items()}
    diff = differences(tri, tor, start)
    for key, value in diff.items():
        assert value <= tol[key], f"triton vs torch: {key} differs by {value:.3e} > {tol[key]:.3e}"


@pytest.mark.slow
def test_hopper_prediction_exceeds_the_interpreter_tolerance():
    """The reason the GPU tolerance differs: under the 14-bit model the gradients and updates drift further from
    FP32 accumulation than the interpreter's tolerance allows (the old tolerances would fail on a GPU for the wrong
    reason), while the loss stays far below what FP8 itself costs (2%)."""
    torch.manual_seed(0)
    base = DeepseekV3(tiny_config())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 13), generator=g) for _ in range(STEPS)]
    predicted = hopper_prediction(base, batches)
    print("predicted GPU drift", predicted)
    assert predicted["grad"] > INTERPRETER_TOL["grad"] and predicted["param"] > INTERPRETER_TOL["param"]
    assert predicted["loss"] < 2e-3


@pytest.mark.slow
def test_fp8_training_tracks_fp32():
    """Convergence: 20 AdamW steps on a learnable pattern (arithmetic sequences mod V), FP8 (torch backend) vs FP32.

    DeepSeek-V3 reports FP8's relative loss error against BF16 below 0.25% over long runs; here the tolerance is
    1% of the FP32 loss at every step (measured: <= 0.6%), and both must learn (loss down by a fifth).
    """
    torch.manual_seed(0)
    base = DeepseekV3(tiny_config())
    g = torch.Generator().manual_seed(3)
    start, stride = torch.randint(0, 128, (20, 4, 1), generator=g), torch.randint(1, 4, (20, 4, 1), generator=g)
    batches = (start + stride * torch.arange(17)) % 128
    loss_fp32, _ = train(copy.deepcopy(base), list(batches), lr=3e-3)
    loss_fp8, _ = train(convert_to_fp8(copy.deepcopy(base), backend="torch"), list(batches), lr=3e-3)
    print("fp32", loss_fp32, "\nfp8 ", loss_fp8)
    worst = max(abs(a - b) / b for a, b in zip(loss_fp8, loss_fp32))
    assert worst <= 0.01, f"FP8 loss strays {worst:.2%} from FP32"
    assert loss_fp32[-1] < 0.8 * loss_fp32[0] and loss_fp8[-1] < 0.8 * loss_fp8[0]
