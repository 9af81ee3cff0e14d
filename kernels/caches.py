"""Quantize once, read many times: FP8 weights per optimizer step, and an input shared by several projections.

``WeightCache`` keeps the e4m3 copy of one weight with its block scales, and (made on the first backward) the
K-major transpose that Dgrad reads. With gradient accumulation over k micro-batches, the weight is quantized and
transposed once per optimizer step instead of k times (and once per evaluation, not per batch). An entry is
valid while the weight is the very Parameter the layer was built with, at the same ``_version``, address,
dtype and scale format: optimizer steps, ``load_state_dict`` and any in-place ``copy_`` bump ``_version``,
``module.to(...)`` moves the address (the cache holds the old storage, so no new one can reuse its address).
A weight that is *not* the layer's own Parameter is quantized afresh on every call: that is what FSDP2 hands a
layer during forward (an all-gathered tensor whose version counter it deliberately preserves while refilling
it, so a cache keyed on it would go stale after a step), and what a user gets after replacing the Parameter.
(Writing through ``param.data`` bypasses the version counter and is not seen; nothing in this repository does.)

``ActQuantCache`` is shared by the projections that read the same input: ``gate_proj``/``up_proj`` of an MLP,
``q_a_proj``/``kv_a_proj_with_mqa`` (or ``q_proj``) of MLA, and the gate and up GEMMs of the routed experts.
It holds the last input's quantization, keyed on the input tensor itself (a weak reference, its ``_version``,
shape, dtype and the format), and the token-major requantization Wgrad makes of it, keyed on the e4m3 tensor
the Functions saved. Entries die with their key tensor (a weak-reference callback), so nothing is kept alive
past the step: the forward entry goes when the layer's input is freed, the backward entry when autograd frees
the saved activation.

Shape legend: M tokens, K input features, N output features, E experts; ``Nt``/``Kt`` counts of 128-tiles.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

Quantized = tuple[torch.Tensor, torch.Tensor]  # (e4m3 values, scales)


class WeightCache:
    """The FP8 form of one Parameter (``owner``) and its K-major transpose, kept until the Parameter changes."""

    def __init__(self, owner: torch.Tensor) -> None:
        self._owner = weakref.ref(owner)
        self._key: tuple | None = None
        self._storage: torch.UntypedStorage | None = None  # held, so that no new storage can take its address
        self._q: Quantized | None = None
        self._qT: Quantized | None = None
        self.quantizations = 0  # how many times the weight was quantized (tests read it)
        self.transpositions = 0  # how many times its transpose was made

    def _key_of(self, w: torch.Tensor, fmt: str) -> tuple | None:
        if self._owner() is not w or not _cacheable(w):
            return None  # not the layer's own Parameter (e.g. FSDP2's all-gathered copy): never cached
        # results made under inference_mode are inference tensors, which autograd may not save: a separate key
        return (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), fmt, torch.is_inference_mode_enabled())

    def quantized(self, w: torch.Tensor, fmt: str, quant: Callable[[torch.Tensor, str], Quantized]) -> Quantized:
        """``quant(w, fmt)``, reused while ``w`` is unchanged."""
        key = self._key_of(w, fmt)
        if key is not None and key == self._key and self._q is not None:
            return self._q
        with torch.no_grad():
            q = quant(w, fmt)
        self.quantizations += 1
        cached = key is not None
        self._key, self._q, self._qT = key, (q if cached else None), None
        self._storage = w.untyped_storage() if cached else None
        return q

    def transposed(self, q: Quantized) -> Quantized:
        """The last two dims of ``q`` (values and block scales) swapped and made contiguous: the K-major operand
        of Dgrad (``dX = dY W``). Cached alongside ``q`` when ``q`` is the cached quantization."""
        if self._q is not None and q[0] is self._q[0]:
            if self._qT is None:
                self._qT = self._transpose(q)
            return self._qT
        return self._transpose(q)

    def _transpose(self, q: Quantized) -> Quantized:
        self.transpositions += 1
        w_q, w_s = q
        return w_q.transpose(-1, -2).contiguous(), w_s.transpose(-1, -2).contiguous()

    def __deepcopy__(self, memo: dict) -> WeightCache:
        owner = self._owner()
        return WeightCache(memo.get(id(owner), owner)) if owner is not None else WeightCache(torch.empty(0))


class _Entry:
    """One cached value, valid while ``key_tensor`` lives and keeps its version; ``on_free(ref)`` runs when it dies."""

    def __init__(self, key_tensor: torch.Tensor, extra: tuple, value: Any, on_free: Callable[[Any], None]) -> None:
        self.ref = weakref.ref(key_tensor, on_free)
        self.key = _entry_key(key_tensor, extra)
        self.value = value

    def matches(self, t: torch.Tensor, extra: tuple) -> bool:
        return self.ref() is t and self.key == _entry_key(t, extra)


def _entry_key(t: torch.Tensor, extra: tuple) -> tuple:
    return (t._version, tuple(t.shape), t.dtype, torch.is_inference_mode_enabled(), *extra)


def _cacheable(t: torch.Tensor) -> bool:
    return not t.is_inference()  # inference-mode tensors have no version counter


class ActQuantCache:
    """The last input's 1x128 quantization (forward) and token-major requantization (Wgrad), shared by siblings."""

    def __init__(self) -> None:
        self._fwd: _Entry | None = None
        self._wgrad: _Entry | None = None
        self.quantizations = 0  # forward quantizations actually computed (tests read it)
        self.requantizations = 0  # Wgrad requantizations actually computed

    def _drop_fwd(self, ref: Any) -> None:
        if self._fwd is not None and self._fwd.ref is ref:  # a newer entry stays
            self._fwd = None

    def _drop_wgrad(self, ref: Any) -> None:
        if self._wgrad is not None and self._wgrad.ref is ref:
            self._wgrad = None

    def quantized(self, x: torch.Tensor, fmt: str, quant: Callable[[torch.Tensor, str], Quantized]) -> Quantized:
        """``quant(x, fmt)`` of the layer input ``x``, keyed on ``x`` itself: pass the caller's tensor, not a view
        made for the call (each call's view would be a new key)."""
        if self._fwd is not None and self._fwd.matches(x, (fmt,)):
            return self._fwd.value
        with torch.no_grad():
            q = quant(x, fmt)
        self.quantizations += 1
        self._fwd = _Entry(x, (fmt,), q, self._drop_fwd) if _cacheable(x) else None
        return q

    def requantized(
        self, q: Quantized, fmt: str, quant_t: Callable[[torch.Tensor, torch.Tensor, str], Quantized]
    ) -> Quantized:
        """``quant_t(x_q, x_s, fmt)``: the saved activation requantized along tokens, once for all its readers."""
        x_q, x_s = q
        if self._wgrad is not None and self._wgrad.matches(x_q, (fmt,)):
            return self._wgrad.value
        with torch.no_grad():
            qt = quant_t(x_q, x_s, fmt)
        self.requantizations += 1
        self._wgrad = _Entry(x_q, (fmt,), qt, self._drop_wgrad) if _cacheable(x_q) else None
        return qt

    def __deepcopy__(self, memo: dict) -> ActQuantCache:
        return ActQuantCache()
