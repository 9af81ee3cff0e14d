"""Worker for tests/dist/test_pp.py: 2 gloo ranks run one batch through the micro DeepseekV3 cut into pipeline
stages, under Schedule1F1B (2 stages), ScheduleDualPipeV (4 stages, the V) and ScheduleDualPipeV with one MTP
module (computed in the last stage's loss on pp rank 0, beside the embedding), and compare with the same model
without pipelining. Rank 0 writes a JSON report (schedule -> {"ok", "detail"}) to argv[1].

    torchrun --standalone --nproc_per_node=2 tests/dist/pp_worker.py /tmp/pp.json

Checked (fp32: rtol 1e-5, atol 1e-6; the micro-batch sums are added in another order): the mean of the
micro-batch losses equals the full-batch loss (CE + alpha * balance); every parameter gets its gradient on exactly
one rank and it equals the reference gradient; the expert loads summed over micro-batches equal the full batch's.
"""

import copy
import json
import sys
import traceback

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.transformer import DeepseekV3
from train.parallel.pipeline_parallel import build_pipeline

B, T, MICRO = 8, 16, 4


def micro_cfg(mtp: int = 0) -> ModelConfig:
    return ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_nextn_predict_layers=mtp, rope_scaling=None,
        seq_aux_alpha=0.01,
    )


def check(schedule: str, mtp: int = 0) -> str:
    rank = dist.get_rank()
    cfg = micro_cfg(mtp)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    pipe = build_pipeline(model, schedule, dist.group.WORLD, MICRO, (B // MICRO, T), torch.device("cpu"),
                          scale_grads=not mtp)
    stages = pipe.stages
    losses: list = []
    pipe.schedule.step(x, target=y, losses=losses)
    if mtp:  # the embedding is in two stages: the schedule leaves the sum over micro-batches, divided here once
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(MICRO)
    mine = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    loads = {i: load_E for m in stages for i, load_E in m.expert_loads.items()}
    loss = torch.stack(losses).mean().item() if losses else None
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, loss, loads))
    if rank != 0:
        return "compared on rank 0"

    out = ref(x, y)
    out.loss.backward()
    msgs = []
    pp_loss = [lo for _, lo, _ in gathered if lo is not None]
    assert len(pp_loss) == 1, f"exactly one rank holds the last stage, got losses {pp_loss}"
    assert abs(pp_loss[0] - out.loss.item()) <= 1e-5 * abs(out.loss.item()), (pp_loss[0], out.loss.item())
    msgs.append(f"loss {pp_loss[0]:.6f} vs {out.loss.item():.6f}")
    grads: dict = {}
    for part, _, _ in gathered:
        for n, gr in part.items():
            assert n not in grads, f"{n} has a gradient on two ranks"
            grads[n] = gr
    want = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == want.keys(), sorted(set(grads) ^ set(want))
    worst = 0.0
    for n, w in want.items():
        err = (grads[n] - w).abs().max().item()
        worst = max(worst, err)
        assert torch.allclose(grads[n], w, rtol=1e-5, atol=1e-6), (
            f"{n}: max abs err {err:.3e}, mean {(grads[n] - w).abs().mean():.3e}"
        )
    msgs.append(f"{len(want)} gradients, max abs err {worst:.2e}")
    pp_loads = {i: load_E for _, _, part in gathered for i, load_E in part.items()}
    pp_load = torch.stack([pp_loads[i] for i in sorted(pp_loads)])
    assert torch.equal(pp_load, out.expert_load_LE.float()), (pp_load, out.expert_load_LE)
    return "; ".join(msgs)


def main() -> None:
    dist.init_process_group("gloo")
    report = {}
    for name, schedule, mtp in (("1f1b", "1f1b", 0), ("dualpipev", "dualpipev", 0), ("dualpipev_mtp", "dualpipev", 1)):
        try:
            report[name] = {"ok": True, "detail": check(schedule, mtp)}
        except Exception:
            report[name] = {"ok": False, "detail": traceback.format_exc()}
        dist.barrier()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
