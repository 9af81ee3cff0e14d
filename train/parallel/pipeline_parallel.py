"""Pipeline parallelism for DeepseekV3 with ``torch.distributed.pipelining``: stages, schedules, the loss.

How the model is cut
--------------------
The decoder layers are split as evenly as possible into ``n_stages`` consecutive slices (earlier stages get the
extra layer when it does not divide). Stage 0 also holds the token embedding, the last stage the final norm and
the output head:

    stage 0: embed_tokens + layers[0:a]   stage 1: layers[a:b]   ...   stage S-1: layers[..:L] + norm + lm_head

Each stage module refers to the full model's own submodules (no copy), so parameter names, initialization and
checkpoints stay those of ``DeepseekV3``; a rank simply never touches the layers of stages it does not hold.
``rank_view`` collects the parts a rank holds under their full-model names: the trainer's optimizer, EMA,
gradient clipping and DCP checkpoints run on it (each rank saves its own parameters; a PP checkpoint loads into
any other layout, and the reverse).

Schedules (each rank holds a fixed set of stages; ``pp`` ranks in the pipeline group)
------------------------------------------------------------------------------------
- ``1f1b``: one stage per rank (``S = pp``). After a warm-up of forwards, every rank alternates one forward and
  one backward, so at most ``pp`` micro-batches of activations are alive; the bubble is ``(pp-1)/(m+pp-1)``.
- ``dualpipev``: DeepSeek's DualPipe in its "V" form (``S = 2 * pp``): rank r holds stages r and 2pp-1-r, so the
  first and the last stage share rank 0 and the micro-batches travel down and back up the ranks. The backward is
  split into input- and weight-gradient halves (zero-bubble style), and the forward of one micro-batch is paired
  with the backward of another so that, on GPUs, the all-to-all of one hides behind the compute of the other.
  It needs ``n_microbatches >= 2 * pp``.

Both come from ``torch.distributed.pipelining.schedules``; nothing is scheduled by hand here. Evaluation runs the
same schedule forward-only (``schedule.eval``) under 1F1B; under DualPipeV, whose ``eval`` fails in torch 2.13,
``forward_only`` sends each micro-batch through the stages one after another.

What travels between stages
---------------------------
A stage returns ``(h_BTD, balance_1)``: the hidden state and the running sum of the MoE layers' (unweighted)
balance losses so far. The last stage returns ``(logits_BTV, balance_1)`` and ``PipelineLoss`` adds
``alpha * balance`` to the cross-entropy, so the balance loss of every stage's MoE layers reaches its router
through ordinary autograd across the pipeline. Each stage also sums the expert loads of its MoE layers over the
micro-batches (``PipelineStageModule.expert_loads``, for the trainer to clear after each step) for the
auxiliary-loss-free bias update.

Multi-token prediction under PP (DeepSeek-V3 keeps MTP with DualPipe for exactly this reason): under
``dualpipev`` the last stage lives on pp rank 0 beside stage 0, so it can use the embedding table and the head
directly. The last stage also returns the normed hidden state; the loss runs the MTP modules on it with the
embedding of the shifted tokens (rebuilt from the targets: ``input_ids[:, k:] == targets[:, k-1:T-1]``), and the
shared embedding receives its gradient from both uses (stage 0's lookup and the MTP's), accumulated on one rank.
Because the embedding then belongs to two stage modules, the schedule's per-stage gradient scaling is turned off
(``scale_grads=False``) and the trainer divides by the number of micro-batches once. Refused with a ValueError
naming the field: MTP under ``1f1b`` (embedding and head on different ranks), MTP with data parallelism next to
PP (the table would belong to two FSDP units), and ``tie_word_embeddings``.

Gradient scale: the schedules sum the per-micro-batch losses' gradients and, with ``scale_grads=True`` (default),
divide by the number of micro-batches: with equal-sized micro-batches the gradient of the mean loss, as one
process computes it on the whole batch.

Legend: B batch (one micro-batch), T positions, D hidden, V vocabulary, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from model.attention import build_attention_mask
from model.moe import DeepseekMoE
from model.transformer import DeepseekV3, cross_entropy
from train.heldout import ce_sums
from train.parallel.config import PP_SCHEDULES

__all__ = [
    "SCHEDULES",
    "Pipeline",
    "PipelineLoss",
    "PipelineStageModule",
    "build_pipeline",
    "forward_only",
    "check_pipeline_model",
    "gather_full_state_dict",
    "moe_layer_ids",
    "pipeline_loss",
    "rank_view",
    "stage_layer_ranges",
    "stages_of_rank",
]

SCHEDULES = PP_SCHEDULES


def stage_layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive layer slices, one per stage, sizes differing by at most one (earlier stages larger)."""
    if n_stages < 1 or n_stages > n_layers:
        raise ValueError(f"cannot split {n_layers} decoder layers into {n_stages} pipeline stages (need 1..layers)")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def stages_of_rank(schedule: str, pp_rank: int, pp_size: int) -> list[int]:
    """The stage indices a pipeline rank holds: [r] for 1F1B, [r, 2pp-1-r] for DualPipeV (the V)."""
    if schedule == "1f1b":
        return [pp_rank]
    if schedule == "dualpipev":
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    raise ValueError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")


