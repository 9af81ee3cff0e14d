"""The typed configuration of the whole pipeline: Hydra composes YAML, these dataclasses consume it.

`conf/config.yaml` composes one group per code folder (`data/`, `model/`, `parallel/`, ...). Stage entry points
receive Hydra's `DictConfig` and call `to_config`, which merges it into the structured schema below: a misspelt or
unknown key, or a value of the wrong type, fails here — before any work starts — with an error naming the key.
Library code only ever sees these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from distill.config import DistillConfig
from eval.config import EvalConfig
from kernels.backend import BACKENDS
from kernels.formats import SCALE_FORMATS, ScaleFormats
from model.config import ModelConfig
from train.config import TrainConfig
from train.parallel.config import ParallelConfig
from train.post_config import GRPOConfig, SFTConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration that cannot be run: unknown key, wrong type, impossible combination."""


@dataclass
class RunConfig:
    name: str = "default"  # outputs/<name>/<stage>/
    root: str = "outputs"
    seed: int = 0
    deterministic: bool = True
    data_from: str | None = None  # reuse the data stage of another run (sweeps, benches); default: this run's


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "deepseek-repro"
    entity: str | None = None
    group: str | None = None  # W&B group; default: the run name (a Hydra multirun's jobs share `sweep-<time>`)
    system_metrics: bool | None = None  # CPU/GPU/memory sampling in the W&B run; null: on when CUDA is present
    system_metrics_interval_s: float = 15.0

    def validate(self) -> None:  # the mode is checked by _check
        if not self.system_metrics_interval_s > 0:
            raise ValueError(f"system_metrics_interval_s must be > 0, got {self.system_metrics_interval_s}")


@dataclass
class KernelsConfig:
    """The FP8 kernels (`precision=fp8`): which implementation runs, and how the scales are stored.

    `scale_format` sets every tensor class; `act_scale_format`, `weight_scale_format`, `grad_scale_format`
    override one class each (kernels/formats.py: fp32 as DeepSeek-V3, ue8m0 as DeepSeek-V3.1).
    """

    backend: str = "auto"  # auto | triton | torch | torchao (kernels/backend.py)
    scale_format: str = "fp32"  # fp32 | ue8m0
    act_scale_format: str | None = None  # activations X; None: scale_format
    weight_scale_format: str | None = None  # weights W
    grad_scale_format: str | None = None  # output gradients dY

    def scale_formats(self) -> ScaleFormats:
        base = self.scale_format
        act, weight, grad = (self.act_scale_format, self.weight_scale_format, self.grad_scale_format)
        return ScaleFormats(act or base, weight or base, grad or base)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"kernels.backend must be one of {BACKENDS}, got {self.backend!r}")
        for key in ("scale_format", "act_scale_format", "weight_scale_format", "grad_scale_format"):
            value = getattr(self, key)
            if value not in (*SCALE_FORMATS, *((None,) if key != "scale_format" else ())):
                raise ValueError(f"kernels.{key} must be one of {SCALE_FORMATS}, got {value!r}")
        if self.backend == "torchao" and self.scale_formats() != ScaleFormats():
            raise ValueError(
                f"kernels.scale_format ({self.scale_formats()}) applies to our kernels; kernels.backend=torchao uses "
                "torchao's row-wise recipe, which picks its own (power-of-two) scales"
            )


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["data", "pretrain", "sft", "rl", "distill", "eval", "report"])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    precision: str = "fp32"  # fp32 | bf16 | fp8 | auto (bf16 where the device has native bf16 matmuls, else fp32)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def register_schema() -> None:
    """Make the dataclasses the base of conf/config.yaml (its first default, `schema`): every field is then
    overridable from the command line and type-checked while Hydra composes."""
    ConfigStore.instance().store(name="schema", node=Config)


register_schema()


def _validate_sections(section: Any, key: str) -> None:
    """Call `validate()` of every dataclass in the tree below `section` (children first), so each section states
    its own enums, ranges and cross-field rules; a ValueError becomes a ConfigError prefixed with the key."""
    for f in fields(section):
        value = getattr(section, f.name)
        children = value if isinstance(value, list) else [value]
        for i, child in enumerate(children):
            if is_dataclass(child):
                _validate_sections(child, f"{key}.{f.name}" + (f"[{i}]" if isinstance(value, list) else ""))
    validate = getattr(section, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{key}: {e}" if key else str(e)) from e


def _check(cfg: Config) -> None:
    if cfg.precision not in ("fp32", "bf16", "fp8", "auto"):
        raise ConfigError(f"precision must be fp32, bf16, fp8 or auto, got {cfg.precision!r}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode must be offline, online or disabled, got {cfg.wandb.mode!r}")
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if is_dataclass(section):
            _validate_sections(section, f.name)


def to_config(dcfg: DictConfig | dict) -> Config:
    """Merge a composed Hydra config into the schema; raise ConfigError naming the offending key."""
    if isinstance(dcfg, DictConfig):
        dcfg = OmegaConf.to_container(dcfg, resolve=True)
    dcfg = {k: v for k, v in dcfg.items() if k != "hydra"}
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, dcfg)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    _check(cfg)
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """Compose `conf/<config_name>.yaml` with command-line style overrides (for tests and notebooks)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        dcfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return to_config(dcfg)


def stage_dir(cfg: Config, stage: str) -> Path:
    """Where a stage of this run lives; the data stage may come from another run (`run.data_from`)."""
    run = cfg.run.data_from if stage == "data" and cfg.run.data_from else cfg.run.name
    return Path(cfg.run.root) / run / stage


def as_dict(section: Any) -> dict:
    """A dataclass section as a plain dict (for manifests and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(section), resolve=True)
