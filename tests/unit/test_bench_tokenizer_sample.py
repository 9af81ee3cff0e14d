"""bench/tokenizer_sample.py: the held-out documents are never trained on, samples are nested, rows are complete."""

from bench.tokenizer_sample import main, prefix, split_corpus


def test_held_out_documents_are_disjoint_from_every_sample_and_samples_nest():
    texts = [f"doc {i} " + "x" * (100 * (i % 7 + 1)) for i in range(200)]
    pool, held = split_corpus(texts, holdout_mb=0.01, seed=3)
    assert sum(len(t) for t in held) >= 10_000 and not set(held) & set(pool)
    assert sorted(pool + held) == sorted(texts)
    assert split_corpus(texts, 0.01, 3) == (pool, held)  # seeded
    small, big = prefix(pool, 0.005), prefix(pool, 0.02)
    assert big[: len(small)] == small and sum(map(len, small)) >= 5_000
    assert prefix(pool, 100) == pool


def test_rows_on_a_small_corpus():
    rows = main(["--mb", "0.6", "--samples", "0.1", "0.2", "--holdout-mb", "0.2", "--no-csv"])
    assert [r["sample_mb_asked"] for r in rows] == [0.1, 0.2]
    assert all(r["heldout_bytes_per_token"] > 1.0 and r["sample_mb"] >= r["sample_mb_asked"] for r in rows)
