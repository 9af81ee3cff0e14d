"""FP8 training of linear layers and MoE experts: Fprop, Dgrad and Wgrad all on e4m3, as in DeepSeek-V3.

How FP8 training works here (report section 3.3). A linear layer ``Y = X W^T`` costs three GEMMs per step:

    Fprop  Y  = X  @ W^T     X: 1x128 tiles along K     W: 128x128 blocks
    Dgrad  dX = dY @ W       dY: 1x128 tiles along N    W: the same blocks, transposed (no requantization)
    Wgrad  dW = dY^T @ X     dY and X: 128x1 tiles, i.e. along the tokens that Wgrad sums over

All six GEMM inputs are e4m3, each tile with its own online max-abs scale, and every GEMM accumulates in
FP32 with promotion every 128 of K (``kernels/fp8_gemm.py``). Forward saves the *quantized* activation
(1 byte per element plus one fp32 scale per 128) instead of the high-precision one; Wgrad dequantizes it,
and requantizes it along tokens ("dequantize, transpose, re-quantize", as DeepSeek-V3 describes its
backward). The parameter stays an FP32 master weight (or whatever dtype the model keeps), quantized afresh
each step; the gradient comes back in the parameter's dtype; outputs and dX in the input's dtype.

Under ``backend="torch"`` the same Functions run on the references of ``kernels/reference.py``: identical
quantized bits, FP32 accumulation in a different order.

Public API: ``fp8_linear``, ``FP8Linear``, ``fp8_grouped_mm`` (drop-in for ``model.moe.grouped_mm``),
``FP8GroupedMM`` (the callable ``convert_to_fp8`` installs on ``RoutedExperts``), ``convert_to_fp8``,
``fp8_stats``, ``check_fp8_dims``, ``ScaleStats``.

Which GEMMs (``convert_to_fp8``, ``precision=fp8``). DeepSeek-V3 runs every GEMM in FP8 except the embedding,
the output head, the MoE gating, the normalizations and the attention core (softmax(QK^T)V). For our model:

- attention projections: ``q_a_proj``, ``q_b_proj`` / ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``;
- every MLP: the dense first layers, the shared experts (``gate_proj``, ``up_proj``, ``down_proj``);
- the MTP modules' ``eh_proj`` (a plain linear GEMM, not in the exception list);
- the routed experts: their ``grouped_mm`` attribute becomes an ``FP8GroupedMM``.

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


@dataclass(frozen=True)
class _Ops:
    act_quant: Any  # (x_MK, pow2) -> (q_MK, s_MKt)
    act_quant_t: Any  # (x_MK, s_MKt | None, pow2) -> (q_KM, s_KMt)
    weight_quant: Any  # (w_[E]NK, pow2) -> (q, s)
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
            s = s.detach()
            self.last = torch.stack([s.min(), s.max(), s.mean()])


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, backend: str, pow2: bool, stats: ScaleStats | None):
        with torch.autocast(x.device.type, enabled=False):  # our GEMMs choose their own precision
            return _FP8LinearFn._forward(ctx, x, weight, bias, backend, pow2, stats)

    @staticmethod
    def _forward(ctx, x, weight, bias, backend: str, pow2: bool, stats: ScaleStats | None):
        ops = ops_for(backend)
        x_MK = x.reshape(-1, x.shape[-1])
        x_q, x_s = ops.act_quant(x_MK, pow2)
        w_q, w_s = ops.weight_quant(weight, pow2)
        y_MN = ops.gemm_nt(x_q, x_s, w_q, w_s, b_blockwise=True, out_dtype=x.dtype)
        if bias is not None:
            y_MN = y_MN + bias.to(y_MN.dtype)
        if stats is not None:
            stats.record(x_s)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)  # the FP8 activation, not x
        ctx.meta = (ops, pow2, x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y_MN.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        ops, pow2, x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        dy_MN = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # Dgrad: dY (1x128 along N) @ W, the forward's blocks transposed
            dy_q, dy_s = ops.act_quant(dy_MN, pow2)
            # W^T made K-major (an N*K-byte copy): Hopper's FP8 MMA wants both operands K-major
            w_qT, w_sT = w_q.t().contiguous(), w_s.t().contiguous()
            dx = ops.gemm_nt(dy_q, dy_s, w_qT, w_sT, b_blockwise=True, out_dtype=x_dtype).view(x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad: dY^T @ X, both quantized along tokens
            dyT_q, dyT_s = ops.act_quant_t(dy_MN, None, pow2)
            xT_q, xT_s = ops.act_quant_t(x_q, x_s, pow2)
            dw = ops.gemm_nt(dyT_q, dyT_s, xT_q, xT_s, b_blockwise=False, out_dtype=torch.float32).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy_MN.float().sum(0).to(b_dtype)
        return dx, dw, db, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    pow2_scale: bool = False,
    stats: ScaleStats | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with Fprop, Dgrad and Wgrad in FP8 (``x``: ``[..., K]``, ``weight``: ``[N, K]``)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {weight.shape[-1]} ({tuple(weight.shape)})")
    return _FP8LinearFn.apply(x, weight, bias, resolve_backend(backend), pow2_scale, stats)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8; same parameters and state_dict keys as ``nn.Linear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        pow2_scale: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = resolve_backend(backend)
        self.pow2_scale = pow2_scale
        self.scale_stats = ScaleStats()

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", pow2_scale: bool = False) -> FP8Linear:
        """Wrap an existing ``nn.Linear``, sharing its Parameter objects (optimizers built before keep working)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            backend=backend,
            pow2_scale=pow2_scale,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x, self.weight, self.bias, backend=self.backend, pow2_scale=self.pow2_scale, stats=self.scale_stats
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}, pow2_scale={self.pow2_scale}"


