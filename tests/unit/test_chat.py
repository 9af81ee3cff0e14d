"""The chat template: the loss mask covers exactly the completion (and its EOS), and encoding round-trips."""

import pytest

from data.reasoning import generate_task, task_row
from data.tokenizer import ASSISTANT, BOS, EOS, USER, new_tokenizer, train_tokenizer
from train.chat import decode_chat, decode_completion, encode_chat, eos_id, render_prompt


@pytest.fixture(scope="module")
def rows():
    return [task_row(generate_task(kind, 3, i)) for kind in ("arith", "countdown") for i in range(8)]


@pytest.fixture(scope="module")
def tok(rows):
    return train_tokenizer([r["prompt"] + " " + r["completion"] for r in rows] * 4, vocab_size=400)


def test_mask_is_exactly_the_completion_and_eos(tok, rows):
    for r in rows:
        ids, mask = encode_chat(tok, r["prompt"], r["completion"])
        assert len(ids) == len(mask)
        prompt_ids = render_prompt(tok, r["prompt"])
        n_prompt = len(prompt_ids)
        assert ids[:n_prompt] == prompt_ids
        assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
        assert ids[-1] == eos_id(tok)
        # the masked-in tokens decode to the completion followed by the end-of-sentence token, nothing else
        assert decode_chat(tok, [i for i, m in zip(ids, mask) if m]) == r["completion"] + EOS
        assert decode_completion(tok, ids[n_prompt:]) == r["completion"]


def test_round_trip_is_the_deepseek_template(tok, rows):
    r = rows[0]
    ids, _ = encode_chat(tok, r["prompt"], r["completion"])
    assert decode_chat(tok, ids) == f"{BOS}{USER}{r['prompt']}{ASSISTANT}{r['completion']}{EOS}"
    # role markers and reasoning tags are single special tokens
    for t in (BOS, USER, ASSISTANT, EOS, "<think>", "</think>", "<answer>", "</answer>"):
        assert ids.count(tok.token_to_id(t)) == 1, t


def test_prompt_only_has_no_loss_and_ends_with_assistant(tok, rows):
    ids, mask = encode_chat(tok, rows[1]["prompt"])
    assert sum(mask) == 0
    assert ids == render_prompt(tok, rows[1]["prompt"])
    assert ids[0] == tok.token_to_id(BOS) and ids[-1] == tok.token_to_id(ASSISTANT)


def test_tokenizer_without_chat_tokens_is_refused():
    plain = new_tokenizer()
    with pytest.raises(ValueError, match="special token"):
        encode_chat(plain, "hi", "there")
