"""Worker for tests/dist/test_expert_parallel.py: one torchrun launch of 4 gloo ranks runs every check and rank 0
writes a JSON report (check name -> {"ok": bool, "detail": str}) to the path given as argv[1].

    torchrun --standalone --nproc_per_node=4 tests/dist/ep_worker.py /tmp/ep.json
    EP_WORKER_RAISE=1 torchrun ...    # debugging: let a failing check raise instead of recording it

A failing check is recorded and the others still run, unless the failure leaves the ranks' collectives out of step
(then gloo aborts the launch and the pytest side shows the worker's stderr).

Every rank rebuilds every rank's inputs from fixed seeds, so each can compute the single-process reference itself.
Tolerances: fp32 paths rtol=1e-5, atol=1e-6 (reduction order differs); FP8 dispatch: relative L2 error < 0.06
(e4m3 keeps 3 mantissa bits, a relative rounding error up to 2^-4 per element); BF16 combine: rel. L2 < 1e-2;
gradients sent back in bf16 (the fp8/bf16 wires): atol=rtol=1e-2; exchanges and DCP round trips: bit-exact.
"""

import copy
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from model.config import ModelConfig
from model.moe import DeepseekMoE
from model.transformer import DeepseekV3
from train.parallel.all_to_all import all_to_all, all_to_all_start, dequantize_rows_fp8, quantize_rows_fp8
from train.parallel.config import ParallelConfig
from train.parallel.expert_parallel import (
    ExpertParallelMoE,
    apply_expert_parallel,
    fully_shard_experts,
    max_ranks_per_token,
    ranks_per_token,
)
from train.parallel.mesh import ParallelMeshes, build_mesh

RESULTS: dict[str, dict] = {}


def record(name: str, fn) -> None:  # noqa: ANN001
    t0 = time.perf_counter()
    try:
        detail = fn()
        RESULTS[name] = {"ok": True, "detail": f"[{time.perf_counter() - t0:.2f}s] {detail}"}
    except Exception:  # the pytest side asserts ok and shows the traceback
        if os.environ.get("EP_WORKER_RAISE"):
            raise
        RESULTS[name] = {"ok": False, "detail": traceback.format_exc()}


def close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> str:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return f"{name}: empty"
    err = (got - want).abs()
    msg = f"{name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}"
    assert torch.allclose(got, want, rtol=rtol, atol=atol), msg
    return msg


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


# ---------------------------------------------------------------- all-to-all
def check_all_to_all(wire: str | None, use_async: bool) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    D = 5
    splits = [[(3 * i + 2 * j) % 4 for j in range(world)] for i in range(world)]  # rows i -> j; includes zeros
    splits[1] = [0] * world  # rank 1 sends nothing at all
    xs = [torch.randn(sum(splits[i]), D, generator=torch.Generator().manual_seed(10 + i)) for i in range(world)]
    ws = [
        torch.randn(sum(splits[i][j] for i in range(world)), D, generator=torch.Generator().manual_seed(50 + j))
        for j in range(world)
    ]
    x = xs[rank].clone().requires_grad_(True)
    out_splits = [splits[i][rank] for i in range(world)]
    if use_async:
        pending = all_to_all_start(x, out_splits, splits[rank], None, wire)
        busy = torch.randn(64, 64) @ torch.randn(64, 64)  # work while the exchange is in flight
        out = pending.wait()
        assert busy.shape == (64, 64)
    else:
        out = all_to_all(x, out_splits, splits[rank], None, wire)
    (out * ws[rank]).sum().backward()

    # single-process reference over every rank's tensors
    ref_x = [t.clone().requires_grad_(True) for t in xs]
    chunks = [list(t.split(splits[i])) for i, t in enumerate(ref_x)]
    wire_fn = {
        None: lambda t: t,
        "bfloat16": lambda t: t.to(torch.bfloat16).float(),
        "fp8": lambda t: t + (dequantize_rows_fp8(quantize_rows_fp8(t), t.dtype) - t).detach(),  # straight-through
    }[wire]
    ref_out = [wire_fn(torch.cat([chunks[i][j] for i in range(world)])) for j in range(world)]
    sum((o * w).sum() for o, w in zip(ref_out, ws)).backward()
    msgs = [close("out", out, ref_out[rank].detach(), rtol=0, atol=0)]
    if wire is None:
        msgs.append(close("grad", x.grad, ref_x[rank].grad, rtol=0, atol=0))
        # second reference: torch's own autograd all-to-all (functional collectives)
        x_fc = xs[rank].clone().requires_grad_(True)
        out_fc = fc.all_to_all_single_autograd(x_fc, out_splits, splits[rank], dist.group.WORLD)
        (out_fc * ws[rank]).sum().backward()
        msgs.append(close("out_vs_torch_fc", out, out_fc.detach(), rtol=0, atol=0))
        msgs.append(close("grad_vs_torch_fc", x.grad, x_fc.grad, rtol=0, atol=0))
    else:  # gradients travel in bf16 for both reduced wires
        msgs.append(close("grad", x.grad, ref_x[rank].grad, rtol=1e-2, atol=1e-2))
    return "; ".join(msgs)


