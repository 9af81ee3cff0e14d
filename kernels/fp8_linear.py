"""FP8 training of linear layers and MoE experts: Fprop, Dgrad and Wgrad all on e4m3, as in DeepSeek-V3.

How FP8 training works here (report section 3.3). A linear layer ``Y = X W^T`` costs three GEMMs per step:

    Fprop  Y  = X  @ W^T     X: 1x128 tiles along K     W: 128x128 blocks
    Dgrad  dX = dY @ W       dY: 1x128 tiles along N    W: the same blocks, transposed (no requantization)
    Wgrad  dW = dY^T @ X     dY and X: 128x1 tiles, i.e. along the tokens that Wgrad sums over

All six GEMM inputs are e4m3, each tile with its own online max-abs scale, and every GEMM accumulates in
FP32 with promotion every 128 of K (``kernels/fp8_gemm.py``). Forward saves the *quantized* activation
(1 byte per element plus one scale per 128) instead of the high-precision one; Wgrad dequantizes it,
and requantizes it along tokens ("dequantize, transpose, re-quantize", as DeepSeek-V3 describes its
backward). The parameter stays an FP32 master weight (or whatever dtype the model keeps); its FP8 form and the
transpose Dgrad reads are made once per optimizer step, and an input read by two projections (gate/up,
q_a/kv_a) is quantized once (``kernels/caches.py``). Each tensor class (activations, weights, gradients) has
its scale format, fp32 or ue8m0 (``kernels/formats.py``).

Precision of the outputs. The GEMMs write their output (and dX) in ``compute_dtype``: under autocast (the
trainer's ``precision=fp8`` runs in BF16 autocast) that is BF16, what ``nn.Linear`` gives in the BF16 run and
what DeepSeek-V3's FP8 GEMMs output; without autocast, the input's dtype. dW is computed in FP32 and returned
in the parameter's dtype (DeepSeek-V3 keeps weight gradients in FP32).

Under ``backend="torch"`` the same Functions run on the references of ``kernels/reference.py``: identical
quantized bits, FP32 accumulation in a different order.

Public API: ``fp8_linear``, ``FP8Linear``, ``fp8_grouped_mm`` (drop-in for ``model.moe.grouped_mm``),
``FP8GroupedMM`` (the callable ``convert_to_fp8`` installs on ``RoutedExperts``), ``convert_to_fp8``,
``fp8_stats``, ``check_fp8_dims``, ``ScaleStats``, ``compute_dtype``.

Which GEMMs (``convert_to_fp8``, ``precision=fp8``). DeepSeek-V3 runs every GEMM in FP8 except the embedding,
the output head, the MoE gating, the normalizations and the attention core (softmax(QK^T)V). For our model:

- attention projections: ``q_a_proj``, ``q_b_proj`` / ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``;
- every MLP: the dense first layers, the shared experts (``gate_proj``, ``up_proj``, ``down_proj``);
- the MTP modules' ``eh_proj`` (a plain linear GEMM, not in the exception list);
- the routed experts: their ``grouped_mm`` attribute becomes an ``FP8GroupedMM``.

``backend="torchao"`` puts torchao's float8 training (row-wise scales) on the same linear layers instead, for
comparison (``kernels/comparison.py``).

``nn.Linear`` modules with those attribute names become ``FP8Linear`` sharing the same Parameter objects, so
parameter names, state_dict keys and an optimizer built beforehand are unchanged: checkpoints move freely
between precisions. Everything else (``embed_tokens``, ``lm_head``, the router ``gate``, norms) is untouched.
Shapes need not be multiples of 128: the kernels zero-pad the last tile (``check_fp8_dims`` lists the padded
GEMMs of a config and how much of their tiles is padding).

Shape legend: M tokens, K input features, N output features, E experts, E1 = E + 1 offsets,
``Kt``/``Nt``/``Mt`` counts of 128-tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import reference as ref
from kernels.backend import resolve_backend
from kernels.caches import ActQuantCache, WeightCache
from kernels.comparison import convert_linears_torchao
from kernels.formats import ScaleFormats


@dataclass(frozen=True)
class _Ops:
    act_quant: Any  # (x_MK, fmt) -> (q_MK, s_MKt)
    act_quant_t: Any  # (x_MK, s_MKt | None, fmt) -> (q_KM, s_KMt)
    weight_quant: Any  # (w_[E]NK, fmt) -> (q, s)
    gemm_nt: Any  # (a_q, a_s, b_q, b_s, *, b_blockwise, out_dtype) -> c
    grouped_gemm_nt: Any  # (a_q, a_s, b_q_ENK, b_s, offsets_E1, out_dtype) -> c
    grouped_wgrad: Any  # (aT_q, aT_s, bT_q, bT_s, offsets_E1) -> dW_ENK fp32


def ops_for(backend: str) -> _Ops:
    """The kernel set of a resolved backend; the Triton modules are imported here, never at package import."""
    if backend == "torch":
        return _Ops(
            ref.act_quant_ref,
            ref.act_quant_t_ref,
            ref.weight_quant_ref,
            ref.fp8_gemm_nt_ref,
            ref.grouped_gemm_nt_ref,
            ref.grouped_wgrad_ref,
        )
    assert backend == "triton", backend
    # deferred: these modules import Triton, needed only by the triton backend
    from kernels import fp8_gemm, grouped_gemm, quant

    return _Ops(
        quant.act_quant,
        quant.act_quant_t,
        quant.weight_quant,
        fp8_gemm.fp8_gemm_nt,
        grouped_gemm.grouped_fp8_gemm_nt,
        grouped_gemm.grouped_fp8_wgrad,
    )


class ScaleStats:
    """The last activation scales a module saw, summarized on the device as (min, max, mean), detached.

    Recording costs three small reductions and no host sync; ``fp8_stats`` reads them all at once.
    """

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def record(self, s: torch.Tensor) -> None:
        if s.numel():
            s = ref.decode_scale(s.detach())
            self.last = torch.stack([s.min(), s.max(), s.mean()])


def as_formats(scale_formats: ScaleFormats | str) -> ScaleFormats:
    """``ScaleFormats`` from itself or one format name for every tensor class."""
    return scale_formats if isinstance(scale_formats, ScaleFormats) else ScaleFormats.all(scale_formats)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of an FP8 layer's output (and dX): autocast's when autocast is on, as ``nn.Linear`` would give under
    it (BF16 under ``precision=fp8``, like DeepSeek-V3's BF16 GEMM outputs), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@dataclass(frozen=True)
class _Call:
    """What one FP8 GEMM call needs besides tensors (a non-tensor argument of the autograd Functions)."""

    ops: _Ops
    formats: ScaleFormats
    out_dtype: torch.dtype
    weight_cache: WeightCache | None
    act_cache: ActQuantCache | None

    def requantize_t(self, x_q: torch.Tensor, x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wgrad's token-major operand from the saved e4m3 activation (shared by the input's readers)."""
        if self.act_cache is None:
            return self.ops.act_quant_t(x_q, x_s, self.formats.act)
        return self.act_cache.requantized((x_q, x_s), self.formats.act, self.ops.act_quant_t)

    def transpose_w(self, w_q: torch.Tensor, w_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dgrad's K-major W^T: Hopper's FP8 MMA wants both operands K-major (cached with the weight)."""
        if self.weight_cache is None:
            return w_q.transpose(-1, -2).contiguous(), w_s.transpose(-1, -2).contiguous()
        return self.weight_cache.transposed((w_q, w_s))


def _quantize_inputs(
    call: _Call, x: torch.Tensor, weight: torch.Tensor, stats: ScaleStats | None
) -> tuple[torch.Tensor, ...]:
    """(x_q, x_s, w_q, w_s) through the caches; x is quantized as [M, K], keyed on the caller's tensor."""

    def act_quant(t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return call.ops.act_quant(t.reshape(-1, t.shape[-1]), fmt)

    with torch.autocast(x.device.type, enabled=False):
        fa, fw = call.formats.act, call.formats.weight
        x_q, x_s = call.act_cache.quantized(x, fa, act_quant) if call.act_cache else act_quant(x, fa)
        w_q, w_s = (
            call.weight_cache.quantized(weight, fw, call.ops.weight_quant)
            if call.weight_cache
            else call.ops.weight_quant(weight, fw)
        )
    if stats is not None:
        stats.record(x_s)
    return x_q, x_s, w_q, w_s


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_q, x_s, w_q, w_s, call: _Call):
        with torch.autocast(x.device.type, enabled=False):  # our GEMMs choose their own precision
            y_MN = call.ops.gemm_nt(x_q, x_s, w_q, w_s, b_blockwise=True, out_dtype=call.out_dtype)
            if bias is not None:
                y_MN = y_MN + bias.to(y_MN.dtype)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)  # the FP8 activation, not x
        ctx.meta = (call, x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y_MN.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        call, x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        ops, fmt = call.ops, call.formats
        dy_MN = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # Dgrad: dY (1x128 along N) @ W, the forward's blocks transposed
                dy_q, dy_s = ops.act_quant(dy_MN, fmt.grad)
                w_qT, w_sT = call.transpose_w(w_q, w_s)
                dx = ops.gemm_nt(dy_q, dy_s, w_qT, w_sT, b_blockwise=True, out_dtype=call.out_dtype)
                dx = dx.to(x_dtype).view(x_shape)
            if ctx.needs_input_grad[1]:  # Wgrad: dY^T @ X, both quantized along tokens
                dyT_q, dyT_s = ops.act_quant_t(dy_MN, None, fmt.grad)
                xT_q, xT_s = call.requantize_t(x_q, x_s)
                dw = ops.gemm_nt(dyT_q, dyT_s, xT_q, xT_s, b_blockwise=False, out_dtype=torch.float32).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[2]:
                db = dy_MN.float().sum(0).to(b_dtype)
        return dx, dw, db, None, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    scale_formats: ScaleFormats | str = "fp32",
    stats: ScaleStats | None = None,
    weight_cache: WeightCache | None = None,
    act_cache: ActQuantCache | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with Fprop, Dgrad and Wgrad in FP8 (``x``: ``[..., K]``, ``weight``: ``[N, K]``).

    The output (and dX) is in ``compute_dtype(x)``: autocast's dtype under autocast, else x's; dW in the weight's.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {weight.shape[-1]} ({tuple(weight.shape)})")
    call = _Call(
        ops_for(resolve_backend(backend)), as_formats(scale_formats), compute_dtype(x), weight_cache, act_cache
    )
    quantized = _quantize_inputs(call, x, weight, stats)
    return _FP8LinearFn.apply(x, weight, bias, *quantized, call)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8; same parameters and state_dict keys as ``nn.Linear``.

    It keeps its FP8 weight per optimizer step (``weight_cache``) and may share its input's quantization with
    the sibling projections that read the same input (``act_cache``, set by ``convert_to_fp8``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        scale_formats: ScaleFormats | str = "fp32",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = resolve_backend(backend)
        self.scale_formats = as_formats(scale_formats)
        self.scale_stats = ScaleStats()
        self.weight_cache = WeightCache(self.weight)
        self.act_cache = ActQuantCache()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, backend: str = "auto", scale_formats: ScaleFormats | str = "fp32"
    ) -> FP8Linear:
        """Wrap an existing ``nn.Linear``, sharing its Parameter objects (optimizers built before keep working)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            backend=backend,
            scale_formats=scale_formats,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.weight_cache = WeightCache(new.weight)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x,
            self.weight,
            self.bias,
            backend=self.backend,
            scale_formats=self.scale_formats,
            stats=self.scale_stats,
            weight_cache=self.weight_cache,
            act_cache=self.act_cache,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}, scale_format={self.scale_formats}"


class _FP8GroupedMMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, offsets_E1, x_q, x_s, w_q, w_s, call: _Call):
        with torch.autocast(x_MK.device.type, enabled=False):
            y_MN = call.ops.grouped_gemm_nt(x_q, x_s, w_q, w_s, offsets_E1, call.out_dtype)
        ctx.save_for_backward(x_q, x_s, w_q, w_s, offsets_E1)
        ctx.meta = (call, x_MK.dtype, w_ENK.dtype)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        x_q, x_s, w_q, w_s, offsets_E1 = ctx.saved_tensors
        call, x_dtype, w_dtype = ctx.meta
        ops, fmt = call.ops, call.formats
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        with torch.autocast(dy_MN.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # Dgrad per expert: dY[rows_e] @ W[e]
                dy_q, dy_s = ops.act_quant(dy_MN, fmt.grad)
                w_qT, w_sT = call.transpose_w(w_q, w_s)
                dx = ops.grouped_gemm_nt(dy_q, dy_s, w_qT, w_sT, offsets_E1, call.out_dtype).to(x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad per expert: dY[rows_e]^T @ X[rows_e], tiles along tokens
                dyT_q, dyT_s = ops.act_quant_t(dy_MN, None, fmt.grad)
                xT_q, xT_s = call.requantize_t(x_q, x_s)
                dw = ops.grouped_wgrad(dyT_q, dyT_s, xT_q, xT_s, offsets_E1).to(w_dtype)
        return dx, dw, None, None, None, None, None, None


def fp8_grouped_mm(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    backend: str = "auto",
    scale_formats: ScaleFormats | str = "fp32",
    stats: ScaleStats | None = None,
    weight_cache: WeightCache | None = None,
    act_cache: ActQuantCache | None = None,
) -> torch.Tensor:
    """FP8 drop-in for ``model.moe.grouped_mm``: ``[M, N]``, rows ``offsets[e]:offsets[e+1]`` times ``w[e]^T``."""
    if x_MK.dim() != 2 or w_ENK.dim() != 3 or x_MK.shape[1] != w_ENK.shape[2]:
        raise ValueError(f"expected x_MK [M, K] and w_ENK [E, N, K], got {tuple(x_MK.shape)}, {tuple(w_ENK.shape)}")
    call = _Call(
        ops_for(resolve_backend(backend)), as_formats(scale_formats), compute_dtype(x_MK), weight_cache, act_cache
    )
    quantized = _quantize_inputs(call, x_MK, w_ENK, stats)
    return _FP8GroupedMMFn.apply(x_MK, w_ENK, offsets_E1, *quantized, call)


class FP8GroupedMM:
    """Callable set as ``RoutedExperts.grouped_mm``; a plain object (no parameters, not a submodule).

    ``owners``: the experts' own stacked weights (gate, up, down), each of which gets a ``WeightCache``; the
    gate and up GEMMs read the same input and share its quantization.
    """

    def __init__(
        self, backend: str = "auto", scale_formats: ScaleFormats | str = "fp32", owners: tuple[torch.Tensor, ...] = ()
    ) -> None:
        self.backend = resolve_backend(backend)
        self.scale_formats = as_formats(scale_formats)
        self.scale_stats = ScaleStats()
        self.weight_caches = [WeightCache(w) for w in owners]
        self.act_cache = ActQuantCache()

    def _cache_of(self, w_ENK: torch.Tensor) -> WeightCache | None:
        return next((c for c in self.weight_caches if c._owner() is w_ENK), None)

    def __call__(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(
            x_MK,
            w_ENK,
            offsets_E1,
            backend=self.backend,
            scale_formats=self.scale_formats,
            stats=self.scale_stats,
            weight_cache=self._cache_of(w_ENK),
            act_cache=self.act_cache,
        )

    def __repr__(self) -> str:
        return f"FP8GroupedMM(backend={self.backend}, scale_format={self.scale_formats})"


FP8_LINEAR_NAMES = frozenset(
    {
        "q_a_proj",
        "q_b_proj",
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "eh_proj",
    }
)


# projections that read the same input tensor: one quantization serves both
SHARED_INPUT = (("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("q_proj", "kv_a_proj_with_mqa"))


def convert_to_fp8(model: nn.Module, backend: str = "auto", scale_formats: ScaleFormats | str = "fp32") -> nn.Module:
    """Make the FP8-eligible GEMMs of ``model`` run in FP8, in place; returns ``model``.

    ``backend="torchao"`` converts the linear layers with torchao's float8 training instead (the comparison
    backend, ``kernels/comparison.py``); the routed experts then run our kernels (``auto``).
    Idempotent: already converted modules are left as they are. Raises ValueError/RuntimeError for a
    backend that cannot run here (see ``kernels.backend.resolve_backend``) before touching the model.
    """
    resolved = resolve_backend(backend)
    formats = as_formats(scale_formats)
    if resolved == "torchao":
        convert_linears_torchao(model, FP8_LINEAR_NAMES)
        resolved = resolve_backend("auto")
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in FP8_LINEAR_NAMES and type(child) is nn.Linear:
                setattr(parent, child_name, FP8Linear.from_linear(child, resolved, formats))
        for a, b in SHARED_INPUT:
            first, second = getattr(parent, a, None), getattr(parent, b, None)
            if isinstance(first, FP8Linear) and isinstance(second, FP8Linear):
                second.act_cache = first.act_cache
        # RoutedExperts keeps its grouped GEMM as an instance attribute precisely so that it can be swapped
        if "grouped_mm" in vars(parent) and not isinstance(parent.grouped_mm, FP8GroupedMM):
            owners = tuple(parent.parameters(recurse=False))
            parent.grouped_mm = FP8GroupedMM(resolved, formats, owners)
    return model


def fp8_modules(model: nn.Module) -> dict[str, FP8Linear | FP8GroupedMM]:
    """Qualified name -> FP8 layer (``FP8Linear``, or the ``FP8GroupedMM`` of a routed-experts module)."""
    found: dict[str, FP8Linear | FP8GroupedMM] = {}
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            found[name] = module
        elif isinstance(getattr(module, "grouped_mm", None), FP8GroupedMM):
            found[f"{name}.grouped_mm"] = module.grouped_mm
    return found


def fp8_stats(model: nn.Module, per_module: bool = False) -> dict[str, float]:
    """Activation-scale statistics of the last forward, for logging: ``act_scale_{min,max,mean}``, ``modules``.

    The mean is over modules (each module's mean scale weighs the same). With ``per_module``, also
    ``<module name>/act_scale_{min,max,mean}``. Keys carry no prefix (the logger adds ``fp8/``).
    Empty dict when nothing is converted or ran yet.
    """
    out: dict[str, float] = {}
    names, lasts = [], []
    for name, layer in fp8_modules(model).items():
        if layer.scale_stats.last is not None:
            names.append(name)
            lasts.append(layer.scale_stats.last.float())
    # one host sync for all modules
    summaries = torch.stack([t.to(lasts[0].device) for t in lasts]).tolist() if lasts else []
    if per_module:
        for name, values in zip(names, summaries):
            for key, v in zip(("min", "max", "mean"), values):
                out[f"{name}/act_scale_{key}"] = v
    if summaries:
        out["act_scale_min"] = min(s[0] for s in summaries)
        out["act_scale_max"] = max(s[1] for s in summaries)
        out["act_scale_mean"] = sum(s[2] for s in summaries) / len(summaries)
        out["modules"] = float(len(summaries))
    return out


def fp8_gemm_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(N, K) of every GEMM ``convert_to_fp8`` puts in FP8, from a ``model.config.ModelConfig``-like object."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    shapes: dict[str, tuple[int, int]] = {}
    if cfg.q_lora_rank:
        shapes["q_a_proj"] = (cfg.q_lora_rank, D)
        shapes["q_b_proj"] = (H * qk, cfg.q_lora_rank)
    else:
        shapes["q_proj"] = (H * qk, D)
    shapes["kv_a_proj_with_mqa"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
    shapes["kv_b_proj"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    shapes["o_proj"] = (D, H * cfg.v_head_dim)
    if cfg.first_k_dense_replace > 0:
        shapes["mlp.gate_proj/up_proj"] = (cfg.intermediate_size, D)
        shapes["mlp.down_proj"] = (D, cfg.intermediate_size)
    if cfg.first_k_dense_replace < cfg.num_hidden_layers or cfg.num_nextn_predict_layers:
        if cfg.n_shared_experts:
            F_shared = cfg.moe_intermediate_size * cfg.n_shared_experts
            shapes["shared_experts.gate_proj/up_proj"] = (F_shared, D)
            shapes["shared_experts.down_proj"] = (D, F_shared)
        shapes["experts.gate_proj/up_proj"] = (cfg.moe_intermediate_size, D)
        shapes["experts.down_proj"] = (D, cfg.moe_intermediate_size)
    if cfg.num_nextn_predict_layers:
        shapes["eh_proj"] = (D, 2 * D)
    return shapes


def check_fp8_dims(cfg: Any) -> list[str]:
    """Check a model config for the FP8 path; returns one note per GEMM whose N or K is zero-padded.

    The kernels tile N and K by 128 and pad the last tile with zeros, so every positive size works and nothing
    is refused for not being a multiple of 128; the notes say how much of the tiles is padding (wasted work
    on a GPU, e.g. 50% for a 64-wide dimension). Raises ValueError for a non-positive dimension.
    """
    notes = []
    for name, (N, K) in fp8_gemm_shapes(cfg).items():
        if N < 1 or K < 1:
            raise ValueError(f"FP8 GEMM {name} has shape (N={N}, K={K}): dimensions must be positive")
        padded = [f"{d}={v} -> {-(-v // ref.TILE) * ref.TILE}" for d, v in (("N", N), ("K", K)) if v % ref.TILE]
        if padded:
            used = N * K / ((-(-N // ref.TILE) * ref.TILE) * (-(-K // ref.TILE) * ref.TILE))
            notes.append(f"{name}: {', '.join(padded)} (tiles {used:.0%} useful)")
    return notes
