"""Stages log through Hydra's handlers (conf/hydra/job_logging/rank_zero.yaml): info from rank 0 only, on stdout and
in the job's log file; warnings from every rank."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP = textwrap.dedent(
    f"""
    import logging
    import hydra
    import pipeline.config  # registers the schema

    @hydra.main(version_base=None, config_path={str(REPO / "conf")!r}, config_name="config")
    def main(cfg):
        logging.getLogger("stage").info("an info message")
        logging.getLogger("stage").warning("a warning")

    main()
    """
)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_info_from_rank_zero_only_warnings_from_every_rank(tmp_path, rank):
    (tmp_path / "app.py").write_text(APP)
    env = {**os.environ, "RANK": rank, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(tmp_path / "app.py"), f"hydra.run.dir={tmp_path / 'job'}", "hydra.job.name=app"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[stage][WARNING] - a warning" in out.stdout
    assert ("[stage][INFO] - an info message" in out.stdout) == (rank == "0")
    log_file = (tmp_path / "job" / "app.log").read_text()
    assert "a warning" in log_file and ("an info message" in log_file) == (rank == "0")
