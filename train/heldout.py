"""Held-out language-model metrics, shared by pretraining's validation and the evaluation stage: mean next-token
cross entropy and bits per byte over fixed batches.

Bits per byte, as the literature computes it (nanochat's `evaluate_bpb`, lm-eval's `bits_per_byte`): the summed
next-token CE in nats of the targets that stand for text, divided by ln 2 times the UTF-8 bytes of that text.
Targets that stand for no text (special tokens: the end-of-sequence separator of packed documents, BOS, the FIM
markers) have 0 bytes and are EXCLUDED from the CE sum as well, so a tokenizer that marks more boundaries is not
charged for predicting them. The mean CE ("loss") keeps every non-ignored target: it is the training objective.

Everything accumulates on the device; the host reads the sums once per evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from data.loader import PackedDataset
from model.transformer import IGNORE_INDEX
from train.runtime import autocast

Batch = tuple[Tensor, Tensor]


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for. Byte-level BPE maps one byte to one symbol, so the token string's length
    is its byte count; special tokens stand for no text and count 0."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for tok, i in vocab.items():
        lengths[i] = 0 if tok in special else len(tok)
    return lengths


def fixed_batches(ds: PackedDataset, batch_size: int, n_batches: int) -> list[Batch]:
    """The first sequences of a split, in order: the same validation batches at every evaluation."""
    n = min(len(ds), batch_size * n_batches)
    if n == 0:
        raise ValueError(f"validation split {ds.dir} holds no sequence of length {ds.seq_len}")
    rows = torch.from_numpy(np.stack([ds[i] for i in range(n)]))
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in rows.split(batch_size)]


def ce_sums(logits_BTV: Tensor, targets_BT: Tensor, bytes_V: Tensor) -> Tensor:
    """[4] fp32 sums of one batch: CE over the kept targets, their count, CE over text targets, their bytes."""
    ce_BT = F.cross_entropy(
        logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets_BT)
    kept_BT = targets_BT != IGNORE_INDEX
    bytes_BT = torch.where(kept_BT, bytes_V[targets_BT.clamp(min=0)], 0).float()
    text_BT = bytes_BT > 0
    return torch.stack([ce_BT.sum(), kept_BT.sum().float(), (ce_BT * text_BT).sum(), bytes_BT.sum()])


def metrics_from_sums(sums: list[float]) -> dict[str, float]:
    """{"loss": mean CE, "bpb": bits per byte} from the [4] sums of `ce_sums` (added over batches and ranks)."""
    ce, n_tok, ce_text, n_bytes = sums
    return {"loss": ce / max(1.0, n_tok), "bpb": ce_text / (max(1.0, n_bytes) * math.log(2))}


@torch.no_grad()
def evaluate(model, batches: list[Batch], precision: str, device: torch.device, byte_len: np.ndarray) -> dict:
    """Mean next-token CE (the MTP head is not an evaluation target) and bits per byte over fixed batches."""
    was_training = model.training
    model.eval()
    bytes_V = torch.as_tensor(byte_len, device=device)
    total = torch.zeros(4, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = model(x).logits_BTV
        total += ce_sums(logits, y, bytes_V)
    model.train(was_training)
    return metrics_from_sums(total.tolist())
