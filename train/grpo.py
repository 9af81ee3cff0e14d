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
2. Rewards, by rule (rewards/graders.py, through train/policy.py): `correct` (the `<answer>` is right: numeric match
   for arithmetic, the Countdown expression checked by `data.reasoning.verify`) plus `format_weight` times `format` (the
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
  more. What RL can and cannot do at this scale is measured from one pretrained base by `bench/rl_gain.py`
  (held-out prompts, greedy; the figures are in bench/results/ and the README): from the mixed cold start the
  policy learns to reason on arithmetic and to answer Countdown directly (this model's Countdown reasoning does not
  help); from an all-reasoning cold start (`cot_fraction=1`) SFT alone scores higher and GRPO adds less, mostly on
  Countdown. So RL here selects and sharpens behaviours the cold start shows; it does not teach the tiny model
  arithmetic it lacks, and the mixed start ends below the all-reasoning SFT because it saw half the worked examples.
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
  mu > 1 is `rl.updates_per_batch`): on CPU the learner, not the sampler, takes most of a step (the logged
  `gen_time_frac` is the sampler's share), so fresh rollouts cost less than extra passes over old ones. With mu > 1
  the old-policy log-probabilities are recomputed with the training forward pass (not taken from the sampler), so
  the first update's ratio is exactly 1 even though the sampler runs the absorbed-MLA cached path.
- Keeping the base model: with `rl.lm_mix` > 0 (the default) every update also takes the pretraining loss on
  packed train windows (InstructGPT's PPO-ptx, train/lm_mix.py), as SFT does with `sft.lm_mix`; R1 instead mixes
  non-reasoning data into its SFT rounds.
- No language-consistency reward (one language here) and no MoE bias update during RL (routing stays as SFT left it,
  so the old and new policies route tokens alike).

Faults: grader exceptions score 0 and are counted (`grader_errors`); a step whose loss or gradient is NaN/Inf is
skipped and counted, `max_bad_steps` in a row stop the run with a checkpoint; `rl.resume=auto` continues from the
newest valid checkpoint (model, optimizer, prompt position, RNG); SIGTERM/SIGUSR1 finish the step, save it and exit
(the skeleton shared by every training stage: train/loop.py). One process: several ranks are refused.

Legend: B prompts, G samples per prompt, N = B * G sequences, T tokens (prompt + completion, right-padded),
V vocabulary.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import hydra
import torch
from datasets import load_from_disk
from omegaconf import DictConfig
from torch import Tensor

from data.outputs import stage_outputs
from data.tokenizer import load_tokenizer
from model.generate import generate
from model.hf import export_hf
from pipeline.config import Config, stage_dir, to_config
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from rewards.graders import shows_thinking
from train.chat import batch_indices, decode_completion, eos_id, render_prompt
from train.checkpoint import CheckpointManager
from train.lm_mix import LMMix
from train.loop import Loop, TrainingError, first_nonfinite
from train.optim import build_optimizer
from train.parallel.parallelize import world_size_from_env
from train.policy import Scores, evaluate_accuracy, load_policy, newest_checkpoint, score_completions
from train.post_config import ADV_NORMS, LOSS_AGGS, GRPOConfig
from train.runtime import autocast, device_for, dist_info, require_one_process, resolve_precision

__all__ = ["Scores", "TrainingError", "evaluate_accuracy", "load_policy", "newest_checkpoint", "run"]
prompt_indices = batch_indices  # the prompts of a step: the same resumable per-epoch order as SFT's examples


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
    model,
    ref,
    opt,
    ids_NT: Tensor,
    mask_NT: Tensor,
    adv_N: Tensor,
    r: GRPOConfig,
    precision: str = "fp32",
    lm: LMMix | None = None,
    step: int = 0,
) -> tuple[dict, str | None]:
    """`r.updates_per_batch` optimizer steps of the clipped, KL-penalized objective on one batch of rollouts.

    The old policy's log-probabilities are computed once, before the first update (so its ratio is exactly 1; with a
    single update they are the first pass's own, detached); the reference's too when `ref` is given. Micro-batches
    of `r.micro_batch_size` sequences accumulate gradients; `aggregate` uses the whole batch's counts, so the
    gradient does not depend on the micro-batch size.
    Returns the metrics of the updates (entropy from the first pass; loss, KL and clip fraction from the last) and
    the name of the first non-finite tensor when an update had to be skipped (then the remaining ones are too).
    The metrics of an update stay on the device until its one host read. With `lm` (train/lm_mix.py) each update
    also backpropagates the weighted pretraining loss of its own batch (update u of step s reads batch
    s * updates_per_batch + u), reported as `lm_loss`.
    """
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
        sums = torch.zeros(4, dtype=torch.float64, device=ids_NT.device)  # loss, kl, clip_frac, entropy
        for j, c in enumerate(chunks):
            logp, ent = token_logprobs(model, ids_NT[c], precision, with_entropy=(u == 0), temperature=tau)
            m = mask_NT[c]
            old = old_logp[j] if old_logp is not None else logp.detach()
            loss_NT, clipped = clipped_surrogate(logp, old, adv_N[c], r.clip_eps, r.clip_eps_high)
            kl = ent_sum = loss_NT.new_zeros(())
            if ref_logp is not None and r.kl_coef > 0:
                kl_NT = k3_kl(logp, ref_logp[j])
                loss_NT = loss_NT + r.kl_coef * kl_NT
                kl = (kl_NT.detach() * m).sum()
            loss = aggregate(loss_NT, m, r.loss_agg, n_seqs, n_tokens, r.max_new_tokens)
            loss.backward()
            if ent is not None:
                ent_sum = (ent * m).sum()
            per_token = torch.stack([kl, (clipped & m).sum().to(kl.dtype), ent_sum]).double() / max(1, n_tokens)
            sums += torch.cat([loss.detach().double().reshape(1), per_token])
        if lm is not None:
            lm_ce, _ = lm.backward(model, step * r.updates_per_batch + u, precision)
            sums = torch.cat([sums, lm_ce.double().reshape(1)])
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.optim.grad_clip or float("inf"), foreach=True)
        loss_v, kl_v, clip_v, ent_v, *lm_v, gnorm_v = torch.cat([sums, gnorm.detach().double().reshape(1)]).tolist()
        if not math.isfinite(loss_v) or not math.isfinite(gnorm_v):
            culprit = "loss" if not math.isfinite(loss_v) else first_nonfinite(model) or "grad_norm"
            opt.zero_grad(set_to_none=True)
            return out, culprit
        opt.step()
        opt.zero_grad(set_to_none=True)
        vals = {"loss": loss_v, "kl": kl_v, "clip_frac": clip_v, "entropy": ent_v, "grad_norm": gnorm_v}
        vals |= {"lm_loss": lm_v[0]} if lm_v else {}
        if u == 0:
            out = vals
        else:
            out |= {k: vals[k] for k in ("loss", "kl", "clip_frac", "grad_norm", "lm_loss") if k in vals}
    return out, None


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class Rollouts:
    """One step's batch: B prompts x G samples, their scores and group advantages (host tensors)."""

    rows: list[dict]  # the B prompt rows, each repeated G times in `rep_rows`
    rep_rows: list[dict]
    prompts: list[list[int]]
    tokens: list[list[int]]  # N = B * G completions' ids, prompt-major
    texts: list[str]
    scores: Scores
    rewards_BG: Tensor
    adv_BG: Tensor
    degenerate_B: Tensor
    generated_tokens: int
    gen_s: float  # seconds spent sampling (the rest of `sample_rollouts` is decoding and grading)


