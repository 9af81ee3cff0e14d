"""Parameter accounting on the meta device reproduces DeepSeek's published totals; presets keep their promises.

Published figures (rounded by DeepSeek): V3 671B total / 37B activated / HF checkpoint 685B with the MTP module;
V2-Lite 15.7B total / 2.4B activated. Our counts come from the real module tree (model.info).
"""

import json

import pytest

from model.config import load_preset
from model.info import build_meta, main, model_info


@pytest.fixture(scope="module")
def v3():
    return model_info(load_preset("v3_671b"))


def test_v3_671b_reproduces_published_totals(v3):
    assert abs(v3.total / 671e9 - 1) < 0.01, v3.total  # main model, MTP excluded
    assert round(v3.activated / 1e9) == 37, v3.activated  # 36.6B (input embedding not counted)
    assert abs(v3.total_with_mtp_as_released / 685e9 - 1) < 0.01, v3.total_with_mtp_as_released
    assert 13e9 < v3.mtp_as_released < 14.5e9  # "14B MTP module" (685B - 671B), with its emb/head copies
    assert v3.embedding == 2 * 129280 * 7168
    assert v3.kv_cache_bytes_per_token == 61 * (512 + 64) * 2  # bf16 latent + rope key per layer


def test_v2_lite_shape_reproduces_published_totals():
    info = model_info(load_preset("v2_lite"))
    assert abs(info.total / 15.7e9 - 1) < 0.01, info.total
    assert abs(info.activated / 2.4e9 - 1) < 0.03, info.activated
    assert info.mtp == 0


def test_presets_keep_their_promises():
    tiny, student, small = (model_info(load_preset(n)) for n in ("tiny", "student", "small"))
    assert 1e6 < tiny.total < 10e6 and load_preset("tiny").n_routed_experts >= 16
    assert student.activated <= tiny.activated / 3, (student.activated, tiny.activated)
    assert not load_preset("student").is_moe
    assert abs(small.total / 100e6 - 1) < 0.1, small.total


def test_meta_build_allocates_nothing():
    model = build_meta(load_preset("v3_671b"))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 680e9  # main + MTP (embedding/head shared)
    assert model.model.layers[3].mlp.experts.gate_proj.shape == (256, 2048, 7168)


def test_cli(capsys):
    d = main(["--model", "tiny", "--json"])
    assert json.loads(capsys.readouterr().out)["total"] == d["total"] == model_info(load_preset("tiny")).total
    assert main(["model=student"])["preset"] == "student"
    assert "activated per token" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        main(["--model", "nope"])


def test_unit_consistency_with_a_real_model():
    # the meta count equals the count of an allocated model
    from model.transformer import DeepseekV3

    cfg = load_preset("tiny")
    real = DeepseekV3(cfg)
    info = model_info(cfg)
    assert info.total + info.mtp == sum(p.numel() for p in real.parameters())
