"""Tokenize documents (with FIM) and pack them into flat, sharded token files.

Packing. Documents are tokenized, each followed by EOS, and concatenated into one token stream per split; the stream
is cut into shards `shard_00000.npy`, `shard_00001.npy`, ... (1-D arrays, uint16 when the vocabulary has fewer than
65536 entries, else uint32) of at most `tokens_per_shard` tokens. A training sample is the window of `seq_len + 1`
tokens starting at `k * seq_len` of the stream: inputs are its first `seq_len` tokens, targets its last `seq_len`
(the shift by one), so consecutive samples share one token and no token is wasted. No padding: a document runs on
into the next sample, and EOS tells the model where one document ends and the next begins.

Document text is encoded with special-token parsing off (`encode_special_tokens`), so a document that spells
`<think>` or `<｜fim▁hole｜>` trains as those characters; the sentinels and EOS are inserted as ids. Every document
is checked to decode back to its text exactly (failures are counted and dropped).

Each datatrove task writes its own *part* of each split (`PartWriter`); `merge_parts` renumbers the parts' shards
into the split directory and writes its index.

Layout of a split directory (`train/` or `val/`):

    shard_00000.npy ...        token ids, 1-D
    doc_starts.npy             int64 offsets in the stream where each document begins (for cross-document masks)
    index.json                 {"format": 1, "seq_len", "dtype", "vocab_size", "eos_id", "n_tokens", "n_docs",
                                "n_sequences", "shards": [{"file", "n_tokens"}], "doc_starts_file", "fim_level"}

Splitting into train/validation is by document and by a hash of its text (`split_hash`): a document is in `val` for
every run and seed with the same `val_fraction`, whatever else is in the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data.fim import WindowFim, fim_ids, fim_rng, split_document
from data.langs import PROSE_LANGS
from data.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE, token_bytes, token_dtype

INDEX = "index.json"
DOC_STARTS = "doc_starts.npy"
PART = "part.json"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def split_hash(text: str) -> float:
    """A uniform number in [0, 1) fixed by the document's text (not by its position or the seed)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"valsplit").digest(), "little")
    return h / 2**64


def assign_splits(hashes: list[float], val_fraction: float) -> list[bool]:
    """True = validation: documents whose hash is below `val_fraction`. With val_fraction > 0 and at least two
    documents, val is never empty (the lowest hash goes there) and train is never empty (the highest stays)."""
    is_val = [h < val_fraction for h in hashes]
    if val_fraction > 0 and len(hashes) >= 2:
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        is_val[order[0]] = True
        is_val[order[-1]] = False
    return is_val


def sentinel_ids(tok: Tokenizer) -> tuple[int, int, int]:
    return tok.token_to_id(FIM_BEGIN), tok.token_to_id(FIM_HOLE), tok.token_to_id(FIM_END)


def fim_wanted(lang: str, fim_langs: list[str]) -> bool:
    return lang in fim_langs or ("*" in fim_langs and lang not in PROSE_LANGS)


