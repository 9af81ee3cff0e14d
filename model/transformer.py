"""The DeepSeek-V3 model: embeddings, decoder layers (MLA + dense MLP or DeepSeekMoE), head, and MTP modules.

    h = embed_tokens(t)
    for each layer:  h = h + MLA(RMSNorm(h));  h = h + FFN(RMSNorm(h))    FFN = MLP (first_k_dense_replace layers)
                                                                            or DeepseekMoE (the rest)
    logits = lm_head(RMSNorm(h))

Multi-Token Prediction (DeepSeek-V3 section 2.2). D sequential modules; module k (1..D) predicts the token k+1
steps ahead of each position, keeping the complete causal chain of predictions:

    h'_i^k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])     h^0 = the main model's final-normed hidden state
    h^k    = shared_head.norm(DecoderLayer_k(h'^k))    over positions i = 0 .. T-1-k
    P^k    = lm_head(h^k)        predicts t_{i+k+1}; Emb and lm_head are the main model's (shared)

The MTP loss is the mean over depths of each depth's cross-entropy; the total loss adds mtp_loss_weight times it.
The concat order [embedding ; hidden] and the normed hidden states passed from depth to depth are those of the
release's inference engines (vLLM, SGLang) and of Megatron-LM's MTP, so the release's MTP weights fit.
MTP runs in `forward` only when targets are given and no cache is passed; at inference `mtp_forward` runs the first
module on its own latent cache to draft tokens for speculative decoding (`model.speculative`).

Targets are already shifted: targets_BT[:, i] is the token after input_ids_BT[:, i] (ignore_index -100 where no
loss is wanted, e.g. SFT prompts). For MTP depth k the target of position i is targets_BT[:, i + k].

Losses: loss = ce + mtp_loss_weight * mtp + alpha * balance, balance summed over the MoE layers that ran (main
and MTP), alpha = seq_aux_alpha (moe_balance="aux_free") or aux_loss_alpha ("aux_loss").

Module and parameter names are those of the DeepSeek-V3 release (= transformers' DeepseekV3ForCausalLM), except
that MTP module k lives at `mtp.{k}` (the release stores it as `model.layers.{num_hidden_layers + k}`, with the
decoder-layer weights at the top level: our `mtp.{k}.layer.*`); `model.hf` maps the names.

Shape legend: B batch, T positions, S key positions, D hidden, V vocabulary, L MoE layers that ran, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.attention import MLA, build_attention_mask
from model.cache import LayerCache, MLACache
from model.config import ModelConfig
from model.moe import MLP, DeepseekMoE, MoEStats
from model.norm import RMSNorm
from model.rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits_BTV: Tensor
    loss: Tensor | None  # ce + mtp_loss_weight * mtp + alpha * balance; None without targets
    ce_loss: Tensor | None
    mtp_loss: Tensor | None  # mean over MTP depths (unweighted); None when MTP did not run
    balance_loss: Tensor  # unweighted, summed over the MoE layers that ran (0 for a dense model)
    expert_load_LE: Tensor  # tokens per expert, one row per MoE layer that ran, in `moe_layers()` order
    dropped: int  # token-slots dropped by capacity-mode MoE (0 when dropless)
    hidden_BTD: Tensor | None = None  # the main model's last hidden state after its final norm (MTP's input)


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model: lists every missing, unexpected and mis-shaped tensor."""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = DeepseekMoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x_BTD: Tensor,
        rope_cos_sin: tuple[Tensor, Tensor],
        mask_B1TS: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, MoEStats | None]:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope_cos_sin, mask_B1TS, cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, DeepseekMoE):
            out_BTD, stats = self.mlp(h_BTD)
            return x_BTD + out_BTD, stats
        return x_BTD + self.mlp(h_BTD), None


