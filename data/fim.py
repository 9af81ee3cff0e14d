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

Two levels (`data.fim.level`):

- document (above, DeepSeek-Coder's): the whole document is cut and rearranged before packing. With documents
  longer than the training window, the middle often lands in a later window than the `<｜fim▁begin｜>` that
  announces it, so the model rarely sees a whole example.
- window (bigcode's and Megatron's, done on token ids after tokenizing): the packed stream is built window by
  window (`WindowFim`, `seq_len` tokens each); every piece of a document that lies in one window is, with
  probability `rate`, rearranged inside that window (cut points uniform over its tokens). The three sentinels
  take room, so the window holds three fewer tokens of text, and the tokens that do not fit start the next window:
  nothing is truncated, unlike Megatron's version, and `undo_window_fim` recovers the plain token stream exactly.
  A training sample k (tokens [k T, k T + T + 1), data/pack.py) holds window k whole, so every FIM example is seen
  whole.

Sentinels and EOS are token ids here: document text is encoded with special-token parsing off (data/pack.py), so
no document can contain them and the layouts parse back unambiguously.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

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


def fim_ids(prefix: list[int], middle: list[int], suffix: list[int], mode: str, sentinels: tuple[int, int, int]):
    """The token layout of one FIM example from already-encoded pieces (sentinels = ids of begin, hole, end)."""
    begin, hole, end = sentinels
    if mode == "psm":
        return [begin, *prefix, hole, *suffix, end, *middle]
    if mode == "spm":
        return [begin, hole, *suffix, end, *prefix, *middle]
    raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")


def undo_fim_piece(piece: np.ndarray, sentinels: tuple[int, int, int]) -> np.ndarray:
    """The plain tokens of one FIM piece (starting with the begin sentinel): prefix + middle + suffix."""
    begin, hole, end = sentinels
    assert piece[0] == begin
    body = piece[1:]
    e = int(np.flatnonzero(body == end)[0])
    if body[0] == hole:  # SPM: <hole> suffix <end> prefix+middle
        return np.concatenate([body[e + 1 :], body[1:e]])
    h = int(np.flatnonzero(body == hole)[0])  # PSM: prefix <hole> suffix <end> middle
    return np.concatenate([body[:h], body[e + 1 :], body[h + 1 : e]])


class WindowFim:
    """Builds the packed stream window by window, FIM-transforming pieces inside each window (module docstring).

    `add(ids)` appends one document's plain ids (ending in EOS); `windows(final)` returns the windows that are now
    complete, each exactly `window` tokens (with `final=True` also the last, shorter one), and for each the offsets
    (within it) where a document starts. Deterministic in (seed, the plain stream)."""

    def __init__(
        self, window: int, eos: int, sentinels: tuple[int, int, int], rate: float, spm_rate: float, seed: int
    ) -> None:
        self.window, self.eos, self.sentinels = window, eos, sentinels
        self.rate, self.spm_rate = rate, spm_rate
        self.rng = np.random.default_rng(seed)
        self._plain: list[np.ndarray] = []
        self._buffered = 0
        self._at_doc_start = True
        self.modes = {"psm": 0, "spm": 0}

    def add(self, ids: np.ndarray) -> None:
        self._plain.append(np.asarray(ids, dtype=np.int64))
        self._buffered += len(ids)

    def _take_window(self, plain: np.ndarray, pos: int) -> tuple[np.ndarray, list[int], int]:
        out: list[np.ndarray] = []
        starts: list[int] = []
        budget, used = self.window, 0
        while budget > 0 and pos < len(plain):
            if plain[pos] == self.eos:
                out.append(plain[pos : pos + 1])
                pos, budget, used = pos + 1, budget - 1, used + 1
                self._at_doc_start = True
                continue
            if self._at_doc_start:
                starts.append(used)
                self._at_doc_start = False
            eos_at = np.flatnonzero(plain[pos : pos + budget] == self.eos)
            run = int(eos_at[0]) if eos_at.size else min(budget, len(plain) - pos)
            if budget > 3 and self.rng.random() < self.rate:
                take = min(run, budget - 3)
                piece = plain[pos : pos + take]
                i, j = sorted(self.rng.integers(0, take + 1, size=2))
                mode = "spm" if self.rng.random() < self.spm_rate else "psm"
                self.modes[mode] += 1
                out.append(np.asarray(fim_ids(piece[:i], piece[i:j], piece[j:], mode, self.sentinels), np.int64))
                budget, used = budget - take - 3, used + take + 3
            else:
                take = min(run, budget)
                out.append(plain[pos : pos + take])
                budget, used = budget - take, used + take
            pos += take
        return np.concatenate(out) if out else np.zeros(0, np.int64), starts, pos

    def windows(self, final: bool = False) -> list[tuple[np.ndarray, list[int]]]:
        """The windows complete so far (see the class docstring); the rest stays buffered."""
        if not self._plain:
            return []
        plain = np.concatenate(self._plain)
        done, pos = [], 0
        # a window needs at most `window` plain tokens; with that many buffered, its pieces' ends are known
        while len(plain) - pos >= self.window or (final and pos < len(plain)):
            win, starts, pos = self._take_window(plain, pos)
            done.append((win, starts))
        self._plain = [plain[pos:]] if pos < len(plain) else []
        self._buffered = len(plain) - pos
        return done


def undo_window_fim(stream: np.ndarray, window: int, eos: int, sentinels: tuple[int, int, int]) -> np.ndarray:
    """The plain token stream of a stream built by `WindowFim` (the exact inverse)."""
    begin = sentinels[0]
    out = []
    for w0 in range(0, len(stream), window):
        win = stream[w0 : w0 + window]
        pos = 0
        while pos < len(win):
            if win[pos] != begin:
                stop = np.flatnonzero(win[pos:] == begin)
                end = pos + int(stop[0]) if stop.size else len(win)
                out.append(win[pos:end])
                pos = end
                continue
            stop = np.flatnonzero(win[pos + 1 :] == eos)  # a FIM piece ends at its document's EOS or the window's end
            end = pos + 1 + int(stop[0]) if stop.size else len(win)
            out.append(undo_fim_piece(win[pos:end], sentinels))
            pos = end
    return np.concatenate(out) if out else np.zeros(0, np.int64)
