"""The generative suites' scoring, driven by oracle and adversarial "models" through the same path as a real one.

The oracle returns each prompt's canonical completion (HumanEval's canonical solutions, the masked FIM lines, the
reference reasoning traces): every metric must be 1. Adversaries (empty, syntactically broken, wrong answers) must
score 0. A mixed generator checks the pass@k estimator end to end. The sandbox runs for real on a few programs.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest
import yaml

from data.fim import fim_prompt
from data.reasoning import build_test_tasks, task_row
from eval.config import FimEvalConfig, HumanEvalConfig, ReasoningEvalConfig
from eval.generation import Prompt, Sampling
from eval.stats import wilson_interval
from eval.suite_code import fim_floors, run_fim, run_humaneval, select_fim_tasks
from eval.suite_reasoning import copy_prompt_answer, load_gsm8k_rows, run_reasoning
from rewards.humaneval import STOP_SEQUENCES, load_problems, truncate_completion

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def oracle(answers: dict[str, str], tail: str = ""):
    """A GenerateFn answering each prompt text with its canonical completion (+ `tail`), n times."""

    def generate(prompts: list[Prompt], sampling: Sampling) -> list[list[str]]:
        return [[answers[p.text] + tail] * sampling.n for p in prompts]

    return generate


def constant(text: str):
    return lambda prompts, sampling: [[text] * sampling.n for _ in prompts]


# ---------------------------------------------------------------- HumanEval


def test_truncate_completion_stops_at_top_level_statements():
    body = "    x = 1\n    if x:\n        return x\n"
    assert truncate_completion(body + "\ndef other():\n    pass") == body
    assert truncate_completion(body + "\nprint(f(1))") == body
    assert truncate_completion(body) == body  # nested `if` is indented: not a stop


class _TaskYaml(yaml.SafeLoader):
    """lm-eval task files tag functions (`!function utils.x`); their names are all a test needs."""


_TaskYaml.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def until_of(path: Path) -> tuple[str, ...]:
    return tuple(yaml.load(path.read_text(), Loader=_TaskYaml)["generation_kwargs"]["until"])


def test_stop_sequences_are_lm_evals_humaneval_stop_sequences():
    """One list: lm-evaluation-harness's own humaneval task (the installed package), ours, and our lm-eval task."""
    theirs = until_of(Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml")
    assert theirs == STOP_SEQUENCES == until_of(REPO / "eval" / "lm_eval_tasks" / "ds_humaneval.yaml")


def test_code_suites_stop_decoding_at_their_stop_strings(problems):
    seen = []

    def recording(prompts, sampling):
        seen.append(sampling.stop_strings)
        return [[""] * sampling.n for _ in prompts]

    run_humaneval(recording, problems, HumanEvalConfig(max_problems=1), floors={})
    run_humaneval(recording, problems, HumanEvalConfig(max_problems=1, stop_sequences=False), floors={})
    run_fim(recording, problems, FimEvalConfig(modes=["psm"], max_tasks=1), floors={})
    assert seen == [STOP_SEQUENCES, (), ("\n",)]


def test_humaneval_oracle_scores_one_and_adversaries_zero(problems):
    cfg = HumanEvalConfig(max_problems=3, n_samples=1, ks=[1])
    answers = {p.prompt: p.canonical_solution for p in problems[:3]}
    # the oracle's solution followed by junk after a top-level stop: truncation must remove the junk
    res = run_humaneval(oracle(answers, tail="\ndef junk(:\n"), problems, cfg)
    assert res.metrics["pass@1"] == 1.0 and res.metrics["n_problems"] == 3
    assert all(row["passed"] for row in res.samples)
    assert run_humaneval(constant(""), problems, cfg).metrics["pass@1"] == 0.0
    assert run_humaneval(constant("    return None\n"), problems, cfg).metrics["pass@1"] == 0.0


def test_humaneval_pass_at_k_from_mixed_samples(problems):
    """Two samples per problem, one right and one wrong: pass@1 = 1/2 and pass@2 = 1 (unbiased estimator)."""
    chosen = problems[:2]
    answers = {p.prompt: p.canonical_solution for p in chosen}

    def half_right(prompts, sampling):
        return [[answers[p.text], "    return None\n"] for p in prompts]

    res = run_humaneval(half_right, chosen, HumanEvalConfig(max_problems=2, n_samples=2, ks=[1, 2]))
    assert res.metrics["pass@1"] == pytest.approx(0.5)
    assert res.metrics["pass@2"] == pytest.approx(1.0)


def test_humaneval_rejects_a_generator_with_the_wrong_number_of_samples(problems):
    with pytest.raises(ValueError, match="completions"):
        run_humaneval(lambda p, s: [["x"]], problems[:1], HumanEvalConfig(max_problems=1, n_samples=2, ks=[1]))


# ---------------------------------------------------------------- single-line infilling


def test_fim_task_selection_is_seeded_and_spans_the_benchmark(problems):
    a = select_fim_tasks(problems, 20, seed=0)
    assert a == select_fim_tasks(problems, 20, seed=0) and len(a) == 20
    assert a != select_fim_tasks(problems, 20, seed=1)
    assert len(select_fim_tasks(problems, 0)) == 1033  # Bavarian et al.'s single-line task count
    assert len({t.task_id for t in a}) > 10  # drawn over many problems, not the first few


def test_fim_oracle_scores_one_in_both_modes_and_adversaries_zero(problems):
    cfg = FimEvalConfig(modes=["psm", "spm"], max_tasks=4)
    tasks = select_fim_tasks(problems, 4, seed=0)
    answers = {fim_prompt(t.prefix, t.suffix, m): t.middle for t in tasks for m in cfg.modes}
    # the generation runs past the line: only the first line is the completion
    res = run_fim(oracle(answers, tail="\n    garbage that must be cut"), problems, cfg)
    for mode in cfg.modes:
        assert res.metrics[f"{mode}/exact_match"] == 1.0
        assert res.metrics[f"{mode}/pass@1"] == 1.0
    broken = run_fim(constant("    (("), problems, cfg)
    for mode in cfg.modes:
        assert broken.metrics[f"{mode}/exact_match"] == 0.0 and broken.metrics[f"{mode}/pass@1"] == 0.0
    assert run_fim(constant(""), problems, FimEvalConfig(modes=["psm"], max_tasks=4)).metrics["psm/exact_match"] == 0


def test_fim_prompts_differ_by_mode(problems):
    t = select_fim_tasks(problems, 1, seed=3)[0]
    psm, spm = fim_prompt(t.prefix, t.suffix, "psm"), fim_prompt(t.prefix, t.suffix, "spm")
    assert psm != spm and psm.endswith("<｜fim▁end｜>") and spm.endswith(t.prefix)


# ---------------------------------------------------------------- reasoning


@pytest.fixture(scope="module")
def reasoning_rows():
    return [task_row(t) for t in build_test_tasks(n_test=6, seed=0)]


def test_reasoning_oracle_scores_one_and_adversaries_zero(reasoning_rows):
    cfg = ReasoningEvalConfig(k=2, temperature=0.6)
    answers = {r["prompt"]: r["completion"] for r in reasoning_rows}
    assert {r["kind"] for r in reasoning_rows} == {"arith", "countdown"}
    res = run_reasoning(oracle(answers), reasoning_rows, cfg)
    m = res.metrics
    assert m["pass@1"] == 1.0 and m["pass@2"] == 1.0 and m["format_rate"] == 1.0 and m["grader_errors"] == 0
    assert m["n_prompts"] == 6 and m["k"] == 2 and "gsm8k/skipped" in m and m["think_rate"] == 1.0
    direct = run_reasoning(constant("<think></think><answer>-987654</answer>"), reasoning_rows, cfg).metrics
    assert direct["think_rate"] == 0.0 and direct["format_rate"] == 1.0
    wrong = run_reasoning(constant("<think>guess</think><answer>-987654</answer>"), reasoning_rows, cfg).metrics
    assert wrong["pass@1"] == 0.0 and wrong["format_rate"] == 1.0
    empty = run_reasoning(constant(""), reasoning_rows, cfg).metrics
    assert empty["pass@1"] == 0.0 and empty["format_rate"] == 0.0


def test_reasoning_pass_at_1_is_the_mean_over_samples(reasoning_rows):
    answers = {r["prompt"]: r["completion"] for r in reasoning_rows}

    def one_of_four(prompts, sampling):
        return [[answers[p.text]] + ["<think>x</think><answer>nope</answer>"] * 3 for p in prompts]

    m = run_reasoning(one_of_four, reasoning_rows, ReasoningEvalConfig(k=4)).metrics
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@4"] == pytest.approx(1.0)


def test_reasoning_prompts_use_the_chat_template(reasoning_rows):
    seen = []

    def spy(prompts, sampling):
        seen.extend(prompts)
        return [[""] * sampling.n for _ in prompts]

    run_reasoning(spy, reasoning_rows[:2], ReasoningEvalConfig(k=1, temperature=0.0))
    assert all(p.chat for p in seen) and [p.text for p in seen] == [r["prompt"] for r in reasoning_rows[:2]]


def test_gsm8k_is_scored_when_present_and_skipped_with_a_reason_when_absent():
    rows, reason = load_gsm8k_rows(str(FIXTURES / "gsm8k_sample.jsonl"))
    assert reason is None and len(rows) == 5
    answers = {r["prompt"]: r["completion"] for r in rows}
    m = run_reasoning(oracle(answers), [], ReasoningEvalConfig(k=1, temperature=0.0), (rows, None)).metrics
    assert m["gsm8k/pass@1"] == 1.0 and m["gsm8k/n_prompts"] == 5
    assert load_gsm8k_rows(None)[0] == [] and "not set" in load_gsm8k_rows(None)[1]
    assert "does not exist" in load_gsm8k_rows("/nonexistent/gsm8k.jsonl")[1]


# ---------------------------------------------------------------- floors and intervals


def test_fim_floor_is_what_an_empty_line_scores(problems):
    """On the 16 tasks the old default drew (seed 0), one masked line is a comment: leaving it empty passes, so the
    floor of pass@1 there is 1/16, the 0.06 the report once showed for every checkpoint."""
    cfg = FimEvalConfig(modes=["psm", "spm"], max_tasks=16)
    tasks = select_fim_tasks(problems, 16, seed=0)
    floors = fim_floors(problems, tasks, cfg.modes)
    assert floors["psm/pass@1"]["empty"] == floors["spm/pass@1"]["empty"] == pytest.approx(1 / 16)
    assert floors["psm/exact_match"]["empty"] == 0.0
    res = run_fim(constant(""), problems, cfg)  # the floor is the empty generator's score through the same path
    assert res.metrics["psm/pass@1"] == floors["psm/pass@1"]["empty"] and res.floors == floors
    lo, hi = res.intervals["psm/pass@1"]
    assert (lo, hi) == pytest.approx(wilson_interval(1, 16))


def test_humaneval_floor_and_interval(problems):
    cfg = HumanEvalConfig(max_problems=4, n_samples=1, ks=[1])
    answers = {p.prompt: p.canonical_solution for p in problems[:4]}
    res = run_humaneval(oracle(answers), problems, cfg)
    assert res.floors == {"pass@1": {"empty": 0.0}}  # a docstring-only body returns None: every test fails
    assert res.intervals["pass@1"] == pytest.approx(wilson_interval(4, 4))
    passed = run_humaneval(oracle(answers), problems, cfg, floors={"pass@1": {"empty": -1.0}})
    assert passed.floors == {"pass@1": {"empty": -1.0}}  # a cached floor is reused, not recomputed


def test_reasoning_floors_and_intervals(reasoning_rows):
    answers = {r["prompt"]: r["completion"] for r in reasoning_rows}
    res = run_reasoning(oracle(answers), reasoning_rows, ReasoningEvalConfig(k=2))
    assert res.floors["pass@1"]["empty"] == 0.0 and res.floors["format_rate"]["copy_prompt"] == 1.0
    copy = run_reasoning(
        lambda ps, s: [[copy_prompt_answer(p.text)] * s.n for p in ps], reasoning_rows, ReasoningEvalConfig(k=2)
    )
    assert copy.metrics["pass@1"] == res.floors["pass@1"]["copy_prompt"]  # the floor is that generator's score
    assert res.intervals["pass@1"] == pytest.approx(wilson_interval(6, 6))
    assert copy_prompt_answer("What is 12 + 30?") == "<think></think><answer>30</answer>"
