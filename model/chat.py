"""Chat with an exported model in the terminal, tokens printed as they are generated.

    python -m model.chat --ckpt outputs/<run>/hf                      # interactive; /reset clears, /exit quits
    python -m model.chat --ckpt outputs/<run>/hf --prompt "2+3=?"     # one turn, then exit
    python -m model.chat --ckpt outputs/<run>/hf --temperature 0      # greedy

`--ckpt` is a Hugging Face-format directory written by `model.hf.export_hf` (config.json, safetensors and
tokenizer.json); it is read with `model.hf.import_hf` and the `tokenizers` library.

Chat template: when the tokenizer knows DeepSeek's special tokens `<｜User｜>`, `<｜Assistant｜>` and
`<｜end▁of▁sentence｜>`, a conversation is rendered as the release does,
`<bos>{system}<｜User｜>{q1}<｜Assistant｜>{a1}<｜end▁of▁sentence｜><｜User｜>{q2}<｜Assistant｜>`;
otherwise as plain text, `{system}\\n\\nUser: {q1}\\n\\nAssistant: {a1}\\n\\nUser: {q2}\\n\\nAssistant:`.
Generation stops at the end-of-sentence token (or the config's eos_token_id) or after --max-new-tokens.

Streaming text token by token needs care: one character can span several byte-level tokens, so `TextStreamer`
decodes everything generated so far and prints only the new suffix, holding back while the tail is an incomplete
UTF-8 sequence (decoded as U+FFFD).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tokenizers import Tokenizer
from torch import nn

from model.generate import GenerationOutput, generate
from model.hf import import_hf

USER, ASSISTANT, EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"


class TextStreamer:
    """Turns token ids, pushed one at a time, into the text they add (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, skip_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = set(skip_ids)
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the new printable text (possibly empty)."""
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new


def has_chat_specials(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in (USER, ASSISTANT, EOS))


def render_chat(messages: list[dict[str, str]], tokenizer: Tokenizer, bos_token_id: int | None) -> list[int]:
    """Token ids of a conversation (roles system/user/assistant) ending with the assistant's turn to speak."""
    if has_chat_specials(tokenizer):
        text = ""
        for m in messages:
            if m["role"] == "system":
                text += m["content"]
            elif m["role"] == "user":
                text += USER + m["content"]
            elif m["role"] == "assistant":
                text += ASSISTANT + m["content"] + EOS
            else:
                raise ValueError(f"unknown chat role {m['role']!r} (expected system, user or assistant)")
        text += ASSISTANT
    else:
        parts = []
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {m['role']!r} (expected system, user or assistant)")
            parts.append(m["content"] if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}")
        text = "\n\n".join(parts + ["Assistant:"])
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
        ids = [bos_token_id] + ids
    return ids


def stop_ids(tokenizer: Tokenizer, eos_token_id: int | None) -> list[int]:
    ids = {eos_token_id} if eos_token_id is not None else set()
    if tokenizer.token_to_id(EOS) is not None:
        ids.add(tokenizer.token_to_id(EOS))
    return sorted(ids)


def chat_turn(
    model: nn.Module,
    tokenizer: Tokenizer,
    messages: list[dict[str, str]],
    out: TextIO,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int | None = None,
    speculative: bool | None = None,
) -> tuple[str, GenerationOutput]:
    """Generate the assistant's reply to `messages`, writing it to `out` as it is produced; return (reply, raw)."""
    cfg = model.config
    stops = stop_ids(tokenizer, cfg.eos_token_id)
    streamer = TextStreamer(tokenizer, skip_ids=stops)

    def on_token(_sample: int, token_id: int) -> None:
        out.write(streamer.push(token_id))
        out.flush()

    prompt = render_chat(messages, tokenizer, cfg.bos_token_id)
    result = generate(
        model,
        [prompt],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=stops,
        seed=seed,
        stream=on_token,
        speculative=speculative,
    )
    out.write(streamer.flush())
    out.flush()
    return streamer.emitted, result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.chat", description="Chat with an exported DeepSeek-V3 model.")
    p.add_argument("--ckpt", type=Path, required=True, help="Hugging Face-format directory (model.hf export)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (else: interactive)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-speculative", action="store_true", help="decode without the MTP module's drafts")
    args = p.parse_args(argv)

    tok_file = args.ckpt / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(f"{tok_file} not found: export the model with a tokenizer (model.hf export --tokenizer)")
    tokenizer = Tokenizer.from_file(str(tok_file))
    model = import_hf(args.ckpt).eval()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    kw["speculative"] = False if args.no_speculative else None

    def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        reply, res = chat_turn(model, tokenizer, history, sys.stdout, seed=args.seed, **kw)
        history.append({"role": "assistant", "content": reply})
        drafts = f", {100 * res.acceptance_rate:.0f}% of MTP drafts accepted" if res.draft_tokens else ""
        print(
            f"\n[{res.num_generated_tokens} tokens, {res.decode_tokens_per_second:.1f} tok/s{drafts}]", file=sys.stderr
        )

    if args.prompt is not None:
        turn(args.prompt)
        return
    print("chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            text = input("\n> ")
        except EOFError:
            break
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        turn(text)


if __name__ == "__main__":
    main()