class SharedHead(nn.Module):
    """The MTP module's output norm; the head matrix itself is the main model's lm_head (shared)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = DecoderLayer(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)


class DeepseekV3Model(nn.Module):
    """The trunk (release prefix `model.`): embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = DeepseekV3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList([MTPModule(cfg, L + k) for k in range(cfg.num_nextn_predict_layers)])
        self.rotary_emb = RotaryEmbedding(cfg)
        self.init_weights()
        if cfg.compile:
            self.compile_blocks()

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the two halves of every decoder block in place (attention and FFN, main and MTP layers).

        Called at construction when `config.compile` is set, i.e. before any FSDP or pipeline wrapping (as torchtitan
        orders it); parameter names stay unchanged. Per module rather than per whole model so that one compiled graph
        serves every layer; per half rather than per block because dynamo caches graphs per function, and a
        block's variants (dense or MoE x training, evaluation, prefill, decode) would overflow its recompile limit.
        Shapes are dynamic from the first compile: decoding changes them every step (rows leave, the cache grows,
        verification feeds two tokens). `compile_kwargs` go to `torch.compile` (tests: backend="eager", fullgraph)."""
        for layer in list(self.model.layers) + [m.layer for m in self.mtp]:
            layer.self_attn.compile(**{"dynamic": True, **compile_kwargs})
            layer.mlp.compile(**{"dynamic": True, **compile_kwargs})

    # ------------------------------------------------------------------ construction helpers
    @torch.no_grad()
    def init_weights(self) -> None:
        """DeepSeek/transformers init: every matrix and embedding ~ N(0, initializer_range), norms 1, biases and the
        router's selection bias 0. Safe to call after `to_empty()` on a model built on the meta device."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
                continue
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=std)
            for name, b in module.named_buffers(recurse=False):
                if name == "e_score_correction_bias":
                    nn.init.zeros_(b)

    def moe_layers(self) -> Iterator[DeepseekMoE]:
        """The DeepseekMoE blocks in order: main layers, then MTP modules (the rows of expert_load_LE)."""
        for layer in list(self.model.layers) + [m.layer for m in self.mtp]:
            if isinstance(layer.mlp, DeepseekMoE):
                yield layer.mlp

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids_BT: Tensor,
        targets_BT: Tensor | None = None,
        *,
        position_ids_BT: Tensor | None = None,
        attention_mask_BT: Tensor | None = None,
        cache: MLACache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """attention_mask_BT: True for real tokens over ALL key positions (cached + new), for left padding.
        position_ids_BT default: count of real tokens before each position (0.. without a mask).
        logits_to_keep > 0: logits of the last that many positions only (a prefill needs just the last); not with
        targets."""
        if logits_to_keep and targets_BT is not None:
            raise ValueError("logits_to_keep is for inference: the losses need the logits of every position")
        B, T = input_ids_BT.shape
        past = cache.seq_len if cache is not None else 0
        device = input_ids_BT.device
        if position_ids_BT is None:
            if attention_mask_BT is not None:
                position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids_BT = torch.arange(past, past + T, device=device)[None].expand(B, T)
        mask_B1TS = build_attention_mask(attention_mask_BT, T, past, device)
        rope = self.rotary_emb(position_ids_BT)

        h_BTD = self.model.embed_tokens(input_ids_BT)
        stats: list[MoEStats] = []
        for i, layer in enumerate(self.model.layers):
            h_BTD, s = layer(h_BTD, rope, mask_B1TS, cache.layer(i) if cache is not None else None)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.advance(T)
        h_BTD = self.model.norm(h_BTD)
        logits_BTV = self.lm_head(h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD)

        ce_loss = mtp_loss = loss = None
        if targets_BT is not None:
            ce_loss = cross_entropy(logits_BTV, targets_BT)
            if cache is None and len(self.mtp) > 0:
                mtp_all = self.mtp_logits(h_BTD, input_ids_BT, rope, mask_B1TS, stats)
                if mtp_all:  # mean over depths; depth k's targets are targets_BT shifted by k
                    depth_losses = [cross_entropy(lg, targets_BT[:, k:]) for k, lg in enumerate(mtp_all, start=1)]
                    mtp_loss = torch.stack(depth_losses).mean()
        zero = logits_BTV.new_zeros((), dtype=torch.float32)
        balance = torch.stack([s.balance_loss for s in stats]).sum() if stats else zero
        if targets_BT is not None:
            loss = ce_loss
            if mtp_loss is not None:
                loss = loss + self.config.mtp_loss_weight * mtp_loss
            alpha = {"aux_free": self.config.seq_aux_alpha, "aux_loss": self.config.aux_loss_alpha}.get(
                self.config.moe_balance, 0.0
            )
            if stats and alpha > 0:
                loss = loss + alpha * balance
        E = self.config.n_routed_experts
        load_LE = torch.stack([s.load_E for s in stats]) if stats else torch.zeros(0, E, device=device)
        return ModelOutput(
            logits_BTV=logits_BTV,
            loss=loss,
            ce_loss=ce_loss,
            mtp_loss=mtp_loss,
            balance_loss=balance,
            expert_load_LE=load_LE,
            dropped=sum(int(s.dropped) for s in stats),
            hidden_BTD=h_BTD,
        )

    def mtp_logits(
        self,
        h_BTD: Tensor,
        input_ids_BT: Tensor,
        rope: tuple[Tensor, Tensor],
        mask_B1TS: Tensor | None = None,
        stats: list[MoEStats] | None = None,
    ) -> list[Tensor]:
        """Logits of each MTP depth k = 1..D: [B, T-k, V], row i predicting the token k+1 after position i.

        h_BTD is the main model's last hidden state after its final norm; MoE stats are appended to `stats`.
        """
        T = input_ids_BT.shape[1]
        out = []
        h_prev = h_BTD
        for k, mtp in enumerate(self.mtp, start=1):
            n = T - k  # positions that still have a token k steps ahead
            if n <= 0:
                break
            emb_BnD = self.model.embed_tokens(input_ids_BT[:, k:])
            x_BnD = mtp.eh_proj(torch.cat([mtp.enorm(emb_BnD), mtp.hnorm(h_prev[:, :n])], dim=-1))
            rope_n = (rope[0][:, :n], rope[1][:, :n])
            mask_n = None if mask_B1TS is None else mask_B1TS[:, :, :n, :n]
            y_BnD, s = mtp.layer(x_BnD, rope_n, mask_n)
            if s is not None and stats is not None:
                stats.append(s)
            h_prev = mtp.shared_head.norm(y_BnD)
            out.append(self.lm_head(h_prev))
        return out

    def mtp_forward(
        self,
        h_BTD: Tensor,
        next_ids_BT: Tensor,
        *,
        position_ids_BT: Tensor,
        attention_mask_BT: Tensor | None = None,
        cache: MLACache | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Logits [B, T, V] of the first MTP module at inference (the draft of speculative decoding).

        Position t combines the main model's final-normed hidden state h_BTD[:, t] with the embedding of the token
        after it, next_ids_BT[:, t], exactly as in training, and predicts the token after that one. position_ids_BT
        and attention_mask_BT (over cached + new positions) are those of the main model's positions t; `cache` is an
        MLACache of the MTP layers (`MLACache.for_model(model, ..., mtp=True)`), advanced by T here.
        logits_to_keep > 0: only the last that many positions' logits ([B, logits_to_keep, V]; 0 = all).
        """
        mtp = self.mtp[0]
        T = next_ids_BT.shape[1]
        past = cache.seq_len if cache is not None else 0
        mask_B1TS = build_attention_mask(attention_mask_BT, T, past, next_ids_BT.device)
        rope = self.rotary_emb(position_ids_BT)
        emb_BTD = self.model.embed_tokens(next_ids_BT)
        x_BTD = mtp.eh_proj(torch.cat([mtp.enorm(emb_BTD), mtp.hnorm(h_BTD)], dim=-1))
        y_BTD, _ = mtp.layer(
            x_BTD, rope, mask_B1TS, cache.layer(self.config.num_hidden_layers) if cache is not None else None
        )
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            y_BTD = y_BTD[:, -logits_to_keep:]
        return self.lm_head(mtp.shared_head.norm(y_BTD))


class SummedTokenCrossEntropy(torch.autograd.Function):
    """sum over targets != -100 of -log_softmax(logits)[target]: `F.cross_entropy(..., reduction="sum")` with a
    leaner backward. Its gradient, softmax minus the one-hot target, is computed from the saved log-probabilities as
    one exp and one scatter, instead of zero-filling an [N, V] gradient for the NLL and then running log_softmax's
    backward over it: two fewer passes over the largest tensor of a small model's step."""

    @staticmethod
    def forward(ctx, logits_NV: Tensor, targets_N: Tensor) -> Tensor:
        logp_NV = torch.log_softmax(logits_NV, dim=-1)
        valid_N = targets_N != IGNORE_INDEX
        target_N1 = targets_N.clamp(min=0).unsqueeze(1)
        picked_N = logp_NV.gather(1, target_N1).squeeze(1)
        ctx.save_for_backward(logp_NV, target_N1, valid_N)
        return -torch.where(valid_N, picked_N, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None]:
        logp_NV, target_N1, valid_N = ctx.saved_tensors
        scale_N1 = (grad_total * valid_N.to(logp_NV.dtype)).unsqueeze(1)
        grad_NV = logp_NV.exp().mul_(scale_N1)
        return grad_NV.scatter_add_(1, target_N1, -scale_N1), None


def cross_entropy(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Mean token cross-entropy in fp32 over targets != -100 (0 when every target is ignored, never NaN)."""
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    total = SummedTokenCrossEntropy.apply(logits_NV, targets_BT.reshape(-1))
    return total / (targets_BT != IGNORE_INDEX).sum().clamp(min=1)


def load_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Strictly load `state_dict` into `model`; CheckpointMismatchError lists every missing, unexpected and
    mis-shaped tensor (parameters and persistent buffers) before anything is copied."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{n}: checkpoint {tuple(state_dict[n].shape)} != model {tuple(expected[n].shape)}"
        for n in set(expected) & set(state_dict)
        if tuple(state_dict[n].shape) != tuple(expected[n].shape)
    )
    if missing or unexpected or shapes:
        lines = [
            f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} mis-shaped"
        ]
        lines += [f"  missing: {n}" for n in missing] + [f"  unexpected: {n}" for n in unexpected]
        lines += [f"  shape: {s}" for s in shapes]
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
