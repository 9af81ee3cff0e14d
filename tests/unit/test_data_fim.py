"""FIM: exact layouts, determinism, and the property that undoing the transform restores the document."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from data.fim import apply_fim, fim_prompt, format_fim, split_document, undo_fim
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
