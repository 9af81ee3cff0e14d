"""`precision=auto`: bf16 where the device multiplies bf16 natively, else fp32, resolved by each stage once its device
is known; an unresolved "auto" never reaches autocast (it would silently run fp32)."""

from pathlib import Path

import pytest
import torch

import train.runtime as runtime
from pipeline.config import ConfigError, compose
from train.runtime import autocast, cpu_flags, resolve_precision

CPU = torch.device("cpu")


def test_auto_composes_and_a_bad_value_names_the_key():
    assert compose(["precision=auto"]).precision == "auto"
    with pytest.raises(ConfigError, match="precision must be fp32, bf16, fp8 or auto"):
        compose(["precision=fp16"])


@pytest.mark.parametrize(
    ("flags", "want"), [([], "fp32"), (["avx512_bf16"], "bf16"), (["amx_bf16"], "bf16"), (["avx512f"], "fp32")]
)
def test_auto_on_a_cpu_follows_its_native_bf16_flags(monkeypatch, flags, want):
    monkeypatch.setattr(runtime, "cpu_flags", lambda wanted=(): [f for f in flags if f in wanted])
    assert resolve_precision("auto", CPU) == want


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_explicit_precisions_are_kept(monkeypatch, precision):
    monkeypatch.setattr(runtime, "cpu_flags", lambda wanted=(): list(wanted))
    assert resolve_precision(precision, CPU) == precision


def test_this_machine_reports_what_proc_cpuinfo_says():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    assert cpu_flags() == [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    want = "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"
    assert resolve_precision("auto", CPU) == want


def test_an_unresolved_auto_never_reaches_autocast():
    with pytest.raises(ValueError, match="got 'auto'"):
        autocast("auto", CPU)
    with autocast("bf16", CPU):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
