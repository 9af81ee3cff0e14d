"""Typed configuration of the evaluation stage (`conf/eval/`), merged into `pipeline.config.Config` as `cfg.eval`.

OmegaConf structured configs: plain dataclasses, `Optional`, `list`, nested dataclasses; a misspelt key fails when
the config is composed. One section per suite, each with `enabled`, so any suite can be switched off by config:

    python -m eval.run eval.humaneval.enabled=false eval.reasoning.k=8 eval.reasoning.temperature=0.6

The defaults score the whole of HumanEval (164 problems, greedy, room for a function body) and its code bpb, and
samples of the FIM tasks and held-out reasoning prompts, within the CPU budget of `make pipeline`; `conf/eval/smoke`
is the micro budget of the tests. Every score carries its interval over problems, so a sample size shows in the
width. A real model wants `eval.fim.max_tasks=0 eval.humaneval.n_samples=20 eval.humaneval.temperature=0.8
eval.humaneval.ks=[1,10]` (0 = all tasks / problems).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BpbEvalConfig:
    enabled: bool = True
    batches: int = 4  # validation batches (the first ones of the split, the same for every checkpoint)
    batch_size: int = 8
    seq_len: int = 0  # 0: the length the data stage packed with (capped by the model's max positions)
    code_problems: int = 0  # HumanEval programs (prompt + canonical solution) as held-out code; 0 = all, -1 = skip


@dataclass
class FimEvalConfig:
    enabled: bool = True
    modes: list[str] = field(default_factory=lambda: ["psm", "spm"])
    max_tasks: int = 256  # single-line tasks drawn (seeded) from HumanEval's 1033; 0 = all
    max_new_tokens: int = 32
    batch_size: int = 32


@dataclass
class HumanEvalConfig:
    enabled: bool = True
    max_problems: int = 0  # the first problems of HumanEval; 0 = all 164
    n_samples: int = 1  # n per problem for the unbiased pass@k estimator (1 with greedy decoding)
    ks: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 320  # the longest canonical body is 315 tokens of the tiny tokenizer (bench/eval_cost.py)
    batch_size: int = 64  # prompts per generate() call (each sampled n_samples times); decoding is step-bound
    stop_sequences: bool = True  # stop decoding at the Codex stop sequences (false: the same scores, more tokens)


@dataclass
class ReasoningEvalConfig:
    enabled: bool = True
    n: int = 100  # held-out prompts from the data stage's reasoning test split; 0 = all
    k: int = 4  # samples per prompt: pass@1 is averaged over them
    temperature: float = 0.6  # DeepSeek-R1's evaluation setting (temperature 0.6, top-p 0.95)
    top_p: float = 0.95
    max_new_tokens: int = 96
    batch_size: int = 32
    gsm8k_path: str | None = None  # a local GSM8K jsonl/dir; absent -> the GSM8K part is skipped with a reason
    gsm8k_n: int = 100


@dataclass
class MoEEvalConfig:
    enabled: bool = True
    batches: int = 2  # validation batches routed to measure expert load (batch size of the bpb suite)


@dataclass
class EvalConfig:
    ckpt: str | None = None  # a DCP checkpoint or HF directory; None: every checkpoint of outputs/<run>/
    tokenizer: str | None = None  # None: the HF directory's tokenizer.json, else outputs/<run>/data/tokenizer.json
    seed: int = 0
    sandbox_workers: int = 2
    table_rows: int = 8  # sample rows per suite and checkpoint in the W&B tables / <suite>_samples.jsonl
    bpb: BpbEvalConfig = field(default_factory=BpbEvalConfig)
    fim: FimEvalConfig = field(default_factory=FimEvalConfig)
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    reasoning: ReasoningEvalConfig = field(default_factory=ReasoningEvalConfig)
    moe: MoEEvalConfig = field(default_factory=MoEEvalConfig)

    def validate(self) -> None:
        for mode in self.fim.modes:
            if mode not in ("psm", "spm"):
                raise ValueError(f"eval.fim.modes: unknown FIM mode {mode!r} (psm or spm)")
        h = self.humaneval
        if any(k < 1 or k > h.n_samples for k in h.ks):
            raise ValueError(f"eval.humaneval.ks={h.ks} must lie in [1, n_samples={h.n_samples}]")
        if self.reasoning.k < 1 or h.n_samples < 1:
            raise ValueError("eval.reasoning.k and eval.humaneval.n_samples must be >= 1")
        if self.reasoning.temperature == 0 and self.reasoning.k != 1:
            raise ValueError(
                f"eval.reasoning: greedy decoding (temperature 0) draws one sample, got k={self.reasoning.k}"
            )
        if h.temperature == 0 and h.n_samples != 1:
            raise ValueError(f"eval.humaneval: greedy decoding (temperature 0) draws one sample, got n={h.n_samples}")
        for key, v in (
            ("humaneval.max_new_tokens", h.max_new_tokens),
            ("fim.max_new_tokens", self.fim.max_new_tokens),
            ("reasoning.max_new_tokens", self.reasoning.max_new_tokens),
        ):
            if v < 1:
                raise ValueError(f"eval.{key}={v} must be >= 1")
        if self.bpb.code_problems < -1:
            raise ValueError(f"eval.bpb.code_problems={self.bpb.code_problems}: 0 = all, -1 = skip, or a count")
