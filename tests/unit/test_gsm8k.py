"""GSM8K loader on a hand-written fixture in GSM8K's schema (question, answer ending in '#### N')."""

import json
import shutil
from pathlib import Path

import pytest

from data.gsm8k import canonical_number, load_gsm8k, parse_gsm8k_solution
from data.reasoning import ANSWER_CLOSE, ANSWER_OPEN, COLUMNS, THINK_CLOSE, THINK_OPEN, extract_answer, verify

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gsm8k_sample.jsonl"
EXPECTED_ANSWERS = ["19", "1250", "-4", "9500", "45"]


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    return load_gsm8k(FIXTURE, split="test", cache_dir=str(tmp_path_factory.mktemp("hf_cache")))


def test_fixture_rows_map_to_reasoning_columns(gsm8k):
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert tuple(gsm8k.column_names) == COLUMNS and gsm8k.num_rows == len(raw)
    assert gsm8k["answer"] == EXPECTED_ANSWERS  # commas dropped, negatives kept, '####45' without a space
    assert gsm8k["prompt"] == [r["question"] for r in raw]
    assert gsm8k["id"] == [f"gsm8k-test-{i}" for i in range(len(raw))]
    assert set(gsm8k["kind"]) == {"gsm8k"}
    assert gsm8k["difficulty"] == [2, 1, 1, 2, 2]  # solution lines before '####'
    assert json.loads(gsm8k["meta"][0]) == {"source": str(FIXTURE), "split": "test"}


def test_cot_drops_annotations_and_final_line(gsm8k):
    row = gsm8k[3]
    assert row["cot"] == "The school gets 12 * 1,000 = 12,000 sheets.\nIt has 12,000 - 2,500 = 9,500 left."
    for cot in gsm8k["cot"]:
        assert "<<" not in cot and ">>" not in cot and "####" not in cot and cot == cot.strip()


def test_completion_is_the_sft_trace_and_verifies(gsm8k):
    for row in gsm8k:
        assert row["completion"] == f"{THINK_OPEN}{row['cot']}{THINK_CLOSE}{ANSWER_OPEN}{row['answer']}{ANSWER_CLOSE}"
        assert verify("gsm8k", extract_answer(row["completion"]), row["answer"], row["meta"])
    assert verify("gsm8k", "1,250", gsm8k[1]["answer"])
    assert not verify("gsm8k", "4", gsm8k[2]["answer"])
    # GSM8K answers are checked leniently (math-verify), unlike the generated sets' strict numbers
    for written in ("\\boxed{1250}", "1250 dollars", "x = 1250", "1250.0"):
        assert verify("gsm8k", written, gsm8k[1]["answer"]), written
        assert not verify("arith", written, gsm8k[1]["answer"]) or written == "1250.0", written
    assert not verify("gsm8k", "1251", gsm8k[1]["answer"])


def test_directory_source_picks_the_split_file(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "train.jsonl")
    ds = load_gsm8k(tmp_path, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds["answer"] == EXPECTED_ANSWERS and ds["id"][0] == "gsm8k-train-0"
    with pytest.raises(ValueError, match="no test.jsonl"):
        load_gsm8k(tmp_path, split="test", cache_dir=str(tmp_path / "cache"))


def test_bad_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_gsm8k("no_such_file.jsonl")
    with pytest.raises(ValueError, match="neither"):
        load_gsm8k("outputs/missing/test.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x", "solution": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match="lacks GSM8K column"):
        load_gsm8k(bad, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("solution", "cot", "answer"),
    [
        ("A is 2 + 3 = <<2+3=5>>5.\n#### 5", "A is 2 + 3 = 5.", "5"),
        ("Spend 1,000 * 2 = <<1000*2=2000>>2,000.\n\n#### 2,000", "Spend 1,000 * 2 = 2,000.", "2000"),
        ("Down 10 - 12 = <<10-12=-2>>-2.\n#### -2", "Down 10 - 12 = -2.", "-2"),
        ("Half is <<5/2=2.5>>2.5\n#### 2.50", "Half is 2.5", "2.5"),
        ("#### 7", "", "7"),
        ("uses #### inside, then\n#### 3", "uses #### inside, then", "3"),
    ],
)
def test_parse_gsm8k_solution(solution, cot, answer):
    assert parse_gsm8k_solution(solution) == (cot, answer)


def test_parse_gsm8k_solution_rejects_missing_or_non_numeric_final():
    with pytest.raises(ValueError, match="no '#### N'"):
        parse_gsm8k_solution("The answer is 5.")
    with pytest.raises(ValueError, match="not a number"):
        parse_gsm8k_solution("so\n#### five")
    assert canonical_number("$1,234.50") == "1234.5" and canonical_number("0.10") == "0.1"
