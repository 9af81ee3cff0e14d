"""What every training loop needs around the model: device, process group facts, precision, model construction.

Precision (`precision=`):
- fp32: everything in FP32.
- bf16: FP32 master weights, compute under `torch.autocast(bfloat16)`.
- auto: bf16 where the device multiplies bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX),
        else fp32 (`resolve_precision`, called by each stage once its device is known). On an AVX2 CPU bf16
        matmuls are emulated and several times slower than fp32 (bench/cpu_autocast.py).
- fp8:  as bf16, plus the DeepSeek-V3 FP8 recipe on the attention projections and every expert/MLP linear
        (`kernels.fp8_linear.convert_to_fp8`):
        1x128 activation tiles, 128x128 weight blocks, e4m3, FP32 promotion; sizes that are not multiples of
        128 are zero-padded.
        Embedding, output head, router, norms and the attention core stay in BF16/FP32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kernels.formats import ScaleFormats
from kernels.fp8_linear import convert_to_fp8
from model.config import ModelConfig
from model.transformer import DeepseekV3


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def require_one_process(stage: str, world_size: int) -> None:
    """Post-training stages run in one process: under torchrun each rank would train its own copy, unsynchronised."""
    if world_size > 1:
        raise ValueError(
            f"{stage} runs in one process, but it was launched on {world_size} (WORLD_SIZE={world_size}): its loop has"
            f" no data parallelism (every rank would train its own copy with no gradient exchange). Run it with"
            f" `python -m {stage}` (only pretraining, `python -m train.pretrain`, runs under torchrun)"
        )


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", *NATIVE_BF16_CPU_FLAGS)) -> list[str]:
    """Which of `wanted` this CPU's /proc/cpuinfo lists (empty where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision=auto` for this device: bf16 where its matmuls run bf16 natively, else fp32; other values as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_flags(NATIVE_BF16_CPU_FLAGS) else "fp32"


def autocast(precision: str, device: torch.device):
    if precision in ("bf16", "fp8"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":  # "auto" must be resolved first (resolve_precision), or it would silently run fp32
        raise ValueError(f"precision must be fp32, bf16 or fp8 here, got {precision!r}")
    return contextlib.nullcontext()


def build_model(
    mcfg: ModelConfig,
    precision: str,
    kernels_backend: str,
    device: torch.device,
    scale_formats: ScaleFormats | str = "fp32",
) -> nn.Module:
    """The single-device model with FP32 master weights, the FP8 path applied from outside when asked.

    ``scale_formats``: the FP8 scale format per tensor class (``KernelsConfig.scale_formats()``), or one format
    for every class.
    On the meta device nothing is allocated (train/meta_init.py materialises it after sharding).
    """
    mcfg.validate()
    if device.type == "meta":
        with torch.device("meta"):
            model = DeepseekV3(mcfg)
    else:
        model = DeepseekV3(mcfg).to(device)
    if precision == "fp8":
        convert_to_fp8(model, backend=kernels_backend, scale_formats=scale_formats)
    return model
