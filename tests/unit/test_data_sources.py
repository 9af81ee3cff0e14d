"""Sources: listing every input with a reason, the embedded Python-environment corpus, local jsonl/parquet, the hub
reader on local files, and the fingerprint that decides whether the stage re-runs."""

import inspect
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import SourceConfig
from data.sources import _python_env_roots, check_sources, list_files, list_items, sample_files
from tests.unit.hostile_corpus import GOOD_PY, make_bad_corpus, read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CODE = dict(kind="files", text_field="content", lang_field="lang", path_field="path")


def _by_name(recs):
    return {Path(r["path"]).name: r for r in recs}


@pytest.mark.timeout(60)
def test_python_env_source_reads_good_files_and_names_every_bad_one(tmp_path):
    root = make_bad_corpus(tmp_path / "corpus")
    spec = SourceConfig(kind="python_env", roots=[str(root)], extensions=[".py", ".rst", ".txt"])
    by_name = _by_name(read_records([spec]))
    assert {n: r["reason"] for n, r in by_name.items()} == {
        "good.py": "",
        "doc.rst": "",
        "bin.py": "binary",
        "latin1.py": "non_utf8",  # no declaration: Python itself refuses it
        "empty.py": "",  # read fine; the filters name it "empty"
        "one_line.txt": "too_large",
        "loop_a.py": "symlink",
        "loop_b.py": "symlink",
        "pipe.py": "not_a_file",  # a FIFO: never opened
        "bom.py": "",
        "declared_latin1.py": "",
        "caf\\xe9_name.py": "",  # a name that is not UTF-8, shown escaped
        "think.py": "",
    }
    assert by_name["good.py"]["lang"] == "python" and by_name["doc.rst"]["lang"] == "rst"
    assert by_name["good.py"]["text"] == GOOD_PY
    assert by_name["bom.py"]["text"] == GOOD_PY  # the BOM is not part of the text
    assert "name = 'café'" in by_name["declared_latin1.py"]["text"]
    assert by_name["one_line.txt"]["text"] == "" and by_name["caf\\xe9_name.py"]["text"].startswith("def increment(x)")


def test_a_file_that_grows_after_its_stat_is_read_whole_or_refused(tmp_path, monkeypatch):
    """The reader asks for the size fstat gave, plus one byte: a file that grew in between is read to its end, or
    counted as too large past the cap, never cut at the old size."""
    import data.sources as sources

    path = tmp_path / "grown.py"
    path.write_text(GOOD_PY * 3)
    real_fstat = os.fstat

    def stale_fstat(fd):  # the size the file had before it grew
        st = real_fstat(fd)
        return os.stat_result((*st[:6], len(GOOD_PY), *st[7:]))

    monkeypatch.setattr(sources.os, "fstat", stale_fstat)
    assert sources.read_text_file(path, 10**6, "python") == (GOOD_PY * 3, "")
    assert sources.read_text_file(path, 2 * len(GOOD_PY), "python") == ("", "too_large")


