"""Fill-In-the-Middle (FIM): teach a left-to-right model to complete a hole given the code on both sides.

Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle") showed that moving a random
middle span of a document to its end, with sentinel tokens marking the parts, teaches infilling at no cost to
ordinary left-to-right ability. DeepSeek-Coder trained with a FIM rate of 0.5 and DeepSeek-V3 with 0.1, both with
the Prefix-Suffix-Middle (PSM) layout at document level.

The transform, per code document, deterministic in (seed, document text):
1. with probability `rate` the document is transformed, otherwise left as is;
2. two cut points are drawn uniformly over the document's *characters* (character-level split, so a hole can start
   or end inside a token or a word); prefix = text[:i], middle = text[i:j], suffix = text[j:];
3. with probability `spm_rate` the SPM layout is used, otherwise PSM.

Token layouts (sentinels are single special tokens, see data/tokenizer.py; EOS is appended by the packer after every
document, transformed or not):

    PSM:  <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>
    SPM:  <｜fim▁begin｜> <｜fim▁hole｜> suffix <｜fim▁end｜> prefix middle <｜end▁of▁sentence｜>

PSM is DeepSeek-Coder's / DeepSeek-V3's layout. SPM is Bavarian et al.'s "SPM variant 2" (their Appendix D,
`[PRE, SUF] suffix [MID] prefix middle`, the variant they train with), spelled with DeepSeek's sentinels
(PRE = fim▁begin, SUF = fim▁hole, MID = fim▁end): prefix and middle are contiguous, so the model continues the
prefix naturally and the prefix can be tokenized as one piece with the middle. In both layouts the model learns to
produce the middle after `<｜fim▁end｜>`, and `undo_fim` recovers the original document exactly.

`fim_prompt(prefix, suffix, mode)` builds the inference prompt that eval uses: the layout up to the point where the
middle is generated.
"""

from __future__ import annotations

import hashlib
import random

from data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE

MODES = ("psm", "spm")


def fim_rng(seed: int, text: str) -> random.Random:
    """A generator seeded by (seed, document content): the same document gets the same transform anywhere."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, key=str(seed).encode()).digest()
    return random.Random(int.from_bytes(digest, "little"))


def split_document(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Character-level split at two uniform cut points: (prefix, middle, suffix), any of them possibly empty."""
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:i], text[i:j], text[j:]


def format_fim(prefix: str, middle: str, suffix: str, mode: str) -> str:
    """The training string of one FIM example (without the trailing EOS)."""
    if mode == "psm":
        return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}{middle}"
    if mode == "spm":
        return f"{FIM_BEGIN}{FIM_HOLE}{suffix}{FIM_END}{prefix}{middle}"
    raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")


def fim_prompt(prefix: str, suffix: str, mode: str = "psm") -> str:
    """The inference prompt for filling the hole between `prefix` and `suffix`; the model generates the middle."""
    if mode == "psm":
        return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"
    if mode == "spm":
        return f"{FIM_BEGIN}{FIM_HOLE}{suffix}{FIM_END}{prefix}"
    raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")


def apply_fim(text: str, seed: int, rate: float, spm_rate: float) -> tuple[str, str]:
    """(possibly transformed text, mode) with mode "" (untouched), "psm" or "spm"; deterministic in (seed, text)."""
    rng = fim_rng(seed, text)
    if rng.random() >= rate:
        return text, ""
    prefix, middle, suffix = split_document(text, rng)
    mode = "spm" if rng.random() < spm_rate else "psm"
    return format_fim(prefix, middle, suffix, mode), mode


def undo_fim(text: str) -> str:
    """The original document of a FIM training string (or `text` itself when it is not one)."""
    if not text.startswith(FIM_BEGIN):
        return text
    body = text[len(FIM_BEGIN) :]
    if body.startswith(FIM_HOLE):  # SPM: <hole> suffix <end> prefix+middle
        suffix, _, prefix_middle = body[len(FIM_HOLE) :].partition(FIM_END)
        return prefix_middle + suffix
    prefix, _, rest = body.partition(FIM_HOLE)  # PSM: prefix <hole> suffix <end> middle
    suffix, _, middle = rest.partition(FIM_END)
    return prefix + middle + suffix
