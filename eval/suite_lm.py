"""Forward-pass suites: bits per byte on held-out data, and expert load / MaxVio of the MoE router.

Bits per byte
-------------
Cross entropy per token depends on the tokenizer; per UTF-8 byte it does not, so checkpoints with different
vocabularies (and published numbers) compare: bpb = sum of next-token CE (nats) / (bytes x ln 2), where a token's
bytes are those of its text (`train.heldout.token_byte_lengths`). What is counted: every target token that stands for
text. End-of-sequence targets (the separators the data stage puts between documents) are excluded from both the loss
and the token count, since they stand for no byte of the text; a document's first token is scored conditioned on the
EOS before it. This is what lm-evaluation-harness's `loglikelihood_rolling` counts for a document (the comparison is
`eval/lm_eval_run.py`'s, tested in tests/unit/test_lm_eval.py). Two held-out sets:
- `val/`: the first `batches` x `batch_size` windows of the data stage's validation split (documents held out by
  text hash). The split mixes code and prose and its shards do not record which document is which, so this figure
  is the MIXED one (said so in the metrics as `val/mix`).
- `code/`: HumanEval's programs (prompt + canonical solution; the data stage removed them from the training corpus),
  each scored as one document `EOS program`; a program longer than the context is scored in disjoint windows, each
  token conditioned on up to `context` tokens before it (lm-eval's rolling windows): a held-out code figure.
The MTP head is not an evaluation target: only the next-token CE counts.

Intervals and floors: the 95% interval is the bootstrap over windows (`val/`) or programs (`code/`) of the ratio
sum(nats) / sum(bytes) (`eval.stats`). Floors: `uniform`, a model that spreads its probability evenly over the
vocabulary (log2 V bits per token); `unigram`, the token frequencies of the train split (add-one smoothed), a model
that ignores context. The base model's own figure (the pretrain column) is the reference for post-trained checkpoints.

Expert load and MaxVio
----------------------
The validation windows are routed through every MoE layer; per layer, load_E = tokens sent to each routed expert
summed over the windows, and MaxVio = (max load - mean load) / mean load (DeepSeek-V3 / Wang et al. 2024): 0 is a
perfectly balanced layer, E/K - 1 means one expert takes every token (the two bounds are given as its floors).
Reported per layer, averaged over layers, and per batch (averaged, with a bootstrap interval over batches), since
balance over a whole set hides imbalance inside batches. A dense model (the distilled student) has no routed experts:
the suite says so and reports nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from data.loader import PackedDataset
from data.tokenizer import EOS
from eval.config import BpbEvalConfig, MoEEvalConfig
from eval.generation import SuiteResult
from eval.stats import bootstrap_interval, bootstrap_ratio_interval
from model.moe import DeepseekMoE
from rewards.humaneval import Problem
from train.heldout import fixed_batches, token_byte_lengths
from train.metrics import max_violation
from train.runtime import autocast

Batch = tuple[torch.Tensor, torch.Tensor]
UNIGRAM_SAMPLE = 4_000_000  # train tokens counted for the unigram floor


def val_batches(
    val_dir: Path, model: torch.nn.Module, batch_size: int, n_batches: int, seq_len: int = 0
) -> list[Batch]:
    """The first windows of the validation split, as (inputs, targets) batches; seq_len 0 = the packed length,
    capped by the model's context."""
    packed = PackedDataset(val_dir).seq_len
    seq_len = min(seq_len or packed, int(model.config.max_position_embeddings))
    return fixed_batches(PackedDataset(val_dir, seq_len), batch_size, n_batches)


