"""The pretraining-LM term of SFT and GRPO (train/lm_mix.py, `sft.lm_mix` / `rl.lm_mix`): its batches, that it moves
the gradient towards the pretraining data, that it is an input of the stage only when on, and that 0 changes nothing.

The packed shards (test_sft.py `make_micro_run`) are this repository's own Python sources, tokenized by the micro
run's tokenizer and written by the data stage's `ShardWriter`: real code in the real shard format.
"""

import json
from pathlib import Path

import pytest
import torch

from data.loader import PackedDataset
from data.tokenizer import load_tokenizer
from model.transformer import DeepseekV3
from pipeline.config import compose
from tests.unit.micro import make_micro_run, micro_config, micro_overrides
from train.grpo import grpo_update, pack_sequences
from train.grpo import run as run_grpo
from train.lm_mix import LMMix
from train.optim import build_optimizer
from train.policy import load_policy
from train.post_config import GRPOConfig
from train.sft import run as run_sft

pytestmark = pytest.mark.usefixtures("one_thread")


def vocab_of(run: Path) -> int:
    return load_tokenizer(run / "data" / "tokenizer.json").get_vocab_size(with_added_tokens=True)


def lm_ce(model, lm: LMMix, steps: range) -> float:
    """Mean next-token CE of `model` on the LM batches of `steps` (no gradient)."""
    with torch.no_grad():
        return sum(model(*lm.batch(s)).ce_loss.item() for s in steps) / len(steps)


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    shards = make_micro_run(tmp_path) / "data" / "train"
    model = DeepseekV3(micro_config(vocab_of(tmp_path / "micro"), max_position_embeddings=16))
    lm = LMMix.build(shards, 1.0, 3, model, seed=5)
    x5, y5 = lm.batch(5)
    assert x5.shape == (3, 16) and torch.equal(x5[:, 1:], y5[:, :-1])  # windows capped at the model's context
    lm.batch(0)
    assert torch.equal(lm.batch(5)[0], x5)  # the same batch whatever was read before (a resumed run)
    assert not torch.equal(lm.batch(6)[0], x5)
    ds = PackedDataset(shards, 16)  # every row is a window of the packed stream
    windows = {tuple(ds[i][:-1].tolist()) for i in range(len(ds))}
    assert all(tuple(row.tolist()) in windows for row in x5)


def test_sft_lm_mix_lowers_the_loss_on_the_shards_and_zero_changes_nothing(tmp_path):
    """Same seed, same SFT batches: with lm_mix = 1 the LM loss on the shards ends lower than with 0; lm_mix = 0 is
    the plain SFT loop (same losses whatever the idle lm_batch_size, no shards among the inputs, no lm_loss)."""
    runs = {}
    for name, extra in (
        ("off", ["sft.lm_mix=0"]),
        ("off2", ["sft.lm_mix=0", "sft.lm_batch_size=3"]),
        ("on", ["sft.lm_mix=1.0"]),
    ):
        run = make_micro_run(tmp_path, name)
        shards = run / "data" / "train"
        over = micro_overrides(tmp_path, name) + ["sft.steps=6", "sft.eval_n=0", "sft.table_every=0", *extra]
        runs[name] = (run, run_sft(compose(over)))
    rows = {
        n: [json.loads(line) for line in (r / "sft" / "metrics.jsonl").read_text().splitlines()]
        for n, (r, _) in runs.items()
    }
    loss = {n: [row["loss"] for row in rs if "loss" in row] for n, rs in rows.items()}
    assert loss["off"] == loss["off2"] and len(loss["off"]) == 6
    assert loss["on"][0] == loss["off"][0]  # "loss" stays the SFT loss: equal before the first update
    assert all("lm_loss" in row for row in rows["on"] if "loss" in row)
    assert not any("lm_loss" in row for row in rows["off"])
    inputs = {n: json.loads((r / "sft" / "manifest.json").read_text())["inputs"] for n, (r, _) in runs.items()}
    assert "lm_shards" in inputs["on"] and "lm_shards" not in inputs["off"]

    def shard_ce(name: str) -> float:
        model, _ = load_policy(Path(runs[name][1]["checkpoint"]), "fp32", "auto", torch.device("cpu"))
        return lm_ce(model.eval(), LMMix.build(shards, 1.0, 4, model, seed=0), range(4))

    off, on = shard_ce("off"), shard_ce("on")
    assert on < off - 0.1, f"LM CE on the shards after SFT: lm_mix=0 {off:.3f}, lm_mix=1 {on:.3f}"


