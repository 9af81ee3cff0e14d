"""bench.common.append_result: rows land under the right header even when a bench gains a column."""

import csv

import bench.common as common


def test_a_new_column_widens_the_header_and_keeps_old_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    common.append_result("b", {"arm": "x", "acc": 0.5})
    common.append_result("b", {"arm": "y", "acc": 0.6, "steps": 10})
    common.append_result("b", {"arm": "z", "acc": 0.7})
    with open(tmp_path / "b.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["date", "machine", "commit", "arm", "acc", "steps"]
    assert [(r["arm"], r["acc"], r["steps"]) for r in rows] == [("x", "0.5", ""), ("y", "0.6", "10"), ("z", "0.7", "")]
