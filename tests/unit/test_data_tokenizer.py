"""Tokenizer: special token ids, exact round trip, and loading through transformers."""

import inspect
import json
import textwrap

import numpy as np
import pytest

from data.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    load_hf_tokenizer,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    token_dtype,
    train_tokenizer,
)

CORPUS = [inspect.getsource(textwrap), inspect.getsource(json), textwrap.__doc__ or ""]
HARD = [
    "def f(x):\n\treturn x  \r\n",  # tabs, trailing spaces, CRLF
    "  leading spaces and\n\n\n\nblank lines   ",
    "Unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 🤖🔥, combining e\u0301, zero-width \u200b.",
    "numbers 1234567 3.14159 0xDEADBEEF 1e-10",
    "\x0c form feed and \x0b vertical tab",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=600, min_frequency=2)


def test_special_tokens_have_the_first_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() <= 600
    for t in SPECIAL_TOKENS:
        assert tok.encode(t).ids == [SPECIAL_TOKENS.index(t)]
    assert BOS == "<｜begin▁of▁sentence｜>" and EOS == "<｜end▁of▁sentence｜>"


@pytest.mark.parametrize("text", CORPUS + HARD)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_token_bytes_are_what_decode_decodes(tok):
    """The packer's round-trip check (ids -> bytes through `token_bytes`) agrees with `tok.decode` on every token
    that is whole UTF-8 on its own, on every text here, and on special tokens."""
    table = token_bytes(tok)
    assert len(table) == tok.get_vocab_size() and len(set(table)) == len(table)
    for i, b in enumerate(table):
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:  # a piece of a multi-byte character: decode() would show U+FFFD
            assert "\ufffd" in tok.decode([i])
            continue
        assert tok.decode([i], skip_special_tokens=False) == text
    for text in CORPUS + HARD + ["<think> and " + EOS]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")
        assert b"".join(table[i] for i in ids).decode("utf-8") == tok.decode(ids, skip_special_tokens=False)


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_transformers_loads_it_and_agrees(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    assert load_tokenizer(path).encode(CORPUS[0]).ids == tok.encode(CORPUS[0]).ids
    hf = load_hf_tokenizer(path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, SPECIAL_TOKENS.index(PAD))
    for text in CORPUS + HARD:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text).ids
        assert hf.decode(ids) == text
    chat = "<｜User｜>2+2?<｜Assistant｜><think>add</think><answer>4</answer>"
    ids = hf(chat, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i < len(SPECIAL_TOKENS)] == [6, 7, 8, 9, 10, 11]
    assert hf.decode(ids) == chat


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(129280) == np.uint32


def test_the_data_stage_sets_its_own_tokenizer_threads(monkeypatch):
    import os

    from data.tokenizer import tokenizer_threads

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # as the Makefile exports it
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    with tokenizer_threads(0):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and "RAYON_NUM_THREADS" not in os.environ
    with tokenizer_threads(1):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and os.environ["RAYON_NUM_THREADS"] == "1"
    with tokenizer_threads(3):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["RAYON_NUM_THREADS"] == "3"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and "RAYON_NUM_THREADS" not in os.environ  # restored
