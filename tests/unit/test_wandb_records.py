"""The reader of W&B's offline run files, on files W&B itself wrote: records spanning 32 KiB blocks, a file cut
short by a killed process, a corrupted chunk, a file that is not a run log."""

import pytest

from pipeline.tracking import Tracker
from pipeline.wandb_records import BLOCK, CorruptRunFile, raw_records, read_run, run_files


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """A real offline run of several blocks, with one record (a 100 kB summary value) longer than a block."""
    d = tmp_path_factory.mktemp("big")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_MODE", raising=False)  # about W&B: the config decides, whatever the environment says
        t = Tracker(d, run_group="g", stage="s", mode="offline")
        for step in range(1, 401):
            t.log({"loss": 1.0 / step, "lr": 1e-3}, step=step)
        t.summary({"long": "x" * 100_000})
        t.finish()
    (segment,) = run_files(d)
    (path,) = segment.glob("*.wandb")
    return path


def test_every_record_of_a_multi_block_file_is_read(big_run):
    assert big_run.stat().st_size > 4 * BLOCK
    c = read_run(big_run)
    assert c.complete and c.exited
    assert c.history_steps == list(range(1, 401))
    assert [r["loss"] for r in c.history] == pytest.approx([1.0 / s for s in range(1, 401)])
    assert c.summary["long"] == "x" * 100_000  # joined from first, middle and last chunks


def test_a_file_cut_short_reads_up_to_its_last_whole_record(big_run, tmp_path):
    data = big_run.read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) // 2])
    c = read_run(cut)
    assert not c.complete and 0 < c.rows < 400
    assert c.history_steps == list(range(1, c.rows + 1))


def test_a_corrupted_chunk_ends_the_read_there(big_run, tmp_path):
    data = bytearray(big_run.read_bytes())
    data[BLOCK + 100] ^= 0xFF  # one byte in the second block
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))
    whole, complete = raw_records(big_run)
    some, complete_bad = raw_records(bad)
    assert complete and not complete_bad and 0 < len(some) < len(whole) and some == whole[: len(some)]


def test_a_file_that_is_not_a_run_log_is_refused(tmp_path):
    p = tmp_path / "x.wandb"
    p.write_bytes(b"not a log at all")
    with pytest.raises(CorruptRunFile, match="not a W&B run log"):
        read_run(p)
