"""GRPO: reinforcement learning of reasoning from rule-based rewards, starting from the cold-start SFT checkpoint.

    python -m train.grpo                                  # CPU default: tiny model, 150 steps of 16 prompts x 8
    python -m train.grpo rl.kl_coef=0 rl.loss_agg=seq_sum_norm rl.adv_norm=none    # Dr. GRPO
    python -m train.grpo rl.loss_agg=seq_mean rl.clip_eps_high=0.2                 # the GRPO paper's objective
    python -m train.grpo experiment=smoke                 # micro scale, seconds
    make rl RUN=<run>

Reads `outputs/<run>/data/` (tokenizer, reasoning train split) and the newest checkpoint of `outputs/<run>/sft/`;
writes `outputs/<run>/rl/`: checkpoints/ (DCP, resumable), hf/, metrics.jsonl, samples.jsonl, curves.png, manifest.

How one step works (Shao et al. 2024, "DeepSeekMath", section 4; DeepSeek-R1 section 2.2):

1. Rollouts. B prompts from the train split, each rendered with the chat template (train/chat.py) and sampled G
   times by `model.generate.generate(..., n_samples=G)`: the prompt is prefilled once into MLA's latent cache and
   shared by its G samples.
2. Rewards, by rule (rewards/graders.py): `correct` (the `<answer>` is right: numeric match for arithmetic, the
   Countdown expression checked by `data.reasoning.verify`) plus `format_weight` times `format` (the
   `<think>...</think><answer>...</answer>` layout). A grader that raises scores that sample 0 and is counted.
3. Group-normalized advantages: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of
   sample i. A group whose rewards are all equal has A = 0: it carries no learning signal, so it is dropped from
   the batch (and counted) rather than letting only the KL term act on it (DAPO's dynamic sampling filters them too).
4. `updates_per_batch` optimizer steps on the batch, with the clipped surrogate of PPO on the ratio to the policy
   that sampled it, rho_t = pi(o_t) / pi_old(o_t):
       l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t
   and the k3 estimator of KL(pi || pi_ref) to the frozen SFT model (Schulman 2020, used by GRPO):
       KL_t = pi_ref/pi - log(pi_ref/pi) - 1   (>= 0, unbiased, low variance)
5. Aggregation of l_t over the batch (`loss_agg`), each from its paper:
   - "seq_mean"     GRPO (Shao et al. 2024): mean over samples of the mean over each sample's tokens. Long answers
                    get less weight per token, which biases towards longer wrong answers (Liu et al. 2025).
   - "token_mean"   DAPO (Yu et al. 2025): the sum over all tokens of the batch divided by their number: every
                    token weighs the same.
   - "seq_sum_norm" Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the sum over all tokens
                    divided by a constant, samples x max_new_tokens: no length bias at all. Pair with
                    `adv_norm=none` (A_i = r_i - mean, no std division, their other fix).

Where this departs from DeepSeek-R1's recipe, and why:
- Scale: R1 samples 16 outputs per question for thousands of steps on a 671B model. Here a few-million-parameter
  model, G = 8, a few dozen steps: enough to move a small model's accuracy on a simple task, not to grow long
  reasoning.
- Tasks: procedurally generated arithmetic and Countdown (data/reasoning.py) instead of competition math and code;
  the code reward exists in rewards/graders.py but is not in the default mix.
- Cold start: R1's cold-start traces all reason. Here half of them answer directly (`data.reasoning.cot_fraction`
  = 0.5), so that RL has a behaviour to select, as R1-Zero's base model sometimes reasons and RL makes it reason
  more. What RL can and cannot do at this scale, measured from one pretrained base (`bench/rl_gain.py`, 500 held-out
  prompts, greedy): from the mixed cold start, 17.2% -> 34.0% (+16.8). The policy learns to reason on arithmetic
  (reasoning rate 14% -> 99% there; 36% of reasoned answers right against 11% of direct ones) and to answer
  Countdown directly (this model's Countdown reasoning does not help; direct answers 20% -> 28%). From an all-
  reasoning cold start (`cot_fraction=1`), SFT alone reaches 39.2% and GRPO 45.4% (+6.2, mostly Countdown). So RL
  here selects and sharpens behaviours the cold start shows; it does not teach the tiny model arithmetic it lacks,
  and the mixed start ends below the all-reasoning SFT because it saw half the worked examples.
- Rollout temperature 0.7 (R1: 1.0), and the policy that is optimized is the one sampled, pi_tau = softmax(logits /
  tau): the log-probabilities of the surrogate, the old policy and the KL reference all divide the logits by tau
  (as TRL and verl do), so the ratio is exact and mu = 1 stays on-policy. Measured with the earlier all-reasoning,
  2000-row cold start: at tau = 1 a tiny policy samples so many wrong arithmetic tokens that the learning signal is
  mostly about tokens greedy decoding never picks; tau = 0.7 gave a larger greedy held-out gain than tau = 1 from
  one SFT checkpoint, and no setting gained from another: sharpening arithmetic alone was not a robust signal.
- Clip-higher (eps_high > eps_low) and token-level aggregation are DAPO's changes, default here because they keep
  the entropy of a small policy from collapsing; `rl.clip_eps_high=0.2 rl.loss_agg=seq_mean` is R1's objective.
- The reference model is the SFT checkpoint, frozen for the whole run (R1 periodically resets it); beta = 0.01.
- One update per batch by default (mu = 1: purely on-policy, the ratio is 1 and clipping never binds; the paper's
  mu > 1 is `rl.updates_per_batch`): measured on 2 CPU cores the learner, not the sampler, takes ~70-90% of a step,
  so fresh rollouts cost less than extra passes over old ones. With mu > 1 the old-policy log-probabilities are
  recomputed with the training forward pass (not taken from the sampler), so the first update's ratio is exactly 1
  even though the sampler runs the absorbed-MLA cached path.
- No language-consistency reward (one language here) and no MoE bias update during RL (routing stays as SFT left it,
  so the old and new policies route tokens alike).

Faults: grader exceptions score 0 and are counted (`grader_errors`); a step whose loss or gradient is NaN/Inf is
skipped and counted, `max_bad_steps` in a row stop the run with a checkpoint; `rl.resume=auto` continues from the
newest valid checkpoint (model, optimizer, prompt position, RNG).

Legend: B prompts, G samples per prompt, N = B * G sequences, T tokens (prompt + completion, right-padded),
V vocabulary.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.generate import generate
from pipeline.config import Config, stage_dir, to_config
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from rewards.graders import get_reward, score_safely, shows_thinking, task_reward
from train.chat import decode_completion, eos_id, render_prompt
from train.checkpoint import CheckpointManager, read_model_config
from train.optim import build_optimizer, lr_at
from train.post_config import GRPOConfig
from train.runtime import autocast, build_model, device_for, dist_info

LOSS_AGGS = ("seq_mean", "token_mean", "seq_sum_norm")
ADV_NORMS = ("std", "none")


class TrainingError(RuntimeError):
    """A run that cannot go on (too many bad steps); a checkpoint was written before raising."""


# ------------------------------------------------------------------------------------------------ rewards


@dataclass
class Scores:
    reward: list[float]
    correct: list[float]
    format: list[float]
    errors: int  # samples whose grading raised (scored 0)


def score_completions(completions: list[str], rows: list[dict], format_weight: float) -> Scores:
    """reward = correct + format_weight * format for each completion of the matching task row."""
    correct, err_c = score_safely(
        task_reward,
        completions,
        kinds=[r["kind"] for r in rows],
        answers=[r["answer"] for r in rows],
        metas=[r["meta"] for r in rows],
    )
    fmt, err_f = score_safely(get_reward("format"), completions)
    reward = [c + format_weight * f for c, f in zip(correct, fmt)]
    return Scores(reward, correct, fmt, err_c + err_f)


# ------------------------------------------------------------------------------------------------ the objective


def group_advantages(rewards_BG: Tensor, norm: str = "std", eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Advantages [B, G] and a [B] mask of degenerate groups (all rewards equal: advantage 0)."""
    if norm not in ADV_NORMS:
        raise ValueError(f"adv_norm must be one of {ADV_NORMS}, got {norm!r}")
    mean_B1 = rewards_BG.mean(dim=1, keepdim=True)
    adv_BG = rewards_BG - mean_B1
    degenerate_B = (rewards_BG.max(dim=1).values - rewards_BG.min(dim=1).values) <= eps
    if norm == "std":
        std_B1 = rewards_BG.std(dim=1, keepdim=True, unbiased=True) if rewards_BG.shape[1] > 1 else adv_BG * 0
        adv_BG = adv_BG / (std_B1 + eps)
    adv_BG = adv_BG.masked_fill(degenerate_B[:, None], 0.0)
    return adv_BG, degenerate_B


