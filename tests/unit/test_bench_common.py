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


def test_rows_appended_to_results_do_not_mark_the_commit_dirty_but_code_edits_do(tmp_path, monkeypatch):
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "b.csv").write_text("date\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "bench" / "results")
    clean = common.commit()
    common.append_result("b", {"arm": "x"})
    assert common.commit() == clean and not clean.endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.commit() == clean + "-dirty"
