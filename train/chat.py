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
the model's prompts byte for byte the same way.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from data.tokenizer import ASSISTANT, BOS, EOS, USER


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
