"""The comparison backend (``kernels.backend=torchao``): torchao's float8 training on the same linear layers.

A GPU user who wants FP8 training from a library reaches for torchao's ``convert_to_float8_training`` (as
torchtitan's float8 converter does). Its ``rowwise`` recipe quantizes activations, weights and gradients to e4m3
with one scale per row (a row of the activation, a row of the weight; the scales rounded to powers of two) and
runs ``torch._scaled_mm`` (cuBLASLt on a GPU; it also runs on CPU). That is coarser than DeepSeek-V3's 1x128 /
128x128 tiles, with no promotion (one cuBLAS accumulation over the whole K), so it is the natural yardstick for
both the speed (``bench/kernels_gpu.py``) and the numerics (``tests/kernels/test_comparison.py`` states the
agreement) of our kernels.

What it converts: the ``nn.Linear`` modules ``convert_to_fp8`` would convert (same names), sharing their Parameter
objects (state_dict keys unchanged). On a GPU, ``torch._scaled_mm`` needs both dimensions to be multiples of 16;
layers that are not stay for ``convert_to_fp8`` to give to our kernels (none in DeepSeek-V3's shapes). The
routed experts are not linear layers: torchao's grouped FP8 GEMM (prototype) needs Triton on a GPU and token
groups padded to multiples of 16, which the dropless layout does not give, so they run our kernels.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn


def convertible(module: nn.Module, fqn: str, names: Collection[str]) -> bool:
    """Whether torchao takes this module: an ``nn.Linear`` with one of ``names``, sized for ``torch._scaled_mm``."""
    if type(module) is not nn.Linear or fqn.rsplit(".", 1)[-1] not in names:
        return False
    on_gpu = module.weight.device.type == "cuda"
    return not on_gpu or (module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_linears_torchao(model: nn.Module, names: Collection[str]) -> nn.Module:
    """Swap the eligible linear layers of ``model`` for torchao's ``Float8Linear`` (row-wise recipe), in place."""
    # deferred: torchao is optional, only for the comparison backend
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name("rowwise")
    return convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, fqn: convertible(module, fqn, names)
    )


def is_torchao_linear(module: nn.Module) -> bool:
    from torchao.float8.float8_linear import Float8Linear  # deferred: torchao is optional

    return isinstance(module, Float8Linear)


def rowwise_quant(x_RK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one fp32 scale per row (amax / 448): the operand format of row-wise ``torch._scaled_mm``."""
    s_R1 = x_RK.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x_RK.float() / s_R1).clamp(-448, 448).to(torch.float8_e4m3fn), s_R1


def rowwise_scaled_mm(
    x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``x @ w^T`` on row-wise quantized operands through ``torch._scaled_mm`` (cuBLASLt on a GPU): the fastest
    FP8 GEMM torch ships, the benchmark's row-wise reference point (no autograd)."""
    return torch._scaled_mm(x_q, w_q.T, scale_a=x_s, scale_b=w_s.T.contiguous(), out_dtype=out_dtype)
