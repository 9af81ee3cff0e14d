"""lm-evaluation-harness (`--model hf`, our local task files) against our harness on the same HF checkpoint, problems
and greedy settings: the same code bits per byte, the same greedy completions, the same scores.

The model is a random micro DeepseekV3 exported with `model.hf.export_hf`; lm-eval runs as a user runs it, through its
own command line (`python -m lm_eval run`), in a subprocess. One difference is expected and explained: lm-eval decodes
with `skip_special_tokens=True`, so special tokens a random model emits (BOS, the role and FIM markers) are missing
from its text; `eval.lm_eval_run.compare` removes them from ours before comparing (measured: the token streams are
otherwise identical). The reasoning tags are kept by both (eval/lm_eval_run.py marks them non-special in the
tokenizer lm-eval loads).
"""

from __future__ import annotations

import json

import pytest

from data.reasoning import write_reasoning_sets
from data.tokenizer import BOS, save_tokenizer
from eval.lm_eval_run import lm_eval_text, main
from model.hf import export_hf
from tests.unit.test_eval_run import micro_model, problems, tokenizer  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_lm_eval_text_drops_special_tokens_but_the_reasoning_tags():
    assert lm_eval_text(f"<think>a{BOS}b</think><answer>5</answer>") == "<think>ab</think><answer>5</answer>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("lm_eval") / "r"
    save_tokenizer(tokenizer, root / "data" / "tokenizer.json")
    write_reasoning_sets(root / "data" / "reasoning", n_train=4, n_test=4)
    export_hf(micro_model(5, max_position_embeddings=2048), root / "pretrain" / "hf", root / "data" / "tokenizer.json")
    return root


def test_lm_eval_equals_our_harness(run_dir):
    args = ["--run", str(run_dir), "--stages", "pretrain", "--humaneval-n", "2", "--code-n", "3", "--reasoning-n", "4"]
    args += ["--max-new-tokens", "24"]
    summary = main(args)
    assert json.loads((run_dir / "lm_eval" / "summary.json").read_text()) == summary
    lm = summary["pretrain"]["lm_eval"]
    # lm-eval's own aggregate over the same programs, from its own results file
    assert lm["ds_code_bpb"]["bits_per_byte,none"] == summary["pretrain"]["agreement"]["code_bpb"]["lm_eval"]
    a = summary["pretrain"]["agreement"]
    assert a["code_bpb"]["lm_eval"] == pytest.approx(a["code_bpb"]["ours"], rel=1e-4), a["code_bpb"]
    assert a["humaneval_pass@1"]["lm_eval"] == a["humaneval_pass@1"]["ours"]
    assert a["reasoning_accuracy"]["lm_eval"] == a["reasoning_accuracy"]["ours"]
    samples = run_dir / "lm_eval" / "pretrain" / "results"
    for task, key in (("ds_humaneval", "humaneval"), ("ds_reasoning", "reasoning")):
        (path,) = samples.rglob(f"samples_{task}_*.jsonl")
        theirs = [json.loads(line)["filtered_resps"][0] for line in path.read_text().splitlines()]
        assert len(theirs) == (2 if key == "humaneval" else 4)
    assert a["humaneval_same_completion"] == 1.0, a["humaneval_differing"]
    assert a["reasoning_same_completion"] == 1.0
