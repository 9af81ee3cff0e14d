"""One optimizer step's forward and backward under each layout, chosen once when the pretraining loop starts.

    layout = build_layout(cfg, mcfg, meshes, device)     # Single | Parallel (DDP/FSDP/HSDP/EP) | Pipelined
    parts, load_LE = layout.forward_backward(batches, poison)
    gnorm = layout.clip_grad_norm_(max_norm)
    ...the loop syncs once (`layout.reduce_`), steps the optimizer on `layout.trained`...
    layout.update_expert_bias(load_LE, gamma); val = layout.evaluate(batches, byte_len)

Every layout returns the same things: the step's loss parts (loss, ce, mtp, balance: 0-dim device tensors, the mean
over its micro-batches) and the per-layer expert loads [L_moe, E] (a device tensor, summed over micro-batches), so
the loop reads the same whatever runs underneath. Nothing here reads a device value on the host: the loop's one
read per step (train/loop.py) sees everything the step must decide on.

- `Single`: one process, `accum` micro-batches of gradient accumulation.
- `Parallel`: EP, then FSDP2/HSDP applied by `train.parallel.parallelize`; the loader reads by data-parallel
  rank; `reduce_` all-reduces the step's scalars and loads over the data-parallel ranks (one collective), so every
  rank logs, skips and updates the router biases on the same numbers. With `parallel.grad_sync=last` the gradient
  reduction runs once per optimizer step, in the last micro-batch's backward (FSDP2 `set_requires_gradient_sync`).
- `Pipelined`: the stages this rank holds under `torch.distributed.pipelining` (train/parallel/pipeline_parallel.py),
  `trained` is the rank's `rank_view`; the loss parts (held by the last stage) and the per-stage expert loads are
  summed over every rank in one all-reduce; validation runs forward only.

Batches move to the device from pinned memory without blocking (`to_device`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from model.config import ModelConfig
from model.hf import export_hf
from model.moe import update_expert_bias
from train.heldout import Batch, metrics_from_sums
from train.heldout import evaluate as evaluate_lm
from train.meta_init import init_plan, materialize
from train.parallel.mesh import ParallelMeshes
from train.parallel.parallelize import DataParallel, clip_grad_norm_, parallelize, parallelize_pipeline
from train.parallel.pipeline_parallel import Pipeline, forward_only, gather_full_state_dict, moe_layer_ids, rank_view
from train.runtime import autocast, build_model

PARTS = ("loss", "ce", "mtp", "balance")


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host batch on the training device; on CUDA through pinned memory, so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Single:
    """One process: `accum` micro-batches of `micro_batch_size` sequences per optimizer step."""

    def __init__(self, model: nn.Module, accum: int, precision: str, device: torch.device) -> None:
        self.model, self.trained, self.accum, self.precision, self.device = model, model, accum, precision, device
        self.dp = DataParallel()
        self.moe_layers = list(model.moe_layers())
        self.n_experts = model.config.n_routed_experts
        self.held = set(moe_layer_ids(model))  # layer ids whose router biases this rank updates

    def _sync_gradients(self, last_micro_batch: bool) -> None:
        """Whether this micro-batch's backward reduces gradients over ranks (no-op on one process)."""

    def forward_backward(self, batches, poison: bool) -> tuple[dict[str, Tensor], Tensor]:
        sums = torch.zeros(len(PARTS), dtype=torch.float64, device=self.device)
        load_LE = torch.zeros(len(self.moe_layers), self.n_experts, device=self.device)
        for a in range(self.accum):
            x, y = next(batches)
            self._sync_gradients(a == self.accum - 1)
            with autocast(self.precision, self.device):
                out = self.model(to_device(x, self.device), to_device(y, self.device))
            loss = out.loss * float("nan") if poison else out.loss
            (loss / self.accum).backward()
            zero = loss.new_zeros(())  # MTP / balance are None without an MTP module / without MoE layers
            parts = (loss, out.ce_loss, out.mtp_loss if out.mtp_loss is not None else zero, out.balance_loss)
            sums += torch.stack([p.detach().double() for p in parts]) / self.accum
            if self.moe_layers:
                load_LE += out.expert_load_LE.detach().float()
        return dict(zip(PARTS, sums.unbind())), load_LE

    def reduce_(self, flat: Tensor, n_mean: int) -> None:
        """One process: the step's numbers are already everyone's."""

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)

    def update_expert_bias(self, load_LE: Tensor, gamma: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free bias step of every MoE layer this rank holds, from the step's loads."""
        for layer, layer_id, load_E in zip(self.moe_layers, moe_layer_ids(self.model), load_LE):
            if layer_id in self.held:
                update_expert_bias(layer, load_E, gamma)

    def expert_bias(self) -> Tensor:
        """[L_moe, E] the routers' selection biases (a device tensor), as every rank should see them."""
        return torch.stack([m.gate.e_score_correction_bias.detach().float() for m in self.moe_layers])

    def evaluate(self, batches: list[Batch], byte_len) -> dict:
        return evaluate_lm(self.model, batches, self.precision, self.device, byte_len)

    def export(self, mcfg: ModelConfig, cfg, out_dir: Path, tokenizer_path: Path) -> None:
        export_hf(self.model, out_dir, tokenizer_path=tokenizer_path)


class Parallel(Single):
    """EP and FSDP2/HSDP over `meshes` (train/parallel/parallelize.py); see the module docstring."""

    def __init__(self, model, meshes: ParallelMeshes, cfg, accum: int, device: torch.device) -> None:
        super().__init__(model, accum, cfg.precision, device)
        self.meshes, self.grad_sync = meshes, cfg.parallel.grad_sync
        self.dp = parallelize(model, meshes, cfg.parallel, mixed_precision=cfg.precision in ("bf16", "fp8"))

    def _sync_gradients(self, last_micro_batch: bool) -> None:
        if isinstance(self.model, FSDPModule) and self.grad_sync == "last":
            self.model.set_requires_gradient_sync(last_micro_batch)

    def reduce_(self, flat: Tensor, n_mean: int) -> None:
        if self.dp.size > 1:
            dist.all_reduce(flat, group=self.dp.group)
            flat[:n_mean] /= self.dp.size

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        return clip_grad_norm_(self.model.parameters(), max_norm)

    def export(self, mcfg: ModelConfig, cfg, out_dir: Path, tokenizer_path: Path) -> None:
        """Every rank takes part in gathering the full state dict; rank 0 writes it from a plain CPU copy."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            export_hf(_cpu_model(full, mcfg, cfg), out_dir, tokenizer_path=tokenizer_path)


class Pipelined(Single):
    """The stages this rank holds, under a `torch.distributed.pipelining` schedule; see the module docstring."""

    def __init__(self, model, meshes: ParallelMeshes, cfg, accum: int, device: torch.device) -> None:
        super().__init__(model, accum, cfg.precision, device)
        t, par = cfg.train, cfg.parallel
        n_micro = accum if par.pp_microbatches == -1 else par.pp_microbatches
        mixed = cfg.precision in ("bf16", "fp8")
        shape = (t.micro_batch_size, t.seq_len)
        self.pipe: Pipeline
        self.pipe, self.dp = parallelize_pipeline(model, meshes, par, n_micro, shape, device, mixed_precision=mixed)
        self.trained, self.pp_group = rank_view(model, self.pipe.stages), meshes.pp.get_group()
        self.moe_row = {layer_id: row for row, layer_id in enumerate(moe_layer_ids(model))}  # layer id -> load row
        self.held = {i for st in self.pipe.stages for i in self.moe_row if st.holds(i)}

    def forward_backward(self, batches, poison: bool) -> tuple[dict[str, Tensor], Tensor]:
        """`accum` micro-batches in rounds of the schedule's M; the gradients (left summed over micro-batches by
        the schedule) are divided by `accum` once. Loss parts: the mean over the step's micro-batches on the last
        stage's ranks, zeros elsewhere; loads: the rows of the layers this rank holds, zeros elsewhere."""
        pipe, M = self.pipe, self.pipe.n_microbatches
        pipe.loss.poison = poison
        for _ in range(self.accum // M):
            xs, ys = zip(*(next(batches) for _ in range(M)))
            x, y = to_device(torch.cat(xs), self.device), to_device(torch.cat(ys), self.device)
            with autocast(self.precision, self.device):
                pipe.schedule.step(x, target=y, losses=[])
        pipe.loss.poison = False
        for p in {id(p): p for st in pipe.stages for p in st.parameters()}.values():  # the embedding may be in two
            if p.grad is not None:
                p.grad.div_(self.accum)
        sums = torch.zeros(len(PARTS), dtype=torch.float64, device=self.device)
        for r in pipe.loss.records:
            sums += torch.stack([r[k].double() for k in PARTS]) / self.accum
        pipe.loss.records.clear()
        load_LE = torch.zeros(len(self.moe_row), self.n_experts, device=self.device)
        for st in pipe.stages:
            for i, load_E in st.expert_loads.items():
                load_LE[self.moe_row[i]] += load_E
            st.expert_loads.clear()
        return dict(zip(PARTS, sums.unbind())), load_LE

    def reduce_(self, flat: Tensor, n_mean: int) -> None:
        """Over every rank: the loss parts come from the last stage's ranks only, so their world sum over dp_size
        is the data-parallel mean; each layer's load rows come from the ranks holding it."""
        dist.all_reduce(flat)
        flat[:n_mean] /= self.dp.size

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        return clip_grad_norm_(self.trained.parameters(), max_norm, self.pp_group)

    def expert_bias(self) -> Tensor:
        """Each pp rank's copy is current for the layers it holds (the others may not even be materialized): those
        rows, zeros elsewhere, summed over the pp group."""
        zeros_E = torch.zeros(self.n_experts, device=self.device)
        rows = [
            m.gate.e_score_correction_bias.detach().float() if i in self.held else zeros_E
            for m, i in zip(self.moe_layers, self.moe_row)
        ]
        bias_LE = torch.stack(rows)
        dist.all_reduce(bias_LE, group=self.pp_group)
        return bias_LE

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], byte_len) -> dict:
        """`evaluate` under PP, forward only. 1F1B: the schedule's `eval`, M micro-batches per round, the last round
        padded with all-ignored targets (nothing counted). DualPipeV (whose `eval` fails in torch 2.13):
        `forward_only`, one micro-batch after another through the stages. The last stage's sums are summed over the
        pipeline group, so every rank returns the same numbers."""
        pipe = self.pipe
        self.trained.eval()
        pipe.loss.records.clear()
        pipe.loss.eval_bytes_V = torch.as_tensor(byte_len, device=self.device)
        if pipe.kind == "1f1b":
            M = pipe.n_microbatches
            pad = (-len(batches)) % M
            padded = list(batches) + [(torch.zeros_like(batches[0][0]), torch.full_like(batches[0][1], -100))] * pad
            for i in range(0, len(padded), M):
                x = to_device(torch.cat([b[0] for b in padded[i : i + M]]), self.device)
                y = to_device(torch.cat([b[1] for b in padded[i : i + M]]), self.device)
                with autocast(self.precision, self.device):
                    pipe.schedule.eval(x, target=y, losses=[])
        else:
            for x, y in batches:
                with autocast(self.precision, self.device):
                    forward_only(pipe, to_device(x, self.device), to_device(y, self.device))
            for st in pipe.stages:  # an FSDP root keeps its parameters gathered after a forward with no backward
                if isinstance(st, FSDPModule):
                    st.reshard()
        total = torch.zeros(4, device=self.device)
        for r in pipe.loss.records:
            total += r["eval_sums"]
        pipe.loss.records.clear()
        pipe.loss.eval_bytes_V = None
        dist.all_reduce(total, group=self.pp_group)
        self.trained.train()
        return metrics_from_sums(total.tolist())

    def export(self, mcfg: ModelConfig, cfg, out_dir: Path, tokenizer_path: Path) -> None:
        """The ranks' parts gathered on rank 0 (FSDP shards first gathered to full tensors)."""
        full = gather_full_state_dict(self.trained, sharded=self.dp.size > 1)
        if full is not None:
            export_hf(_cpu_model(full, mcfg, cfg), out_dir, tokenizer_path=tokenizer_path)