def rolling_windows(ids: list[int], context: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that score ids[1:] given ids[0] (the EOS a document follows): disjoint predicted
    spans of up to `context` tokens, each input the `context` tokens before its targets (targets -100 where a token
    is context only). One window when the document fits."""
    out, done = [], 1
    while done < len(ids):
        end = min(len(ids), done + context)
        lo = max(0, end - 1 - context)
        x = ids[lo : end - 1]
        y = [-100] * (done - 1 - lo) + ids[done:end]
        out.append((x, y))
        done = end
    return out


def document_batches(docs: Sequence[list[int]], batch_size: int, pad_id: int, context: int = 1 << 30):
    """Right-padded (inputs, targets) batches of whole documents (rolling windows past `context`); padding targets
    are -100 (ignored). Also the document index of each row, so losses can be summed per document."""
    rows = [(d, w) for d, ids in enumerate(docs) for w in rolling_windows(ids, context)]
    batches, owners = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        T = max(len(x) for _, (x, _) in chunk)
        x_BT = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        y_BT = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, (_, (x, y)) in enumerate(chunk):
            x_BT[b, : len(x)] = torch.tensor(x)
            y_BT[b, : len(y)] = torch.tensor(y)
        batches.append((x_BT, y_BT))
        owners.append([d for d, _ in chunk])
    return batches, owners


def code_documents(problems: Sequence[Problem], tokenizer: Tokenizer) -> list[list[int]]:
    """`EOS prompt+solution` token ids per problem: the program scored after a document boundary."""
    eos = tokenizer.token_to_id(EOS)
    return [[eos] + tokenizer.encode(p.prompt + p.canonical_solution, add_special_tokens=False).ids for p in problems]


@torch.no_grad()
def sequence_nats(
    model: torch.nn.Module, batches: list[Batch], byte_len: np.ndarray, eos_id: int, precision: str = "fp32"
) -> dict[str, np.ndarray]:
    """Per row of every batch: summed next-token CE (nats), tokens and bytes scored, EOS targets excluded."""
    device = next(model.parameters()).device
    model.eval()
    nats, tokens, n_bytes = [], [], []
    for x_BT, y_BT in batches:
        y_BT = y_BT.masked_fill(y_BT == eos_id, -100)
        with autocast(precision, device):
            logits_BTV = model(x_BT.to(device)).logits_BTV
        ce_BT = F.cross_entropy(
            logits_BTV.float().flatten(0, 1), y_BT.to(device).flatten(), ignore_index=-100, reduction="none"
        ).view(y_BT.shape)
        keep_BT = y_BT >= 0
        nats += ce_BT.sum(1).double().cpu().tolist()
        tokens += keep_BT.sum(1).tolist()
        n_bytes += [int(byte_len[y[k].numpy()].sum()) for y, k in zip(y_BT, keep_BT)]
    return {"nats": np.array(nats), "tokens": np.array(tokens), "bytes": np.array(n_bytes)}


def bpb_metrics(prefix: str, s: dict[str, np.ndarray], floors_nats: dict[str, float]) -> tuple[dict, dict, dict]:
    """(metrics, intervals, floors) of one held-out set from its per-unit nats, tokens and bytes. `floors_nats`
    gives each floor model's summed nats over the same targets."""
    nats, toks, n_bytes = s["nats"].sum(), s["tokens"].sum(), s["bytes"].sum()
    ln2_bytes = max(1, n_bytes) * math.log(2)
    metrics = {f"{prefix}/loss": float(nats / max(1, toks)), f"{prefix}/bpb": float(nats / ln2_bytes)}
    metrics[f"{prefix}/tokens"] = int(toks)
    lo, hi = bootstrap_ratio_interval(s["nats"], s["bytes"] * math.log(2))
    intervals = {f"{prefix}/bpb": (lo, hi)}
    floors = {f"{prefix}/bpb": {name: float(v / ln2_bytes) for name, v in floors_nats.items()}}
    return metrics, intervals, floors


def floor_nats(batches: list[Batch], eos_id: int, vocab: int, unigram_logp: np.ndarray | None) -> dict[str, float]:
    """Summed nats of the floor models on the scored targets (EOS targets excluded, as in `sequence_nats`)."""
    y = torch.cat([b[1].flatten() for b in batches])
    y = y[(y >= 0) & (y != eos_id)].numpy()
    out = {"uniform": float(len(y) * math.log(vocab))}
    if unigram_logp is not None:
        out["unigram"] = float(-unigram_logp[y].sum())
    return out


def unigram_logp(train_dir: Path | None, vocab: int) -> np.ndarray | None:
    """log p(token) of the train split's unigram distribution (add-one smoothed), or None without a train split."""
    if train_dir is None or not (Path(train_dir) / "index.json").is_file():
        return None
    ds = PackedDataset(train_dir)
    counts = np.bincount(ds.tokens(0, min(ds.n_tokens, UNIGRAM_SAMPLE)), minlength=vocab)[:vocab] + 1.0
    return np.log(counts / counts.sum())


def run_bpb(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    batches: list[Batch],
    problems: Sequence[Problem],
    cfg: BpbEvalConfig,
    precision: str = "fp32",
    train_dir: Path | None = None,
) -> SuiteResult:
    byte_len = token_byte_lengths(tokenizer)
    eos = tokenizer.token_to_id(EOS)
    vocab = int(model.config.vocab_size)
    uni = unigram_logp(train_dir, vocab)
    val = sequence_nats(model, batches, byte_len, eos, precision)
    metrics, intervals, floors = bpb_metrics("val", val, floor_nats(batches, eos, vocab, uni))
    metrics["val/mix"] = "code and text mixed (the shards do not record each document's kind)"
    if cfg.code_problems >= 0:
        chosen = problems[: cfg.code_problems] if cfg.code_problems > 0 else problems
        code = code_bpb(model, tokenizer, chosen, cfg.batch_size, precision, uni)
        metrics |= code.metrics
        intervals |= code.intervals
        floors |= code.floors
    model.eval()
    return SuiteResult(metrics, intervals=intervals, floors=floors)


def code_bpb(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    problems: Sequence[Problem],
    batch_size: int = 8,
    precision: str = "fp32",
    unigram: np.ndarray | None = None,
) -> SuiteResult:
    """`code/` bits per byte of the problems' programs (see the module docstring), interval over programs."""
    byte_len = token_byte_lengths(tokenizer)
    eos = tokenizer.token_to_id(EOS)
    docs = code_documents(problems, tokenizer)
    batches, owners = document_batches(docs, batch_size, eos, int(model.config.max_position_embeddings))
    rows = sequence_nats(model, batches, byte_len, eos, precision)
    per_doc = {k: np.bincount(np.concatenate(owners), weights=v, minlength=len(docs)) for k, v in rows.items()}
    floors = floor_nats(batches, eos, int(model.config.vocab_size), unigram)
    metrics, intervals, floors = bpb_metrics("code", per_doc, floors)
    return SuiteResult(metrics | {"code/documents": len(docs)}, intervals=intervals, floors=floors)


@torch.no_grad()
def run_moe(model: torch.nn.Module, batches: list[Batch], cfg: MoEEvalConfig, precision: str = "fp32") -> SuiteResult:
    """Expert load per MoE layer over the batches, MaxVio per layer and per batch (see the module docstring)."""
    if not any(isinstance(layer.mlp, DeepseekMoE) for layer in model.model.layers):  # (MTP's MoE is not evaluated)
        return SuiteResult({"skipped": "dense model: no MoE layers"})
    device = next(model.parameters()).device
    model.eval()
    load_LE = torch.zeros(0)
    batch_vio, dropped = [], 0
    for x, _ in batches[: cfg.batches]:
        with autocast(precision, device):
            out = model(x.to(device))
        l_LE = out.expert_load_LE.detach().float().cpu()
        load_LE = l_LE if load_LE.numel() == 0 else load_LE + l_LE
        batch_vio.append([max_violation(l_E) for l_E in l_LE])
        dropped += int(out.dropped)
    vio = [max_violation(l_E) for l_E in load_LE]
    first = int(model.config.first_k_dense_replace)
    metrics: dict = {"maxvio": float(np.mean(vio)), "maxvio_batch": float(np.mean(batch_vio))}
    metrics |= {f"maxvio/layer{first + i}": v for i, v in enumerate(vio)}
    metrics |= {
        "dropped": dropped,
        "tokens": int(sum(x.numel() for x, _ in batches[: cfg.batches])),
        "expert_load": load_LE.tolist(),
    }
    bounds = {"balanced": 0.0, "collapsed": model.config.n_routed_experts / model.config.num_experts_per_tok - 1}
    floors = {"maxvio": bounds, "maxvio_batch": bounds}
    intervals = {"maxvio_batch": bootstrap_interval(np.mean(batch_vio, axis=1))}
    return SuiteResult(metrics, intervals=intervals, floors=floors)
