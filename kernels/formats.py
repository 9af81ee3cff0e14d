"""How the FP8 scales of each tensor class are stored: ``fp32`` or ``ue8m0`` (``kernels.scale_format``).

- ``fp32``: the DeepSeek-V3 recipe. ``s = amax / 448`` in FP32, one per 1x128 tile or 128x128 block.
- ``ue8m0``: DeepSeek-V3.1's recipe (and the OCP MX scale type). The scale is rounded *up* to a power of two and
  stored as its biased 8-bit exponent ``e`` (``s = 2^(e - 127)``, ``e = 255`` is NaN), one byte per tile. Scaling
  and unscaling are then exact (multiplying by 2^k only moves the exponent), the scale tensor is 4x smaller, and
  the quantized values use at most the top binade less than FP32 scales do (rounding ``s`` up can lower the tile
  maximum from 448 to as little as 224).

The three tensor classes of an FP8 linear layer can each take either format:

- ``act``: the activations X (Fprop, and X^T for Wgrad);
- ``weight``: the weights W (Fprop, and W^T for Dgrad);
- ``grad``: the output gradients dY (Dgrad, and dY^T for Wgrad).
"""

from __future__ import annotations

from dataclasses import dataclass

SCALE_FORMATS = ("fp32", "ue8m0")


@dataclass(frozen=True)
class ScaleFormats:
    """The scale format of each tensor class; ``ScaleFormats.all("ue8m0")`` sets every class."""

    act: str = "fp32"
    weight: str = "fp32"
    grad: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("act", "weight", "grad"):
            value = getattr(self, name)
            if value not in SCALE_FORMATS:
                raise ValueError(f"scale format of {name} must be one of {SCALE_FORMATS}, got {value!r}")

    @classmethod
    def all(cls, fmt: str) -> ScaleFormats:
        return cls(fmt, fmt, fmt)

    def __str__(self) -> str:
        if self.act == self.weight == self.grad:
            return self.act
        return f"act={self.act},weight={self.weight},grad={self.grad}"
