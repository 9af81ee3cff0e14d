"""A deterministic synthetic corpus (Python functions and prose) for end-to-end tests.

The default corpus is the code installed on the machine, which differs between machines; golden-curve and resume
tests need the same bytes everywhere, so they generate these from a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = [
    "model",
    "expert",
    "token",
    "layer",
    "router",
    "cache",
    "latent",
    "query",
    "value",
    "key",
    "batch",
    "shard",
    "gradient",
    "loss",
    "step",
    "data",
    "train",
    "check",
    "sample",
    "value",
    "number",
    "result",
    "list",
    "index",
    "count",
    "total",
    "weight",
    "scale",
    "block",
    "tile",
    "compute",
    "memory",
]


def _function(rng: random.Random, i: int) -> str:
    name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{i}"
    args = rng.sample(_WORDS, 2)
    body = []
    for _ in range(rng.randint(2, 6)):
        a, b = rng.choice(args), rng.randint(1, 99)
        op = rng.choice(["+", "-", "*"])
        body.append(f"    {a} = {a} {op} {b}")
    cond = f"    if {args[0]} > {rng.randint(0, 50)}:\n        return {args[0]}\n"
    doc = f'    """Return the {rng.choice(_WORDS)} of {args[0]} and {args[1]}."""\n'
    return f"def {name}({args[0]}, {args[1]}):\n{doc}" + "\n".join(body) + f"\n{cond}    return {args[1]}\n"


def _prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(4, 10)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 12))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def write_corpus(path: Path, n_docs: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            if i % 3:
                text = "\n\n".join(_function(rng, i * 10 + k) for k in range(rng.randint(2, 5)))
                f.write(json.dumps({"text": text, "path": f"pkg/mod_{i}.py"}) + "\n")
            else:
                f.write(json.dumps({"text": _prose(rng), "path": f"docs/page_{i}.md"}) + "\n")
    return path
