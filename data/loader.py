"""A resumable, rank-aware loader over packed token shards (see data/pack.py for the layout).

The one idea: a *global* order of sequences that does not depend on how many ranks read it.

    epoch e        = a permutation of all sequence indices, drawn from numpy's generator seeded by (seed, e)
    global stream  = epoch 0's permutation, then epoch 1's, ... (position g -> epoch g // N, slot g % N)
    state          = `consumed`: how many sequences of the global stream all ranks together have taken

At each step, with world size W and per-rank batch b, rank r takes global positions
`[consumed + r*b, consumed + (r+1)*b)` and every rank then advances `consumed` by `W*b`. The ranks of one step
therefore read disjoint, consecutive slices whose union, in rank order, is exactly the slice a single rank with
batch `W*b` would read. Because the state is one global count, a checkpoint saved on 4 ranks resumes on 2 or 1
(or 8) without repeating or skipping a sequence: the new ranks simply continue the same global stream.
`consumed` is the same number on every rank, so it can be saved once with the checkpoint (e.g. in the trainer's
JSON loop state).

Use in a training loop (gradient accumulation simply calls `next` once per micro-batch):

    ds = PackedDataset(data_dir / "train", seq_len=256)
    loader = ShardLoader(ds, batch_size=micro_batch, rank=dp_rank, world_size=dp_size, seed=seed)
    loader.load_state_dict(ckpt["data"])        # on resume, saved with any world size
    inputs_BT, targets_BT = next(loader)
    ckpt["data"] = loader.state_dict()           # {"consumed", "seed", "n_sequences", "seq_len"}

Tensor names: B = per-rank batch, T = seq_len.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data.pack import DOC_STARTS, INDEX


class PackedDataset:
    """Fixed-length windows over a split's token stream: item k = tokens [k*T, k*T + T + 1) as an int64 array.

    `seq_len` may differ from the one the data stage packed with (the stream is flat); it defaults to it. Shards are
    memory-mapped when first read and at most `max_open_shards` stay mapped (least recently used are closed: each
    map holds a file descriptor), so a corpus of any number of shards stays under the process's descriptor limit.
    """

    def __init__(self, shard_dir: str | Path, seq_len: int | None = None, max_open_shards: int = 64) -> None:
        self.dir = Path(shard_dir)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"no packed split at {self.dir}: {INDEX} missing (run the data stage)")
        self.index = json.loads(index_path.read_text())
        self.seq_len = int(seq_len or self.index["seq_len"])
        self.n_tokens = int(self.index["n_tokens"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index["eos_id"])
        if self.n_tokens < self.seq_len + 1:
            raise ValueError(f"{self.dir}: {self.n_tokens} tokens are fewer than seq_len + 1 = {self.seq_len + 1}")
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self._files = [s["file"] for s in self.index["shards"]]
        sizes = np.array([s["n_tokens"] for s in self.index["shards"]], dtype=np.int64)
        assert sizes.sum() == self.n_tokens, f"{self.dir}: shards hold {sizes.sum()} tokens, index says {self.n_tokens}"
        self._sizes = sizes
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.max_open_shards = max_open_shards
        self._doc_starts: np.ndarray | None = None

    def _shard(self, s: int) -> np.ndarray:
        """Shard `s` memory-mapped (opened on first use; the least recently used map is dropped beyond the bound)."""
        arr = self._open.get(s)
        if arr is None:
            arr = np.load(self.dir / self._files[s], mmap_mode="r")
            assert len(arr) == self._sizes[s], f"{self.dir / self._files[s]}: {len(arr)} tokens, index says more"
            self._open[s] = arr
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(s)
        return arr

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int64, read across shard boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - self._starts[s]
            shard = self._shard(s)
            take = min(stop - pos, len(shard) - lo)
            out[pos - start : pos - start + take] = shard[lo : lo + take]
            pos += take
            s += 1
        return out

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"sequence {k} out of range [0, {len(self)})")
        return self.tokens(k * self.seq_len, k * self.seq_len + self.seq_len + 1)

    @property
    def doc_starts(self) -> np.ndarray:
        """Stream offsets where documents begin (int64, sorted)."""
        if self._doc_starts is None:
            self._doc_starts = np.load(self.dir / self.index.get("doc_starts_file", DOC_STARTS))
        return self._doc_starts

    def document_ids(self, k: int) -> np.ndarray:
        """For each of item k's T + 1 tokens, the index of the document it belongs to (for cross-document masks)."""
        offsets = np.arange(k * self.seq_len, k * self.seq_len + self.seq_len + 1)
        return np.searchsorted(self.doc_starts, offsets, side="right") - 1


@dataclass
class DataLoaderState:
    """What a checkpoint stores: the global count of sequences consumed, and what makes the order reproducible."""

    consumed: int = 0
    seed: int = 0
    n_sequences: int = 0
    seq_len: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataLoaderState:
        return cls(**{k: int(d[k]) for k in ("consumed", "seed", "n_sequences", "seq_len")})


class ShardLoader:
    """Infinite iterator of (inputs_BT, targets_BT) int64 tensors for one data-parallel rank."""

    def __init__(self, dataset: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.state = DataLoaderState(consumed=0, seed=seed, n_sequences=len(dataset), seq_len=dataset.seq_len)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        return self.state.consumed // self.state.n_sequences

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.state.seed, epoch]).permutation(self.state.n_sequences)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, start: int, count: int) -> list[int]:
        """Dataset indices at global stream positions [start, start + count) (epochs wrap with a new shuffle)."""
        n = self.state.n_sequences
        return [int(self._order(g // n)[g % n]) for g in range(start, start + count)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.state.consumed + self.rank * self.batch_size
        rows_BT1 = np.stack([self.dataset[i] for i in self.global_indices(start, self.batch_size)])
        self.state.consumed += self.world_size * self.batch_size
        tokens_BT1 = torch.from_numpy(rows_BT1)
        return tokens_BT1[:, :-1].contiguous(), tokens_BT1[:, 1:].contiguous()

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state saved by any number of ranks; the order must be the same (seed, data, seq_len)."""
        s = DataLoaderState.from_dict(state)
        mine = self.state
        for name in ("seed", "n_sequences", "seq_len"):
            if getattr(s, name) != getattr(mine, name):
                raise ValueError(
                    f"loader state does not match this data: {name}={getattr(s, name)} in the checkpoint, "
                    f"{getattr(mine, name)} here"
                )
        self.state = s