# ---------------------------------------------------------------- expert-parallel MoE
def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        routed_scaling_factor=2.5,
    )
    base.update(kw)
    return ModelConfig(**base)


def make_moe(cfg: ModelConfig) -> DeepseekMoE:
    torch.manual_seed(1234)
    moe = DeepseekMoE(cfg)
    with torch.no_grad():  # a non-zero selection bias, so the test also covers biased selection
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, cfg.n_routed_experts))
        for p in moe.parameters():
            p.mul_(5.0)  # larger weights: outputs well above fp32 noise
    return moe


def rank_input(r: int, B: int = 2, T: int = 5, D: int = 32) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(100 + r))


def reference_backward(cfg: ModelConfig, world: int) -> tuple[DeepseekMoE, list[torch.Tensor]]:
    """One process: the local layer on every rank's tokens, loss = sum over ranks of (y_r * g_r).sum() + 0.1 *
    balance_r (a per-rank forward: the balance loss is a per-rank quantity). Returns the layer and the inputs."""
    ref = make_moe(cfg)
    xs = [rank_input(r).requires_grad_(True) for r in range(world)]
    loss = 0
    for r in range(world):
        y_r, st_r = ref(xs[r])
        loss = loss + (y_r * torch.randn(y_r.shape, generator=torch.Generator().manual_seed(200 + r))).sum()
        loss = loss + 0.1 * st_r.balance_loss
    loss.backward()
    return ref, xs