def encode_documents(
    texts: list[str],
    langs: list[str],
    tok: Tokenizer,
    seed: int,
    fim_rate: float,
    spm_rate: float,
    fim_langs: list[str],
    table: list[bytes] | None = None,
) -> list[tuple[list[int], str, bool]]:
    """(ids ending in EOS, FIM mode "" / "psm" / "spm", round trip ok) per document.

    `tok` must have `encode_special_tokens` set. Document-level FIM (data/fim.py, deterministic in (seed, text)) cuts
    the text into prefix/middle/suffix, each encoded on its own; the round trip check maps every encoded piece's
    ids back to bytes (`table`, data.tokenizer.token_bytes, built when not given) and compares them with the piece's
    UTF-8: decoding exactly, without building the decoded strings. Pass fim_rate=0 for window-level FIM, which works
    on the packed ids instead."""
    assert tok.encode_special_tokens, "document text must be encoded with special-token parsing off"
    pieces, layout = [], []  # layout: (mode, index of the first piece)
    for text, lang in zip(texts, langs):
        mode = ""
        if fim_rate > 0 and fim_wanted(lang, fim_langs):
            rng = fim_rng(seed, text)
            if rng.random() < fim_rate:
                prefix, middle, suffix = split_document(text, rng)
                mode = "spm" if rng.random() < spm_rate else "psm"
        layout.append((mode, len(pieces)))
        if mode == "psm":
            pieces += [prefix, middle, suffix]
        elif mode == "spm":
            pieces += [prefix + middle, suffix]
        else:
            pieces.append(text)
    ids = [e.ids for e in tok.encode_batch_fast(pieces, add_special_tokens=False)]
    table = table or token_bytes(tok)
    ok_piece = [b"".join(map(table.__getitem__, i)) == p.encode("utf-8") for i, p in zip(ids, pieces)]
    eos, sentinels = tok.token_to_id(EOS), sentinel_ids(tok)
    out = []
    for mode, k in layout:
        if mode == "psm":
            doc = fim_ids(ids[k], ids[k + 1], ids[k + 2], "psm", sentinels)
            ok = all(ok_piece[k : k + 3])
        elif mode == "spm":
            doc = fim_ids(ids[k], [], ids[k + 1], "spm", sentinels)  # prefix+middle is one piece
            ok = all(ok_piece[k : k + 2])
        else:
            doc, ok = ids[k], ok_piece[k]
        out.append((doc + [eos], mode, ok))
    return out


