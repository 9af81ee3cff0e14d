"""Cold-start SFT: batches mask prompts, the loss learns only responses, and the stage runs, skips and resumes.

`make_micro_run` (tests/unit/micro.py) builds a whole run directory in tmp_path (tokenizer, reasoning splits, packed
train shards for the pretraining-LM term, a freshly initialised micro model saved as the "pretrain" checkpoint).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.reasoning import build_splits
from data.tokenizer import train_tokenizer
from model.transformer import IGNORE_INDEX, DeepseekV3
from pipeline.config import compose
from tests.unit.micro import make_micro_run, micro_config, micro_overrides
from train.chat import encode_chat, eos_id
from train.sft import batch_indices, make_batch
from train.sft import run as run_sft

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(tok, rows):
    return [encode_chat(tok, r["prompt"], r["completion"]) for r in rows]


def _micro_tok_rows():
    ds = build_splits(n_train=8, n_test=0, seed=2)
    rows = ds["train"].to_list()
    tok = train_tokenizer([r["prompt"] + " " + r["completion"] for r in rows] * 4, vocab_size=300)
    return tok, rows


def test_make_batch_targets_only_the_response():
    tok, rows = _micro_tok_rows()
    ex = _examples(tok, rows[:3])
    x, y = make_batch(ex, pad_id=eos_id(tok))
    for b, (ids, mask) in enumerate(ex):
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1]
        want = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        assert y[b, :n].tolist() == want
        assert (y[b, n:] == IGNORE_INDEX).all()  # padding carries no loss
        assert sum(t != IGNORE_INDEX for t in want) == sum(mask)  # every response token (and EOS) is a target


def test_sft_loss_ignores_prompt_positions():
    """The CE equals a hand-computed mean over response positions, and its gradient at prompt positions is 0."""
    tok, rows = _micro_tok_rows()
    torch.manual_seed(0)
    model = DeepseekV3(micro_config(tok.get_vocab_size(with_added_tokens=True), num_nextn_predict_layers=0))
    ex = _examples(tok, rows[:4])
    x, y = make_batch(ex, pad_id=eos_id(tok))
    out = model(x, y)
    out.logits_BTV.retain_grad()
    resp = y != IGNORE_INDEX
    ref = F.cross_entropy(out.logits_BTV[resp].float(), y[resp])
    err = (out.ce_loss - ref).abs().item()
    assert err < 1e-5, f"fp32 CE vs hand-computed: abs err {err}"
    out.ce_loss.backward()
    g = out.logits_BTV.grad
    assert g[~resp].abs().max().item() == 0.0  # prompt and pad positions: exactly no gradient
    assert g[resp].abs().amax(-1).min().item() > 0.0  # every response position gets one
    # so changing what the prompt positions would predict cannot change the loss
    y2 = y.clone()
    y2[~resp] = IGNORE_INDEX
    x2 = x.clone()
    assert torch.equal(model(x2, y2).ce_loss, out.ce_loss)


def test_sft_loss_decreases_on_a_repeated_batch():
    tok, rows = _micro_tok_rows()
    torch.manual_seed(0)
    model = DeepseekV3(micro_config(tok.get_vocab_size(with_added_tokens=True)))
    x, y = make_batch(_examples(tok, rows[:4]), pad_id=eos_id(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(x, y).ce_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    idx = [i for s in range(5) for i in batch_indices(n, b, s, seed=0)]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert batch_indices(n, b, 3, seed=0) == batch_indices(n, b, 3, seed=0)


def test_sft_stage_runs_skips_and_resumes(tmp_path):
    run = make_micro_run(tmp_path)
    res = run_sft(compose(micro_overrides(tmp_path) + ["sft.steps=2"]))
    assert Path(res["checkpoint"]).name == "step_000002"
    assert 0.0 <= res["eval_accuracy"] <= 1.0
    assert (run / "sft" / "manifest.json").is_file()
    # same config and inputs: skipped
    assert run_sft(compose(micro_overrides(tmp_path) + ["sft.steps=2"]))["skipped"] is True
    # more steps under resume=auto is another config: the 2-step attempt is set aside and training starts over
    res = run_sft(compose(micro_overrides(tmp_path) + ["sft.steps=3"]))
    assert Path(res["checkpoint"]).name == "step_000003" and (run / "sft" / "superseded").is_dir()
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    # extending on purpose: resume from the named checkpoint (not the pretrained weights); each step logged once
    ckpt = run / "sft" / "checkpoints" / "step_000003"
    res = run_sft(compose(micro_overrides(tmp_path) + ["sft.steps=4", f"sft.resume={ckpt}"]))
    assert Path(res["checkpoint"]).name == "step_000004"
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4], steps
    assert (run / "sft" / "samples.jsonl").is_file()


@pytest.mark.parametrize("module", ["train.sft", "train.grpo", "distill.run"])
def test_post_training_refuses_several_processes(tmp_path, monkeypatch, module):
    """Under torchrun each rank would train its own copy with no gradient exchange: refused before any work."""
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"{module} runs in one process, but it was launched on 2 \(WORLD_SIZE=2\)"):
        importlib.import_module(module).run(compose(micro_overrides(tmp_path)))
    assert not (tmp_path / "micro").exists()