def check_ep_moe(meshes: ParallelMeshes, fp8: bool = False, bf16: bool = False, capacity: bool = False) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    # the wire checks drop the shared experts: their exact output would dilute the routed part's error
    n_shared = 0 if (fp8 or bf16) else 1
    cfg = tiny_cfg(moe_impl="capacity" if capacity else "dropless", capacity_factor=1.0, n_shared_experts=n_shared)
    ep_moe = ExpertParallelMoE(make_moe(cfg), meshes.ep, fp8_dispatch=fp8, bf16_combine=bf16)
    ep = meshes.ep.size()
    x = rank_input(rank).requires_grad_(True)
    y, stats = ep_moe(x)
    g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(200 + rank))
    ((y * g_out).sum() + 0.1 * stats.balance_loss).backward()

    # stats and capacity drops: the local layer on this rank's tokens alone
    local = make_moe(cfg)
    x_own = x.detach().clone().requires_grad_(True)
    y_own, stats_own = local(x_own)
    msgs = []
    assert torch.equal(stats.load_E, stats_own.load_E), (stats.load_E, stats_own.load_E)
    assert stats.dropped == stats_own.dropped, (stats.dropped, stats_own.dropped)
    msgs.append(close("balance_loss", stats.balance_loss.detach(), stats_own.balance_loss.detach()))
    if fp8 or bf16:
        err = rel_l2(y.detach(), y_own.detach())
        assert err < (0.06 if fp8 else 1e-2), f"relative L2 error of y {err:.3e}"
        assert err > 1e-4, f"relative L2 error {err:.3e}: the reduced-precision wire was not used"
        return f"dropped={stats.dropped}; y rel L2 err {err:.3e}"
    msgs.append(close("y_vs_own_tokens", y.detach(), y_own.detach()))
    if not capacity:  # one dispatched row per (token, destination rank), bounded by node-limited routing
        topk_idx_NK = ep_moe.gate(x.detach().reshape(-1, x.shape[-1]))[0]
        rows, (N, K) = int(ranks_per_token(topk_idx_NK, cfg.n_routed_experts, ep).sum()), topk_idx_NK.shape
        assert ep_moe.last_dispatch_rows == rows, (ep_moe.last_dispatch_rows, rows)
        assert rows <= N * max_ranks_per_token(cfg.n_routed_experts, cfg.n_group, cfg.topk_group, K, ep)
        msgs.append(f"dispatched {rows} rows for {N} tokens x {K} experts")
    if capacity:
        return f"dropped={stats.dropped}; " + "; ".join(msgs)

    # outputs and gradients: the local layer on ALL ranks' tokens, loss = sum over ranks
    ref, xs = reference_backward(cfg, world)
    msgs.append(close("x.grad", x.grad, xs[rank].grad))
    # replicated parameters (gate, shared experts): the sum of every rank's gradient is the reference gradient
    for name in ("gate.weight", "shared_experts.gate_proj.weight", "shared_experts.down_proj.weight"):
        g = ep_moe.get_parameter(name).grad.clone()
        dist.all_reduce(g)
        msgs.append(close(name, g, ref.get_parameter(name).grad))
    # experts: sum over the ranks holding the same experts, then gather over the EP group
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = getattr(ep_moe.experts, name).grad.to_local().clone()
        if meshes.expert_fsdp.size() > 1:
            dist.all_reduce(g, group=meshes.expert_fsdp._flatten().get_group())
        full = g.new_empty((cfg.n_routed_experts, *g.shape[1:]))
        dist.all_gather_into_tensor(full, g.contiguous(), group=ep_moe.group)
        msgs.append(close(f"experts.{name}.grad", full, getattr(ref.experts, name).grad))
    gathered = ep_moe.gather_experts()
    assert torch.equal(gathered["up_proj"], ref.experts.up_proj.detach())
    return "; ".join(msgs)


def check_bf16_params(meshes: ParallelMeshes) -> str:
    """Layer in bf16 (as under precision=bf16), FP8 dispatch and BF16 combine together: same routing as the local
    bf16 layer, output within bf16+fp8 tolerance (relative L2 < 0.06), gradients reach the gate and the experts."""
    rank = dist.get_rank()
    cfg = tiny_cfg(n_shared_experts=0)
    ep_moe = ExpertParallelMoE(make_moe(cfg).bfloat16(), meshes.ep, fp8_dispatch=True, bf16_combine=True)
    x = rank_input(rank).bfloat16().requires_grad_(True)
    y, stats = ep_moe(x)
    y.float().square().sum().backward()
    y_own, stats_own = make_moe(cfg).bfloat16()(x.detach())
    assert y.dtype == torch.bfloat16 and torch.equal(stats.load_E, stats_own.load_E)
    err = rel_l2(y.detach().float(), y_own.float())
    assert err < 0.06, f"relative L2 error of y {err:.3e}"
    for t in (x.grad, ep_moe.gate.weight.grad, ep_moe.experts.down_proj.grad.to_local()):
        assert t is not None and torch.isfinite(t.float()).all() and t.abs().sum() > 0
    return f"y rel L2 err {err:.3e}"


