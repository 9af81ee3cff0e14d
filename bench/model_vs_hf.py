"""Our DeepseekV3 against transformers' DeepseekV3ForCausalLM on the same weights (CPU), and MTP speculative decoding.

    .venv/bin/python -m bench.model_vs_hf                      # tiny preset: batch 4 x 256, 4 prompts x 64 new tokens
    .venv/bin/python -m bench.model_vs_hf --ckpt outputs/<run>/pretrain/hf     # + rows on a pretrained checkpoint
    .venv/bin/python -m bench.model_vs_hf --rounds 3 --no-csv  # print only
    .venv/bin/python -m bench.model_vs_hf --profile            # torch.profiler tables of our train step and decode

What is measured (fp32, `torch.set_num_threads(--threads)`, same weights: our model is exported with
`model.hf.export_hf` and both sides load that directory; random weights of the tiny preset unless --ckpt):

- train: tokens/s of one training step, forward + backward of the next-token loss on a [batch, seq] batch
  (best of --iters steps after one warm-up). Ours runs twice: without MTP (the same work as transformers, which
  has no MTP module: the apples-to-apples ratio) and with its MTP module and loss (what pretraining runs).
- generate: new tokens/s of greedy decoding, --prompts prompts of --prompt-len tokens, --new-tokens each,
  both with their KV cache (ours: MLA latent cache, `model.generate` without drafts; transformers: `generate()`
  with its DynamicCache), end-of-sequence disabled so both produce exactly the same number of tokens; we check that
  both produce the same tokens. "decode" rows time decoding alone (the run minus a prefill-only run).
- generate_long: the same with --long-prompt-len prompts, where the cache holds ~1K positions per row: this is
  where caching only MLA's latent pays (transformers re-expands every cached latent through kv_b_proj at every
  step; the absorbed path attends over the latents directly).
- --compile: ours with `model.compile=true` (`DeepseekV3.compile_blocks`, inductor) for training and decoding;
  `ours_first_call_s` is the warm-up call, compile included (minutes on a 2-core CPU).
- speculative (model with its MTP module): our greedy decoding with MTP drafts verified by the main model
  (`model.speculative`, the engine's default for such a model) against our plain decoding and transformers on the
  same weights: tokens/s, the acceptance rate of the drafts, the ratio to our plain decoding and to transformers,
  and whether the tokens equal plain decoding's. On random weights the drafts are nearly always rejected (the floor);
  with --ckpt (a Hugging Face directory our `model.hf.export_hf` wrote, e.g. a pipeline's `pretrain/hf`, with its
  tokenizer) the prompts are Python source from the standard library, encoded with the checkpoint's tokenizer.

- train_roofline (one row per run): the training step's floor on this CPU in fp32: its FLOPs as
  `torch.utils.flop_counter.FlopCounterMode` counts them on transformers' step (matmuls and the eager attention's
  batched matmuls: every score, as a kernel without causal skipping computes them; ours is counted too) divided by
  the best fp32 GEMM rate measured in the same run on the step's typical shapes (the head forward and backward, an
  expert's gate/up projection, the attention scores). Both steps' CPU time as multiples of that floor; hf_x_floor is
  also the most any fp32 implementation could beat transformers by here.

Timing: best (minimum) of the timed repetitions over --rounds interleaved rounds of fresh workers, in wall-clock
seconds and in process CPU seconds (`time.process_time`). On a shared machine the wall clock measures the neighbours
too; with one torch thread the CPU-time figure is the robust one (it counts only this process's work, though a
loaded machine still slows it through shared caches). The "decode" rows subtract two best-of timings. Each row
records the 1-minute load average at the end of the run.

Memory: each (implementation, workload) runs in a FRESH subprocess; the figure is the growth of the process's peak
resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, KiB on Linux) from just after the model is loaded to
the end of the workload (first round), i.e. the peak extra memory of activations, gradients, caches, temporaries.
tracemalloc does not see torch's allocations, hence this method. Ratios > 1 mean ours is faster / leaner.
Results are appended to bench/results/model_vs_hf.csv with machine, commit and date (`bench.common.append_result`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from bench.common import append_result

ROOT = Path(__file__).resolve().parents[1]
STDLIB_SOURCES = ("textwrap.py", "argparse.py", "inspect.py", "dataclasses.py")  # prompts for a checkpoint


def tiny_config(mtp: bool):
    """conf/model/tiny.yaml, with or without its MTP module."""
    from model.config import load_preset

    return load_preset("tiny", **({} if mtp else {"num_nextn_predict_layers": 0}))


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ workers


def _load(impl: str, hf_dir: Path):
    if impl == "ours":
        from model.hf import import_hf

        return import_hf(hf_dir)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def _train_step(impl: str, model, ids_BT: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    if impl == "ours":
        loss = model(ids_BT[:, :-1], targets_BT=ids_BT[:, 1:]).loss
    else:
        loss = model(input_ids=ids_BT[:, :-1], labels=ids_BT[:, :-1], use_cache=False).loss
    loss.backward()


def _generate(impl: str, model, prompts_BT: torch.Tensor, new_tokens: int, speculative: bool) -> dict:
    if impl == "ours":
        from model.generate import generate

        out = generate(model, prompts_BT.tolist(), max_new_tokens=new_tokens, temperature=0.0, speculative=speculative)
        return {"tokens": out.tokens, "drafted": out.draft_tokens, "accepted": out.accepted_tokens}
    with torch.inference_mode():
        out = model.generate(
            prompts_BT,
            attention_mask=torch.ones_like(prompts_BT),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return {"tokens": out[:, prompts_BT.shape[1] :].tolist()}


def _best_of(run, reps: int) -> tuple[float, float, list[float], object]:
    """(best wall s, best cpu s, all wall s, last result) over `reps` timed runs after one warm-up."""
    walls, cpus, result = [], [], None
    for i in range(reps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        result = run()
        if i > 0:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), walls, result


def prompts_for(hf_dir: Path, n: int, length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """[n, length] prompts: Python source of the standard library when the directory has a tokenizer (a trained
    checkpoint sees text like its corpus), else random token ids."""
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        return torch.randint(2, vocab_size, (n, length), generator=generator)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in STDLIB_SOURCES:
        ids += tok.encode((stdlib / name).read_text()).ids
    starts = torch.randint(0, len(ids) - length, (n,), generator=generator).tolist()
    return torch.tensor([ids[s : s + length] for s in starts])


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impl, work, mode = args.worker.split(":")  # mode: plain | spec | compiled (ours only; transformers: plain)
    model = _load(impl, args.hf_dir)
    if mode == "compiled":  # model.compile=true: inductor compiles in the warm-up run (its time is recorded)
        model.compile_blocks()
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    base = maxrss_mib()
    out: dict = {}
    if work == "train":
        model.train()
        ids_BT = torch.randint(2, V, (args.batch, args.seq + 1), generator=gen)
        w0 = time.perf_counter()
        wall, cpu, walls, _ = _best_of(lambda: _train_step(impl, model, ids_BT), args.iters)
        out["first_call_s"] = time.perf_counter() - w0 - sum(walls)
        n_tokens = args.batch * args.seq
    else:  # "generate" (short prompts) or "generate_long" (long prompts: the cache holds ~1K positions)
        model.eval()
        prompt_len = args.prompt_len if work == "generate" else args.long_prompt_len
        prompts_BT = prompts_for(args.hf_dir, args.prompts, prompt_len, V, gen)
        spec = mode == "spec"

        def run(n: int):
            return lambda: _generate(impl, model, prompts_BT, n, spec)

        w0 = time.perf_counter()
        wall, cpu, walls, res = _best_of(run(args.new_tokens), args.gen_iters)
        out["first_call_s"] = time.perf_counter() - w0 - sum(walls)
        assert all(len(t) == args.new_tokens for t in res["tokens"])
        n_tokens = args.prompts * args.new_tokens
        # decode alone: subtract a run that only prefills and draws the first token
        wall1, cpu1, _, _ = _best_of(run(1), args.gen_iters)
        n_decode = args.prompts * (args.new_tokens - 1)
        out.update(res, decode_tokens_per_s=n_decode / (wall - wall1), decode_tokens_per_cpu_s=n_decode / (cpu - cpu1))
    out.update(tokens_per_s=n_tokens / wall, tokens_per_cpu_s=n_tokens / cpu, wall_s_all=walls)
    out["peak_extra_mib"] = maxrss_mib() - base
    return out


def run_worker(name: str, hf_dir: Path, args: argparse.Namespace, tree: Path = ROOT) -> dict:
    """Run one worker in a fresh process, importing the code of source tree `tree` (this one, or --before's)."""
    cmd = [sys.executable, "-m", "bench.model_vs_hf", "--worker", name, "--hf-dir", str(hf_dir)]
    for k in (
        "threads",
        "iters",
        "gen_iters",
        "batch",
        "seq",
        "prompts",
        "prompt_len",
        "long_prompt_len",
        "new_tokens",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ roofline


def step_flops(impl: str, model, ids_BT: torch.Tensor) -> int:
    """Floating-point operations of one training step as `torch.utils.flop_counter.FlopCounterMode` counts them
    (matmuls, batched matmuls and attention kernels; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _train_step(impl, model, ids_BT)
    return counter.get_total_flops()


def gemm_shapes(cfg, batch: int, seq: int) -> dict[str, tuple[int, int, int, int]]:
    """(batch of matrices, M, K, N) of the training step's typical GEMMs: the head (forward, input gradient, weight
    gradient), a routed expert's fused gate/up projection, the attention scores."""
    N, D, V = batch * seq, cfg.hidden_size, cfg.vocab_size
    rows_per_expert = N * cfg.num_experts_per_tok // cfg.n_routed_experts
    H, Q = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return {
        "head": (1, N, D, V),
        "head_dx": (1, N, V, D),
        "head_dw": (1, V, N, D),
        "expert": (1, rows_per_expert, D, 2 * cfg.moe_intermediate_size),
        "scores": (batch * H, seq, Q, seq),
    }


def sgemm_rate(shapes: dict[str, tuple[int, int, int, int]], reps: int = 10) -> tuple[float, str]:
    """(best fp32 GEMM rate in FLOP per CPU second over `shapes`, the shape that reached it): `torch.matmul`, best
    of `reps` after a warm-up. The head's weight gradient multiplies a transposed operand, as autograd does."""
    best, best_name = 0.0, ""
    for name, (Bm, M, K, N) in shapes.items():
        a = torch.randn(K, M).t() if name == "head_dw" else torch.randn(Bm, M, K).squeeze(0)
        b = torch.randn(Bm, K, N).squeeze(0)
        torch.matmul(a, b)
        times = []
        for _ in range(reps):
            c0 = time.process_time()
            torch.matmul(a, b)
            times.append(time.process_time() - c0)
        rate = 2 * Bm * M * K * N / min(times)
        if rate > best:
            best, best_name = rate, name
    return best, best_name


def roofline_worker(args: argparse.Namespace) -> dict:
    """FLOPs of both training steps on the same weights, and this CPU's fp32 GEMM rate, in one process."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    out: dict = {}
    for impl in ("ours", "hf"):
        model = _load(impl, args.hf_dir).train()
        ids_BT = torch.randint(2, model.config.vocab_size, (args.batch, args.seq + 1), generator=gen)
        out[f"{impl}_flops"] = step_flops(impl, model, ids_BT)
    rate, shape = sgemm_rate(gemm_shapes(tiny_config(False), args.batch, args.seq))
    out.update(sgemm_flop_per_s=rate, sgemm_shape=shape)
    return out


def roofline_row(roof: dict, ours: dict, hf: dict, args: argparse.Namespace) -> dict:
    """The training step's floor: transformers' counted FLOPs (its eager attention computes every score, as a
    kernel without causal skipping must) at the measured GEMM rate, and both steps' CPU time as multiples of it."""
    n_tokens = args.batch * args.seq
    floor_s = roof["hf_flops"] / roof["sgemm_flop_per_s"]
    ours_s, hf_s = n_tokens / ours["tokens_per_cpu_s"], n_tokens / hf["tokens_per_cpu_s"]
    return {
        "step_gflop_hf": round(roof["hf_flops"] / 1e9, 3),
        "step_gflop_ours": round(roof["ours_flops"] / 1e9, 3),
        "sgemm_gflop_per_cpu_s": round(roof["sgemm_flop_per_s"] / 1e9, 1),
        "sgemm_shape": roof["sgemm_shape"],
        "floor_cpu_s": round(floor_s, 4),
        "ours_cpu_s": round(ours_s, 4),
        "hf_cpu_s": round(hf_s, 4),
        "ours_x_floor": round(ours_s / floor_s, 2),
        "hf_x_floor": round(hf_s / floor_s, 2),
        "max_speedup_over_hf": round(hf_s / floor_s, 2),  # what a perfect fp32 implementation could reach
    }


# ------------------------------------------------------------------------------------------------ profile


def profile(args: argparse.Namespace) -> None:
    """Print torch.profiler's top operators (self CPU time) for our training step and our plain decoding."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from model.generate import generate
    from model.transformer import DeepseekV3

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DeepseekV3(tiny_config(mtp=True))
    ids_BT = torch.randint(2, model.config.vocab_size, (args.batch, args.seq + 1))
    prompts = ids_BT[: args.prompts, : args.prompt_len].tolist()
    for what, fn in (
        ("train step (with MTP)", lambda: _train_step("ours", model.train(), ids_BT)),
        ("plain decoding", lambda: generate(model, prompts, max_new_tokens=args.new_tokens, speculative=False)),
    ):
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n=== {what}: top operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ------------------------------------------------------------------------------------------------ driver

# (metric, ours job, reference job, field, workload): the rows of one run; a job is "impl:work:mode@weights"
ROWS = (
    ("train_tokens_per_s", "ours:train:plain@plain", "hf:train:plain@plain", "tokens_per_s", "fwd+bwd"),
    ("train_tokens_per_s_ours_with_mtp", "ours:train:plain@mtp", "hf:train:plain@plain", "tokens_per_s", "+ MTP loss"),
    ("generate_tokens_per_s", "ours:generate:plain@plain", "hf:generate:plain@plain", "tokens_per_s", "generate"),
    ("decode_tokens_per_s", "ours:generate:plain@plain", "hf:generate:plain@plain", "decode_tokens_per_s", "decode"),
    (
        "generate_long_tokens_per_s",
        "ours:generate_long:plain@plain",
        "hf:generate_long:plain@plain",
        "tokens_per_s",
        "long",
    ),
    (
        "decode_long_tokens_per_s",
        "ours:generate_long:plain@plain",
        "hf:generate_long:plain@plain",
        "decode_tokens_per_s",
        "long decode",
    ),
    ("spec_generate_tokens_per_s", "ours:generate:spec@mtp", "hf:generate:plain@mtp", "tokens_per_s", "speculative"),
    (
        "spec_decode_tokens_per_s",
        "ours:generate:spec@mtp",
        "hf:generate:plain@mtp",
        "decode_tokens_per_s",
        "spec decode",
    ),
)
CKPT_ROWS = (
    ("ckpt_generate_tokens_per_s", "ours:generate:plain@ckpt", "hf:generate:plain@ckpt", "tokens_per_s", "ckpt"),
    (
        "ckpt_spec_generate_tokens_per_s",
        "ours:generate:spec@ckpt",
        "hf:generate:plain@ckpt",
        "tokens_per_s",
        "ckpt spec",
    ),
    (
        "ckpt_spec_decode_tokens_per_s",
        "ours:generate:spec@ckpt",
        "hf:generate:plain@ckpt",
        "decode_tokens_per_s",
        "ckpt spec decode",
    ),
)
COMPILE_ROWS = (
    ("train_tokens_per_s_ours_compiled", "ours:train:compiled@plain", "hf:train:plain@plain", "tokens_per_s", "comp"),
    (
        "decode_tokens_per_s_ours_compiled",
        "ours:generate:compiled@plain",
        "hf:generate:plain@plain",
        "decode_tokens_per_s",
        "comp",
    ),
)
PLAIN_OF = {"ours:generate:spec@mtp": "ours:generate:plain@mtp", "ours:generate:spec@ckpt": "ours:generate:plain@ckpt"}


def describe(metric: str, args: argparse.Namespace, cfg) -> str:
    B, N = args.prompts, args.new_tokens
    if metric.startswith("train"):
        extra = (
            ", ours + MTP loss" if "mtp" in metric else ", ours with model.compile=true" if "compiled" in metric else ""
        )
        return f"batch {args.batch} x seq {args.seq} fwd+bwd" + extra
    length = args.long_prompt_len if "long" in metric else args.prompt_len
    what = "decode only" if "decode" in metric else "prefill + decode"
    weights = "pretrained checkpoint" if metric.startswith("ckpt") else "random weights"
    spec = ", ours with MTP drafts" if "spec" in metric else ""
    spec += ", ours with model.compile=true" if "compiled" in metric else ""
    return f"{B} x {length} + {N} new greedy, {what}{spec}, {weights}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.model_vs_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared, loaded machine)")
    p.add_argument("--iters", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--gen-iters", type=int, default=2, help="timed generation runs (after one warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--long-prompt-len", type=int, default=896, help="prompt length of the long-context workload")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all workers; the best is kept")
    p.add_argument("--ckpt", type=Path, default=None, help="a Hugging Face directory written by model.hf.export_hf")
    p.add_argument("--compile", action="store_true", help="+ rows of ours with model.compile=true (minutes each)")
    p.add_argument(
        "--before",
        type=Path,
        default=None,
        help="an earlier source tree (git archive <commit> | tar -x -C DIR): its ours-workers run in the same rounds "
        "and every row gains cpu_ratio_to_before (ours now / ours then)",
    )
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to the CSV")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of ours and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(roofline_worker(args) if args.worker == "roofline" else worker(args)))
        return
    if args.profile:
        profile(args)
        return

    from model.hf import export_hf
    from model.transformer import DeepseekV3

    rows_spec = ROWS + (CKPT_ROWS if args.ckpt else ()) + (COMPILE_ROWS if args.compile else ())
    jobs = sorted(
        {j for _, o, h, _, _ in rows_spec for j in (o, h)} | {PLAIN_OF[o] for _, o, *_ in rows_spec if o in PLAIN_OF}
    )
    if args.before:  # the same ours-jobs on the earlier tree ("before|" + job)
        jobs += sorted({"before|" + o for _, o, *_ in rows_spec})
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"ckpt": args.ckpt}
        for mtp in (False, True):
            torch.manual_seed(0)
            dirs["mtp" if mtp else "plain"] = Path(tmp) / ("mtp" if mtp else "plain")
            export_hf(DeepseekV3(tiny_config(mtp)), dirs["mtp" if mtp else "plain"])
        for rnd in range(args.rounds):  # interleaved rounds: a burst of load from neighbours hits both sides
            for job in jobs:
                print(f"round {rnd + 1}/{args.rounds}: {job} ...", file=sys.stderr, flush=True)
                name, weights = job.split("@")
                before = name.startswith("before|")
                tree = args.before if before else ROOT
                r = run_worker(name.removeprefix("before|"), dirs[weights], args, tree)
                best = results.setdefault(job, r)
                for k in ("tokens_per_s", "tokens_per_cpu_s", "decode_tokens_per_s", "decode_tokens_per_cpu_s"):
                    if k in r:
                        best[k] = max(best[k], r[k])
        results["roofline"] = run_worker("roofline", dirs["plain"], args)

    cfg = tiny_config(True)
    shape = f"tiny L{cfg.num_hidden_layers} D{cfg.hidden_size} E{cfg.n_routed_experts} k{cfg.num_experts_per_tok}"
    if args.ckpt:
        shape += f"; ckpt {args.ckpt}"
    load = round(os.getloadavg()[0], 2)
    for metric, ours_key, hf_key, field, _ in rows_spec:
        o, h = results[ours_key], results[hf_key]
        cpu_field = field.removesuffix("_s") + "_cpu_s"  # tokens_per_s -> tokens_per_cpu_s
        row = {
            "threads": args.threads,
            "shape": shape,
            "workload": describe(metric, args, cfg),
            "metric": metric,
            "ours": round(o[field], 1),
            "hf": round(h[field], 1),
            "speed_ratio": round(o[field] / h[field], 3),
            "ours_per_cpu_s": round(o[cpu_field], 1),
            "hf_per_cpu_s": round(h[cpu_field], 1),
            "cpu_speed_ratio": round(o[cpu_field] / h[cpu_field], 3),
            "load_avg_1m": load,
            "ours_peak_extra_mib": round(o["peak_extra_mib"], 1),
            "hf_peak_extra_mib": round(h["peak_extra_mib"], 1),
            "memory_ratio": round(h["peak_extra_mib"] / max(o["peak_extra_mib"], 1e-6), 3),
            "same_greedy_tokens": o["tokens"] == h["tokens"] if "tokens" in o else "",
            "ours_first_call_s": round(o["first_call_s"], 1),  # warm-up: includes inductor's compile when compiled
        }
        if args.before:  # the same workload on the earlier tree, in the same rounds
            then = results["before|" + ours_key]
            row["before_tree"] = args.before.name
            row["before_per_cpu_s"] = round(then[cpu_field], 1)
            row["cpu_ratio_to_before"] = round(o[cpu_field] / then[cpu_field], 3)
        if ours_key in PLAIN_OF:  # speculative: acceptance, against our own plain decoding on the same weights
            plain = results[PLAIN_OF[ours_key]]
            row["acceptance"] = round(o["accepted"] / max(o["drafted"], 1), 3)
            row["cpu_ratio_to_ours_plain"] = round(o[cpu_field] / plain[cpu_field], 3)
            row["same_tokens_as_ours_plain"] = o["tokens"] == plain["tokens"]
        print(
            f"{metric:34s} tok/cpu-s ours {row['ours_per_cpu_s']:8.1f} hf {row['hf_per_cpu_s']:8.1f} "
            f"(x{row['cpu_speed_ratio']:.2f})  tok/s x{row['speed_ratio']:.2f}  "
            f"peak MiB ours {row['ours_peak_extra_mib']:6.1f} hf {row['hf_peak_extra_mib']:6.1f}  "
            f"same tokens: {row['same_greedy_tokens']}"
            + (f"  x{row['cpu_ratio_to_before']:.2f} vs before" if args.before else "")
            + (
                f"  acceptance {row['acceptance']:.2f}, x{row['cpu_ratio_to_ours_plain']:.2f} vs our plain "
                f"(same tokens: {row['same_tokens_as_ours_plain']})"
                if "acceptance" in row
                else ""
            )
        )
        if not args.no_csv:
            append_result("model_vs_hf", row)
    roof = roofline_row(results["roofline"], results["ours:train:plain@plain"], results["hf:train:plain@plain"], args)
    print(
        f"train_roofline: {roof['step_gflop_hf']} GFLOP (FlopCounterMode, transformers' step; ours "
        f"{roof['step_gflop_ours']}) at {roof['sgemm_gflop_per_cpu_s']} GFLOP/cpu-s (sgemm, {roof['sgemm_shape']}): "
        f"floor {roof['floor_cpu_s']} s; ours {roof['ours_x_floor']}x, transformers {roof['hf_x_floor']}x the floor"
    )
    if not args.no_csv:
        append_result(
            "model_vs_hf",
            {
                "threads": args.threads,
                "shape": shape,
                "workload": describe("train_tokens_per_s", args, cfg) + ", floor of a perfect fp32 implementation",
                "metric": "train_roofline",
                "load_avg_1m": load,
                **roof,
            },
        )
        print("appended to bench/results/model_vs_hf.csv")


if __name__ == "__main__":
    main()