def test_a_file_replaced_after_listing_is_counted_not_fatal(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (root / name).write_text(GOOD_PY)
    spec = SourceConfig(kind="python_env", roots=[str(root)], extensions=[".py"])
    items, _ = list_items([spec], 0)
    (root / "a.py").unlink()  # vanishes
    (root / "b.py").unlink()
    os.mkfifo(root / "b.py")  # becomes a FIFO: opening it for reading would block
    from data.readers import ItemReader

    f = tmp_path / "items.jsonl"
    f.write_text("".join(json.dumps(i) + "\n" for i in items))
    recs = [d.metadata for d in ItemReader(str(f), [spec], 10**6).run()]
    assert [(Path(r["path"]).name, r["reason"]) for r in recs] == [
        ("a.py", "vanished"),
        ("b.py", "not_a_file"),
        ("c.py", ""),
    ]


def test_sampling_is_deterministic_and_capped():
    files = [(f"f{i}.py", Path(f"f{i}.py"), 100 + i) for i in range(200)]
    a = sample_files(files, seed=0, max_files=50, max_bytes=0)
    assert a == sample_files(files, seed=0, max_files=50, max_bytes=0) and len(a) == 50
    assert a != sample_files(files, seed=1, max_files=50, max_bytes=0)
    b = sample_files(files, seed=0, max_files=0, max_bytes=5000)
    assert sum(f[2] for f in b) <= 5000 and len(b) >= 20


def test_the_default_corpus_is_this_interpreter():
    import sysconfig

    assert _python_env_roots(["stdlib"]) == [Path(sysconfig.get_paths()["stdlib"]).resolve()]
    files, _ = list_files([Path(inspect.getsourcefile(json)).parent], [".py"])
    assert any(name.endswith("json/decoder.py") for name, _, _ in files)


def test_fingerprint_changes_with_any_change_under_a_python_env_root(tmp_path):
    """The stage's skip decision: adding, editing, touching or removing a file re-runs it; nothing else does."""
    root = tmp_path / "r"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text(GOOD_PY)
    spec = SourceConfig(kind="python_env", roots=[str(root)], extensions=[".py"])

    def fp():
        return list_items([spec], 0)[1]

    seen = [fp()]
    assert fp() == seen[0]  # stable
    (root / "notes.bin").write_bytes(b"x")  # not an input: no change
    assert fp() == seen[0]
    (root / "pkg" / "b.py").write_text("x = 1\n")  # added
    seen.append(fp())
    (root / "pkg" / "b.py").write_text("x = 2\n")  # edited, same size
    os.utime(root / "pkg" / "b.py", ns=(time.time_ns(), time.time_ns() + 10**9))
    seen.append(fp())
    (root / "pkg" / "b.py").unlink()  # removed
    assert fp() == seen[0]  # back to the first listing
    assert len(set(seen)) == 3


def test_fingerprint_of_files_sources_hashes_content(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "abc"}) + "\n")
    spec = SourceConfig(kind="files", paths=[str(tmp_path)])
    a = list_items([spec], 0)[1]
    st = f.stat()
    f.write_text(json.dumps({"text": "abd"}) + "\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content tells
    assert list_items([spec], 0)[1] != a


def test_jsonl_rows_truncated_line_and_missing_field():
    recs = read_records([SourceConfig(**CODE, paths=[str(FIXTURES / "code.jsonl")])])
    assert [r["reason"] for r in recs] == [""] * 6 + ["bad_json_line"]
    assert [r["lang"] for r in recs[:6]] == ["python"] * 3 + ["solidity"] * 2 + ["python"]
    assert recs[3]["path"].endswith(":contracts/Counter.sol")
    web = read_records([SourceConfig(kind="files", paths=[str(FIXTURES / "web.jsonl")])])
    assert [r["reason"] for r in web] == ["", "", "missing_text_field"] and web[0]["lang"] == "text"


def test_caps_apply_per_source_across_files():
    spec = SourceConfig(**CODE, paths=[str(FIXTURES)], max_files=4)
    assert sum(1 for r in read_records([spec]) if not r["reason"]) == 4
    # two tasks take ceil(4 / 2) each
    assert sum(1 for r in read_records([spec], world_size=2) if not r["reason"]) <= 4


def _good_rows():
    return [json.loads(x) for x in (FIXTURES / "code.jsonl").read_text().splitlines()[:-1]]


def test_parquet_gives_the_same_records_as_jsonl(tmp_path):
    pq.write_table(pa.Table.from_pylist(_good_rows()), tmp_path / "code.parquet")
    from_parquet = read_records([SourceConfig(**CODE, paths=[str(tmp_path / "code.parquet")])])
    from_jsonl = read_records([SourceConfig(**CODE, paths=[str(FIXTURES / "code.jsonl")])])
    strip = lambda rs: [(r["text"], r["lang"], r["path"].split(":", 1)[1]) for r in rs]  # noqa: E731
    assert strip(from_parquet) == strip(from_jsonl[:6])


def test_two_tasks_read_every_item_once(tmp_path):
    root = make_bad_corpus(tmp_path / "corpus")
    spec = SourceConfig(kind="python_env", roots=[str(root)], extensions=[".py", ".rst", ".txt"])
    one, two = read_records([spec]), read_records([spec], world_size=2)
    assert sorted(r["path"] for r in one) == sorted(r["path"] for r in two)


def test_hub_source_reads_rows_through_datatrove(tmp_path, monkeypatch):
    """The hub path (datatrove's HuggingFaceDatasetReader, streaming) on a local file with the-stack-smol's columns."""
    import datasets

    pq.write_table(pa.Table.from_pylist(_good_rows() + [{"content": None, "lang": "Python"}]), tmp_path / "t.parquet")
    real = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        return real("parquet", data_files=str(tmp_path / "t.parquet"), split=kw["split"], streaming=kw["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = SourceConfig(
        kind="hub",
        hub_path="bigcode/the-stack-smol",
        hub_data_dir="data/python",
        text_field="content",
        lang_field="lang",
        path_field="path",
        max_files=5,
    )
    recs = read_records([spec])
    assert calls == [("bigcode/the-stack-smol", None, {"split": "train", "data_dir": "data/python", "streaming": True})]
    assert len(recs) == 5 and recs[0]["text"] == _good_rows()[0]["content"] and recs[0]["lang"] == "python"
    spec.max_files = 0
    assert read_records([spec])[-1]["reason"] == "missing_text_field"  # counted, not skipped


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist: .*nowhere.jsonl"):
        check_sources([SourceConfig(kind="files", paths=[str(tmp_path / "nowhere.jsonl")])])
    with pytest.raises(ValueError, match="not a directory"):
        check_sources([SourceConfig(kind="python_env", roots=[str(tmp_path / "nodir")])])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="jsonl"):
        check_sources([SourceConfig(kind="files", paths=[str(tmp_path / "notes.csv")])])


def test_items_are_shared_between_tasks_by_bytes():
    from data.readers import ITEM_OVERHEAD_BYTES, item_tasks

    # one big file first, then small ones: by position (i % 2) task 0 would get 1 MB + 4 x 10 KB, task 1 4 x 10 KB
    items = [{"kind": "text", "size": 10**6}] + [{"kind": "text", "size": 10_000} for _ in range(8)]
    items.insert(3, {"kind": "hub"})
    items.insert(5, {"kind": "reject"})
    tasks = list(item_tasks(iter(items), 2))
    assert [it for it, _ in tasks] == items  # every item, in order
    assert [t for it, t in tasks if it["kind"] == "hub"] == [None]  # every task reads its shard of a hub source
    load = [sum(it.get("size", 0) + ITEM_OVERHEAD_BYTES for it, t in tasks if t == r) for r in (0, 1)]
    assert [t for it, t in tasks if it.get("size") == 10**6] == [0]
    assert all(t == 1 for it, t in tasks if it.get("size") == 10_000)  # the small ones balance the big one
    assert load[1] < load[0]
    assert list(item_tasks(iter(items), 2)) == tasks  # every task computes the same assignment
    assert {t for _, t in item_tasks(iter(items), 1)} == {0, None}


def test_the_data_stage_never_loads_torch():
    """`python -m data.prepare` and datatrove's fork server import the CLI module: torch is 1.5 s of CPU there."""
    import subprocess
    import sys

    code = "import sys, data.prepare, pipeline.__main__; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