def sample_rollouts(model, tok, rows: list[dict], r: GRPOConfig, precision: str, seed: int) -> Rollouts:
    """Steps 1-2 of the module docstring: G samples per prompt (one prefill each), rewards, advantages."""
    eos = eos_id(tok)
    prompts = [render_prompt(tok, row["prompt"]) for row in rows]
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with autocast(precision, device):
        gen = generate(
            model,
            prompts,
            n_samples=r.group_size,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop_token_ids=[eos],
            seed=seed,
        )
    gen_s = time.perf_counter() - t0
    rep_rows = [row for row in rows for _ in range(r.group_size)]
    texts = [decode_completion(tok, t) for t in gen.tokens]
    sc = score_completions(texts, rep_rows, r.format_weight)
    rewards_BG = torch.tensor(sc.reward, dtype=torch.float32).view(len(rows), r.group_size)
    adv_BG, degenerate_B = group_advantages(rewards_BG, r.adv_norm)
    return Rollouts(
        rows,
        rep_rows,
        prompts,
        gen.tokens,
        texts,
        sc,
        rewards_BG,
        adv_BG,
        degenerate_B,
        gen.num_generated_tokens,
        gen_s,
    )


def rollout_metrics(ro: Rollouts, eos: int) -> dict:
    n = len(ro.texts)
    return {
        "reward_mean": float(ro.rewards_BG.mean()),
        "reward_std": float(ro.rewards_BG.std()),
        "accuracy": sum(ro.scores.correct) / n,
        "format_rate": sum(ro.scores.format) / n,
        "think_rate": sum(map(shows_thinking, ro.texts)) / n,
        "response_len": sum(len(t) for t in ro.tokens) / n,
        "truncated_frac": sum(1 for t in ro.tokens if not t or t[-1] != eos) / n,
        "degenerate_frac": float(ro.degenerate_B.float().mean()),
    }


