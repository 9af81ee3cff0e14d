"""Byte-level BPE tokenizer with DeepSeek-V3's special tokens, trained with Hugging Face `tokenizers`.

How it works. Text is first split into "pre-tokens" (runs of letters, digits in groups of at most three, spaces,
punctuation: the GPT-2 / DeepSeek regex idea), every pre-token is mapped to bytes and each byte to one of 256 visible
characters (byte-level: no unknown token, any UTF-8 string is representable), then BPE merges the most frequent
adjacent pairs until the vocabulary reaches `vocab_size`. Because nothing is normalized and every byte has a
symbol, `decode(encode(text)) == text` for every string. Text that spells a special token (`<think>` in a file)
would be read as that token: the packer encodes document text with `encode_special_tokens = True`, so it stays
text, and checks the round trip on every kept document (data/pack.py).

Special tokens take the first ids, in this order (DeepSeek-V3 spelling: fullwidth bar U+FF5C, U+2581 for spaces):

    0 <｜begin▁of▁sentence｜>   BOS
    1 <｜end▁of▁sentence｜>     EOS: ends every document in the packed stream
    2 <｜▁pad▁｜>               PAD
    3 <｜fim▁begin｜>  4 <｜fim▁hole｜>  5 <｜fim▁end｜>    fill-in-the-middle sentinels (see data/fim.py)
    6 <｜User｜>  7 <｜Assistant｜>                        chat roles
    8 <think>  9 </think>  10 <answer>  11 </answer>     reasoning format tags (R1)

The saved `tokenizer.json` loads in `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`;
`load_hf_tokenizer` does that with the BOS/EOS/PAD roles set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.io import atomic_write_text, scoped_env

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SPECIAL_TOKENS = [
    BOS,
    EOS,
    PAD,
    FIM_BEGIN,
    FIM_HOLE,
    FIM_END,
    USER,
    ASSISTANT,
    THINK_OPEN,
    THINK_CLOSE,
    ANSWER_OPEN,
    ANSWER_CLOSE,
]

# Digits are split into groups of 1-3 before the byte-level regex (as DeepSeek's and Llama-3's tokenizers do),
# so numbers tokenize consistently; the ByteLevel step then applies the GPT-2 pre-tokenization regex.
_DIGITS = Regex(r"\p{N}{1,3}")


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with this project's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_DIGITS, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_threads(threads: int) -> contextlib.AbstractContextManager[None]:
    """Encode and train with `threads` threads (0: every core), whatever this process inherited: the Makefile
    turns the tokenizers library's parallelism off for the training stages, and the data stage decides its own.
    Rayon sizes its thread pool at the first parallel call of a process, so `threads` holds from that call on."""
    env = {"TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true"}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    return scoped_env(env)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None
) -> Tokenizer:
    """Train byte-level BPE on `texts` (strings or batches of them); special tokens get ids 0..11, bytes follow."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write `tokenizer.json` (atomically: a reader never sees a half-written file)."""
    atomic_write_text(Path(path), tok.to_str(pretty=False))


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def load_hf_tokenizer(path: Path):
    """`transformers.PreTrainedTokenizerFast` over `tokenizer.json`, with BOS/EOS/PAD set and no space clean-up."""
    from transformers import PreTrainedTokenizerFast  # deferred: transformers is a heavy import, only for this wrapper

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        clean_up_tokenization_spaces=False,
    )


def _byte_symbols() -> dict[str, int]:
    """The byte-level alphabet as a map symbol -> byte: the 188 printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, soft hyphen...) for the characters from U+0100 up, in byte order (GPT-2's table, which
    `pre_tokenizers.ByteLevel` and `decoders.ByteLevel` use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {chr(b): b for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in set(printable)):
        symbols[chr(256 + k)] = b
    return symbols


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The bytes each id decodes to (index = id): a byte-level token's symbols mapped back to bytes, a special
    token's own text. `b"".join(table[i] for i in ids)` is what `tok.decode(ids, skip_special_tokens=False)`
    decodes from UTF-8, so comparing it with the text's UTF-8 checks a round trip without decoding (test)."""
    symbols = _byte_symbols()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    table = [b""] * tok.get_vocab_size()
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        table[i] = token.encode("utf-8") if token in special else bytes(symbols[c] for c in token)
    return table


def token_dtype(vocab_size: int):
    """The smallest numpy dtype for token ids: uint16 when the vocabulary has fewer than 65536 entries."""
    return np.uint16 if vocab_size < 2**16 else np.uint32


def contains_special_text(text: str) -> bool:
    """True when `text` spells a special token (it would be encoded as that token, not as text)."""
    return any(t in text for t in SPECIAL_TOKENS)
