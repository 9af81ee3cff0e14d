"""The README's measured table is what `bench.readme` writes from bench/results/*.csv, not hand-typed figures."""

import csv

import pytest

import bench.readme as readme


def test_readme_table_is_what_the_results_files_say():
    assert readme.main(["--check"]) == 0, "README.md's table is stale or hand-edited: run `python -m bench.readme`"


def test_a_new_result_row_changes_the_table(tmp_path, monkeypatch):
    """A row appended to a CSV shows up in the rendered table (the check above can fail)."""
    monkeypatch.setattr(readme, "RESULTS_DIR", tmp_path)
    assert "| FP8 vs BF16 pretraining | not measured |" in readme.render()
    with (tmp_path / "fp8_vs_bf16.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["date", "commit", "steps", "tail_mean_abs_rel_diff", "final_val_rel_diff"])
        w.writeheader()
        w.writerow(
            dict(
                date="2026-12-01T00:00:00Z",
                commit="abc1234",
                steps=7,
                tail_mean_abs_rel_diff=0.01,
                final_val_rel_diff=-0.002,
            )
        )
    table = readme.render()
    assert "7 steps: mean abs. rel. loss difference 1.000%" in table and "abc1234, 2026-12-01" in table
    text = f"intro\n{readme.BEGIN}\nold table\n{readme.END}\nrest\n"
    assert readme.splice(text, table) == f"intro\n{readme.BEGIN}\n{table}\n{readme.END}\nrest\n"


def test_splice_names_the_missing_markers():
    with pytest.raises(ValueError, match="markers"):
        readme.splice("no markers here", "table")
