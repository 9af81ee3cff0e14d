"""The chat template of post-training, and its tokenization with a loss mask.

DeepSeek-V3/R1 render one exchange as

    <｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜>{completion}<｜end▁of▁sentence｜>

with the role markers as single special tokens (ids from `data/tokenizer.py`). Training on such a pair learns only
the answer: the loss mask is 1 on the completion's tokens and on the closing end-of-sentence token (the model must
learn to stop), and 0 on BOS, the user turn and the assistant marker. Generation feeds the same text up to and
including `<｜Assistant｜>` (`render_prompt`) and stops at the end-of-sentence token.

The prompt and the completion are tokenized separately and concatenated, so the boundary of the mask is exact: no
BPE merge can straddle it (it sits on a special token anyway). Both are encoded without any post-processor, and the
special tokens inside a completion (`<think>`, `</think>`, `<answer>`, `</answer>`) become their single ids.
Decoding the ids with special tokens kept gives back the template text exactly (`decode_chat`).

SFT (train/sft.py), GRPO (train/grpo.py), distillation and evaluation all use these functions, so every stage sees
the model's prompts byte for byte the same way. SFT and the distilled student also share the batches built from
such exchanges (`encode_rows`, `make_batch`) and their order (`batch_indices`, also GRPO's prompt order).
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from data.tokenizer import ASSISTANT, BOS, EOS, USER
from model.transformer import IGNORE_INDEX


def special_id(tokenizer: Tokenizer, token: str) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ValueError(f"the tokenizer has no special token {token!r} (train it with data.tokenizer.train_tokenizer)")
    return tid


def eos_id(tokenizer: Tokenizer) -> int:
    return special_id(tokenizer, EOS)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def render_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of `BOS USER prompt ASSISTANT`: what generation is fed to produce the completion."""
    ids = [special_id(tokenizer, BOS), special_id(tokenizer, USER)]
    return ids + _encode(tokenizer, prompt) + [special_id(tokenizer, ASSISTANT)]


def encode_chat(tokenizer: Tokenizer, prompt: str, completion: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one exchange; mask is 1 exactly on the completion's tokens and the final EOS.

    Without a completion, returns the generation prompt (`render_prompt`) with an all-zero mask.
    """
    ids = render_prompt(tokenizer, prompt)
    mask = [0] * len(ids)
    if completion is not None:
        answer = _encode(tokenizer, completion) + [eos_id(tokenizer)]
        ids += answer
        mask += [1] * len(answer)
    return ids, mask


def decode_chat(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The template text of `ids`, special tokens included (the inverse of `encode_chat`)."""
    return tokenizer.decode(ids, skip_special_tokens=False)


def decode_completion(tokenizer: Tokenizer, ids: list[int]) -> str:
    """A generated completion as text: the final EOS dropped, the reasoning tags (special tokens) kept."""
    eos = eos_id(tokenizer)
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def encode_rows(tokenizer: Tokenizer, rows: list[dict], max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, loss_mask) of each row's prompt and completion; rows longer than max_len are dropped and counted."""
    out, dropped = [], 0
    for r in rows:
        ids, mask = encode_chat(tokenizer, r["prompt"], r["completion"])
        if len(ids) > max_len:
            dropped += 1
            continue
        out.append((ids, mask))
    return out, dropped


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded inputs [B, T] and targets [B, T]: targets[t] = ids[t+1] where that token is in the loss mask,
    else IGNORE_INDEX (prompt tokens and padding)."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        x[b, : len(ids) - 1] = ids_t[:-1]
        y[b, : len(ids) - 1] = torch.where(keep, ids_t[1:], IGNORE_INDEX)
    return x, y


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Example indices of step `step`: consecutive slices of per-epoch permutations (a pure function of its
    arguments, so a resumed run draws the same examples)."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch - len(out), n - off)
        out += perm[off : off + take].tolist()
        pos += take
    return out
