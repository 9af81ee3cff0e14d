"""bench.code_structure classifies imports against DESIGN.md's layering."""

import pytest

from bench.code_structure import Report, analyse, analyse_module, arrow_against_flow


@pytest.mark.parametrize(
    ("src", "dst", "why"),
    [
        ("model.generate", "train.parallel.eplb", "a library imports a stage"),
        ("train.grpo", "eval.graders", "a stage imports a later stage"),
        ("distill.student", "train.sft", "imports a stage module"),
        ("rewards.graders", "data.reasoning", "a library imports a stage"),
        ("train.pretrain", "pipeline.__main__", "imports the orchestrator"),
        ("distill.student", "train.optim", None),  # a library module of an earlier stage: along the flow
        ("train.pretrain", "pipeline.config", None),  # the schema of config dataclasses is a leaf
        ("distill.config", "train.config", None),
        ("eval.suite_code", "rewards.humaneval", None),
        ("pipeline.__main__", "train.pretrain", None),  # the orchestrator runs the stages
    ],
)
def test_arrow_classification(src, dst, why):
    assert arrow_against_flow(src, dst) == why


def test_in_function_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from train.sft import x\n"
        "def f():\n    import json\n    from eval.run import run\n    return json\n"
    )
    report = Report()
    analyse_module("train.pretrain", source, report)
    assert [(m, d) for m, _, d in report.inner_imports] == [("train.pretrain", "json"), ("train.pretrain", "eval.run")]
    assert report.arrows == [("train.pretrain", "eval.run", "imports a stage module")]
    assert report.functions == [("train.pretrain", "f", 4)]


def test_this_checkout_has_no_arrow_against_the_flow():
    """No stage module imports another, no library imports a stage, no stage imports a later one (DESIGN.md)."""
    report = analyse()
    assert report.arrows == [], "\n".join(f"{src} -> {dst}: {why}" for src, dst, why in report.arrows)
