"""Rank-0 logging under Hydra.

Every stage logs through `logging`; Hydra configures the handlers from conf/hydra/job_logging/rank_zero.yaml:
Hydra's default job logging (the console on stdout, `<job>.log` in the run's `.hydra/<time>/` folder) with this
filter on both, so a torchrun job writes each info message once (rank 0's), while warnings and errors of every rank
still show.
"""

from __future__ import annotations

import logging
import os


class RankZeroFilter(logging.Filter):
    """Passes every record of rank 0 (the `RANK` torchrun sets; 0 without one) and warnings or worse of any rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.environ.get("RANK", "0") == "0"
