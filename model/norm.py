"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias.

Computed in fp32 whatever the input dtype, cast back, then scaled by the weight: the same order of operations as
transformers' DeepseekV3RMSNorm, so logits agree bit-for-bit in fp32. When input and weight are both fp32 that order
is exactly `F.rms_norm`'s, one call instead of eight small ops (tests check the two agree bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
