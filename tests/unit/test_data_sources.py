"""Sources: the embedded Python-environment corpus, local jsonl/parquet, and the hub loader on local files."""

import inspect
import os
import shutil
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import SourceConfig
from data.sources import check_sources, iter_source, list_files, sample_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CODE = SourceConfig(kind="files", text_field="content", lang_field="lang", path_field="path")


def make_bad_corpus(root: Path) -> Path:
    """Good files and every kind of bad item the stage must survive."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(inspect.getsourcefile(textwrap), root / "good.py")
    (root / "doc.rst").write_text("Title\n=====\n\nA short paragraph of documentation written in words.\n")
    (root / "bin.py").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    (root / "latin1.py").write_bytes("name = 'café'\n".encode("latin-1") * 10)
    (root / "empty.py").write_bytes(b"")
    (root / "one_line.txt").write_bytes(b"a" * 50_000_000)  # a single 50 MB line
    os.symlink(root / "loop_b.py", root / "loop_a.py")  # a symlink loop
    os.symlink(root / "loop_a.py", root / "loop_b.py")
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "up")  # a directory loop
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    os.mkfifo(root / "pipe.py")  # reading it would block forever
    return root


def test_python_env_source_skips_and_counts_bad_items(tmp_path):
    root = make_bad_corpus(tmp_path / "corpus")
    spec = SourceConfig(kind="python_env", roots=[str(root)], extensions=[".py", ".rst", ".txt"])
    recs = list(iter_source(spec, seed=0, max_doc_bytes=500_000))
    by_name = {Path(r["path"]).name: r for r in recs}
    assert set(by_name) == {
        "good.py",
        "doc.rst",
        "bin.py",
        "latin1.py",
        "empty.py",
        "one_line.txt",
        "loop_a.py",
        "loop_b.py",
        "pipe.py",
    }
    assert {n: r["reason"] for n, r in by_name.items()} == {
        "good.py": "",
        "doc.rst": "",
        "bin.py": "binary",
        "latin1.py": "non_utf8",
        "empty.py": "",
        "one_line.txt": "too_large",
        "loop_a.py": "symlink",
        "loop_b.py": "symlink",
        "pipe.py": "not_a_file",
    }
    assert by_name["good.py"]["lang"] == "python" and by_name["doc.rst"]["lang"] == "rst"
    assert by_name["good.py"]["text"] == inspect.getsource(textwrap)
    assert by_name["one_line.txt"]["text"] == ""


def test_sampling_is_deterministic_and_capped():
    files = [(f"f{i}.py", Path(f"f{i}.py"), 100 + i) for i in range(200)]
    a = sample_files(files, seed=0, max_files=50, max_bytes=0)
    assert a == sample_files(files, seed=0, max_files=50, max_bytes=0) and len(a) == 50
    assert a != sample_files(files, seed=1, max_files=50, max_bytes=0)
    b = sample_files(files, seed=0, max_files=0, max_bytes=5000)
    assert sum(f[2] for f in b) <= 5000 and len(b) >= 20


def test_the_default_corpus_is_this_interpreter():
    import json
    import sysconfig

    from data.sources import _python_env_roots

    assert _python_env_roots(["stdlib"]) == [Path(sysconfig.get_paths()["stdlib"]).resolve()]
    files, _ = list_files([Path(inspect.getsourcefile(json)).parent], [".py"])
    assert any(name.endswith("json/decoder.py") for name, _, _ in files)


def test_jsonl_rows_truncated_line_and_missing_field():
    recs = list(iter_source(SourceConfig(**{**CODE.__dict__, "paths": [str(FIXTURES / "code.jsonl")]}), 0, 10**6))
    assert [r["reason"] for r in recs] == [""] * 6 + ["bad_json_line"]
    assert [r["lang"] for r in recs[:6]] == ["python"] * 3 + ["solidity"] * 2 + ["python"]
    assert recs[3]["path"].endswith(":contracts/Counter.sol")
    web = list(iter_source(SourceConfig(kind="files", paths=[str(FIXTURES / "web.jsonl")]), 0, 10**6))
    assert [r["reason"] for r in web] == ["", "", "missing_text_field"] and web[0]["lang"] == "text"


def test_caps_apply_per_source_across_files(tmp_path):
    spec = SourceConfig(**{**CODE.__dict__, "paths": [str(FIXTURES)], "max_files": 4})
    assert sum(1 for r in iter_source(spec, 0, 10**6) if not r["reason"]) == 4


def _good_rows():
    import json

    return [json.loads(x) for x in (FIXTURES / "code.jsonl").read_text().splitlines()[:-1]]


def test_parquet_gives_the_same_records_as_jsonl(tmp_path):
    rows = _good_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "code.parquet")
    from_parquet = list(
        iter_source(SourceConfig(**{**CODE.__dict__, "paths": [str(tmp_path / "code.parquet")]}), 0, 10**6)
    )
    from_jsonl = list(iter_source(SourceConfig(**{**CODE.__dict__, "paths": [str(FIXTURES / "code.jsonl")]}), 0, 10**6))
    strip = lambda rs: [(r["text"], r["lang"], r["path"].split(":", 1)[1]) for r in rs]  # noqa: E731
    assert strip(from_parquet) == strip(from_jsonl[:6])


def test_hub_source_reads_rows_of_the_hub_schema(tmp_path, monkeypatch):
    """The hub path (load_dataset streaming) on a local file with the-stack-smol's columns."""
    import datasets

    pq.write_table(pa.Table.from_pylist(_good_rows()), tmp_path / "train.parquet")
    real = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        return real("parquet", data_files=str(tmp_path / "train.parquet"), split=kw["split"], streaming=kw["streaming"])

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
    recs = list(iter_source(spec, 0, 10**6))
    assert calls == [("bigcode/the-stack-smol", None, {"split": "train", "streaming": True, "data_dir": "data/python"})]
    assert len(recs) == 5 and recs[0]["text"] == _good_rows()[0]["content"] and recs[0]["lang"] == "python"


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist: .*nowhere.jsonl"):
        check_sources([SourceConfig(kind="files", paths=[str(tmp_path / "nowhere.jsonl")])])
    with pytest.raises(ValueError, match="not a directory"):
        check_sources([SourceConfig(kind="python_env", roots=[str(tmp_path / "nodir")])])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="jsonl"):
        check_sources([SourceConfig(kind="files", paths=[str(tmp_path / "notes.csv")])])
