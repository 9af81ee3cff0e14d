"""Every rule of the train, sft, rl, distill and parallel sections, checked when the config is composed: each bad
value fails with the key, the bad value and what is allowed. One row per rule, checked by the pass `to_config` runs
after Hydra's merge (every section's `validate()`, prefixed with its key: `pipeline.config._check`) on the typed
defaults with the override applied; a few rows go through the whole `compose` as well."""

import dataclasses

import pytest
import yaml

from pipeline.config import Config, ConfigError, _check, compose

RULES = [
    # train (train/config.py TrainConfig, OptimConfig)
    ("train.steps=0", r"train: steps must be >= 1, got 0"),
    ("train.seq_len=0", r"train: seq_len must be >= 1, got 0"),
    ("train.log_every=0", r"train: log_every must be >= 1, got 0"),
    ("train.eval_every=0", r"train: eval_every must be >= 1, got 0"),
    ("train.eval_batches=0", r"train: eval_batches must be >= 1, got 0"),
    ("train.ckpt_every=0", r"train: ckpt_every must be >= 1, got 0"),
    ("train.ema_every=0", r"train: ema_every must be >= 1, got 0"),
    ("train.max_bad_steps=0", r"train: max_bad_steps must be >= 1, got 0"),
    ("train.keep_last=-1", r"train: keep_last must be >= 0, got -1"),
    ("train.batch_size=0", r"train: batch_size must be >= 1, got 0"),
    ("train.micro_batch_size=0", r"train: micro_batch_size must be >= 1, got 0"),
    ("train.micro_batch_size=3", r"train: batch_size=16 is not divisible by micro_batch_size=3 \(set micro_batch"),
    ("train.ema_decay=1.0", r"train: ema_decay must be in \[0, 1\) \(0 disables the EMA\), got 1.0"),
    ("train.peak_tflops=0", r"train: peak_tflops must be > 0, got 0"),
    ("train.activation_checkpointing=some", r"train: activation_checkpointing must be one of \('none', 'full'\)"),
    ("train.optim.schedule=foo", r"train.optim: schedule must be one of \('wsd', 'cosine'\), got 'foo'"),
    ("train.optim.lr=0", r"train.optim: lr must be > 0, got 0"),
    ("train.optim.min_lr_ratio=2", r"train.optim: min_lr_ratio must be in \[0, 1\], got 2"),
    ("train.optim.decay_start=-0.1", r"train.optim: decay_start must be in \[0, 1\], got -0.1"),
    ("train.optim.beta1=1", r"train.optim: beta1 must be in \[0, 1\), got 1"),
    ("train.optim.beta2=-0.5", r"train.optim: beta2 must be in \[0, 1\), got -0.5"),
    ("train.optim.eps=0", r"train.optim: eps must be > 0, got 0"),
    ("train.optim.weight_decay=-1", r"train.optim: weight_decay must be >= 0, got -1"),
    ("train.optim.grad_clip=-1", r"train.optim: grad_clip must be >= 0, got -1"),
    ("train.optim.warmup_steps=-1", r"train.optim: warmup_steps must be >= 0, got -1"),
    # sft (train/post_config.py SFTConfig)
    ("sft.steps=0", r"sft: steps must be >= 1, got 0"),
    ("sft.max_len=0", r"sft: max_len must be >= 1, got 0"),
    ("sft.log_every=0", r"sft: log_every must be >= 1"),
    ("sft.ckpt_every=0", r"sft: ckpt_every must be >= 1"),
    ("sft.max_bad_steps=0", r"sft: max_bad_steps must be >= 1"),
    ("sft.eval_max_new_tokens=0", r"sft: eval_max_new_tokens must be >= 1"),
    ("sft.table_rows=0", r"sft: table_rows must be >= 1"),
    ("sft.n_train=-1", r"sft: n_train must be >= 0, got -1"),
    ("sft.keep_last=-1", r"sft: keep_last must be >= 0"),
    ("sft.eval_n=-1", r"sft: eval_n must be >= 0"),
    ("sft.table_every=-1", r"sft: table_every must be >= 0"),
    ("sft.micro_batch_size=5", r"sft: batch_size=32 is not divisible by micro_batch_size=5"),
    ("sft.optim.schedule=linear", r"sft.optim: schedule must be one of \('wsd', 'cosine'\), got 'linear'"),
    # rl (train/post_config.py GRPOConfig)
    ("rl.loss_agg=foo", r"rl: loss_agg must be one of \('seq_mean', 'token_mean', 'seq_sum_norm'\), got 'foo'"),
    ("rl.adv_norm=mad", r"rl: adv_norm must be one of \('std', 'none'\), got 'mad'"),
    ("rl.group_size=1", r"rl: group_size must be >= 2 \(advantages are relative to the group\), got 1"),
    ("rl.steps=0", r"rl: steps must be >= 1"),
    ("rl.prompts_per_step=0", r"rl: prompts_per_step must be >= 1"),
    ("rl.updates_per_batch=0", r"rl: updates_per_batch must be >= 1"),
    ("rl.micro_batch_size=0", r"rl: micro_batch_size must be >= 1"),
    ("rl.max_new_tokens=0", r"rl: max_new_tokens must be >= 1"),
    ("rl.log_every=0", r"rl: log_every must be >= 1"),
    ("rl.ckpt_every=0", r"rl: ckpt_every must be >= 1"),
    ("rl.max_bad_steps=0", r"rl: max_bad_steps must be >= 1"),
    ("rl.table_rows=0", r"rl: table_rows must be >= 1"),
    ("rl.kl_coef=-0.1", r"rl: kl_coef must be >= 0, got -0.1"),
    ("rl.format_weight=-1", r"rl: format_weight must be >= 0"),
    ("rl.n_train=-1", r"rl: n_train must be >= 0"),
    ("rl.eval_n=-1", r"rl: eval_n must be >= 0"),
    ("rl.table_every=-1", r"rl: table_every must be >= 0"),
    ("rl.keep_last=-1", r"rl: keep_last must be >= 0"),
    ("rl.clip_eps=0", r"rl: clip_eps and clip_eps_high must be > 0, got 0"),
    ("rl.clip_eps_high=-1", r"rl: clip_eps and clip_eps_high must be > 0"),
    ("rl.temperature=-1", r"rl: temperature must be >= 0 and top_p in \(0, 1\], got -1"),
    ("rl.top_p=0", r"rl: temperature must be >= 0 and top_p in \(0, 1\], got 0.7, 0"),
    ("rl.optim.lr=-1", r"rl.optim: lr must be > 0, got -1"),
    # distill (distill/config.py DistillConfig, TraceConfig)
    ("distill.kd_mode=reverse", r"distill: kd_mode must be one of \('none', 'online', 'topk'\), got 'reverse'"),
    ("distill.kd_mode=topk", r"distill: kd_mode=topk needs traces.cache_topk > 0"),
    ("distill.kd_weight=1.5", r"distill: kd_weight must be in \[0, 1\], got 1.5"),
    ("distill.kd_temperature=0", r"distill: kd_temperature must be > 0, got 0"),
    ("distill.student_base_steps=0", r"distill: student_init=pretrain needs student_base_steps >= 1, got 0"),
    ("distill.steps=0", r"distill: steps must be >= 1"),
    ("distill.max_len=0", r"distill: max_len must be >= 1"),
    ("distill.log_every=0", r"distill: log_every must be >= 1"),
    ("distill.ckpt_every=0", r"distill: ckpt_every must be >= 1"),
    ("distill.max_bad_steps=0", r"distill: max_bad_steps must be >= 1"),
    ("distill.eval_max_new_tokens=0", r"distill: eval_max_new_tokens must be >= 1"),
    ("distill.eval_every=-1", r"distill: eval_every must be >= 0"),
    ("distill.eval_n=-1", r"distill: eval_n must be >= 0"),
    ("distill.keep_last=-1", r"distill: keep_last must be >= 0"),
    ("distill.micro_batch_size=5", r"distill: batch_size=32 is not divisible by micro_batch_size=5"),
    ("distill.traces.samples_per_prompt=0", r"distill.traces: samples_per_prompt must be >= 1"),
    ("distill.traces.max_new_tokens=0", r"distill.traces: max_new_tokens must be >= 1"),
    ("distill.traces.prompt_batch_size=0", r"distill.traces: prompt_batch_size must be >= 1"),
    ("distill.traces.top_k=-1", r"distill.traces: top_k must be >= 0"),
    ("distill.traces.n_prompts=-1", r"distill.traces: n_prompts must be >= 0"),
    ("distill.traces.max_per_prompt=-1", r"distill.traces: max_per_prompt must be >= 0"),
    ("distill.traces.cache_topk=-1", r"distill.traces: cache_topk must be >= 0"),
    ("distill.traces.top_p=1.5", r"distill.traces: temperature must be >= 0 and top_p in \(0, 1\], got 1.0, 1.5"),
    ("distill.optim.eps=-1", r"distill.optim: eps must be > 0"),
    # parallel (train/parallel/config.py ParallelConfig; the world-size rules are checked at launch, see test_mesh)
    ("parallel.ep=0", r"parallel: ep must be >= 1 \(or -1 for dp_replicate/dp_shard\), got 0"),
    ("parallel.pp=0", r"parallel: pp must be >= 1"),
    ("parallel.dp_replicate=-2", r"parallel: dp_replicate must be >= 1 \(or -1"),
    ("parallel.dp_replicate=-1 parallel.dp_shard=-1", r"parallel: at most one of dp_replicate, dp_shard may be -1"),
    ("parallel.pp_schedule=gpipe", r"parallel: pp_schedule must be one of \('1f1b', 'dualpipev'\), got 'gpipe'"),
    ("parallel.pp_microbatches=0", r"parallel: pp_microbatches must be >= 1 \(or -1: every micro-batch\), got 0"),
    ("parallel.fp8_dispatch=true", r"parallel: fp8_dispatch=true needs parallel.ep > 1"),
    ("parallel.bf16_combine=true", r"parallel: bf16_combine=true needs parallel.ep > 1"),
    ("parallel.grad_sync=sometimes", r"parallel: grad_sync must be one of \('last', 'every'\), got 'sometimes'"),
]


def _overridden(overrides: list[str]) -> Config:
    cfg = Config()
    for o in overrides:
        key, value = o.split("=", 1)
        *path, name = key.split(".")
        section = cfg
        for p in path:
            section = getattr(section, p)
        assert dataclasses.is_dataclass(section) and name in {f.name for f in dataclasses.fields(section)}, key
        setattr(section, name, yaml.safe_load(value))
    return cfg


@pytest.mark.parametrize(("override", "message"), RULES, ids=[o for o, _ in RULES])
def test_bad_value_fails_naming_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        _check(_overridden(override.split()))


@pytest.mark.parametrize("row", [0, 15, 38, 62, 91])
def test_rules_fail_when_composed(row):
    override, message = RULES[row]
    with pytest.raises(ConfigError, match=message):
        compose(override.split())


def test_the_defaults_and_the_smoke_experiment_pass():
    _check(Config())
    compose(["experiment=smoke"])
