"""Forward-pass suites: bits per byte on held-out data, and expert load / MaxVio of the MoE router.

Bits per byte
-------------
Cross entropy per token depends on the tokenizer; per UTF-8 byte it does not, so checkpoints with different
vocabularies (and published numbers) compare: bpb = mean CE (nats/token) x tokens / (bytes x ln 2), where a token's
bytes are those of its text (special tokens count 0; `train.lm_eval.token_byte_lengths`). Two held-out sets:
- `val/`: the first `batches` x `batch_size` windows of the data stage's validation split (documents held out by
  text hash). The split mixes code and prose and its shards do not record which document is which, so this figure
  is the MIXED one (said so in the metrics as `val/mix`).
- `code/`: HumanEval's 164 programs (prompt + canonical solution; the data stage removed them from the training
  corpus), each scored as one document `EOS program EOS` truncated to the model's context: a held-out code figure.
The MTP head is not an evaluation target: only the next-token CE counts (`train.lm_eval.evaluate`).

Expert load and MaxVio
----------------------
The validation windows are routed through every MoE layer; per layer, load_E = tokens sent to each routed expert
summed over the windows, and MaxVio = (max load - mean load) / mean load (DeepSeek-V3 / Wang et al. 2024): 0 is a
perfectly balanced layer, E/K - 1 means one expert takes every token. Reported per layer, averaged over layers, and
per batch (averaged), since balance over a whole set hides imbalance inside batches. A dense model (the distilled
student) has no routed experts: the suite says so and reports nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from data.loader import PackedDataset
from data.tokenizer import EOS
from eval.config import BpbEvalConfig, MoEEvalConfig
from eval.generation import SuiteResult
from rewards.humaneval import Problem
from train.lm_eval import evaluate, fixed_batches, token_byte_lengths
from train.metrics import max_violation
from train.runtime import autocast

Batch = tuple[torch.Tensor, torch.Tensor]


def val_batches(
    val_dir: Path, model: torch.nn.Module, batch_size: int, n_batches: int, seq_len: int = 0
) -> list[Batch]:
    """The first windows of the validation split, as (inputs, targets) batches; seq_len 0 = the packed length,
    capped by the model's context."""
    packed = PackedDataset(val_dir).seq_len
    seq_len = min(seq_len or packed, int(model.config.max_position_embeddings))
    return fixed_batches(PackedDataset(val_dir, seq_len), batch_size, n_batches)


def document_batches(docs: Sequence[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded (inputs, targets) batches of whole documents; padding targets are -100 (ignored)."""
    out = []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        T = max(len(d) for d in chunk) - 1
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, d in enumerate(chunk):
            t = torch.tensor(d, dtype=torch.long)
            x[b, : len(d) - 1] = t[:-1]
            y[b, : len(d) - 1] = t[1:]
        out.append((x, y))
    return out


def code_documents(problems: Sequence[Problem], tokenizer: Tokenizer, context: int) -> list[list[int]]:
    """`EOS prompt+solution EOS` token ids per problem, cut to `context` + 1 tokens (inputs fit the context)."""
    eos = tokenizer.token_to_id(EOS)
    docs = []
    for p in problems:
        ids = [eos] + tokenizer.encode(p.prompt + p.canonical_solution, add_special_tokens=False).ids + [eos]
        docs.append(ids[: context + 1])
    return docs


def run_bpb(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    batches: list[Batch],
    problems: Sequence[Problem],
    cfg: BpbEvalConfig,
    precision: str = "fp32",
) -> SuiteResult:
    device = next(model.parameters()).device
    byte_len = token_byte_lengths(tokenizer)
    val = evaluate(model, batches, precision, device, byte_len)
    n_tok = sum(int((y >= 0).sum()) for _, y in batches)
    metrics: dict = {
        "val/loss": val["loss"],
        "val/bpb": val["bpb"],
        "val/tokens": n_tok,
        "val/mix": "code and text mixed (the shards do not record each document's kind)",
    }
    if cfg.code_problems >= 0:
        chosen = problems[: cfg.code_problems] if cfg.code_problems > 0 else problems
        docs = code_documents(chosen, tokenizer, int(model.config.max_position_embeddings))
        code = evaluate(
            model, document_batches(docs, cfg.batch_size, tokenizer.token_to_id(EOS)), precision, device, byte_len
        )
        metrics |= {"code/loss": code["loss"], "code/bpb": code["bpb"], "code/documents": len(docs)}
    model.eval()
    return SuiteResult(metrics)


@torch.no_grad()
def run_moe(model: torch.nn.Module, batches: list[Batch], cfg: MoEEvalConfig, precision: str = "fp32") -> SuiteResult:
    """Expert load per MoE layer over the batches, MaxVio per layer and per batch (see the module docstring)."""
    from model.moe import DeepseekMoE

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
    return SuiteResult(metrics)