def check_fsdp_ep(meshes: ParallelMeshes) -> str:
    """FSDP2 on top of EP: experts over meshes.expert_fsdp (fully_shard_experts), the rest over dense_fsdp.
    Every gradient must be the reference gradient / world (FSDP averages over data-parallel ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_cfg()
    ep_moe = ExpertParallelMoE(make_moe(cfg), meshes.ep)
    assert fully_shard_experts(ep_moe, meshes) == 1
    fully_shard(ep_moe, mesh=meshes.dense_fsdp)
    x = rank_input(rank).requires_grad_(True)
    y, stats = ep_moe(x)
    g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(200 + rank))
    ((y * g_out).sum() + 0.1 * stats.balance_loss).backward()
    ref, xs = reference_backward(cfg, world)
    msgs = [close("x.grad", x.grad, xs[rank].grad)]
    for name, p in ep_moe.named_parameters():
        msgs.append(close(name, p.grad.full_tensor(), ref.get_parameter(name).grad / world))
    assert len(msgs) == 1 + 7, [m.split(":")[0] for m in msgs]  # x + gate + 3 shared + 3 routed
    return "; ".join(msgs)


def check_dcp_reshard(save: ParallelMeshes, load: ParallelMeshes, ckpt_dir: str) -> str:
    """DCP: save an EP layer at one EP size, load it into a differently initialized layer at another."""
    cfg = tiny_cfg()
    a = ExpertParallelMoE(make_moe(cfg), save.ep)
    dcp.save(a.state_dict(), checkpoint_id=ckpt_dir)
    other = make_moe(cfg)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    b = ExpertParallelMoE(other, load.ep)
    sd = b.state_dict()
    dcp.load(sd, checkpoint_id=ckpt_dir)
    b.load_state_dict(sd)
    ga, gb = a.gather_experts(), b.gather_experts()
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    assert torch.equal(a.gate.weight, b.gate.weight) and torch.equal(
        a.gate.e_score_correction_bias, b.gate.e_score_correction_bias
    )
    return f"ep={save.ep.size()} -> ep={load.ep.size()}: experts and gate bit-exact"


def check_model_ep(meshes: ParallelMeshes) -> str:
    """The whole DeepseekV3 (a dense layer, an MoE layer, an MTP module with an MoE layer) with every DeepseekMoE
    replaced by apply_expert_parallel: per-rank loss equal to the local model's, and the summed gradients of every
    parameter equal to the local model's gradients of the summed loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_cfg(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=1, rope_scaling=None)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    ref = copy.deepcopy(model)
    assert apply_expert_parallel(model, meshes.ep) == 2
    assert len(list(model.moe_layers())) == 2, "EP layers must still count as MoE layers"

    def batch(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(300 + r))
        return ids[:, :-1], ids[:, 1:]

    out = model(*batch(rank))
    out.loss.backward()
    ref_total = 0
    for r in range(world):
        ref_out = ref(*batch(r))
        if r == rank:
            msgs = [close("loss", out.loss.detach(), ref_out.loss.detach())]
            assert torch.equal(out.expert_load_LE, ref_out.expert_load_LE)
        ref_total = ref_total + ref_out.loss
    ref_total.backward()
    for name, p in model.named_parameters():
        if isinstance(p.grad, DTensor):
            g = p.grad.full_tensor()
        else:
            g = p.grad.clone()
            dist.all_reduce(g)
        msgs.append(close(name, g, ref.get_parameter(name).grad, rtol=1e-4, atol=1e-6))
    return f"{len(msgs) - 1} parameter grads; " + "; ".join(m for m in msgs if "experts" in m or "loss" in m)


def check_apply(meshes: ParallelMeshes) -> str:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({"a": DeepseekMoE(cfg), "b": torch.nn.Sequential(DeepseekMoE(cfg))})
    n = apply_expert_parallel(holder, meshes.ep)
    assert n == 2 and isinstance(holder["a"], ExpertParallelMoE) and isinstance(holder["b"][0], ExpertParallelMoE)
    w = holder["a"].experts.gate_proj
    assert w.shape[0] == cfg.n_routed_experts and w.to_local().shape[0] == cfg.n_routed_experts // meshes.ep.size()
    return "replaced 2"


