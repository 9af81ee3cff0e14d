"""Checkpoints on `torch.distributed.checkpoint` (DCP): atomic, resharding-ready, self-describing.

Layout of one checkpoint, `<ckpt_dir>/step_000100/`:
    .metadata, __*_*.distcp     DCP shards: {"model", "optim", "ema"} (any number of ranks can write or read them)
    trainer_state.json          step, loader state, counters (JSON, no pickle)
    rng_rank<r>.json            each rank's RNG states: Python, NumPy, torch CPU and, on a GPU, its CUDA device's
    model_config.json           the model's config, so a checkpoint alone rebuilds its model

Atomicity: every rank writes into `.tmp-step_000100/`; after a barrier rank 0 writes `trainer_state.json` last and
renames the directory to `step_000100`. A directory with the final name is therefore complete; a crash leaves only a
`.tmp-*` directory, which is ignored and cleaned. `latest_valid()` walks checkpoints newest first and skips (and
reports) any that fail to load, so a truncated newest checkpoint falls back to the previous one.
Because DCP stores each tensor with its global shape, a checkpoint saved on N ranks loads on M (elastic resume).

`async_save=True` (`train.async_checkpoint`): `dcp.async_save` copies the state to host memory and returns, the
files are written by a background thread while training goes on; the checkpoint is finalized (barrier, trainer
state, rename) by the next `save` or by `wait()`, so until then it is a `.tmp-*` directory, and a crash before
that falls back to the previous checkpoint exactly as a crash during a synchronous save does.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pipeline.io import atomic_write_json, clean_temporaries

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state_json() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()  # this rank's device (torch.cuda.set_device)
    return state


def set_rng_state_json(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, keep_last: int = 2, async_save: bool = False) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple | None = None  # (future, tmp, final, trainer_state, model_config) of an async save
        if _rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            clean_temporaries(self.dir)
        _barrier()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    # ---------------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        trainer_state: dict[str, Any],
        model_config: dict[str, Any],
        ema: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        self.wait()
        final = self.dir / f"step_{step:06d}"
        tmp = self.dir / f".tmp-step_{step:06d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = self._state(model, optimizer, ema)
        (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(rng_state_json()))
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = (future, tmp, final, {**trainer_state, "step": step}, model_config)
            return final
        dcp.save(state, checkpoint_id=str(tmp))
        self._finalize(tmp, final, {**trainer_state, "step": step}, model_config)
        return final

    def wait(self) -> None:
        """Finish an asynchronous save in flight (every rank calls it): its files, then the rename."""
        if self._pending is None:
            return
        future, tmp, final, trainer_state, model_config = self._pending
        self._pending = None
        future.result()
        self._finalize(tmp, final, trainer_state, model_config)

    def _finalize(self, tmp: Path, final: Path, trainer_state: dict, model_config: dict) -> None:
        _barrier()
        if _rank() == 0:
            atomic_write_json(tmp / "model_config.json", model_config)
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    @staticmethod
    def _state(model: nn.Module, optimizer, ema) -> dict:
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
        else:
            state = {"model": model.state_dict()}
        if ema is not None:
            state["ema"] = ema
        return state

    # ---------------------------------------------------------------------------------------------------- load
    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        ema: dict[str, torch.Tensor] | None = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Load a checkpoint in place into model/optimizer/ema; return its trainer_state."""
        self.wait()
        path = Path(path)
        ts_path = path / "trainer_state.json"
        if not (path / ".metadata").is_file() or not ts_path.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (missing .metadata or trainer_state.json)")
        trainer_state = json.loads(ts_path.read_text())
        state = self._state(model, optimizer, ema)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # truncated shard, missing key, shape mismatch...
            raise CheckpointError(f"{path} failed to load: {type(e).__name__}: {e}") from e
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            model.load_state_dict(state["model"])
        if ema is not None:
            for k, v in state["ema"].items():
                ema[k].copy_(v)
        rng = path / f"rng_rank{_rank()}.json"
        if restore_rng and rng.is_file():
            set_rng_state_json(json.loads(rng.read_text()))
        return trainer_state

    def load_latest_valid(self, model, optimizer=None, ema=None) -> tuple[Path, dict] | None:
        """Newest checkpoint that loads; corrupt ones are reported and skipped. None when there is none."""
        for path in reversed(self.checkpoints()):
            try:
                return path, self.load(path, model, optimizer, ema)
            except CheckpointError as e:
                log.warning("skipping corrupt checkpoint %s: %s", path, e)
        return None


def read_model_config(path: Path) -> dict:
    return json.loads((Path(path) / "model_config.json").read_text())
