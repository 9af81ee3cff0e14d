"""The model configuration: DeepSeek-V3's published ``config.json`` as a typed dataclass.

Field names are those of the release (``hidden_size``, ``kv_lora_rank``, ``n_routed_experts``...), so a published
``config.json`` loads with :meth:`ModelConfig.from_hf` and :meth:`ModelConfig.to_hf` writes one that transformers'
``DeepseekV3Config`` reads. A handful of fields below the release's keys describe how WE train (MoE dispatch mode,
load-balancing strategy, MTP loss weight, torch.compile of the blocks); they are not part of the published file.

:meth:`ModelConfig.validate` rejects impossible combinations with a ``ValueError`` naming the field, before any
tensor is allocated (the model constructors call it first). The class is a valid Hydra structured config:
``OmegaConf.structured(ModelConfig)`` works (only ``Optional``, ``dict[str, Any]`` and plain types are used).
Named presets live in ``conf/model/<name>.yaml`` (flat mappings of these fields); :func:`load_preset` reads one
without Hydra.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# HF config keys that carry no information for this implementation (or are derived); from_hf ignores them silently.
_IGNORED_HF_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "use_cache",
    "pretraining_tp",
    "ep_size",
    "seq_aux",
    "output_router_logits",
}

_MOE_IMPLS = ("dropless", "capacity")
_MOE_BALANCES = ("aux_free", "aux_loss", "none")
_ROPE_TYPES = ("yarn", "default")


@dataclass
class ModelConfig:
    # ---- published DeepSeek-V3 config.json keys (defaults = DeepSeek-V3 671B) ----
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense-layer SwiGLU width
    moe_intermediate_size: int = 2048  # width of one routed (and of one shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA has no GQA: must equal num_attention_heads
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512  # compressed KV latent width d_c
    q_lora_rank: int | None = 1536  # compressed query width d_c'; None = plain q_proj (V2-Lite)
    qk_rope_head_dim: int = 64  # decoupled RoPE key/query width d_h^R
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"  # "noaux_tc": group-limited top-k, bias only for selection
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3  # the first k layers use a dense MLP instead of MoE
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True  # RoPE rotates adjacent pairs (x0,x1),(x2,x3)... as the release's weights expect
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # MTP depth D
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # ---- our training behaviour (not in the published file) ----
    moe_impl: str = "dropless"  # "dropless" | "capacity"
    capacity_factor: float = 1.25
    moe_balance: str = "aux_free"  # "aux_free" | "aux_loss" | "none"
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free bias update
    seq_aux_alpha: float = 0.0001  # complementary sequence-wise balance loss weight
    aux_loss_alpha: float = 0.01  # classic auxiliary loss weight (moe_balance="aux_loss")
    mtp_loss_weight: float = 0.3
    compile: bool = False  # torch.compile each decoder block at construction (DeepseekV3.compile_blocks)

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        """True when at least one layer (main or MTP) holds a DeepSeekMoE block."""
        return self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` (MTP layers count after the main ones) uses MoE; as in the release."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    # ------------------------------------------------------------------ checks
    def validate(self) -> ModelConfig:
        """Raise ValueError naming the offending field for any combination the model cannot build; return self."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "intermediate_size",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be a positive integer or None (no query compression)")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA needs it equal to num_attention_heads={self.num_attention_heads}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "RoPE rotates pairs: must be even")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"more dense layers than num_hidden_layers={self.num_hidden_layers}")
        if self.moe_layer_freq != 1:
            bad("moe_layer_freq", "only 1 (every layer after first_k_dense_replace is MoE) is supported")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be > 0")
        if not 0.0 <= self.attention_dropout < 1.0:
            bad("attention_dropout", "must be in [0, 1)")
        if self.n_routed_experts > 0 and (self.is_moe or self.num_nextn_predict_layers > 0):
            self._validate_moe(bad)
        self._validate_rope(bad)
        if self.moe_impl not in _MOE_IMPLS:
            bad("moe_impl", f"must be one of {_MOE_IMPLS}")
        if self.moe_balance not in _MOE_BALANCES:
            bad("moe_balance", f"must be one of {_MOE_BALANCES}")
        if self.capacity_factor <= 0:
            bad("capacity_factor", "must be > 0")
        for name in ("bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "mtp_loss_weight"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not isinstance(self.compile, bool):
            bad("compile", "must be true or false")
        return self

    def _validate_moe(self, bad) -> None:
        if self.moe_intermediate_size <= 0:
            bad("moe_intermediate_size", "must be a positive integer")
        if self.num_experts_per_tok <= 0:
            bad("num_experts_per_tok", "must be a positive integer")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"top-k larger than n_routed_experts={self.n_routed_experts}")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            bad("n_group", f"must be positive and divide n_routed_experts={self.n_routed_experts}")
        if not 0 < self.topk_group <= self.n_group:
            bad("topk_group", f"must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2 and self.n_group > 1:
            bad("n_group", "group scores sum the top-2 experts of each group: groups need >= 2 experts")
        if self.num_experts_per_tok > self.topk_group * per_group:
            bad("num_experts_per_tok", f"top-k exceeds the {self.topk_group * per_group} experts of topk_group groups")
        if self.scoring_func != "sigmoid":
            bad("scoring_func", "only DeepSeek-V3's 'sigmoid' affinities are implemented (V2's 'softmax' is not)")
        if self.topk_method not in ("noaux_tc", "greedy"):
            bad("topk_method", "must be 'noaux_tc' (group-limited) or 'greedy' (with n_group=1)")
        if self.topk_method == "greedy" and self.n_group != 1:
            bad("topk_method", "'greedy' routing means n_group=1 and topk_group=1")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", "must be > 0")

    def _validate_rope(self, bad) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in _ROPE_TYPES:
            bad("rope_scaling", f"type must be one of {_ROPE_TYPES}")
        if kind == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rs:
                    bad("rope_scaling", f"yarn needs the key {key!r}")
            if not rs["factor"] >= 1.0:
                bad("rope_scaling", "yarn factor must be >= 1")
            if rs["original_max_position_embeddings"] <= 0:
                bad("rope_scaling", "original_max_position_embeddings must be > 0")

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a published ``config.json`` dict (unknown keys ignored; ``overrides`` win), validated."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key in names:
                kw[key] = value
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:  # transformers' attribute name
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        # transformers >= 5 saves rope as "rope_parameters" = {"rope_type", "rope_theta", ...scaling keys}
        if "rope_parameters" in d and d["rope_parameters"] and "rope_scaling" not in d:
            rp = dict(d["rope_parameters"])
            if "rope_theta" in rp:
                kw["rope_theta"] = rp.pop("rope_theta")
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            kw["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        elif "rope_scaling" in d and d["rope_scaling"] is not None:
            rs = dict(d["rope_scaling"])
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs.pop("rope_type")
            kw["rope_scaling"] = None if rs.get("type") == "default" else rs
        elif "rope_scaling" in d:
            kw["rope_scaling"] = None
        if isinstance(kw.get("eos_token_id"), list):
            if not kw["eos_token_id"]:
                raise ValueError("config.json eos_token_id: empty list")
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("num_key_value_heads") is None and "num_attention_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        for key in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if key in kw and isinstance(kw[key], int):
                kw[key] = float(kw[key])
        if "rope_scaling" not in d and "rope_parameters" not in d:
            kw["rope_scaling"] = None  # a config.json without scaling means plain RoPE, not our V3 default
        kw.update(overrides)
        unknown = set(kw) - names
        if unknown:
            raise ValueError(f"ModelConfig.from_hf: unknown override field(s) {sorted(unknown)}")
        return cls(**kw).validate()

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers' DeepseekV3Config loads (our training-only fields left out)."""
        ours = {
            "moe_impl",
            "capacity_factor",
            "moe_balance",
            "bias_update_speed",
            "seq_aux_alpha",
            "mtp_loss_weight",
            "compile",
        }
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ours}
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16")
        return d

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 (as DeepSeek-V3 and transformers)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def load_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, conf/model/<name>.yaml (a flat mapping of ModelConfig fields), validated.

    Merged onto the structured schema, so a misspelt or mistyped key fails at once, naming the key.
    """
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}: no {path} (known: {known})")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), overrides)
    return OmegaConf.to_object(merged).validate()