def sample_table(step: int, ro: Rollouts, n_rows: int) -> list[list]:
    n = len(ro.texts)
    picks = range(0, n, max(1, n // n_rows))
    return [[step, ro.rep_rows[i]["prompt"], ro.texts[i], ro.scores.reward[i], ro.scores.correct[i]] for i in picks][
        :n_rows
    ]


def train(cfg: Config, stage: StageRun, paths: dict[str, Path]) -> dict:
    r = cfg.rl
    info = dist_info()
    device = device_for(info)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    tok = load_tokenizer(paths["tokenizer"])
    eos = eos_id(tok)
    ds = load_from_disk(str(paths["reasoning"]))
    train_rows = [row for row in ds["train"].to_list() if not r.kinds or row["kind"] in r.kinds][: r.n_train or None]
    test_rows = ds["test"].to_list()[: r.eval_n]
    if not train_rows:
        raise ValueError(f"no train rows of kinds {r.kinds or 'any'} in {paths['reasoning']}")

    model, mcfg = load_policy(paths["init"], cfg.precision, cfg.kernels.backend, device, cfg.kernels.scale_formats())
    ref = None
    if r.kl_coef > 0:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    opt = build_optimizer(model, r.optim)
    lm = LMMix.build(paths["lm_shards"], r.lm_mix, r.lm_batch_size, model, cfg.run.seed) if r.lm_mix > 0 else None
    ckpts = CheckpointManager(stage.dir / "checkpoints", keep_last=r.keep_last)
    tracker = stage.tracker
    counters = {"grader_errors": 0, "degenerate_groups": 0, "skipped_batches": 0}

    def evaluate(tag: str) -> dict:
        kw = {"max_new_tokens": r.max_new_tokens, "precision": cfg.precision, "format_weight": r.format_weight}
        ev = evaluate_accuracy(model, tok, test_rows, **kw)
        return {f"{tag}_{k}": ev[k] for k in ("accuracy", "format_rate", "think_rate", "response_len")}

    def save(step: int) -> Path:
        state = {"counters": counters, "bad_steps": loop.bad_total, "initial_eval": initial, "init": str(paths["init"])}
        return ckpts.save(step, model, opt, state, asdict(mcfg))

    loop = Loop("grpo", r, ckpts, tracker, save, is_main=info.is_main)
    state = loop.resume(r.resume, model, opt)
    counters.update({k: v for k, v in state.get("counters", {}).items() if k in counters})
    initial: dict = state.get("initial_eval", {})
    if not state and test_rows:
        initial = evaluate("eval")
        tracker.log(initial, step=0)

    model.train()
    metrics: dict = {}
    for step in loop.steps():
        lr = loop.set_lr(opt, step, r.optim)
        t0 = time.perf_counter()
        rows = [train_rows[i] for i in prompt_indices(len(train_rows), r.prompts_per_step, step, cfg.run.seed)]
        ro = sample_rollouts(model, tok, rows, r, cfg.precision, seed=cfg.run.seed * 1_000_003 + step)
        t_gen = ro.gen_s
        counters["grader_errors"] += ro.scores.errors
        counters["degenerate_groups"] += int(ro.degenerate_B.sum())
        keep = (~ro.degenerate_B).repeat_interleave(r.group_size).nonzero().flatten().tolist()  # host tensors
        ro_time = time.perf_counter() - t0
        # ---- 3. policy updates on the non-degenerate groups
        upd = dict.fromkeys(UPDATE_METRICS, 0.0)
        if keep:
            ids_NT, mask_NT = pack_sequences(
                [ro.prompts[i // r.group_size] for i in keep], [ro.tokens[i] for i in keep], pad_id=eos
            )
            adv_N = ro.adv_BG.flatten()[keep].to(device)
            upd, culprit = grpo_update(
                model, ref, opt, ids_NT.to(device), mask_NT.to(device), adv_N, r, cfg.precision, lm, step
            )
            loop.record(step, culprit, opt)
        else:
            counters["skipped_batches"] += 1
        t_learn = time.perf_counter() - t0 - ro_time

        # ---- 4. metrics, samples, checkpoints
        metrics = {
            **rollout_metrics(ro, eos),
            **upd,
            "lr": lr,
            "rollout_tokens_per_s": ro.generated_tokens / max(t_gen, 1e-9),
            "gen_time_s": t_gen,
            "reward_time_s": ro_time - t_gen,
            "learn_time_s": t_learn,
            "gen_time_frac": t_gen / max(ro_time + t_learn, 1e-9),
            **counters,
            "bad_steps": loop.bad_total,
        }
        last = step + 1 == r.steps
        if last and test_rows:
            metrics |= evaluate("eval")
        if r.table_every and ((step + 1) % r.table_every == 0 or last):
            columns = ["step", "prompt", "completion", "reward", "correct"]
            tracker.log_table("samples", columns, sample_table(step + 1, ro, r.table_rows), step=step + 1)
        postfix = {"reward": f"{metrics['reward_mean']:.3f}", "acc": f"{metrics['accuracy']:.2f}"}
        loop.end_step(step, metrics, postfix | {"gen": f"{metrics['gen_time_frac']:.0%}"})

    final = ckpts.checkpoints()[-1]
    result = {k: metrics[k] for k in ("reward_mean", "accuracy", "format_rate", "response_len") if k in metrics}
    result["precision"] = cfg.precision
    if "eval_accuracy" in metrics:
        result |= {k: metrics[k] for k in ("eval_accuracy", "eval_format_rate", "eval_think_rate")}
    if "eval_accuracy" in initial:
        result["eval_accuracy_initial"] = initial["eval_accuracy"]
        result["eval_think_rate_initial"] = initial.get("eval_think_rate")
    result |= {**counters, "bad_steps": loop.bad_total, "steps": r.steps, "checkpoint": str(final)}
    if info.is_main:
        plot_curves(tracker.metrics_path, stage.dir / "curves.png")
        tracker.log_figure("curves", stage.dir / "curves.png")
    if r.export_hf and info.is_main:
        export_hf(model, stage.dir / "hf", tokenizer_path=paths["tokenizer"])
    return result


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Reward, accuracy, the rate of samples that reason and response length per step."""
    # deferred on purpose: matplotlib (and its backend choice) only matters for this figure at the end of the run
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
    require_one_process("train.grpo", world_size_from_env())
    data = stage_outputs(stage_dir(cfg, "data"))
    init = newest_checkpoint(stage_dir(cfg, "sft") / "checkpoints") if cfg.rl.init == "auto" else Path(cfg.rl.init)
    info = dist_info()
    paths = {"tokenizer": data["tokenizer"], "reasoning": data["reasoning"], "init": init}
    if cfg.rl.lm_mix > 0:  # the pretraining shards are an input (hashed, in the work key) only when they are read
        paths["lm_shards"] = data["train"]
    stage = StageRun(cfg, "rl", inputs=paths, rank=info.rank, resume=cfg.rl.resume)
    return stage.run_checkpointed(lambda st: train(cfg, st, paths))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    print(json.dumps(run(to_config(dcfg)), indent=2, default=str))


if __name__ == "__main__":
    main()