class _FP8GroupedMMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, offsets_E1, backend: str, pow2: bool, stats: ScaleStats | None):
        with torch.autocast(x_MK.device.type, enabled=False):
            return _FP8GroupedMMFn._forward(ctx, x_MK, w_ENK, offsets_E1, backend, pow2, stats)

    @staticmethod
    def _forward(ctx, x_MK, w_ENK, offsets_E1, backend: str, pow2: bool, stats: ScaleStats | None):
        ops = ops_for(backend)
        x_q, x_s = ops.act_quant(x_MK, pow2)
        w_q, w_s = ops.weight_quant(w_ENK, pow2)
        y_MN = ops.grouped_gemm_nt(x_q, x_s, w_q, w_s, offsets_E1, x_MK.dtype)
        if stats is not None:
            stats.record(x_s)
        ctx.save_for_backward(x_q, x_s, w_q, w_s, offsets_E1)
        ctx.meta = (ops, pow2, x_MK.dtype, w_ENK.dtype)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        x_q, x_s, w_q, w_s, offsets_E1 = ctx.saved_tensors
        ops, pow2, x_dtype, w_dtype = ctx.meta
        dy_MN = dy_MN.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad per expert: dY[rows_e] @ W[e]
            dy_q, dy_s = ops.act_quant(dy_MN, pow2)
            w_qT, w_sT = w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()  # K-major, as above
            dx = ops.grouped_gemm_nt(dy_q, dy_s, w_qT, w_sT, offsets_E1, x_dtype)
        if ctx.needs_input_grad[1]:  # Wgrad per expert: dY[rows_e]^T @ X[rows_e], tiles along tokens
            dyT_q, dyT_s = ops.act_quant_t(dy_MN, None, pow2)
            xT_q, xT_s = ops.act_quant_t(x_q, x_s, pow2)
            dw = ops.grouped_wgrad(dyT_q, dyT_s, xT_q, xT_s, offsets_E1).to(w_dtype)
        return dx, dw, None, None, None, None


def fp8_grouped_mm(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    backend: str = "auto",
    pow2_scale: bool = False,
    stats: ScaleStats | None = None,
) -> torch.Tensor:
    """FP8 drop-in for ``model.moe.grouped_mm``: ``[M, N]``, rows ``offsets[e]:offsets[e+1]`` times ``w[e]^T``."""
    if x_MK.dim() != 2 or w_ENK.dim() != 3 or x_MK.shape[1] != w_ENK.shape[2]:
        raise ValueError(f"expected x_MK [M, K] and w_ENK [E, N, K], got {tuple(x_MK.shape)}, {tuple(w_ENK.shape)}")
    return _FP8GroupedMMFn.apply(x_MK, w_ENK, offsets_E1, resolve_backend(backend), pow2_scale, stats)


class FP8GroupedMM:
    """Callable set as ``RoutedExperts.grouped_mm``; a plain object (no parameters, not a submodule)."""

    def __init__(self, backend: str = "auto", pow2_scale: bool = False) -> None:
        self.backend = resolve_backend(backend)
        self.pow2_scale = pow2_scale
        self.scale_stats = ScaleStats()

    def __call__(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(
            x_MK, w_ENK, offsets_E1, backend=self.backend, pow2_scale=self.pow2_scale, stats=self.scale_stats
        )

    def __repr__(self) -> str:
        return f"FP8GroupedMM(backend={self.backend}, pow2_scale={self.pow2_scale})"


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


def convert_to_fp8(model: nn.Module, backend: str = "auto", pow2_scale: bool = False) -> nn.Module:
    """Make the FP8-eligible GEMMs of ``model`` run in FP8, in place; returns ``model``.

    Idempotent: already converted modules are left as they are. Raises ValueError/RuntimeError for a
    backend that cannot run here (see ``kernels.backend.resolve_backend``) before touching the model.
    """
    resolved = resolve_backend(backend)
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in FP8_LINEAR_NAMES and type(child) is nn.Linear:
                setattr(parent, child_name, FP8Linear.from_linear(child, resolved, pow2_scale))
        # RoutedExperts keeps its grouped GEMM as an instance attribute precisely so that it can be swapped
        if "grouped_mm" in vars(parent) and not isinstance(parent.grouped_mm, FP8GroupedMM):
            parent.grouped_mm = FP8GroupedMM(resolved, pow2_scale)
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