def moe_layer_ids(model: DeepseekV3) -> list[int]:
    """The layer index of each row of ``expert_load_LE`` (``model.moe_layers()`` order): main decoder layers, then
    MTP module k as index ``num_hidden_layers + k`` (the keys of ``PipelineStageModule.expert_loads``)."""
    layers = list(model.model.layers) + [m.layer for m in model.mtp]
    return [i for i, layer in enumerate(layers) if isinstance(layer.mlp, DeepseekMoE)]


def check_pipeline_model(model: DeepseekV3, schedule: str, data_parallel: bool) -> None:
    """Refuse what the pipeline cannot train correctly, naming the config field (ValueError)."""
    cfg = model.config
    if cfg.tie_word_embeddings:
        raise ValueError("model.tie_word_embeddings=true is not supported under pipeline parallelism (parallel.pp > 1)")
    if len(model.mtp) > 0 and schedule != "dualpipev":
        raise ValueError(
            f"model.num_nextn_predict_layers={len(model.mtp)}: multi-token prediction under pipeline parallelism needs"
            f" parallel.pp_schedule=dualpipev (the embedding and the head share pp rank 0); with"
            f" parallel.pp_schedule={schedule} set model.num_nextn_predict_layers=0"
        )
    if len(model.mtp) > 0 and data_parallel:
        raise ValueError(
            f"model.num_nextn_predict_layers={len(model.mtp)} with parallel.pp > 1 and data parallelism: the embedding"
            " table would belong to two FSDP units (stage 0 and the last stage); use dp_replicate=dp_shard=1 or"
            " model.num_nextn_predict_layers=0"
        )


