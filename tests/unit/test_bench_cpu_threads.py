"""`bench.cpu_threads` at micro scale: one row per (threads, precision) pair, its median inside its range."""

from bench.cpu_threads import main


def test_one_row_per_pair_with_median_inside_the_range():
    rows = main(["--threads", "1", "--rounds", "2", "--steps", "1", "--batch", "1", "--seq", "16", "--no-csv"])
    assert [(r["threads"], r["precision"]) for r in rows] == [(1, "fp32"), (1, "bf16")]
    for r in rows:
        assert 0 < r["min_s_per_step"] <= r["median_s_per_step"] <= r["max_s_per_step"] and r["rounds"] == 2