# ---------------------------------------------------------------- mesh
def check_mesh() -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(ParallelConfig(dp_replicate=2, dp_shard=-1, ep=2), world, "cpu")
    m = ParallelMeshes.from_mesh(mesh, ep=2)
    ranks = {
        "ep": dist.get_process_group_ranks(m.ep.get_group()),
        "expert_fsdp": sorted(m.expert_fsdp.mesh.flatten().tolist()),
        "dense_fsdp": sorted(m.dense_fsdp.mesh.flatten().tolist()),
        "dp": dist.get_process_group_ranks(m.dp.get_group()),
    }
    # hsdp_ep on 4 ranks: replicas {0,1},{2,3}; EP groups = consecutive pairs; each EP group alone in its replica
    assert ranks["ep"] == [rank - rank % 2, rank - rank % 2 + 1], ranks
    assert ranks["expert_fsdp"] == [rank % 2, rank % 2 + 2], ranks  # same experts: same EP rank, other replica
    assert ranks["dp"] == ranks["dense_fsdp"] == [0, 1, 2, 3], ranks
    assert m.expert_fsdp.mesh.shape == (2, 1) and m.dense_fsdp.mesh.shape == (2, 2)
    for bad, why in ((ParallelConfig(dp_shard=3), "does not equal world_size"), (ParallelConfig(ep=3), "divide")):
        try:
            build_mesh(bad, world, "cpu")
        except ValueError as e:
            assert why in str(e), str(e)
        else:
            raise AssertionError(f"{bad} accepted")
    return str(ranks)


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    for wire in (None, "bfloat16", "fp8"):
        record(f"a2a_sync_{wire}", lambda w=wire: check_all_to_all(w, use_async=False))
    record("a2a_async_None", lambda: check_all_to_all(None, use_async=True))
    record("a2a_async_fp8", lambda: check_all_to_all("fp8", use_async=True))
    record("mesh", check_mesh)
    world = dist.get_world_size()
    ep2 = ParallelMeshes.from_mesh(build_mesh(ParallelConfig(dp_shard=world, ep=2), world, "cpu"), ep=2)
    ep4 = ParallelMeshes.from_mesh(build_mesh(ParallelConfig(dp_shard=world, ep=4), world, "cpu"), ep=4)
    record("ep_moe_ep4", lambda: check_ep_moe(ep4))
    record("ep_moe_ep2", lambda: check_ep_moe(ep2))
    record("ep_moe_ep4_fp8_dispatch", lambda: check_ep_moe(ep4, fp8=True))
    record("ep_moe_ep2_bf16_combine", lambda: check_ep_moe(ep2, bf16=True))
    record("ep_moe_ep4_capacity", lambda: check_ep_moe(ep4, capacity=True))
    record("ep_moe_ep4_bf16_params", lambda: check_bf16_params(ep4))
    record("apply_expert_parallel", lambda: check_apply(ep4))
    record("model_ep4", lambda: check_model_ep(ep4))
    hsdp_ep = ParallelMeshes.from_mesh(build_mesh(ParallelConfig(dp_replicate=2, dp_shard=2, ep=2), world, "cpu"), 2)
    record("fsdp_ep_ep2", lambda: check_fsdp_ep(ep2))
    record("hsdp_ep_ep2", lambda: check_fsdp_ep(hsdp_ep))
    ckpt = os.path.join(os.path.dirname(os.path.abspath(out_path)), "dcp_ep")
    record("dcp_ep4_to_ep2", lambda: check_dcp_reshard(ep4, ep2, ckpt))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, RESULTS)
    if dist.get_rank() == 0:
        merged = {
            k: {"ok": all(g[k]["ok"] for g in gathered), "detail": [g[k]["detail"] for g in gathered]} for k in RESULTS
        }
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
