"""Finding and loading the checkpoints of a run: shared by the eval stage (eval/run.py) and the lm-eval harness
comparison (eval/lm_eval_run.py), so both pick the same checkpoint and rebuild the same model.

A checkpoint is a DCP directory `step_N/` with its `model_config.json` (train/checkpoint.py) or a Hugging Face
directory with `config.json` (model/hf.py); a run directory is the nearest ancestor holding `data/tokenizer.json`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kernels.formats import ScaleFormats
from model.hf import import_hf
from train.policy import load_policy

# label -> stage directory whose newest checkpoint it names, in report order
CHECKPOINT_STAGES = {"pretrain": "pretrain", "sft": "sft", "rl": "rl", "student": "distill"}
_STEP_RE = re.compile(r"^step_(\d+)$")


def newest_step_dir(ckpt_dir: Path) -> Path | None:
    """The `step_N` directory with the largest N (complete checkpoints only: temporaries are named `.tmp-*`)."""
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def discover_checkpoints(run_dir: Path) -> dict[str, Path]:
    """{label: checkpoint} for every training stage of the run that has one (see the module docstring of eval.run)."""
    found = {}
    for label, stage in CHECKPOINT_STAGES.items():
        ckpt = newest_step_dir(run_dir / stage / "checkpoints")
        if ckpt is None and (run_dir / stage / "hf" / "config.json").is_file():
            ckpt = run_dir / stage / "hf"
        if ckpt is not None:
            found[label] = ckpt
    return found


def run_dir_of(path: Path) -> Path | None:
    """The run directory holding a checkpoint: the nearest ancestor with `data/tokenizer.json`."""
    for parent in list(Path(path).resolve().parents)[:5]:
        if (parent / "data" / "tokenizer.json").is_file():
            return parent
    return None


def label_of(path: Path, run_dir: Path | None) -> str:
    if run_dir is not None:
        stage = Path(path).resolve().relative_to(run_dir).parts[0]
        for label, s in CHECKPOINT_STAGES.items():
            if s == stage:
                return label
    return "ckpt"


def resolve_tokenizer(ckpt: Path, explicit: str | None, data_dir: Path | None) -> Path:
    candidates = [Path(explicit)] if explicit else [Path(ckpt) / "tokenizer.json"]
    if data_dir is not None and not explicit:
        candidates.append(data_dir / "tokenizer.json")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no tokenizer for {ckpt}: tried {[str(c) for c in candidates]} (set eval.tokenizer=)")


def load_checkpoint(
    path: Path,
    precision: str = "fp32",
    backend: str = "auto",
    device: torch.device | None = None,
    scale_formats: ScaleFormats | str = "fp32",
):
    """A model from a DCP checkpoint directory (with model_config.json) or a Hugging Face directory (config.json);
    `precision`, `backend` and `scale_formats` (kernels.scale_formats()) apply to DCP checkpoints."""
    path = Path(path)
    device = device or torch.device("cpu")
    if (path / "model_config.json").is_file():
        model, _ = load_policy(path, precision, backend, device, scale_formats)
    elif (path / "config.json").is_file():
        model = import_hf(path).to(device)
    else:
        raise ValueError(f"ckpt={path} is neither a DCP checkpoint (model_config.json) nor an HF dir (config.json)")
    return model.eval()
