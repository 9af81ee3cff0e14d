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
        ("data.fim.rate=1.5", r"data\.fim: rate must be in \[0.0, 1.0\], got 1.5"),
        ("data.pack.val_fraction=0", "val_fraction"),
        ("data.tokenizer.vocab_size=100", "vocab_size"),
        ("data.num_proc=0", "num_proc"),
        ("+data.fim.rat=0.1", "rat"),  # a misspelt key that Hydra appends: the schema refuses it
        ("data.dedup.shingle_words=0", r"data\.dedup: shingle_words must be in \[1, 32\], got 0"),
        ("data.dedup.num_perm=1", r"data\.dedup: num_perm must be in \[16, 1024\]"),
        ("data.dedup.threshold=0.2", r"data\.dedup: threshold must be in \[0.5, 1.0\]"),
        ("data.dedup.bands=40", "set both bands and rows"),
        ("data.dedup.rows=40", "set both bands and rows"),
        ("data.decontam.ngram=2", r"data\.decontam: ngram must be in \[8, 64\], got 2"),
        ("data.fim.languages=[pyton]", r"data\.fim: languages: unknown \['pyton'\]"),
        ("data.fim.level=chunk", r"data\.fim: level must be one of \('document', 'window'\)"),
        ("data.tokenizer.max_train_bytes=0", "data.tokenizer: max_train_bytes"),
        ("data.tokenizer.min_frequency=0", "min_frequency"),
        ("data.filters.min_bytes=0", "data.filters: need 1 <= min_bytes"),
        ("data.filters.min_alnum_fraction=2", "min_alnum_fraction"),
        ("data.filters.prose_rules=[gopher]", r"prose_rules: unknown \['gopher'\]"),
        ("data.pack.seq_len=0", "data.pack: need seq_len >= 1"),
        ("data.reasoning.kinds=[sudoku]", "data.reasoning: kinds"),
        ("data.reasoning.cot_fraction=2", "cot_fraction"),
        ("data.executor=spark", r"data: executor must be one of \('local', 'slurm'\)"),
        ("data.executor=slurm", "slurm.partition"),
        ("data.tasks=-1", "tasks"),
        ("data.slurm.cpus_per_task=0", "data.slurm: cpus_per_task"),
    ],
)
def test_bad_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        compose([override])


@pytest.mark.parametrize(
    "source, match",
    [
        ("{kind: ftp}", r"data\.sources\[0\]: kind must be one of"),
        ("{kind: files}", r"data\.sources\[0\]: a files source needs paths"),
        ("{kind: hub}", "needs hub_path"),
        ("{kind: python_env, roots: []}", "needs roots"),
        ("{kind: python_env, extensions: [py]}", "extensions must start with"),
        ("{kind: python_env, max_files: -1}", "max_files"),
    ],
)
def test_bad_sources_name_their_index(source, match):
    with pytest.raises(ConfigError, match=match):
        compose([f"data.sources=[{source}]"])


def test_valid_settings_compose():
    overrides = ["data.fim.languages=[python,rust,'*']", "data.fim.level=window", "data.dedup.bands=8"]
    overrides += ["data.dedup.rows=16", "data.executor=slurm", "data.slurm.partition=cpu", "data.tasks=64"]
    cfg = compose(overrides)
    assert cfg.data.n_tasks == 64 and cfg.data.fim.level == "window"
    assert compose(["data.num_proc=3"]).data.n_tasks == 3
    DataConfig(sources=[SourceConfig(kind="files", paths=["x.jsonl"])]).validate()