class PipelineStageModule(nn.Module):
    """One stage of a DeepseekV3: an optional embedding, a slice of decoder layers, an optional norm + head.

    ``forward(tokens_BT)`` on stage 0, ``forward(h_BTD, balance_1)`` on the others; returns ``(h_BTD or
    logits_BTV, balance_1)``, and on the last stage with MTP ``(logits_BTV, balance_1, h_BTD)`` (the normed hidden
    state the MTP modules continue from, in the loss). Layers are kept in a ModuleDict keyed by their index in the
    full model. With MTP the last stage also registers the MTP modules and the embedding (so the schedule's weight
    gradient pass reaches them; under DualPipeV the embedding's owner, stage 0, is on the same rank).
    """

    def __init__(self, model: DeepseekV3, layers: range, first: bool, last: bool, mtp: bool = False) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens if first or (last and mtp) else None
        self.first = first
        self.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = model.mtp if last and mtp else None
        self.rotary_emb = model.rotary_emb
        self.n_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        self.expert_loads: dict[int, Tensor] = {}  # layer index -> load_E summed over the training micro-batches

    def holds(self, layer_id: int) -> bool:
        """Whether this stage runs layer `layer_id` (a main decoder layer, or an MTP module's as L + k)."""
        return str(layer_id) in self.layers or (self.mtp is not None and layer_id >= self.n_layers)

    def _count(self, i: int, stats) -> None:
        if torch.is_grad_enabled():  # training micro-batches only, not evaluation
            self.expert_loads[i] = self.expert_loads.get(i, 0) + stats.load_E.detach().float()

    def forward(self, x: Tensor, balance_1: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.first:
            h_BTD = self.embed_tokens(x)
            balance_1 = h_BTD.new_zeros(1, dtype=torch.float32)
        else:
            h_BTD = x
        assert balance_1 is not None, "stages after the first receive the running balance loss"
        B, T, _ = h_BTD.shape
        rope = self.rotary_emb(torch.arange(T, device=h_BTD.device)[None].expand(B, T))
        mask = build_attention_mask(None, T, 0, h_BTD.device)
        for name, layer in self.layers.items():
            h_BTD, stats = layer(h_BTD, rope, mask)
            if stats is not None:
                balance_1 = balance_1 + stats.balance_loss.float()
                self._count(int(name), stats)
        if self.lm_head is None:
            return h_BTD, balance_1
        h_BTD = self.norm(h_BTD)
        if self.mtp is not None:
            return self.lm_head(h_BTD), balance_1, h_BTD
        return self.lm_head(h_BTD), balance_1

    def mtp_losses(self, h_BTD: Tensor, targets_BT: Tensor) -> tuple[Tensor, Tensor]:
        """(mean MTP cross-entropy over depths, summed balance loss of the MTP MoE layers), as
        ``DeepseekV3.mtp_logits`` computes them. The input tokens are not sent down the pipeline: in pretraining
        ``input_ids[:, k:] == targets[:, k-1:T-1]`` (targets are the inputs shifted by one, never ignored)."""
        assert self.mtp is not None and self.embed_tokens is not None
        assert bool((targets_BT >= 0).all()), "MTP under PP rebuilds the input tokens from the targets"
        B, T, _ = h_BTD.shape
        rope = self.rotary_emb(torch.arange(T, device=h_BTD.device)[None].expand(B, T))
        mask = build_attention_mask(None, T, 0, h_BTD.device)
        losses, balance = [], h_BTD.new_zeros((), dtype=torch.float32)
        h_prev = h_BTD
        for k, mtp in enumerate(self.mtp, start=1):
            n = T - k
            if n <= 0:
                break
            emb_BnD = self.embed_tokens(targets_BT[:, k - 1 : T - 1])
            x_BnD = mtp.eh_proj(torch.cat([mtp.enorm(emb_BnD), mtp.hnorm(h_prev[:, :n])], dim=-1))
            y_BnD, stats = mtp.layer(
                x_BnD, (rope[0][:, :n], rope[1][:, :n]), None if mask is None else mask[:, :, :n, :n]
            )
            if stats is not None:
                balance = balance + stats.balance_loss.float()
                self._count(self.n_layers + k - 1, stats)
            h_prev = mtp.shared_head.norm(y_BnD)
            losses.append(cross_entropy(self.lm_head(h_prev), targets_BT[:, k:]))
        return torch.stack(losses).mean(), balance


class PipelineLoss:
    """The last stage's loss per micro-batch: CE + mtp_weight * MTP + alpha * (balance losses summed over every
    MoE layer), as ``DeepseekV3.forward`` computes it. Records the detached parts of each micro-batch (``records``:
    dicts of loss, ce, mtp, balance, tokens) for the trainer's logging; ``poison=True`` multiplies the loss by NaN
    (the loop's ``train.inject_nan_at_step``). With ``eval_bytes_V`` set (validation, no grad) it records only the
    CE and bits-per-byte sums of ``train.heldout.ce_sums`` (``{"eval_sums": [4]}``)."""

    def __init__(self, alpha: float, mtp_weight: float = 0.0, mtp_stage: PipelineStageModule | None = None) -> None:
        self.alpha, self.mtp_weight, self.mtp_stage = alpha, mtp_weight, mtp_stage
        self.records: list[dict[str, Tensor]] = []
        self.poison = False
        self.eval_bytes_V: Tensor | None = None  # UTF-8 bytes per token id, while validating

    def __call__(self, output: tuple[Tensor, ...], targets_BT: Tensor) -> Tensor:
        logits_BTV, balance_1 = output[0], output[1]
        if self.eval_bytes_V is not None and not torch.is_grad_enabled():
            sums = ce_sums(logits_BTV, targets_BT, self.eval_bytes_V)
            self.records.append({"eval_sums": sums})
            return sums[0] / sums[1].clamp(min=1)
        ce = cross_entropy(logits_BTV, targets_BT)
        balance = balance_1.sum()
        loss, mtp = ce, torch.zeros(())
        if self.mtp_stage is not None and torch.is_grad_enabled():  # MTP is a training target, not an eval one
            mtp, mtp_balance = self.mtp_stage.mtp_losses(output[2], targets_BT)
            balance = balance + mtp_balance
            loss = loss + self.mtp_weight * mtp
        if self.alpha > 0:
            loss = loss + self.alpha * balance
        if self.poison:
            loss = loss * float("nan")
        parts = {"loss": loss, "ce": ce, "mtp": mtp, "balance": balance}
        rec = {k: v.detach().float() for k, v in parts.items()}
        self.records.append(rec | {"tokens": (targets_BT >= 0).sum()})
        return loss


def pipeline_loss(alpha: float) -> PipelineLoss:
    """The loss without MTP: mean token CE + alpha * (balance losses summed over MoE layers)."""
    return PipelineLoss(alpha)


class Pipeline(NamedTuple):
    schedule: object  # Schedule1F1B or ScheduleDualPipeV: .step(x, target=y, losses=[]), .eval(...)
    stages: list[PipelineStageModule]  # the stages this rank holds, in stage order
    loss: PipelineLoss  # the last stage's loss function (its records are filled on the rank holding it)
    n_microbatches: int
    kind: str  # "1f1b" | "dualpipev"
    stage_ids: list[int]  # the stage index of each module in `stages`
    n_stages: int
    group: dist.ProcessGroup | None  # the pipeline group


@torch.no_grad()
def forward_only(pipe: Pipeline, tokens_BT: Tensor, targets_BT: Tensor) -> None:
    """One micro-batch through every stage, forward only, for evaluation: the loss (CE, balance) is recorded in
    ``pipe.loss.records`` on the rank holding the last stage. Every rank of the pipeline group calls it with the
    same micro-batch; activations go to the next stage's rank with blocking send/recv.

    Why not ``schedule.eval``: in torch 2.13 ``ScheduleDualPipeV.eval`` still runs the schedule's backward
    actions and fails ("can't steal_bwd_input if this stage doesn't have backward"); ``Schedule1F1B.eval`` works and
    the trainer uses it. Here micro-batches go one after another (no overlap): evaluation is a small share of a run.
    """
    mine = dict(zip(pipe.stage_ids, pipe.stages))
    pp_size = dist.get_world_size(pipe.group)

    def owner(s: int) -> int:
        return s if pipe.kind == "1f1b" or s < pp_size else 2 * pp_size - 1 - s

    out: tuple[Tensor, ...] = (tokens_BT,)
    for s in range(pipe.n_stages):
        if s not in mine:
            continue
        if s > 0 and s - 1 not in mine:  # receive (h_BTD, balance_1) from the previous stage's rank
            h = torch.empty(*tokens_BT.shape, pipe.stages[0].hidden_size, device=tokens_BT.device)
            bal = torch.empty(1, device=tokens_BT.device)
            dist.recv(h, group_src=owner(s - 1), group=pipe.group)
            dist.recv(bal, group_src=owner(s - 1), group=pipe.group)
            out = (h, bal)
        out = mine[s](*out)
        if s + 1 < pipe.n_stages and s + 1 not in mine:
            dist.send(out[0].float().contiguous(), group_dst=owner(s + 1), group=pipe.group)
            dist.send(out[1].float().contiguous(), group_dst=owner(s + 1), group=pipe.group)
    if pipe.n_stages - 1 in mine:
        pipe.loss(out, targets_BT)


def build_pipeline(
    model: DeepseekV3,
    schedule: str,
    pp_group: dist.ProcessGroup | None,
    n_microbatches: int,
    microbatch_shape: tuple[int, int],
    device: torch.device,
    scale_grads: bool = True,
    data_parallel: bool = False,
    shard_fn=None,
    hidden_dtype: torch.dtype = torch.float32,
    logits_dtype: torch.dtype = torch.float32,
) -> Pipeline:
    """Cut ``model`` into the stages this rank holds and build the schedule over them.

    ``microbatch_shape`` = (sequences, positions) of one micro-batch: the stages are built with static shapes (no
    metadata-inference forward, which would also run the MoE layers once more and count their expert loads).
    ``shard_fn(stage_module)``, if given, is applied to each stage module before its ``PipelineStage`` is built
    (FSDP2 for PP x DP: train.parallel.parallelize.fully_shard_stage). ``scale_grads=False`` leaves the gradients
    summed over micro-batches (the trainer divides once; needed with MTP, whose embedding is in two stages).
    ``hidden_dtype`` / ``logits_dtype``: the dtypes the stages really output, which the static buffers between
    stages must declare (the schedules check them only under TORCH_DISTRIBUTED_DEBUG=DETAIL, and a bf16 hidden state
    received into an fp32 buffer is garbage): under autocast the residual stream stays fp32 and the head's output
    is bf16; under FSDP2's bf16 MixedPrecisionPolicy the parameters are bf16, so the hidden state is too.

    ``schedule.step(tokens_BT, target=targets_BT, losses=[])`` on every rank of the pipeline runs one batch
    (forward and backward of all micro-batches; stage 0 feeds the tokens, the last stage takes the targets); then
    the optimizer steps on the parameters of the stages. Every rank must hold the same initial ``model``.
    """
    cfg = model.config
    check_pipeline_model(model, schedule, data_parallel)
    pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
    pp_size = dist.get_world_size(pp_group) if pp_group is not None else 1
    local = stages_of_rank(schedule, pp_rank, pp_size)
    n_stages = pp_size * len(local)
    ranges = stage_layer_ranges(cfg.num_hidden_layers, n_stages)
    if schedule == "dualpipev" and n_microbatches < n_stages:
        raise ValueError(f"dualpipev needs n_microbatches >= 2 * pp = {n_stages}, got {n_microbatches}")
    mtp = len(model.mtp) > 0
    if mtp and scale_grads:
        raise ValueError("MTP under PP needs scale_grads=False (the embedding's gradient would be scaled twice)")
    Bm, T = microbatch_shape
    hidden = (
        torch.empty(Bm, T, cfg.hidden_size, device=device, dtype=hidden_dtype, requires_grad=True),
        torch.empty(1, device=device, requires_grad=True),
    )
    logits = (torch.empty(Bm, T, cfg.vocab_size, device=device, dtype=logits_dtype, requires_grad=True), hidden[1])
    if mtp:
        logits = (*logits, hidden[0])
    tokens = torch.empty(Bm, T, dtype=torch.long, device=device)
    modules, stages = [], []
    for s in local:
        mod = PipelineStageModule(model, ranges[s], first=s == 0, last=s == n_stages - 1, mtp=mtp)
        if shard_fn is not None:
            shard_fn(mod)
        modules.append(mod)
        inputs = tokens if s == 0 else hidden
        outputs = logits if s == n_stages - 1 else hidden
        stages.append(PipelineStage(mod, s, n_stages, device, input_args=inputs, output_args=outputs, group=pp_group))
    alpha = {"aux_free": cfg.seq_aux_alpha, "aux_loss": cfg.aux_loss_alpha}.get(cfg.moe_balance, 0.0)
    last = next((m for m in modules if m.lm_head is not None), None)
    loss_fn = PipelineLoss(alpha, cfg.mtp_loss_weight, last if mtp else None)
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    else:
        sched = ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    return Pipeline(sched, modules, loss_fn, n_microbatches, schedule, local, n_stages, pp_group)


def rank_view(model: DeepseekV3, stages: list[PipelineStageModule]) -> nn.Module:
    """A module holding exactly the parts of ``model`` this pipeline rank trains, under the full model's names
    (``model.embed_tokens``, ``model.layers.<i>``, ``model.norm``, ``lm_head``, ``mtp.<k>``): the optimizer, EMA,
    gradient clipping and DCP checkpoints work on it, so each rank saves its own parameters and a checkpoint
    written under PP loads into the whole model (and the reverse)."""
    trunk, view = nn.Module(), nn.Module()
    trunk.layers = nn.ModuleDict()
    for st in stages:
        if st.first:
            trunk.embed_tokens = st.embed_tokens
        trunk.layers.update(st.layers)
        if st.norm is not None:
            trunk.norm = st.norm
            view.lm_head = st.lm_head
        if st.mtp is not None:
            view.mtp = st.mtp
    view.model = trunk
    return view


def gather_full_state_dict(view: nn.Module, sharded: bool) -> dict[str, Tensor] | None:
    """The whole model's state dict on global rank 0 (None elsewhere): each rank's parts (FSDP shards gathered to
    full tensors first), collected with ``gather_object``. Every rank must call it."""
    if sharded:
        sd = get_model_state_dict(view, options=StateDictOptions(full_state_dict=True))
    else:
        sd = view.state_dict()
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sd, parts, dst=0)
    if parts is None:
        return None
    full: dict[str, Tensor] = {}
    for part in parts:
        full.update(part)
    return full
