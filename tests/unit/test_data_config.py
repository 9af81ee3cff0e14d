"""Every data preset composes into the typed DataConfig, and impossible settings fail early with the key named."""

from pathlib import Path

import pytest

from data.config import DataConfig, SourceConfig
from pipeline.config import ConfigError, compose

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "data").glob("*.yaml"))


def test_presets_exist():
    assert {"default", "smoke", "hub"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset):
    cfg = compose([f"data={preset}"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.sources
    assert all(isinstance(s, SourceConfig) for s in cfg.data.sources)


def test_defaults_match_the_tiny_model():
    cfg = compose([])
    assert cfg.data.tokenizer.vocab_size == cfg.model.vocab_size
    assert cfg.data.sources[0].kind == "python_env"


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.fim.rate=1.5", "fim.rate"),
        ("data.pack.val_fraction=0", "val_fraction"),
        ("data.tokenizer.vocab_size=100", "vocab_size"),
        ("data.num_proc=0", "num_proc"),
        ("+data.fim.rat=0.1", "rat"),  # a misspelt key that Hydra appends: the schema refuses it
    ],
)
def test_bad_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        compose([override])


def test_unknown_source_kind_is_named():
    cfg = DataConfig(sources=[SourceConfig(kind="ftp")])
    with pytest.raises(ValueError, match="sources\\[0\\].kind"):
        cfg.validate()
