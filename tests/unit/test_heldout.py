"""Held-out LM metrics (train/heldout.py), shared by pretraining's validation and the evaluation stage: the mean CE
counts every target, bits per byte only the targets that stand for text (special tokens, 0 bytes, are excluded
from the CE sum and the byte count), against a hand computation with plain torch."""

import math

import numpy as np
import torch

from train.heldout import evaluate


class Bigram(torch.nn.Module):
    """A model whose logits depend on the input token only: easy to compute by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, x, y=None):
        return type("Out", (), {"logits_BTV": self.table[x]})


def test_bpb_excludes_special_token_targets_and_loss_counts_every_target():
    vocab, eos = 6, 5
    byte_len = np.array([1, 2, 3, 1, 4, 0])  # token 5 is a special token (EOS): no bytes
    x = torch.tensor([[0, 1, 2, 5], [3, 4, 5, 0]])
    y = torch.tensor([[1, 2, 5, 3], [4, 5, 0, -100]])  # two EOS targets, one ignored position
    model = Bigram(vocab)
    got = evaluate(model, [(x, y)], "fp32", torch.device("cpu"), byte_len)
    ce = torch.nn.functional.cross_entropy(
        model.table[x].flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100
    )
    kept, text = y.flatten() != -100, (y.flatten() != -100) & (y.flatten() != eos)
    want_loss = ce[kept].mean().item()
    want_bpb = ce[text].sum().item() / (sum(byte_len[t] for t in y.flatten()[text].tolist()) * math.log(2))
    assert abs(got["loss"] - want_loss) < 1e-6 and abs(got["bpb"] - want_bpb) < 1e-6, (got, want_loss, want_bpb)
    # the EOS targets matter for the loss, not for bits per byte
    assert abs(want_bpb - ce[kept].sum().item() / (byte_len[y.flatten()[kept]].sum() * math.log(2))) > 1e-3
