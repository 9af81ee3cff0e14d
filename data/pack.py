"""Tokenize documents (with FIM) and pack them into flat, sharded token files.

Packing. Documents are tokenized, each followed by EOS, and concatenated into one token stream per split; the stream
is cut into shards `shard_00000.npy`, `shard_00001.npy`, ... (1-D arrays, uint16 when the vocabulary has fewer than
65536 entries, else uint32) of `tokens_per_shard` tokens (the last one shorter). A training sample is the window
of `seq_len + 1` tokens starting at `k * seq_len` of the stream: inputs are its first `seq_len` tokens, targets its
last `seq_len` (the shift by one), so consecutive samples share one token and no token is wasted. No padding: a
document runs on into the next sample, and EOS tells the model where one document ends and the next begins.

Layout of a split directory (`train/` or `val/`):

    shard_00000.npy ...        token ids, 1-D
    doc_starts.npy             int64 offsets in the stream where each document begins (for cross-document masks)
    index.json                 {"format": 1, "seq_len", "dtype", "vocab_size", "eos_id", "n_tokens", "n_docs",
                                "n_sequences", "shards": [{"file", "n_tokens"}], "doc_starts_file"}

Splitting into train/validation is by document and by a hash of its text (`split_hash`, `assign_splits`): a document
is in `val` for every run and seed with the same `val_fraction`, whatever else is in the corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data.fim import apply_fim, undo_fim
from data.sources import PROSE_LANGS
from data.tokenizer import EOS, token_dtype

INDEX = "index.json"
DOC_STARTS = "doc_starts.npy"


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


def tokenize_batch(
    batch: dict[str, list],
    tokenizer: Tokenizer,
    seed: int,
    fim_rate: float,
    spm_rate: float,
    fim_langs: list[str],
) -> dict[str, list]:
    """`datasets.map(batched=True)` body: FIM-transform code documents, encode, append EOS, check the round trip.

    Adds `ids` (token ids ending in EOS), `fim` ("", "psm" or "spm") and `roundtrip_ok`: decoding the ids and undoing
    FIM gives back the document exactly.
    """
    eos = tokenizer.token_to_id(EOS)
    every_code_lang = "*" in fim_langs
    texts, modes = [], []
    for text, lang in zip(batch["text"], batch["lang"]):
        fim_this = lang in fim_langs or (every_code_lang and lang not in PROSE_LANGS)
        t, mode = apply_fim(text, seed, fim_rate, spm_rate) if fim_this else (text, "")
        texts.append(t)
        modes.append(mode)
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: not needed
    ids = [e.ids for e in encodings]
    decoded = tokenizer.decode_batch(ids, skip_special_tokens=False)
    ok = [undo_fim(d) == orig for d, orig in zip(decoded, batch["text"])]
    return {"ids": [i + [eos] for i in ids], "fim": modes, "roundtrip_ok": ok}


class ShardWriter:
    """Append documents' token ids; writes fixed-size shards and, on `close`, the split's index."""

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
        arr = np.asarray(ids, dtype=np.int64)
        assert arr.size and arr.min() >= 0 and arr.max() < self.vocab_size, "token id out of vocabulary range"
        self._doc_starts.append(self.n_tokens)
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

    def close(self, seq_len: int) -> dict:
        """Write the last shard, doc_starts.npy and index.json; return the index."""
        if self._fill:
            self._flush()
        if self.n_tokens < seq_len + 1:
            raise ValueError(
                f"{self.out_dir.name}: {self.n_tokens} tokens cannot fill one sequence of seq_len={seq_len} + 1; "
                "add documents (sources' max_files/max_bytes) or lower data.pack.seq_len"
            )
        np.save(self.out_dir / DOC_STARTS, np.asarray(self._doc_starts, dtype=np.int64))
        index = {
            "format": 1,
            "seq_len": seq_len,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "n_tokens": self.n_tokens,
            "n_docs": len(self._doc_starts),
            "n_sequences": (self.n_tokens - 1) // seq_len,
            "shards": self._shards,
            "doc_starts_file": DOC_STARTS,
        }
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        return index
