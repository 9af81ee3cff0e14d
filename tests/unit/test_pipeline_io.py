import os
import shutil

import pytest

from pipeline.io import atomic_dir, atomic_write_json, clean_temporaries, hash_config, hash_path


def test_atomic_dir_publishes_on_success_and_replaces_old(tmp_path):
    final = tmp_path / "shards"
    with atomic_dir(final) as d:
        (d / "a.bin").write_bytes(b"1")
    assert (final / "a.bin").read_bytes() == b"1"
    with atomic_dir(final) as d:
        (d / "b.bin").write_bytes(b"2")
    assert sorted(p.name for p in final.iterdir()) == ["b.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_atomic_dir_crash_leaves_old_content_and_no_partial(tmp_path):
    final = tmp_path / "shards"
    with atomic_dir(final) as d:
        (d / "good.bin").write_bytes(b"ok")
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "half.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in final.iterdir()) == ["good.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_clean_temporaries_removes_leftovers_of_a_killed_process(tmp_path):
    (tmp_path / ".tmp-shards-abc").mkdir()
    (tmp_path / ".tmp-manifest.json-x").write_text("{")
    (tmp_path / "keep").write_text("x")
    removed = clean_temporaries(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_hash_path_sees_content_names_and_ignores_hidden(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("1")
    h1 = hash_path(d)
    (d / ".wandb-cache").write_text("noise")
    assert hash_path(d) == h1
    (d / "x").write_text("2")
    assert hash_path(d) != h1
    os.rename(d / "x", d / "y")
    assert hash_path(d) not in (h1,)
    with pytest.raises(FileNotFoundError, match="missing"):
        hash_path(tmp_path / "missing")


def test_atomic_write_json_and_hash_config_are_stable(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a"')
    assert hash_config({"a": 1, "b": 2}) == hash_config({"b": 2, "a": 1})
    assert hash_config({"a": 1}) != hash_config({"a": 2})


def test_hash_path_survives_fifos_odd_names_and_vanished_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("1")
    os.mkfifo(d / "pipe")  # never opened: reading it would block
    with open(os.fsencode(d) + b"/caf\xe9", "wb") as f:  # a name that is not UTF-8
        f.write(b"2")
    os.symlink(d / "gone", d / "dangling")
    h = hash_path(d)
    assert hash_path(d) == h
    with open(os.fsencode(d) + b"/caf\xe9", "wb") as f:
        f.write(b"3")
    assert hash_path(d) != h


def test_hash_path_of_unreadable_files_as_another_user():
    """As an unprivileged uid: an unreadable file or folder is hashed as a marker (no PermissionError), and the hash
    changes when it becomes readable."""
    from tests.unit.hostile_corpus import run_as_other_user, shared_tmp

    base = shared_tmp()
    d = base / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "ok").write_text("fine")
    (d / "secret").write_text("hidden")
    (d / "sub" / "inner").write_text("x")
    os.chmod(d / "secret", 0o000)
    os.chmod(d / "sub", 0o000)
    code = f"from pipeline.io import hash_path, hash_stats; print(hash_path({str(d)!r}))"
    locked = run_as_other_user(code).strip()
    os.chmod(d / "secret", 0o644)
    os.chmod(d / "sub", 0o755)
    opened = run_as_other_user(code).strip()
    shutil.rmtree(base)
    assert len(locked) == len(opened) == 64 and locked != opened


def test_hash_stats_sees_size_mtime_and_removal(tmp_path):
    from pipeline.io import hash_stats

    f = tmp_path / "a"
    f.write_text("1")
    entries = [("a", f), ("b", tmp_path / "b")]  # b does not exist: recorded as an error, not raised
    h = hash_stats(entries)
    assert hash_stats(entries) == h
    os.utime(f, ns=(0, 10**9))
    assert hash_stats(entries) != h
