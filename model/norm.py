"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias.

Computed in fp32 whatever the input dtype, cast back, then scaled by the weight: the same order of operations as
transformers' DeepseekV3RMSNorm, so logits agree bit-for-bit in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