def k3_kl(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (Schulman 2020)."""
    d = ref_logp_NT - logp_NT
    return torch.exp(d) - d - 1.0


def clipped_surrogate(
    logp_NT: Tensor, old_logp_NT: Tensor, adv_N: Tensor, clip_eps: float, clip_eps_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), and a mask of the tokens where the clipped
    term is the one taken (its gradient is zero there)."""
    ratio_NT = torch.exp(logp_NT - old_logp_NT)
    adv_N1 = adv_N[:, None]
    unclipped = ratio_NT * adv_N1
    clipped = ratio_NT.clamp(1.0 - clip_eps, 1.0 + clip_eps_high) * adv_N1
    loss_NT = -torch.minimum(unclipped, clipped)
    clipped_mask = clipped < unclipped
    return loss_NT, clipped_mask


def aggregate(loss_NT: Tensor, mask_NT: Tensor, mode: str, n_seqs: int, n_tokens: int, max_len: int) -> Tensor:
    """Reduce per-token losses to a scalar (see the module docstring). `n_seqs`, `n_tokens` are the sequence and
    response-token counts of the WHOLE batch, so that summing this over micro-batches gives the batch's value."""
    mask = mask_NT.to(loss_NT.dtype)
    masked = loss_NT * mask
    if mode == "token_mean":
        return masked.sum() / max(1, n_tokens)
    if mode == "seq_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / max(1, n_seqs)
    if mode == "seq_sum_norm":
        return masked.sum() / (max(1, n_seqs) * max_len)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {mode!r}")


def token_logprobs(
    model, ids_NT: Tensor, precision: str, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """log pi_tau(ids[t+1] | ids[:t+1]) for t < T-1, fp32 [N, T-1], pi_tau = softmax(logits / temperature): the
    distribution the rollouts were sampled from; and the per-position entropy when asked."""
    with autocast(precision, ids_NT.device):
        logits_NTV = model(ids_NT[:, :-1]).logits_BTV
    logp_NTV = torch.log_softmax(logits_NTV.float() / temperature, dim=-1)
    logp_NT = logp_NTV.gather(-1, ids_NT[:, 1:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_NTV.exp() * logp_NTV).sum(-1)
    return logp_NT, entropy


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded prompt+completion ids [N, T] and the mask [N, T-1] of target positions that are completion
    tokens (position t predicts token t+1)."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = True
    return ids, mask


UPDATE_METRICS = ("loss", "kl", "clip_frac", "entropy", "grad_norm")


def grpo_update(
    model, ref, opt, ids_NT: Tensor, mask_NT: Tensor, adv_N: Tensor, r: GRPOConfig, precision: str = "fp32"
) -> tuple[dict, str | None]:
    """`r.updates_per_batch` optimizer steps of the clipped, KL-penalized objective on one batch of rollouts.

    The old policy's log-probabilities are computed once, before the first update (so its ratio is exactly 1; with a
    single update they are the first pass's own, detached); the reference's too when `ref` is given. Micro-batches
    of `r.micro_batch_size` sequences accumulate gradients; `aggregate` uses the whole batch's counts, so the
    gradient does not depend on the micro-batch size.
    Returns the metrics of the updates (entropy from the first pass; loss, KL and clip fraction from the last) and
    the name of the first non-finite tensor when an update had to be skipped (then the remaining ones are too).
    """
    from train.pretrain import first_nonfinite

    n_seqs, n_tokens = ids_NT.shape[0], int(mask_NT.sum())
    tau = r.temperature if r.temperature > 0 else 1.0  # the policy optimized is the one sampled: pi_tau
    chunks = [slice(i, i + r.micro_batch_size) for i in range(0, n_seqs, r.micro_batch_size)]
    with torch.no_grad():  # one update: the old policy IS the current one, its log-probs come with the first pass
        old_logp = (
            [token_logprobs(model, ids_NT[c], precision, temperature=tau)[0] for c in chunks]
            if (r.updates_per_batch > 1)
            else None
        )
        ref_logp = (
            [token_logprobs(ref, ids_NT[c], precision, temperature=tau)[0] for c in chunks]
            if (ref is not None)
            else None
        )
    out = dict.fromkeys(UPDATE_METRICS, 0.0)
    for u in range(r.updates_per_batch):
        sums = dict.fromkeys(UPDATE_METRICS, 0.0)
        for j, c in enumerate(chunks):
            logp, ent = token_logprobs(model, ids_NT[c], precision, with_entropy=(u == 0), temperature=tau)
            m = mask_NT[c]
            old = old_logp[j] if old_logp is not None else logp.detach()
            loss_NT, clipped = clipped_surrogate(logp, old, adv_N[c], r.clip_eps, r.clip_eps_high)
            if ref_logp is not None and r.kl_coef > 0:
                kl_NT = k3_kl(logp, ref_logp[j])
                loss_NT = loss_NT + r.kl_coef * kl_NT
                sums["kl"] += float((kl_NT.detach() * m).sum()) / max(1, n_tokens)
            loss = aggregate(loss_NT, m, r.loss_agg, n_seqs, n_tokens, r.max_new_tokens)
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["clip_frac"] += float((clipped & m).sum()) / max(1, n_tokens)
            if ent is not None:
                sums["entropy"] += float((ent * m).sum()) / max(1, n_tokens)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.optim.grad_clip or float("inf"))
        culprit = "loss" if not math.isfinite(sums["loss"]) else first_nonfinite(model)
        if culprit is not None or not torch.isfinite(gnorm):
            opt.zero_grad(set_to_none=True)
            return out, culprit or "grad_norm"
        opt.step()
        opt.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(gnorm)
        if u == 0:
            out = sums
        else:
            out |= {k: sums[k] for k in ("loss", "kl", "clip_frac", "grad_norm")}
    return out, None


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_accuracy(
    model,
    tokenizer,
    rows: list[dict],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    k: int = 1,
    batch_size: int = 64,
    precision: str = "fp32",
    format_weight: float = 0.0,
    seed: int = 0,
) -> dict:
    """Held-out accuracy with the training reward's grader: greedy (temperature 0, k=1) or pass@1 averaged over k
    samples. Returns accuracy, format_rate, mean response length (tokens), grader errors and the scored samples."""
    if temperature == 0 and k != 1:
        raise ValueError(f"greedy evaluation draws one sample per prompt; got k={k}")
    device = next(model.parameters()).device
    eos = eos_id(tokenizer)
    correct, fmt, thinks, lengths, samples, errors = [], [], [], [], [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [render_prompt(tokenizer, r["prompt"]) for r in chunk]
        with autocast(precision, device):
            out = generate(
                model,
                prompts,
                n_samples=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                stop_token_ids=[eos],
                seed=seed + start,
            )
        texts = [decode_completion(tokenizer, t) for t in out.tokens]
        rep = [r for r in chunk for _ in range(k)]
        s = score_completions(texts, rep, format_weight)
        correct += s.correct
        fmt += s.format
        thinks += [shows_thinking(t) for t in texts]
        lengths += [len(t) for t in out.tokens]
        errors += s.errors
        samples += [(r["prompt"], c, sc) for r, c, sc in zip(rep, texts, s.correct)]
    n = max(1, len(correct))
    return {
        "accuracy": sum(correct) / n,
        "format_rate": sum(fmt) / n,
        "think_rate": sum(thinks) / n,
        "response_len": sum(lengths) / n,
        "grader_errors": errors,
        "n": len(rows),
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------------ checkpoints


def newest_checkpoint(ckpt_dir: Path) -> Path:
    ckpts = CheckpointManager(ckpt_dir, keep_last=0).checkpoints() if Path(ckpt_dir).is_dir() else []
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir} (run the upstream stage first)")
    return ckpts[-1]


def load_policy(path: Path, precision: str, backend: str, device: torch.device) -> tuple[torch.nn.Module, ModelConfig]:
    """A model rebuilt from a checkpoint's model_config.json and weights (no optimizer, RNG untouched)."""
    mcfg = ModelConfig(**read_model_config(path))
    model = build_model(mcfg, precision, backend, device)
    CheckpointManager(Path(path).parent, keep_last=0).load(path, model, restore_rng=False)
    return model, mcfg


def prompt_indices(n_rows: int, batch: int, step: int, seed: int) -> list[int]:
    """Rows of step `step`: consecutive slices of per-epoch permutations (a pure function of its arguments, so a
    resumed run draws the same prompts)."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        take = min(batch - len(out), n_rows - off)
        out += perm[off : off + take].tolist()
        pos += take
    return out


def check_config(r: GRPOConfig) -> None:
    if r.loss_agg not in LOSS_AGGS:
        raise ValueError(f"rl.loss_agg must be one of {LOSS_AGGS}, got {r.loss_agg!r}")
    if r.adv_norm not in ADV_NORMS:
        raise ValueError(f"rl.adv_norm must be one of {ADV_NORMS}, got {r.adv_norm!r}")
    if r.group_size < 2:
        raise ValueError(f"rl.group_size must be >= 2 (advantages are relative to the group), got {r.group_size}")
    for name in ("steps", "prompts_per_step", "updates_per_batch", "micro_batch_size", "max_new_tokens"):
        if getattr(r, name) <= 0:
            raise ValueError(f"rl.{name} must be positive, got {getattr(r, name)}")
    if r.kl_coef < 0 or r.clip_eps <= 0 or r.clip_eps_high <= 0:
        raise ValueError("rl.kl_coef must be >= 0 and rl.clip_eps, rl.clip_eps_high > 0")


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: Config, stage: StageRun, paths: dict[str, Path]) -> dict:
    from datasets import load_from_disk

    r = cfg.rl
    check_config(r)
    info = dist_info()
    device = device_for(info)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    tok = load_tokenizer(paths["tokenizer"])
    eos = eos_id(tok)
    ds = load_from_disk(str(paths["reasoning"]))
    train_rows = [row for row in ds["train"].to_list() if not r.kinds or row["kind"] in r.kinds][: r.n_train or None]
    test_rows = ds["test"].to_list()[: r.eval_n]
    if not train_rows:
        raise ValueError(f"no train rows of kinds {r.kinds or 'any'} in {paths['reasoning']}")

    model, mcfg = load_policy(paths["init"], cfg.precision, cfg.kernels.backend, device)
    ref = None
    if r.kl_coef > 0:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    opt = build_optimizer(model, r.optim)
    ckpts = CheckpointManager(stage.dir / "checkpoints", keep_last=r.keep_last)
    tracker = stage.tracker
    counters = {"grader_errors": 0, "degenerate_groups": 0, "bad_steps": 0, "skipped_batches": 0}

    def evaluate(tag: str) -> dict:
        ev = evaluate_accuracy(
            model,
            tok,
            test_rows,
            max_new_tokens=r.max_new_tokens,
            precision=cfg.precision,
            format_weight=r.format_weight,
        )
        return {
            f"{tag}_accuracy": ev["accuracy"],
            f"{tag}_format_rate": ev["format_rate"],
            f"{tag}_think_rate": ev["think_rate"],
            f"{tag}_response_len": ev["response_len"],
        }

    start_step = 0
    resumed = None
    if r.resume == "auto":
        resumed = ckpts.load_latest_valid(model, opt)
    elif r.resume != "none":
        resumed = (Path(r.resume), ckpts.load(Path(r.resume), model, opt))
    initial: dict = {}
    if resumed is not None:
        path, state = resumed
        start_step = state["step"]
        counters.update(state.get("counters", {}))
        initial = state.get("initial_eval", {})
        tracker.resume_at(start_step)
        print(f"resumed from {path} at step {start_step}")
    elif test_rows:
        initial = evaluate("eval")
        tracker.log(initial, step=0)

    def save(step: int) -> Path:
        state = {"counters": counters, "initial_eval": initial, "init": str(paths["init"])}
        return ckpts.save(step, model, opt, state, asdict(mcfg))

    model.train()
    bad_run = 0
    metrics: dict = {}
    bar = tqdm(range(start_step, r.steps), initial=start_step, total=r.steps, desc="grpo", disable=not info.is_main)
    for step in bar:
        lr = lr_at(step, r.steps, r.optim)
        for g in opt.param_groups:
            g["lr"] = lr
        # ---- 1. rollouts
        t0 = time.perf_counter()
        rows = [train_rows[i] for i in prompt_indices(len(train_rows), r.prompts_per_step, step, cfg.run.seed)]
        prompts = [render_prompt(tok, row["prompt"]) for row in rows]
        with autocast(cfg.precision, device):
            gen = generate(
                model,
                prompts,
                n_samples=r.group_size,
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                stop_token_ids=[eos],
                seed=cfg.run.seed * 1_000_003 + step,
            )
        t_gen = time.perf_counter() - t0
        # ---- 2. rewards and advantages
        rep_rows = [row for row in rows for _ in range(r.group_size)]
        texts = [decode_completion(tok, t) for t in gen.tokens]
        sc = score_completions(texts, rep_rows, r.format_weight)
        counters["grader_errors"] += sc.errors
        rewards_BG = torch.tensor(sc.reward, dtype=torch.float32).view(len(rows), r.group_size)
        adv_BG, degenerate_B = group_advantages(rewards_BG, r.adv_norm)
        counters["degenerate_groups"] += int(degenerate_B.sum())
        keep = (~degenerate_B).repeat_interleave(r.group_size).nonzero().flatten().tolist()
        t1 = time.perf_counter()
        # ---- 3. policy updates on the non-degenerate groups
        upd = dict.fromkeys(UPDATE_METRICS, 0.0)
        if keep:
            ids_NT, mask_NT = pack_sequences(
                [prompts[i // r.group_size] for i in keep], [gen.tokens[i] for i in keep], pad_id=eos
            )
            ids_NT, mask_NT = ids_NT.to(device), mask_NT.to(device)
            adv_N = adv_BG.flatten()[keep].to(device)
            upd, culprit = grpo_update(model, ref, opt, ids_NT, mask_NT, adv_N, r, cfg.precision)
            if culprit is not None:
                bad_run += 1
                counters["bad_steps"] += 1
                tracker.log(
                    {"skipped_step": 1, "bad_steps": counters["bad_steps"], "bad_tensor": culprit}, step=step + 1
                )
                if bad_run >= r.max_bad_steps:
                    path = save(step)
                    raise TrainingError(
                        f"stopping: {bad_run} consecutive non-finite updates (step {step + 1}, "
                        f"first bad tensor: {culprit}); checkpoint at {path}"
                    )
            else:
                bad_run = 0
        else:
            counters["skipped_batches"] += 1
        t2 = time.perf_counter()

        # ---- 4. metrics, samples, checkpoints
        n = len(texts)
        metrics = {
            "reward_mean": float(rewards_BG.mean()),
            "reward_std": float(rewards_BG.std()),
            "accuracy": sum(sc.correct) / n,
            "format_rate": sum(sc.format) / n,
            "think_rate": sum(map(shows_thinking, texts)) / n,
            "response_len": sum(len(t) for t in gen.tokens) / n,
            "truncated_frac": sum(1 for t in gen.tokens if not t or t[-1] != eos) / n,
            **upd,
            "lr": lr,
            "rollout_tokens_per_s": gen.num_generated_tokens / max(t_gen, 1e-9),
            "gen_time_s": t_gen,
            "reward_time_s": t1 - t0 - t_gen,
            "learn_time_s": t2 - t1,
            "gen_time_frac": t_gen / max(t2 - t0, 1e-9),
            "degenerate_frac": float(degenerate_B.float().mean()),
            **counters,
        }
        last = step + 1 == r.steps
        if last and test_rows:
            metrics |= evaluate("eval")
        if (step + 1) % r.log_every == 0 or last:
            tracker.log(metrics, step=step + 1)
        if r.table_every and ((step + 1) % r.table_every == 0 or last):
            table = [
                [step + 1, rep_rows[i]["prompt"], texts[i], sc.reward[i], sc.correct[i]]
                for i in range(0, n, max(1, n // r.table_rows))
            ][: r.table_rows]
            tracker.log_table("samples", ["step", "prompt", "completion", "reward", "correct"], table, step=step + 1)
        bar.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}",
            acc=f"{metrics['accuracy']:.2f}",
            len=f"{metrics['response_len']:.0f}",
            gen=f"{metrics['gen_time_frac']:.0%}",
        )
        if (step + 1) % r.ckpt_every == 0 or last:
            save(step + 1)

    final = ckpts.checkpoints()[-1]
    result = {k: metrics[k] for k in ("reward_mean", "accuracy", "format_rate", "response_len") if k in metrics}
    if "eval_accuracy" in metrics:
        result |= {k: metrics[k] for k in ("eval_accuracy", "eval_format_rate", "eval_think_rate")}
    if "eval_accuracy" in initial:
        result["eval_accuracy_initial"] = initial["eval_accuracy"]
        result["eval_think_rate_initial"] = initial.get("eval_think_rate")
    result |= {**counters, "steps": r.steps, "checkpoint": str(final)}
    if info.is_main:
        plot_curves(tracker.metrics_path, stage.dir / "curves.png")
        tracker.log_figure("curves", stage.dir / "curves.png")
    if r.export_hf and info.is_main:
        from model.hf import export_hf

        export_hf(model, stage.dir / "hf", tokenizer_path=paths["tokenizer"])
    return result


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Reward, accuracy, the rate of samples that reason and response length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "reward_mean" in row]
    panels = [
        ("reward_mean", "reward"),
        ("accuracy", "train accuracy"),
        ("think_rate", "samples that reason"),
        ("response_len", "response length (tokens)"),
    ]
    panels = [(k, t) for k, t in panels if all(k in row for row in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    steps = [row["step"] for row in rows]
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot(steps, [row[key] for row in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(cfg: Config) -> dict:
    from data.prepare import stage_outputs

    data = stage_outputs(stage_dir(cfg, "data"))
    init = newest_checkpoint(stage_dir(cfg, "sft") / "checkpoints") if cfg.rl.init == "auto" else Path(cfg.rl.init)
    info = dist_info()
    paths = {"tokenizer": data["tokenizer"], "reasoning": data["reasoning"], "init": init}
    stage = StageRun(cfg, "rl", inputs=paths, rank=info.rank, resume=cfg.rl.resume)
    return stage.run_checkpointed(lambda st: train(cfg, st, paths))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    print(json.dumps(run(to_config(dcfg)), indent=2, default=str))


if __name__ == "__main__":
    main()
