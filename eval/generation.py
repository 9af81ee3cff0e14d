"""The seam between the evaluation suites and a model: prompts in, text completions out.

Every generative suite is three steps, so that its scoring can be tested without a model:

    prompts = build_...()                      # (a) Prompt objects, plus the references the scorer needs
    completions = generate_fn(prompts, sampling)   # (b) any function: the model, an oracle, an adversary
    metrics = score_...(completions, ...)      # (c) graders and the sandbox

`GenerateFn` is `(prompts, sampling) -> completions`, one list of `sampling.n` strings per prompt. The tests pass an
oracle (a function returning each prompt's canonical completion: it must score 1) and adversaries (empty or wrong
completions: they must score 0) through exactly the scoring path the model's completions take. `model_generator`
builds the real one from a `DeepseekV3` and its tokenizer:

- a chat prompt is rendered with the post-training template (`train.chat.render_prompt`:
  `BOS <｜User｜> text <｜Assistant｜>`), the way SFT and GRPO feed the model;
- a raw prompt (code completion, fill-in-the-middle) is the document text, preceded by EOS: pretraining packs
  documents as `... EOS doc EOS doc ...` (no BOS), so "just after an EOS" is where a document starts. Special tokens
  spelled in the text (the FIM sentinels) become their single ids;
- generation stops at EOS, and with `Sampling.stop_strings` at the first step whose decoded text holds one of them
  (HumanEval's stop sequences end a function body, a newline ends a single-line infilling: nothing after them is
  scored, so nothing after them is decoded; `model.generate.StopStrings`);
- the completion is decoded with special tokens kept (the reasoning tags are special tokens) and the final EOS
  dropped, then cut before its first stop string;
- a prompt longer than the context leaves room for `max_new_tokens` by dropping tokens from the start of its body
  (after its first token); such prompts are counted in `truncated_prompts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from data.tokenizer import EOS


@dataclass(frozen=True)
class Prompt:
    text: str
    chat: bool = False  # True: wrap in the chat template; False: a raw document prefix


@dataclass(frozen=True)
class Sampling:
    n: int = 1  # completions per prompt
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()  # decoding stops at the first one in the text; the completion ends before it


GenerateFn = Callable[[Sequence[Prompt], Sampling], list[list[str]]]


@dataclass
class SuiteResult:
    """What a suite returns: flat metrics (numbers, or a string saying why a part was skipped), a few sample rows
    (dicts with the same keys) for the W&B table, the 95% interval of each score ({metric: (low, high)}, over
    problems: `eval.stats`) and its floors ({metric: {floor name: value}}: what an empty completion, a copied
    prompt or a context-free model scores on the same problems, computed by the same scorer)."""

    metrics: dict[str, float | int | str]
    samples: list[dict] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    floors: dict[str, dict[str, float]] = field(default_factory=dict)


def check_completions(prompts: Sequence[Prompt], sampling: Sampling, completions: list[list[str]]) -> None:
    """A GenerateFn's answer must hold `sampling.n` strings for each prompt."""
    if len(completions) != len(prompts) or any(len(c) != sampling.n for c in completions):
        shape = [len(c) for c in completions]
        raise ValueError(f"generate_fn returned {shape} completions for {len(prompts)} prompts x n={sampling.n}")


class ModelGenerator:
    """A GenerateFn backed by `model.generate.generate` (batched, MLA latent cache, prompt prefilled once per group).

    `stats` accumulates over calls: prompts, truncated_prompts, generated_tokens, and finished_early (completions that
    ended before max_new_tokens: at EOS or a stop string).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        precision: str = "fp32",
        seed: int = 0,
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        self.seed = seed
        self.batch_size = batch_size
        self.eos = tokenizer.token_to_id(EOS)
        if self.eos is None:
            raise ValueError(f"the tokenizer has no {EOS!r} token")
        self.context = int(model.config.max_position_embeddings)
        self.stats = {"prompts": 0, "truncated_prompts": 0, "generated_tokens": 0, "finished_early": 0}
        self._calls = 0

    def encode(self, prompt: Prompt) -> list[int]:
        if prompt.chat:
            from train.chat import render_prompt

            return render_prompt(self.tokenizer, prompt.text)
        return [self.eos] + self.tokenizer.encode(prompt.text, add_special_tokens=False).ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        budget = self.context - max_new_tokens
        if budget < 2:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {self.context} positions")
        if len(ids) <= budget:
            return ids
        self.stats["truncated_prompts"] += 1
        return ids[:1] + ids[len(ids) - budget + 1 :]

    def __call__(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[str]]:
        from model.generate import generate
        from train.runtime import autocast

        device = next(self.model.parameters()).device
        out: list[list[str]] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc="generate", leave=False, disable=len(starts) < 2):
            batch = prompts[start : start + self.batch_size]
            chunk = [self._fit(self.encode(p), sampling.max_new_tokens) for p in batch]
            self._calls += 1
            with autocast(self.precision, device):
                g = generate(
                    self.model,
                    chunk,
                    n_samples=sampling.n,
                    max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    stop_token_ids=[self.eos],
                    seed=self.seed + 1000 * self._calls,
                    stop_strings=sampling.stop_strings,
                    decode=self.decode,
                )
            self.stats["prompts"] += len(chunk)
            self.stats["generated_tokens"] += g.num_generated_tokens
            self.stats["finished_early"] += sum(len(t) < sampling.max_new_tokens for t in g.tokens)
            texts = g.texts if g.texts is not None else [self.decode(t) for t in g.tokens]
            out += [texts[i * sampling.n : (i + 1) * sampling.n] for i in range(len(chunk))]
        return out

    def decode(self, ids: list[int]) -> str:
        if ids and ids[-1] == self.eos:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)