class ShardWriter:
    """Append tokens (documents via `add`); writes fixed-size shards and, on `close`, the split's index."""

    def __init__(self, out_dir: Path, vocab_size: int, eos_id: int, tokens_per_shard: int) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokens_per_shard = tokens_per_shard
        self._buf = np.empty(tokens_per_shard, dtype=self.dtype)
        self._fill = 0
        self._shards: list[dict] = []
        self._doc_starts: list[int] = []
        self.n_tokens = 0

    def add(self, ids: list[int] | np.ndarray) -> None:
        """Append one document (its ids already end in EOS)."""
        self.write(ids, doc_starts=[0])

    def write(self, ids: list[int] | np.ndarray, doc_starts: list[int]) -> None:
        """Append tokens, in which documents begin at the offsets `doc_starts`."""
        arr = np.asarray(ids, dtype=np.int64)
        assert arr.size and arr.min() >= 0 and arr.max() < self.vocab_size, "token id out of vocabulary range"
        self._doc_starts.extend(self.n_tokens + s for s in doc_starts)
        self.n_tokens += arr.size
        arr = arr.astype(self.dtype)
        while arr.size:
            take = min(arr.size, self.tokens_per_shard - self._fill)
            self._buf[self._fill : self._fill + take] = arr[:take]
            self._fill += take
            arr = arr[take:]
            if self._fill == self.tokens_per_shard:
                self._flush()

    def _flush(self) -> None:
        name = shard_name(len(self._shards))
        np.save(self.out_dir / name, self._buf[: self._fill])
        self._shards.append({"file": name, "n_tokens": int(self._fill)})
        self._fill = 0

    def index(self, seq_len: int, **extra) -> dict:
        return {
            "format": 1,
            "seq_len": seq_len,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "n_tokens": self.n_tokens,
            "n_docs": len(self._doc_starts),
            "n_sequences": max(0, (self.n_tokens - 1) // seq_len),
            "shards": self._shards,
            "doc_starts_file": DOC_STARTS,
            **extra,
        }

    def close(self, seq_len: int, check: bool = True, **extra) -> dict:
        """Write the last shard, doc_starts.npy and index.json; return the index."""
        if self._fill:
            self._flush()
        if check and self.n_tokens < seq_len + 1:
            raise ValueError(
                f"{self.out_dir.name}: {self.n_tokens} tokens cannot fill one sequence of seq_len={seq_len} + 1; "
                "add documents (sources' max_files/max_bytes) or lower data.pack.seq_len"
            )
        np.save(self.out_dir / DOC_STARTS, np.asarray(self._doc_starts, dtype=np.int64))
        index = self.index(seq_len, **extra)
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        return index


class PartWriter:
    """One task's part of one split: documents in, shards out; window-level FIM applied here (data/fim.py)."""

    def __init__(self, out_dir: Path, tok: Tokenizer, tokens_per_shard: int, seq_len: int, window_fim: dict | None):
        shutil.rmtree(out_dir, ignore_errors=True)  # a re-run of a task starts its part afresh
        self.seq_len = seq_len
        self.writer = ShardWriter(out_dir, tok.get_vocab_size(), tok.token_to_id(EOS), tokens_per_shard)
        self.fim = None
        if window_fim is not None:
            self.fim = WindowFim(seq_len, tok.token_to_id(EOS), sentinel_ids(tok), **window_fim)

    def add(self, ids: list[int]) -> None:
        if self.fim is None:
            self.writer.add(ids)
            return
        self.fim.add(np.asarray(ids, dtype=np.int64))
        for win, starts in self.fim.windows():
            self.writer.write(win, starts)

    def close(self) -> dict:
        extra = {"fim_level": "document"}
        if self.fim is not None:
            for win, starts in self.fim.windows(final=True):
                self.writer.write(win, starts)
            extra = {"fim_level": "window", "fim_window": self.seq_len, "window_fim_modes": self.fim.modes}
        return self.writer.close(self.seq_len, check=False, **extra)


def merge_parts(parts: list[Path], out_dir: Path, seq_len: int) -> dict:
    """Move the shards of `parts` (in order) into `out_dir` as one stream; write doc_starts.npy and index.json.

    Window-level parts are windowed from their own start, so every part but the last is cut to whole windows: the
    tail (fewer than seq_len tokens) is dropped and counted as `tail_tokens_dropped`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indexes = [json.loads((p / INDEX).read_text()) for p in parts]
    parts = [p for p, ix in zip(parts, indexes) if ix["n_tokens"]]
    indexes = [ix for ix in indexes if ix["n_tokens"]]
    if not indexes:
        raise ValueError(f"{out_dir.name}: no document was packed (the removed ones are counted in the stage's log)")
    shards, starts, offset, dropped, fim_modes = [], [], 0, 0, {"psm": 0, "spm": 0}
    for k, (part, ix) in enumerate(zip(parts, indexes)):
        keep = ix["n_tokens"]
        if ix.get("fim_level") == "window" and k < len(parts) - 1:
            keep = ix["n_tokens"] // seq_len * seq_len
        dropped += ix["n_tokens"] - keep
        for mode, n in ix.get("window_fim_modes", {}).items():
            fim_modes[mode] += n
        left = keep
        for s in ix["shards"]:
            if left <= 0:
                break
            name = shard_name(len(shards))
            if s["n_tokens"] <= left:
                os.replace(part / s["file"], out_dir / name)
                n = s["n_tokens"]
            else:  # the cut falls inside this shard
                np.save(out_dir / name, np.load(part / s["file"])[:left])
                n = left
            shards.append({"file": name, "n_tokens": n})
            left -= n
        ds = np.load(part / DOC_STARTS)
        starts.append(ds[ds < keep] + offset)
        offset += keep
    np.save(out_dir / DOC_STARTS, np.concatenate(starts).astype(np.int64))
    first = indexes[0]
    index = {
        "format": 1,
        "seq_len": seq_len,
        "dtype": first["dtype"],
        "vocab_size": first["vocab_size"],
        "eos_id": first["eos_id"],
        "n_tokens": offset,
        "n_docs": int(sum(len(s) for s in starts)),
        "n_sequences": (offset - 1) // seq_len,
        "shards": shards,
        "doc_starts_file": DOC_STARTS,
        "fim_level": first.get("fim_level", "document"),
    }
    if index["fim_level"] == "window":
        index |= {"fim_window": seq_len, "window_fim_modes": fim_modes, "tail_tokens_dropped": dropped}
    if offset < seq_len + 1:
        raise ValueError(
            f"{out_dir.name}: {offset} tokens cannot fill one sequence of seq_len={seq_len} + 1; "
            "add documents (sources' max_files/max_bytes) or lower data.pack.seq_len"
        )
    (out_dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index
