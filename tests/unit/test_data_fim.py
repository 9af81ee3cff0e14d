"""FIM: exact layouts, determinism, and the property that undoing the transform restores the document."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.fim import (
    WindowFim,
    apply_fim,
    fim_prompt,
    format_fim,
    split_document,
    undo_fim,
    undo_fim_piece,
    undo_window_fim,
)
from data.pack import encode_documents, sentinel_ids
from data.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE, SPECIAL_TOKENS, contains_special_text, train_tokenizer

DOC = "def add(a, b):\n    return a + b\n"


def test_layouts_are_exact():
    assert format_fim("P", "M", "S", "psm") == f"{FIM_BEGIN}P{FIM_HOLE}S{FIM_END}M"
    assert format_fim("P", "M", "S", "spm") == f"{FIM_BEGIN}{FIM_HOLE}S{FIM_END}PM"
    assert fim_prompt("P", "S", "psm") == f"{FIM_BEGIN}P{FIM_HOLE}S{FIM_END}"
    assert fim_prompt("P", "S", "spm") == f"{FIM_BEGIN}{FIM_HOLE}S{FIM_END}P"
    # a training example is its prompt followed by the middle, in both modes
    for mode in ("psm", "spm"):
        assert format_fim("P", "M", "S", mode) == fim_prompt("P", "S", mode) + "M"


def test_rates_and_determinism():
    assert apply_fim(DOC, seed=0, rate=0.0, spm_rate=0.5) == (DOC, "")
    out, mode = apply_fim(DOC, seed=0, rate=1.0, spm_rate=0.0)
    assert mode == "psm" and out.startswith(FIM_BEGIN) and not out.startswith(FIM_BEGIN + FIM_HOLE)
    assert apply_fim(DOC, seed=0, rate=1.0, spm_rate=1.0)[1] == "spm"
    assert apply_fim(DOC, seed=3, rate=0.5, spm_rate=0.5) == apply_fim(DOC, seed=3, rate=0.5, spm_rate=0.5)
    docs = [f"x{i} = {i}\n" * 3 for i in range(400)]
    modes = [apply_fim(d, seed=1, rate=0.5, spm_rate=0.5)[1] for d in docs]
    assert 140 < sum(m != "" for m in modes) < 260  # ~50% transformed
    assert 50 < modes.count("spm") < 150
    other_seed = [apply_fim(d, seed=2, rate=0.5, spm_rate=0.5)[1] for d in docs]
    assert modes != other_seed


def test_split_is_character_level_and_covers_the_document():
    rng = random.Random(0)
    for _ in range(200):
        p, m, s = split_document(DOC, rng)
        assert p + m + s == DOC
    cuts = {len(split_document(DOC, random.Random(i))[0]) for i in range(300)}
    assert len(cuts) > len(DOC) // 2  # cut points land on characters everywhere, not on token boundaries only


@settings(max_examples=300, deadline=None)
@given(text=st.text(min_size=0, max_size=200), seed=st.integers(0, 2**31), spm_rate=st.sampled_from([0.0, 0.5, 1.0]))
def test_undo_restores_the_document_exactly(text, seed, spm_rate):
    if contains_special_text(text):  # such documents are dropped by the filters
        return
    out, mode = apply_fim(text, seed=seed, rate=1.0, spm_rate=spm_rate)
    assert mode in ("psm", "spm")
    assert undo_fim(out) == text
    assert undo_fim(out).encode("utf-8", "surrogatepass") == text.encode("utf-8", "surrogatepass")


def test_sentinels_are_single_tokens_and_token_level_round_trip():
    corpus = [DOC * 3, "The hole is in the middle of the text.\n" * 5]
    tok = train_tokenizer(corpus, vocab_size=300, min_frequency=1)
    out, _ = apply_fim(DOC, seed=0, rate=1.0, spm_rate=0.0)
    ids = tok.encode(out + EOS).ids
    for sentinel in (FIM_BEGIN, FIM_HOLE, FIM_END, EOS):
        assert ids.count(SPECIAL_TOKENS.index(sentinel)) == 1
    assert ids[0] == SPECIAL_TOKENS.index(FIM_BEGIN) and ids[-1] == SPECIAL_TOKENS.index(EOS)
    decoded = tok.decode(ids[:-1], skip_special_tokens=False)
    assert undo_fim(decoded) == DOC


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer([DOC * 20, "The hole is in the middle of the text.\n" * 20], vocab_size=400, min_frequency=1)
    t.encode_special_tokens = True
    return t


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=300), seed=st.integers(0, 2**31), spm_rate=st.sampled_from([0.0, 1.0]))
def test_document_level_ids_undo_exactly(tok, text, seed, spm_rate):
    """The packer's document-level FIM on token ids: undoing it and decoding gives the document back, whatever it
    spells (special-token text included: it is encoded as text, never as a sentinel)."""
    ((ids, mode, ok),) = encode_documents([text], ["python"], tok, seed, 1.0, spm_rate, ["python"])
    assert ok and mode == ("spm" if spm_rate else "psm") and ids[-1] == tok.token_to_id(EOS)
    body = np.asarray(ids[:-1])
    assert np.count_nonzero(np.isin(body, range(len(SPECIAL_TOKENS)))) == 3  # the three sentinels, nothing else
    assert tok.decode(undo_fim_piece(body, sentinel_ids(tok)).tolist(), skip_special_tokens=False) == text


def test_special_token_text_is_encoded_as_text(tok):
    text = "x = '<think>' + '<｜fim▁hole｜>'\n"
    ((ids, mode, ok),) = encode_documents([text], ["python"], tok, 0, 0.0, 0.5, ["python"])
    assert ok and mode == "" and ids[:-1] and max(ids[:-1]) >= len(SPECIAL_TOKENS)
    assert not set(ids[:-1]) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids[:-1], skip_special_tokens=False) == text


SENT = (3, 4, 5)


def _docs(rng, n):
    return [np.append(rng.integers(12, 500, size=int(rng.integers(1, 90))), 1) for _ in range(n)]


def _window_stream(docs, window, rate, spm_rate, seed, chunked=True):
    wf = WindowFim(window, 1, SENT, rate, spm_rate, seed)
    out, starts, pos = [], [], 0
    for d in docs:
        wf.add(d)
        for win, ws in wf.windows() if chunked else []:
            out.append(win)
            starts += [pos + s for s in ws]
            pos += len(win)
    for win, ws in wf.windows(final=True):
        out.append(win)
        starts += [pos + s for s in ws]
        pos += len(win)
    return out, starts, wf.modes


@pytest.mark.parametrize("window, rate, spm_rate", [(16, 1.0, 0.0), (16, 1.0, 1.0), (32, 0.5, 0.5), (5, 1.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_level_fim_is_exactly_invertible(window, rate, spm_rate, seed):
    rng = np.random.default_rng(seed)
    docs = _docs(rng, 60)
    plain = np.concatenate(docs)
    wins, starts, modes = _window_stream(docs, window, rate, spm_rate, seed)
    stream = np.concatenate(wins)
    assert all(len(w) == window for w in wins[:-1]) and 0 < len(wins[-1]) <= window  # every window full but the last
    assert np.array_equal(undo_window_fim(stream, window, 1, SENT), plain)
    assert len(starts) == len(docs)  # every document starts once, and in order
    assert np.count_nonzero(stream == SENT[0]) == modes["psm"] + modes["spm"] > 0
    if rate == 1.0 and window > 5:
        assert modes["spm" if spm_rate else "psm"] > 20
    # every FIM example lies whole inside its window: begin, hole, end all in the same one
    for w in wins:
        n_begin = np.count_nonzero(w == SENT[0])
        assert n_begin == np.count_nonzero(w == SENT[1]) == np.count_nonzero(w == SENT[2])


def test_window_level_fim_does_not_depend_on_how_documents_arrive():
    docs = _docs(np.random.default_rng(3), 40)
    a, _, _ = _window_stream(docs, 24, 0.5, 0.5, seed=7)
    b, _, _ = _window_stream(docs, 24, 0.5, 0.5, seed=7, chunked=False)  # all buffered, windows built at the end
    assert np.array_equal(np.concatenate(a), np.concatenate(b))
    rate0, _, modes = _window_stream(docs, 24, 0.0, 0.5, seed=7)
    assert np.array_equal(np.concatenate(rate0), np.concatenate(docs)) and modes == {"psm": 0, "spm": 0}
