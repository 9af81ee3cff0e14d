"""The whole hostile list of issue 17 as a `files` corpus built here: every input becomes documents or is counted
under a named reason, none crashes or hangs the stage, and unreadable inputs are seen as an unprivileged user."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data.config import SourceConfig
from data.outputs import stage_outputs
from data.prepare import run
from pipeline.config import compose
from tests.unit.hostile_corpus import (
    PROSE,
    make_bad_corpus,
    make_hostile_files,
    read_records,
    rows_of,
    run_as_other_user,
    shared_tmp,
)


def _file_of(rec: dict) -> str:
    return rec["path"].split("#", 1)[0].split("/", 1)[1]  # "<folder>/<name>#<row>" -> "<name>"


@pytest.mark.timeout(120)
def test_every_hostile_input_is_read_or_named(tmp_path):
    root, expect = make_hostile_files(tmp_path / "hostile")
    recs = read_records([SourceConfig(kind="files", paths=[str(root)])])
    by_file: dict[str, Counter] = {}
    for r in recs:
        by_file.setdefault(_file_of(r), Counter())[r["reason"]] += 1
    assert set(by_file) == set(expect), set(by_file) ^ set(expect)  # every input appears, nothing else
    for name, reason in expect.items():
        if name == "truncated.jsonl.gz":  # the rows before the break are kept, the break is counted once
            assert by_file[name]["corrupt_file"] == 1 and by_file[name][""] >= 1, by_file[name]
        elif name == "surrogate.jsonl":  # valid JSON (a lone surrogate escape): read, then refused by the filters
            assert by_file[name] == Counter({"": 1})
        elif name == "deep.jsonl":  # nested deeper than any parser recursion: one bad line, the next row is fine
            assert by_file[name] == Counter({"bad_json_line": 1, "": 1})
        else:
            assert set(by_file[name]) == {reason}, (name, by_file[name])
    texts = {r["text"] for r in recs if not r["reason"]}
    for suffix in ("gz", "zst", "bz2", "array one", "array two", "bom", "parquet", "inner", "odd name"):
        assert PROSE + suffix in texts, suffix
    assert any("\ud800" in t for t in texts)


@pytest.mark.timeout(120)
def test_unreadable_files_and_folders_as_another_user():
    """chmod 000 hides nothing from root: the listing and reading run as a fresh unprivileged uid."""
    base = shared_tmp()
    try:
        for name, kind in (("env", "python_env"), ("rows", "files")):
            d = base / name
            (d / "locked_dir").mkdir(parents=True)
            ext = ".py" if kind == "python_env" else ".jsonl"
            (d / f"open{ext}").write_bytes(b"x = 1\n" * 20 if kind == "python_env" else rows_of(PROSE))
            (d / f"locked{ext}").write_bytes(b"x = 2\n" * 20 if kind == "python_env" else rows_of(PROSE))
            (d / "locked_dir" / f"inner{ext}").write_bytes(b"x = 3\n" * 20 if kind == "python_env" else rows_of(PROSE))
            (d / f"locked{ext}").chmod(0o000)
            (d / "locked_dir").chmod(0o000)
        code = f"""
import json
from data.config import SourceConfig
from tests.unit.hostile_corpus import read_records
specs = [SourceConfig(kind="python_env", roots=[{str(base / "env")!r}], extensions=[".py"]),
         SourceConfig(kind="files", paths=[{str(base / "rows")!r}])]
print(json.dumps([(r["path"], r["reason"]) for r in read_records(specs)]))
"""
        got = {Path(p.split("#")[0]).name: reason for p, reason in json.loads(run_as_other_user(code))}
        assert got == {
            "open.py": "",
            "locked.py": "unreadable",
            "locked_dir": "unreadable_dir",
            "open.jsonl": "",
            "locked.jsonl": "unreadable",
        }
    finally:
        for p in base.rglob("*"):
            p.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.timeout(300)
def test_the_stage_survives_the_hostile_corpus(tmp_path):
    """The whole stage on both hostile corpora: it finishes, and every input is in its counts."""
    root, expect = make_hostile_files(tmp_path / "hostile")
    env = make_bad_corpus(tmp_path / "env")
    # near-copies of one paragraph: near-dedup keeps one
    (root / "more.jsonl").write_bytes(rows_of(*[PROSE.replace("pieces", f"pieces {i}") for i in range(40)]))
    cfg = compose(["data=smoke", f"run.root={tmp_path / 'out'}", "run.name=h", "wandb.mode=disabled"])
    cfg.data.sources = [
        SourceConfig(kind="files", paths=[str(root)]),
        SourceConfig(kind="python_env", roots=[str(env)], extensions=[".py", ".rst", ".txt"]),
    ]
    cfg.data.pack.seq_len, cfg.data.pack.tokens_per_shard = 16, 4096
    cfg.data.reasoning.enabled = False
    metrics = run(cfg)
    stats = json.loads(stage_outputs(tmp_path / "out" / "h" / "data")["stats"].read_text())
    removed = stats["removed"]
    for reason in ("corrupt_parquet", "corrupt_file", "empty_file", "unsupported_format", "not_a_file"):
        assert removed.get(reason, 0) >= 1, (reason, removed)
    assert removed["broken_symlink"] == 1 and removed["bad_json_line"] == 1 and removed["non_utf8"] >= 2
    assert stats["documents_in"] == sum(removed.values()) + stats["documents_kept"]
    assert removed["near_duplicate"] >= 40  # the paragraph's copies, in more.jsonl and in the hostile files
    assert metrics["documents_kept"] == stats["documents_kept"] >= 5
    assert stats["documents"]["val"] >= 1 and stats["documents"]["train"] >= 1
