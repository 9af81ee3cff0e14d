"""Every config in conf/ composes into the typed schema; unknown keys and bad values fail early, naming the key."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from pipeline.config import CONF_DIR, Config, ConfigError, compose, to_config


def _group_options():
    for group_dir in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


@pytest.mark.parametrize(("group", "option"), list(_group_options()))
def test_every_config_in_conf_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert isinstance(cfg, Config)


def test_default_composes_to_dataclasses_all_the_way_down():
    cfg = compose()
    assert type(cfg.model).__name__ == "ModelConfig" and type(cfg.train.optim).__name__ == "OptimConfig"
    assert cfg.wandb.mode == "offline"


def test_misspelt_command_line_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="stpes"):
        compose(["train.stpes=5"])


def test_unknown_key_in_a_yaml_fails_naming_it():
    with pytest.raises(ConfigError, match="lerning_rate"):
        to_config({"train": {"optim": {"lerning_rate": 1.0}}})


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigError, match="steps"):
        to_config({"train": {"steps": "many"}})


def test_bad_enum_values_fail():
    with pytest.raises(ConfigError, match="precision"):
        compose(["precision=fp4"])
    with pytest.raises(ConfigError, match="kernels.backend"):
        compose(["kernels.backend=cuda"])


def test_impossible_model_fails_before_anything_is_built():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        compose(["model.num_experts_per_tok=64"])
