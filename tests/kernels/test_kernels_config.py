"""kernels.* config keys: each bad value fails at compose time naming its key; scale formats reach the model."""

import pytest
import torch

from kernels.formats import ScaleFormats
from kernels.fp8_linear import FP8Linear, fp8_modules
from pipeline.config import ConfigError, compose
from train.runtime import build_model


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["kernels.backend=cuda"], "kernels.backend"),
        (["kernels.scale_format=e8m0"], "kernels.scale_format"),
        (["kernels.act_scale_format=fp16"], "kernels.act_scale_format"),
        (["kernels.weight_scale_format=bf16"], "kernels.weight_scale_format"),
        (["kernels.grad_scale_format=int8"], "kernels.grad_scale_format"),
        (["kernels.backend=torchao", "kernels.weight_scale_format=ue8m0"], "kernels.scale_format"),
    ],
)
def test_bad_kernels_values_fail_at_compose(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(overrides)


def test_scale_formats_per_tensor_class():
    assert compose([]).kernels.scale_formats() == ScaleFormats()
    cfg = compose(["kernels.scale_format=ue8m0", "kernels.grad_scale_format=fp32"]).kernels
    assert cfg.scale_formats() == ScaleFormats(act="ue8m0", weight="ue8m0", grad="fp32")
    assert compose(["kernels.scale_format=ue8m0"]).kernels.scale_formats() == ScaleFormats.all("ue8m0")
    assert compose(["kernels.backend=torchao"]).kernels.backend == "torchao"


def test_build_model_passes_the_formats(tmp_path):
    cfg = compose(["kernels.act_scale_format=ue8m0", "kernels.backend=torch"])
    model = build_model(cfg.model, "fp8", cfg.kernels.backend, torch.device("cpu"), cfg.kernels.scale_formats())
    layers = fp8_modules(model).values()
    assert layers and all(m.scale_formats == ScaleFormats(act="ue8m0") for m in layers)
    one = build_model(cfg.model, "fp8", "torch", torch.device("cpu"), "ue8m0")  # one format for every class
    assert all(m.scale_formats == ScaleFormats.all("ue8m0") for m in fp8_modules(one).values())
    assert any(isinstance(m, FP8Linear) for m in one.modules())
