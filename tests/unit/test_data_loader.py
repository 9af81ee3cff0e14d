"""Packing and the resumable rank-aware loader: windows, disjoint ranks, exact resume on a different world size."""

import json
import os

import numpy as np
import pytest
import torch

from data.loader import DataLoaderState, PackedDataset, ShardLoader
from data.pack import INDEX, ShardWriter, assign_splits, split_hash

EOS, VOCAB, T = 1, 1000, 8


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """97 documents of random lengths packed into shards of 50 tokens (so windows cross shard boundaries)."""
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(12, VOCAB, size=int(rng.integers(1, 30)))) + [EOS] for _ in range(97)]
    out = tmp_path_factory.mktemp("train")
    writer = ShardWriter(out, VOCAB, EOS, tokens_per_shard=50)
    for d in docs:
        writer.add(d)
    index = writer.close(seq_len=T)
    return out, np.concatenate(docs), docs, index


def test_index_and_shards(packed):
    out, stream, docs, index = packed
    on_disk = json.loads((out / INDEX).read_text())
    assert on_disk == index
    assert index["n_tokens"] == len(stream) and index["n_docs"] == len(docs) and index["dtype"] == "uint16"
    assert len(index["shards"]) == -(-len(stream) // 50)
    assert np.array_equal(np.concatenate([np.load(out / s["file"]) for s in index["shards"]]), stream)
    assert np.load(out / index["shards"][0]["file"]).dtype == np.uint16


def test_windows_cover_the_stream_with_a_one_token_shift(packed):
    out, stream, docs, _ = packed
    ds = PackedDataset(out)
    assert len(ds) == (len(stream) - 1) // T
    for k in range(len(ds)):
        assert np.array_equal(ds[k], stream[k * T : k * T + T + 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds16 = PackedDataset(out, seq_len=16)  # another context length over the same flat stream
    assert np.array_equal(ds16[3], stream[48:65])
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    assert np.array_equal(ds.doc_starts, starts)
    ids = ds.document_ids(5)
    assert np.array_equal(ids, np.searchsorted(starts, np.arange(40, 49), side="right") - 1)


def test_batches_are_shifted_int64_tensors(packed):
    out, stream, _, _ = packed
    x_BT, y_BT = next(ShardLoader(PackedDataset(out), batch_size=4, seed=1))
    assert x_BT.shape == y_BT.shape == (4, T) and x_BT.dtype == y_BT.dtype == torch.int64
    assert torch.equal(x_BT[:, 1:], y_BT[:, :-1])


def _stream(out, world, b, steps, seed=7, state=None):
    """Rows of all ranks, step by step in rank order, and the final state."""
    loaders = [ShardLoader(PackedDataset(out), batch_size=b, rank=r, world_size=world, seed=seed) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    rows = []
    for _ in range(steps):
        for ld in loaders:
            x_BT, y_BT = ld.next_batch()
            rows.append(torch.cat([x_BT, y_BT[:, -1:]], dim=1))
    states = {json.dumps(ld.state_dict()) for ld in loaders}
    assert len(states) == 1, "every rank holds the same global state"
    return torch.cat(rows), ld.state_dict()


def test_two_ranks_are_disjoint_and_their_union_is_one_rank(packed):
    out = packed[0]
    n = len(PackedDataset(out))
    r0 = ShardLoader(PackedDataset(out), batch_size=3, rank=0, world_size=2, seed=7)
    r1 = ShardLoader(PackedDataset(out), batch_size=3, rank=1, world_size=2, seed=7)
    steps = n // 6
    idx0 = [i for s in range(steps) for i in r0.global_indices(s * 6, 3)]
    idx1 = [i for s in range(steps) for i in r1.global_indices(s * 6 + 3, 3)]
    assert not set(idx0) & set(idx1)
    both, _ = _stream(out, world=2, b=3, steps=steps)
    single, _ = _stream(out, world=1, b=6, steps=steps)
    assert torch.equal(both, single)


def test_resume_4_to_2_to_1_reproduces_the_uninterrupted_stream(packed):
    out = packed[0]
    n = len(PackedDataset(out))
    # 4 ranks x 2 for 3 steps (24 sequences), then 2 ranks x 4 for 4 steps (32), then 1 rank x 8 for 25 steps (200):
    # 256 > n = 191 sequences, so the stream also wraps into a second, differently shuffled epoch.
    a, s = _stream(out, world=4, b=2, steps=3)
    b, s = _stream(out, world=2, b=4, steps=4, state=s)
    c, s = _stream(out, world=1, b=8, steps=25, state=s)
    reference, ref_state = _stream(out, world=1, b=8, steps=32)
    assert s == ref_state and s["consumed"] == 256 > n
    assert torch.equal(torch.cat([a, b, c]), reference)
    ds = PackedDataset(out)
    epoch0 = {tuple(ds[i]) for i in range(n)}
    first_epoch_rows = {tuple(r.tolist()) for r in reference[:n]}
    assert first_epoch_rows == epoch0  # each sequence exactly once per epoch
    ld = ShardLoader(ds, batch_size=1, seed=7)
    assert ld.global_indices(0, n) != ld.global_indices(n, n)  # a new shuffle each epoch


def test_state_mismatch_and_bad_rank_are_errors(packed):
    out = packed[0]
    ld = ShardLoader(PackedDataset(out), batch_size=2, seed=1)
    state = DataLoaderState(consumed=4, seed=2, n_sequences=len(PackedDataset(out)), seq_len=T).to_dict()
    with pytest.raises(ValueError, match="seed"):
        ld.load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(PackedDataset(out), batch_size=2, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedDataset(out / "missing")


def test_too_few_tokens_is_a_clear_error(tmp_path):
    writer = ShardWriter(tmp_path, VOCAB, EOS, tokens_per_shard=50)
    writer.add([5, 6, EOS])
    with pytest.raises(ValueError, match="seq_len"):
        writer.close(seq_len=T)


def test_split_by_document_hash_is_stable_and_never_empty():
    texts = [f"document number {i}" for i in range(2000)]
    val = assign_splits([split_hash(t) for t in texts], 0.1)
    assert 140 < sum(val) < 260
    assert assign_splits([split_hash(t) for t in texts[:1000]], 0.1) == val[:1000]  # independent of the rest
    tiny = assign_splits([split_hash(t) for t in texts[:3]], 0.01)
    assert sum(tiny) == 1
    assert assign_splits([0.5, 0.7], 0.0) == [False, False]


def test_open_shards_stay_bounded(packed):
    """Each memory map holds a file descriptor: reading every window of a many-shard split keeps at most
    max_open_shards of them, and gives the same tokens as an unbounded reader."""
    out, stream, _, index = packed
    assert len(index["shards"]) > 4
    ds = PackedDataset(out, max_open_shards=2)
    fds = len(os.listdir("/proc/self/fd"))
    for k in range(len(ds)):
        assert np.array_equal(ds[k], stream[k * T : k * T + T + 1])
        assert len(ds._open) <= 2
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert np.array_equal(ds.tokens(0, ds.n_tokens), stream)
    with pytest.raises(ValueError, match="max_open_shards"):
        PackedDataset(out, max_open_shards=0)


def test_a_shard_shorter_than_its_index_is_caught(packed, tmp_path):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(packed[0], out)
    first = json.loads((out / INDEX).read_text())["shards"][0]["file"]
    np.save(out / first, np.load(out / first)[:-3])
    with pytest.raises(AssertionError, match="tokens, index says"):
        PackedDataset(out).tokens(0, 10)