def _cpu_model(state_dict: dict, mcfg: ModelConfig, cfg) -> nn.Module:
    model = build_model(mcfg, cfg.precision, cfg.kernels.backend, torch.device("cpu"), cfg.kernels.scale_formats())
    model.load_state_dict(state_dict)
    return model


def checkpoint_activations(model: nn.Module) -> int:
    """`train.activation_checkpointing=full`: every decoder layer (main and MTP) keeps only its input for backward
    and recomputes its forward there (torch's composable `checkpoint`, applied before FSDP as torchtitan does;
    parameter names unchanged, so checkpoints do not care). Returns the number of layers wrapped."""
    blocks = [*model.model.layers, *(m.layer for m in model.mtp)]
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def build_layout(cfg, mcfg: ModelConfig, meshes: ParallelMeshes | None, accum: int, device: torch.device) -> Single:
    """The model of `mcfg` built identically on every rank (same seed) and laid out as `meshes` says: the step
    function of the whole run, picked once. With `train.meta_init` the model is built on the meta device and each
    rank materializes its own part after parallelization (train/meta_init.py)."""
    t = cfg.train
    build_on = torch.device("meta") if t.meta_init else device
    model = build_model(mcfg, cfg.precision, cfg.kernels.backend, build_on, cfg.kernels.scale_formats())
    plan = init_plan(model) if t.meta_init else None
    if t.activation_checkpointing == "full":
        checkpoint_activations(model)
    if meshes is None:
        layout = Single(model, accum, cfg.precision, device)
    elif meshes.pp.size() > 1:
        layout = Pipelined(model, meshes, cfg, accum, device)
    else:
        layout = Parallel(model, meshes, cfg, accum, device)
    if plan is not None:
        materialize(layout.trained, plan, device, cfg.run.seed)
    return layout
