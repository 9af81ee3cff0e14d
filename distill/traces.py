"""Teacher traces by rejection sampling: what the student of the distillation stage learns from.

DeepSeek-R1 (section 2.3.3) builds its SFT data for the final model, and the data the Qwen/Llama students are
distilled on, by rejection sampling: the RL checkpoint answers each prompt several times and only the responses a
rule judges correct (and readable) are kept. Here, for each training prompt:

1. Sample K completions from the teacher (`samples_per_prompt`), with `model.generate.generate`: the prompt is
   rendered with the chat template (train/chat.py), prefilled once into MLA's latent cache and shared by its K
   samples; temperature / top-p / top-k as configured.
2. Grade every completion with the graders RL optimized (train/policy.py `score_completions`: the answer checked by
   rule, numeric for arithmetic, the expression verified for Countdown) and the format reward.
3. Accept a completion when it is correct, in the `<think>...</think><answer>...</answer>` format, and finished
   (the teacher drew the end-of-sentence token before `max_new_tokens`): a truncated trace would teach the student
   never to stop. With `verify_steps` (default) every `a op b = c` step of its `<think>` must also be true: a tiny
   teacher sampled at temperature 1 often reaches a right answer through a wrong step ("13 + 1 = 15. 15 - 1 = 14",
   counted in the traces' stats); R1 likewise filters the responses it
   distils from beyond the final answer (readability, mixed languages). Identical correct completions of one prompt
   are kept once (`dedup`), at most `max_per_prompt`.

The acceptance rate (accepted-by-the-grader samples / all samples) is the teacher's sampling pass@1 on the train
split; it is recorded, with the teacher checkpoint's content hash and every sampling setting, in the trace set's
provenance (`provenance.json` beside the `datasets` directory and in its `DatasetInfo.description`), so a trace set
always says which model produced it and how.

Optionally (`cache_topk > 0`) the teacher's top-k logits at every response position are stored with each trace, so
that logit distillation can run later without the teacher in memory (distill/student.py, `kd_mode=topk`). They are
computed by one teacher forward over exactly the ids the student will train on (`encode_chat` of the accepted text),
so cached positions and training positions line up one to one.

A teacher that gets nothing right makes the stage fail with a clear error; `fallback_to_reference` (for smoke runs
with an untrained teacher only) trains on the data's reference traces instead and says so in the provenance.

The sampler is a plain function `(prompt_ids, n, seed) -> completions` (`model_sampler` wraps the generation engine),
so tests drive the same rejection-sampling code with an oracle teacher that returns known right and wrong answers.

Legend: N response positions of one trace, K cached top-k entries, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from tqdm import tqdm

from distill.config import TraceConfig
from model.generate import generate
from pipeline.io import atomic_dir, atomic_write_json
from rewards.graders import arithmetic_steps_valid
from train.chat import decode_completion, encode_chat, eos_id, make_batch, render_prompt
from train.policy import score_completions
from train.runtime import autocast

log = logging.getLogger(__name__)

# (prompt token ids [B], samples per prompt n, seed) -> B*n completions' token ids, prompt-major (b*n + j)
Sampler = Callable[[list[list[int]], int, int], list[list[int]]]

PROVENANCE = "provenance.json"
DATASET = "dataset"


def model_sampler(
    model: torch.nn.Module, t: TraceConfig, stop_token_ids: list[int], precision: str = "fp32"
) -> Sampler:
    """The real teacher: the generation engine with the trace config's sampling settings."""
    device = next(model.parameters()).device

    def sample(prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        with autocast(precision, device):
            out = generate(
                model,
                prompts,
                n_samples=n,
                max_new_tokens=t.max_new_tokens,
                temperature=t.temperature,
                top_p=t.top_p,
                top_k=t.top_k,
                stop_token_ids=stop_token_ids,
                seed=seed,
            )
        return out.tokens

    return sample


@dataclass
class TraceStats:
    prompts: int = 0
    samples: int = 0
    correct: int = 0  # samples the grader accepted (right answer, right format, finished)
    wrong: int = 0
    unfinished: int = 0  # no end-of-sentence within max_new_tokens (rejected even when the answer is right)
    wrong_steps: int = 0  # right answer, but a false `a op b = c` step in the reasoning (verify_steps)
    duplicates: int = 0  # correct but identical to an earlier accepted trace of the same prompt
    capped: int = 0  # correct and distinct but beyond max_per_prompt
    accepted: int = 0  # traces in the set
    prompts_covered: int = 0  # prompts with at least one accepted trace
    grader_errors: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.correct / max(1, self.samples)

    def as_dict(self) -> dict:
        return asdict(self) | {
            "acceptance_rate": self.acceptance_rate,
            "prompt_coverage": self.prompts_covered / max(1, self.prompts),
        }


def rejection_sample(
    rows: list[dict], sampler: Sampler, tokenizer, t: TraceConfig, seed: int = 0, progress: bool = False
) -> tuple[list[dict], TraceStats]:
    """Sample `t.samples_per_prompt` completions per row and keep the correct, formatted, finished ones.

    `rows` are reasoning-task rows (prompt, kind, answer, meta, id); returns trace rows (the task's columns with the
    teacher's completion, plus `source_id` and `sample`) and the counts behind the acceptance rate.
    """
    eos = eos_id(tokenizer)
    k = t.samples_per_prompt
    stats = TraceStats(prompts=len(rows))
    traces: list[dict] = []
    starts = range(0, len(rows), t.prompt_batch_size)
    for start in tqdm(starts, desc="traces", disable=not progress):
        chunk = rows[start : start + t.prompt_batch_size]
        prompts = [render_prompt(tokenizer, r["prompt"]) for r in chunk]
        tokens = sampler(prompts, k, seed * 1_000_003 + start)
        if len(tokens) != len(chunk) * k:
            raise ValueError(f"sampler returned {len(tokens)} completions for {len(chunk)} prompts x {k} samples")
        texts = [decode_completion(tokenizer, ids) for ids in tokens]
        rep = [r for r in chunk for _ in range(k)]
        sc = score_completions(texts, rep, format_weight=0.0)
        stats.samples += len(texts)
        stats.grader_errors += sc.errors
        for b, row in enumerate(chunk):
            kept: set[str] = set()
            for j in range(k):
                i = b * k + j
                finished = bool(tokens[i]) and tokens[i][-1] == eos
                if not (sc.correct[i] == 1.0 and sc.format[i] == 1.0):
                    stats.wrong += 1
                    continue
                if not finished:
                    stats.unfinished += 1
                    continue
                stats.correct += 1
                if t.verify_steps and not arithmetic_steps_valid(texts[i]):
                    stats.wrong_steps += 1
                    continue
                if t.dedup and texts[i] in kept:
                    stats.duplicates += 1
                    continue
                if t.max_per_prompt and len(kept) >= t.max_per_prompt:
                    stats.capped += 1
                    continue
                kept.add(texts[i])
                traces.append(
                    {
                        "id": f"{row['id']}-t{j}",
                        "source_id": row["id"],
                        "sample": j,
                        "kind": row["kind"],
                        "prompt": row["prompt"],
                        "answer": row["answer"],
                        "meta": row["meta"],
                        "completion": texts[i],
                        "n_tokens": len(tokens[i]),
                    }
                )
            stats.prompts_covered += bool(kept)
    stats.accepted = len(traces)
    return traces, stats


@torch.no_grad()
def teacher_topk(
    model: torch.nn.Module, tokenizer, traces: list[dict], k: int, batch_size: int = 16, precision: str = "fp32"
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The teacher's top-k (ids, logits) at every response position of each trace: positions t where token t+1 is
    in the loss mask of `encode_chat(prompt, completion)`, in order (what `train.chat.make_batch` turns into
    targets). Logits are raw (temperature 1); the distillation loss applies its own temperature."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    eos = eos_id(tokenizer)
    for start in range(0, len(traces), batch_size):
        ex = [encode_chat(tokenizer, r["prompt"], r["completion"]) for r in traces[start : start + batch_size]]
        x, y = make_batch(ex, eos)
        with autocast(precision, device):
            logits_BTV = model(x.to(device)).logits_BTV.float()
        vals_BTK, ids_BTK = logits_BTV.topk(min(k, logits_BTV.shape[-1]), dim=-1)
        for b in range(len(ex)):
            sel = (y[b] != -100).to(device)
            out.append((ids_BTK[b][sel].tolist(), vals_BTK[b][sel].tolist()))
    model.train(was_training)
    return out


def sampling_settings(t: TraceConfig, seed: int) -> dict:
    """Every setting that decides which traces come out (recorded in the provenance)."""
    return {"sampling": asdict(t) | {"seed": seed}, "seed": seed}


def trace_key(provenance: dict) -> dict:
    """The part of the provenance that decides whether an existing trace set can be reused."""
    return {k: provenance[k] for k in ("teacher_hash", "tokenizer_hash", "reasoning_hash", "sampling", "seed")}


def save_traces(out_dir: Path, traces: list[dict], provenance: dict) -> Path:
    """`out_dir/dataset` (datasets.save_to_disk, provenance in its DatasetInfo.description) and
    `out_dir/provenance.json`, published atomically together."""
    if not traces:
        raise ValueError(
            "rejection sampling accepted no trace: the teacher answered no training prompt correctly "
            f"(acceptance rate {provenance['stats']['acceptance_rate']:.3f}); train the teacher longer or sample more"
        )
    ds = Dataset.from_list(traces)
    ds.info.description = json.dumps(provenance, sort_keys=True, default=str)
    with atomic_dir(out_dir) as tmp:
        ds.save_to_disk(str(tmp / DATASET))
        atomic_write_json(tmp / PROVENANCE, provenance)
    return out_dir


def load_traces(out_dir: Path) -> tuple[list[dict], dict]:
    ds = load_from_disk(str(Path(out_dir) / DATASET))
    return ds.to_list(), json.loads((Path(out_dir) / PROVENANCE).read_text())


def read_provenance(out_dir: Path) -> dict | None:
    p = Path(out_dir) / PROVENANCE
    if not p.is_file() or not (Path(out_dir) / DATASET).is_dir():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def build_traces(
    teacher: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    t: TraceConfig,
    *,
    provenance: dict,
    out_dir: Path,
    seed: int,
    precision: str = "fp32",
    sampler: Sampler | None = None,
) -> tuple[list[dict], dict]:
    """Rejection-sample the teacher over `rows`, cache top-k logits if asked, save; returns (traces, provenance).

    `provenance` comes in with the teacher's identity (checkpoint path and hash, input hashes) and goes out with the
    sampling settings, the counts and the acceptance rate added. `sampler` defaults to the teacher's generation.
    """
    t0 = time.perf_counter()
    sampler = sampler or model_sampler(teacher, t, [eos_id(tokenizer)], precision)
    traces, stats = rejection_sample(rows, sampler, tokenizer, t, seed=seed, progress=True)
    t_sample = time.perf_counter() - t0
    fallback = None
    if not traces and t.fallback_to_reference:
        log.warning(
            "distill: the teacher answered no training prompt correctly; training the student on the "
            "data's reference traces instead (traces.fallback_to_reference)"
        )
        fallback = "reference"
        traces = [
            {
                "id": f"{r['id']}-ref",
                "source_id": r["id"],
                "sample": -1,
                "kind": r["kind"],
                "prompt": r["prompt"],
                "answer": r["answer"],
                "meta": r["meta"],
                "completion": r["completion"],
                "n_tokens": -1,
            }
            for r in rows
        ]
    if t.cache_topk > 0 and traces:
        for r, (ids, vals) in zip(traces, teacher_topk(teacher, tokenizer, traces, t.cache_topk, precision=precision)):
            r["topk_ids"], r["topk_logits"] = ids, vals
    provenance = (
        provenance
        | sampling_settings(t, seed)
        | {
            "stats": stats.as_dict(),
            "fallback": fallback,
            "sampling_seconds": round(t_sample, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    save_traces(out_dir, traces, provenance)
    return traces, provenance
