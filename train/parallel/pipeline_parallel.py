"""Pipeline parallelism for DeepseekV3 with ``torch.distributed.pipelining``: stages, schedules, the loss.

How the model is cut
--------------------
The decoder layers are split as evenly as possible into ``n_stages`` consecutive slices (earlier stages get the
extra layer when it does not divide). Stage 0 also holds the token embedding, the last stage the final norm and
the output head:

    stage 0: embed_tokens + layers[0:a]   stage 1: layers[a:b]   ...   stage S-1: layers[..:L] + norm + lm_head

Each stage module refers to the full model's own submodules (no copy), so parameter names, initialization and
checkpoints stay those of ``DeepseekV3``; a rank simply never touches the layers of stages it does not hold.

Schedules (each rank holds a fixed set of stages; ``pp`` ranks in the pipeline group)
------------------------------------------------------------------------------------
- ``1f1b``: one stage per rank (``S = pp``). After a warm-up of forwards, every rank alternates one forward and
  one backward, so at most ``pp`` micro-batches of activations are alive; the bubble is ``(pp-1)/(m+pp-1)``.
- ``dualpipev``: DeepSeek's DualPipe in its "V" form (``S = 2 * pp``): rank r holds stages r and 2pp-1-r, so the
  first and the last stage share rank 0 and the micro-batches travel down and back up the ranks. The backward is
  split into input- and weight-gradient halves (zero-bubble style), and the forward of one micro-batch is paired
  with the backward of another so that, on GPUs, the all-to-all of one hides behind the compute of the other.
  It needs ``n_microbatches >= 2 * pp``.

Both come from ``torch.distributed.pipelining.schedules``; nothing is scheduled by hand here.

What travels between stages
---------------------------
A stage returns ``(h_BTD, balance_1)``: the hidden state and the running sum of the MoE layers' (unweighted)
balance losses so far. The last stage returns ``(logits_BTV, balance_1)`` and ``pipeline_loss`` adds
``alpha * balance`` to the cross-entropy, so the balance loss of every stage's MoE layers reaches its router
through ordinary autograd across the pipeline. Each stage also sums the expert loads of its MoE layers over the
micro-batches (``PipelineStageModule.expert_loads``, for the trainer to clear after each step) for the
auxiliary-loss-free bias update.

Multi-token prediction under PP: not supported, and refused with a ValueError. The MTP module needs the main
model's last hidden state, the embedding of the shifted tokens (stage 0's table) and the output head (last stage);
under 1F1B those live on different ranks and the table would have to be replicated and its gradient summed
across ranks. Train with ``model.num_nextn_predict_layers=0`` under PP.

Gradient scale: the schedules sum the per-micro-batch losses' gradients and, with ``scale_grads=True`` (default),
divide by the number of micro-batches: with equal-sized micro-batches the gradient of the mean loss, as one
process computes it on the whole batch.

Legend: B batch (one micro-batch), T positions, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from model.attention import build_attention_mask
from model.transformer import DeepseekV3, cross_entropy

__all__ = [
    "SCHEDULES",
    "PipelineStageModule",
    "build_pipeline",
    "pipeline_loss",
    "stage_layer_ranges",
    "stages_of_rank",
]

SCHEDULES = ("1f1b", "dualpipev")


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


class PipelineStageModule(nn.Module):
    """One stage of a DeepseekV3: an optional embedding, a slice of decoder layers, an optional norm + head.

    ``forward(tokens_BT)`` on stage 0, ``forward(h_BTD, balance_1)`` on the others; returns ``(h_BTD or
    logits_BTV, balance_1)``. Layers are kept in a ModuleDict keyed by their index in the full model.
    """

    def __init__(self, model: DeepseekV3, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary_emb = model.rotary_emb
        self.expert_loads: dict[int, Tensor] = {}  # layer index -> load_E summed over the training micro-batches

    def forward(self, x: Tensor, balance_1: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.embed_tokens is not None:
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
                if torch.is_grad_enabled():  # training micro-batches only, not evaluation
                    i = int(name)
                    self.expert_loads[i] = self.expert_loads.get(i, 0) + stats.load_E.detach().float()
        if self.lm_head is not None:
            return self.lm_head(self.norm(h_BTD)), balance_1
        return h_BTD, balance_1


def pipeline_loss(alpha: float):
    """The last stage's loss per micro-batch: mean token CE + alpha * (balance losses summed over MoE layers), as
    ``DeepseekV3.forward`` computes it without MTP."""

    def loss_fn(output: tuple[Tensor, Tensor], targets_BT: Tensor) -> Tensor:
        logits_BTV, balance_1 = output
        loss = cross_entropy(logits_BTV, targets_BT)
        return loss + alpha * balance_1.sum() if alpha > 0 else loss

    return loss_fn


def build_pipeline(
    model: DeepseekV3,
    schedule: str,
    pp_group: torch.distributed.ProcessGroup,
    n_microbatches: int,
    microbatch_shape: tuple[int, int],
    device: torch.device,
) -> tuple[object, list[PipelineStageModule]]:
    """Cut ``model`` into the stages this rank holds and return ``(schedule, stage_modules)``.

    ``microbatch_shape`` = (sequences, positions) of one micro-batch: the stages are built with static shapes (no
    metadata-inference forward, which would also run the MoE layers once more and count their expert loads).

    ``schedule.step(tokens_BT, target=targets_BT, losses=[])`` on every rank of the pipeline runs one batch
    (forward and backward of all micro-batches; stage 0 feeds the tokens, the last stage takes the targets); then
    the optimizer steps on the parameters of ``stage_modules``. Every rank must hold the same initial ``model``.
    """
    cfg = model.config
    if len(model.mtp) > 0:
        raise ValueError(
            "multi-token prediction is not supported under pipeline parallelism: set model.num_nextn_predict_layers=0"
            " (see train/parallel/pipeline_parallel.py)"
        )
    if cfg.tie_word_embeddings:
        raise ValueError("tie_word_embeddings=true is not supported under pipeline parallelism (embedding and head "
                         "live on different stages)")  # fmt: skip
    pp_rank, pp_size = torch.distributed.get_rank(pp_group), torch.distributed.get_world_size(pp_group)
    local = stages_of_rank(schedule, pp_rank, pp_size)
    n_stages = pp_size * len(local)
    ranges = stage_layer_ranges(cfg.num_hidden_layers, n_stages)
    Bm, T = microbatch_shape
    hidden = (torch.empty(Bm, T, cfg.hidden_size, device=device, requires_grad=True),
              torch.empty(1, device=device, requires_grad=True))  # fmt: skip
    logits = (torch.empty(Bm, T, cfg.vocab_size, device=device, requires_grad=True), hidden[1])
    tokens = torch.empty(Bm, T, dtype=torch.long, device=device)
    modules, stages = [], []
    for s in local:
        mod = PipelineStageModule(model, ranges[s], first=s == 0, last=s == n_stages - 1)
        modules.append(mod)
        inputs = tokens if s == 0 else hidden
        outputs = logits if s == n_stages - 1 else hidden
        stages.append(PipelineStage(mod, s, n_stages, device, input_args=inputs, output_args=outputs, group=pp_group))
    alpha = {"aux_free": cfg.seq_aux_alpha, "aux_loss": cfg.aux_loss_alpha}.get(cfg.moe_balance, 0.0)
    loss_fn = pipeline_loss(alpha)
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    else:
        if n_microbatches < n_stages:
            raise ValueError(f"dualpipev needs n_microbatches >= 2 * pp = {n_stages}, got {n_microbatches}")
        sched = ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn)
    return sched, modules