def test_grpo_update_with_lm_mix_moves_towards_the_shards(tmp_path):
    """Two copies of one policy, the same rollouts and advantages: the one whose updates add the LM term ends with
    the lower LM loss on the shards, and reports it as lm_loss."""
    run = make_micro_run(tmp_path)
    shards = run / "data" / "train"
    torch.manual_seed(0)
    vocab = vocab_of(run)
    base = DeepseekV3(micro_config(vocab))
    r = GRPOConfig(group_size=4, max_new_tokens=4, updates_per_batch=2, micro_batch_size=8, kl_coef=0.0)
    r.optim.lr = 3e-3
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (6,), generator=g).tolist() for _ in range(8)]
    completions = [torch.randint(4, vocab, (4,), generator=g).tolist() for _ in range(8)]
    ids_NT, mask_NT = pack_sequences(prompts, completions, pad_id=1)
    adv_N = torch.tensor([1.0, -1.0] * 4)
    ce = {}
    for lam in (0.0, 1.0):
        model = DeepseekV3(micro_config(vocab))
        model.load_state_dict(base.state_dict())
        opt = build_optimizer(model, r.optim)
        lm = LMMix.build(shards, lam, 4, model, seed=0) if lam > 0 else None
        for step in range(4):
            stats, bad = grpo_update(model, None, opt, ids_NT, mask_NT, adv_N, r, lm=lm, step=step)
            assert bad is None and (("lm_loss" in stats) == (lm is not None))
        ce[lam] = lm_ce(model.eval(), LMMix.build(shards, 1.0, 4, model, seed=0), range(4))
    assert ce[1.0] < ce[0.0] - 0.1, ce


def test_grpo_stage_reads_the_shards_only_with_lm_mix(tmp_path):
    run = make_micro_run(tmp_path)
    run_sft(compose(micro_overrides(tmp_path) + ["sft.steps=2", "sft.eval_n=0", "sft.table_every=0"]))
    over = micro_overrides(tmp_path) + ["rl.steps=2", "rl.eval_n=0", "rl.table_every=0"]
    run_grpo(compose(over + ["rl.lm_mix=0"]))
    assert "lm_shards" not in json.loads((run / "rl" / "manifest.json").read_text())["inputs"]
    run_grpo(compose(over + ["rl.lm_mix=0.5", "rl.lm_batch_size=2"]))  # another config and input: runs again
    manifest = json.loads((run / "rl" / "manifest.json").read_text())
    assert manifest["inputs"]["lm_shards"]["path"] == str(run / "data" / "train")
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward_mean" in row]
    assert len(steps) == 2  # an update adds the LM term and logs it; a batch of only degenerate groups updates nothing
    assert all(("lm_loss" in row) == (row["degenerate_frac"] < 1) for row in steps)
    assert all(row["lm_loss"] > 0 for row in steps if "lm_loss" in row)


@pytest.mark.parametrize("section", ["sft", "rl"])
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lm_mix=-0.1", r"lm_mix must be a finite weight >= 0 \(0 = off\), got -0.1"),
        ("lm_mix=inf", r"lm_mix must be a finite weight >= 0 \(0 = off\), got inf"),
        ("lm_mix=nan", r"lm_mix must be a finite weight >= 0 \(0 = off\), got nan"),
        ("lm_batch_size=0", r"lm_batch_size must be >= 1, got 0"),
    ],
)
def test_lm_mix_rules_name_the_key(section, override, message):
    with pytest.raises(ValueError, match=rf"{section}: {message}"):
        compose([f"{section}.{override}"])
