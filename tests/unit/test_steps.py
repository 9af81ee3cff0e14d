"""What train/steps.py and train/meta_init.py add around the single-device model: activation checkpointing (the
same gradients, each decoder layer's forward run again in backward) and meta-device initialization (every tensor
gets init_weights()'s fill, reproducibly, from its own seeded generator)."""

import copy

import pytest
import torch

from model.transformer import DeepseekV3
from tests.unit.micro import micro_config
from train.meta_init import init_plan, materialize
from train.runtime import build_model
from train.steps import checkpoint_activations

pytestmark = pytest.mark.usefixtures("one_thread")


def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_gradients():
    torch.manual_seed(0)
    model = DeepseekV3(micro_config(64))
    ckpt = copy.deepcopy(model)
    assert checkpoint_activations(ckpt) == 3  # 2 decoder layers + 1 MTP layer
    calls = {"plain": 0, "ckpt": 0}
    for key, m in (("plain", model), ("ckpt", ckpt)):
        m.model.layers[1].self_attn.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for m in (model, ckpt):
        m(x, x).loss.backward()
    assert calls == {"plain": 1, "ckpt": 2}, calls  # the checkpointed layer ran again in backward
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ckpt.named_parameters()]  # names unchanged
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-6), n


def test_meta_init_fills_every_tensor_like_init_weights_from_per_tensor_seeds():
    cfg = micro_config(64)
    meta = build_model(cfg, "fp32", "torch", torch.device("meta"))
    assert all(t.is_meta for t in meta.parameters())
    plan = init_plan(meta)
    materialize(meta, plan, torch.device("cpu"), seed=0)
    sd = meta.state_dict()
    std = cfg.initializer_range
    for name, t in sd.items():
        assert not t.is_meta and torch.isfinite(t).all(), name
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith("e_score_correction_bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
        elif t.numel() > 500:
            assert abs(t.std().item() - std) < 0.2 * std and abs(t.mean().item()) < 0.2 * std, name
    again = build_model(cfg, "fp32", "torch", torch.device("meta"))
    materialize(again, init_plan(again), torch.device("cpu"), seed=0)
    other = build_model(cfg, "fp32", "torch", torch.device("meta"))
    materialize(other, init_plan(other), torch.device("cpu"), seed=1)
    w = "model.layers.0.self_attn.q_a_proj.weight"
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), again.state_dict().values()))  # reproducible
    assert not torch.equal(sd[w], other.state_dict()[w])  # and the seed matters
    # a rank holding a subset under the full model's names (a pipeline rank's view) draws the same values for it
    part = build_model(cfg, "fp32", "torch", torch.device("meta"))
    view = torch.nn.Module()
    view.model = torch.nn.Module()
    view.model.layers = torch.nn.ModuleDict({"0": part.model.layers[0]})
    materialize(view, init_plan(part), torch.device("cpu"), seed=0)
    assert torch.equal(part.model.layers[0].self_attn.q_a_proj.weight, sd[w])
    assert part.model.layers[1].self_attn.q_a_proj.weight.is_meta  # not held: never allocated
