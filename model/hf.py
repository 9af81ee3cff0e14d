"""Hugging Face interoperability: export our DeepseekV3 to the layout of the DeepSeek-V3 release, and read it back.

An exported directory holds what `transformers.AutoModelForCausalLM.from_pretrained(dir)` expects:

- `config.json`: `ModelConfig.to_hf()` (model_type "deepseek_v3") plus `rope_interleave` (see below), `dtype`, and
  our training-behaviour fields (moe_impl, moe_balance, ...: transformers keeps them as inert attributes).
- `model.safetensors` (or `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json` when larger
  than `max_shard_bytes`), with the tensor names of the DeepSeek-V3 release:
    * our names are already the release's for embeddings, norms, attention and dense/shared MLPs;
    * routed experts: we store stacked `mlp.experts.{gate,up,down}_proj` [E, ...]; the release (and this export)
      has one matrix per expert, `mlp.experts.{e}.gate_proj.weight` [F, D], `.up_proj.weight` [F, D],
      `.down_proj.weight` [D, F]. transformers 5 fuses them again when loading (its conversion mapping for
      deepseek_v3 concatenates gate and up into `experts.gate_up_proj` [E, 2F, D]);
    * MTP module k is stored as decoder layer `model.layers.{num_hidden_layers + k}` with its own `enorm`, `hnorm`,
      `eh_proj`, `shared_head.norm`, the decoder-layer weights, and copies of the shared embedding and output head
      (`embed_tokens.weight`, `shared_head.head.weight`), as the release does. transformers has no MTP module: it
      ignores these keys with an "unexpected keys" note.
- `tokenizer.json` and `tokenizer_config.json` (with a chat template) when a tokenizer is given.

RoPE layout: `rope_interleave` (ours, default true) is written to config.json. With true, both we and transformers
rotate the release's adjacent pairs (x0, x1), (x2, x3)...; with false, halves (GPT-NeoX). Either way the same
weights give the same logits (tested for both, with and without q_lora_rank, with YaRN).

`import_hf` is strict: it reads only safetensors (never pickle) and refuses a directory whose tensor names or shapes
differ from what the config implies, listing every missing, unexpected and mis-shaped name. It also reads the FP8
release layout (e4m3 weights with 128x128 `weight_scale_inv` block scales), dequantizing to fp32.

Command line (a "weights" file is a safetensors of OUR state dict, `model.state_dict()`, with the model config
beside it as `config.json` in our field names, `dataclasses.asdict(ModelConfig)`, or the same path with suffix
`.json`; a directory holding `model.safetensors` + `config.json` works too):

    python -m model.hf export outputs/run/weights.safetensors outputs/run/hf [--tokenizer tokenizer.json]
    python -m model.hf import outputs/run/hf outputs/run/reimported.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from model.config import ModelConfig
from model.transformer import DeepseekV3

SAFE_INDEX = "model.safetensors.index.json"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")  # MTP module parts outside its decoder layer
MTP_LAYER_ATTR = "layer"  # name of the DecoderLayer inside our MTP module
CHAT_SPECIALS = ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")


class HFFormatError(ValueError):
    """The directory does not hold the tensors its config.json implies."""


# ------------------------------------------------------------------------------------------------ name mapping


def _expert_name(prefix: str, e: int, proj: str) -> str:
    return f"{prefix}.{e}.{proj}.weight"


def _release_name(name: str, num_hidden_layers: int) -> str:
    """Our tensor name -> the release's (MTP module k becomes decoder layer num_hidden_layers + k)."""
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if not m:
        return name
    rest = m.group(2).removeprefix(MTP_LAYER_ATTR + ".")
    return f"model.layers.{num_hidden_layers + int(m.group(1))}.{rest}"


def _stacked_experts(release_name: str) -> tuple[str, str] | None:
    """(prefix, proj) when the name is one of our stacked routed-expert tensors."""
    m = re.fullmatch(r"(.+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)", release_name)
    return (m.group(1), m.group(2)) if m else None


def to_hf_tensors(state: dict[str, Tensor], cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Yield (release name, tensor) for every tensor of OUR state dict, plus the release's MTP copies."""
    L = cfg.num_hidden_layers
    for name, t in state.items():
        name = _release_name(name, L)
        m = _stacked_experts(name)
        if m:
            for e in range(t.shape[0]):
                yield _expert_name(m[0], e, m[1]), t[e]
            continue
        yield name, t
    for k in range(cfg.num_nextn_predict_layers):
        yield f"model.layers.{L + k}.embed_tokens.weight", state["model.embed_tokens.weight"]
        head = state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else state["lm_head.weight"]
        yield f"model.layers.{L + k}.shared_head.head.weight", head


def _mtp_copy_source(hf_name: str, cfg: ModelConfig) -> str | None:
    """For the release's per-MTP copies of the shared embedding/head, the name of OUR tensor they copy."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight", hf_name)
    if not m or int(m.group(1)) < cfg.num_hidden_layers:
        return None
    if m.group(2) == "embed_tokens" or cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def from_hf_tensors(tensors: dict[str, Tensor], model: DeepseekV3) -> dict[str, Tensor]:
    """Build OUR state dict from release-named tensors; raise HFFormatError listing every name/shape problem."""
    cfg = model.config
    ours = model.state_dict()
    expected = {name: t.shape for name, t in to_hf_tensors(ours, cfg)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{n}: file {tuple(tensors[n].shape)} != expected {tuple(expected[n])}"
        for n in set(expected) & set(tensors)
        if tuple(tensors[n].shape) != tuple(expected[n])
    )
    if missing or extra or shapes:
        lines = [
            f"the safetensors do not match config.json ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(shapes)} mis-shaped)"
        ]
        lines += [f"  missing: {n}" for n in missing] + [f"  unexpected: {n}" for n in extra]
        lines += [f"  shape: {s}" for s in shapes]
        raise HFFormatError("\n".join(lines))

    out: dict[str, Tensor] = {}
    for name, t in ours.items():
        hf_name = _release_name(name, cfg.num_hidden_layers)
        m = _stacked_experts(hf_name)
        if m:
            out[name] = torch.stack([tensors[_expert_name(m[0], e, m[1])] for e in range(t.shape[0])])
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            out[name] = tensors["model.embed_tokens.weight"]
            continue
        out[name] = tensors[hf_name]
    for hf_name in expected:
        src = _mtp_copy_source(hf_name, cfg)
        if src is not None and not torch.equal(tensors[hf_name], out[src]):
            raise HFFormatError(
                f"{hf_name} differs from {src}: our MTP modules share the embedding and output head with the main "
                "model, so the release's per-MTP copies must equal them"
            )
    return out


# ------------------------------------------------------------------------------------------------ files


def _write_safetensors(tensors: dict[str, Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / SAFE_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def read_safetensors_dir(d: Path) -> dict[str, Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    if (d / SAFE_INDEX).exists():
        files = sorted(set(json.loads((d / SAFE_INDEX).read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d} has neither model.safetensors nor {SAFE_INDEX} (only safetensors are read)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(d / f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name in tensors:
                    raise HFFormatError(f"tensor {name} appears in more than one shard of {d}")
                tensors[name] = fh.get_tensor(name)
    return tensors


def _chat_template(vocab: dict[str, int]) -> str | None:
    if not all(s in vocab for s in CHAT_SPECIALS):
        return None
    user, assistant, eos = CHAT_SPECIALS
    return (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}"
        f"{{% elif m['role'] == 'user' %}}{user}{{{{ m['content'] }}}}"
        f"{{% elif m['role'] == 'assistant' %}}{assistant}{{{{ m['content'] }}}}{eos}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{assistant}{{% endif %}}"
    )


def _write_tokenizer(tokenizer_path: Path, out_dir: Path, cfg: ModelConfig) -> None:
    src = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file {src} does not exist")
    tok = Tokenizer.from_file(str(src))
    shutil.copyfile(src, out_dir / "tokenizer.json")
    tok_cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings}
    for key, tid in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id)):
        if isinstance(tid, int) and tok.id_to_token(tid) is not None:
            tok_cfg[key] = tok.id_to_token(tid)
    template = _chat_template(tok.get_vocab(with_added_tokens=True))
    if template is not None:
        tok_cfg["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """`cfg.to_hf()` plus the weights' dtype and our training-behaviour fields (transformers keeps unknown keys as
    plain attributes; `ModelConfig.from_hf` reads them back, so a model re-imported trains as it did). `compile`
    is left out: whether to torch.compile is the loader's choice, not a property of the weights."""
    d = cfg.to_hf()
    d.update({k: v for k, v in dataclasses.asdict(cfg).items() if k not in d and k != "compile"})  # not a weight
    d["rope_interleave"] = cfg.rope_interleave
    d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


# ------------------------------------------------------------------------------------------------ public API


def export_hf(
    model: DeepseekV3,
    out_dir: Path,
    tokenizer_path: Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write `model` as a Hugging Face DeepSeek-V3 directory (see the module docstring for the layout)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    for name, t in to_hf_tensors(state, cfg):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: transformers re-ties lm_head to the embedding
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    _write_safetensors(tensors, out_dir, max_shard_bytes)
    dtype = state["model.embed_tokens.weight"].dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2))
    if tokenizer_path is not None:
        _write_tokenizer(Path(tokenizer_path), out_dir, cfg)


def dequantize_fp8_blocks(tensors: dict[str, Tensor], block: tuple[int, int] = (128, 128)) -> dict[str, Tensor]:
    """Replace each e4m3 `X.weight` that has an `X.weight_scale_inv` [ceil(N/bn), ceil(K/bk)] (the FP8 release's
    128x128 block scales) by fp32 `weight * scale_inv` per block, as DeepSeek's fp8_cast_bf16.py does."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is not None:
            N, K = t.shape
            full = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:N, :K]
            t = t.float() * full
        out[name] = t
    return out


def import_hf(dir: Path, dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """Read a directory written by `export_hf`, or a checkpoint in the release's layout (FP8 block-quantized weights
    are dequantized), into our model with parameters in `dtype` (the routing bias stays fp32)."""
    d = Path(dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist")
    hf_cfg = json.loads(cfg_path.read_text())
    if hf_cfg.get("model_type") != "deepseek_v3":
        raise HFFormatError(f"{cfg_path}: model_type is {hf_cfg.get('model_type')!r}, expected 'deepseek_v3'")
    cfg = ModelConfig.from_hf(hf_cfg)
    tensors = read_safetensors_dir(d)
    if any(n.endswith("_scale_inv") for n in tensors):
        block = (hf_cfg.get("quantization_config") or {}).get("weight_block_size", [128, 128])
        tensors = dequantize_fp8_blocks(tensors, tuple(block))
    with torch.device("meta"):  # no random init: every tensor comes from the files
        model = DeepseekV3(cfg)
    state = from_hf_tensors(tensors, model)
    state = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True gave the two names separate Parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# ------------------------------------------------------------------------------------------------ command line


def load_weights_file(path: Path) -> DeepseekV3:
    """Our model from a safetensors of our state dict plus our config JSON beside it (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        weights, cfg_candidates = path / "model.safetensors", [path / "config.json"]
    else:
        weights, cfg_candidates = path, [path.with_suffix(".json"), path.parent / "config.json"]
    cfg_file = next((c for c in cfg_candidates if c.is_file()), None)
    if not weights.is_file() or cfg_file is None:
        raise FileNotFoundError(f"need {weights} and a model config JSON at one of {[str(c) for c in cfg_candidates]}")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") == "deepseek_v3":
        cfg = ModelConfig.from_hf(raw)
    else:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f"{cfg_file}: unknown ModelConfig fields {unknown}")
        cfg = ModelConfig(**raw)
    cfg.validate()
    model = DeepseekV3(cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="our weights (+ config JSON) -> Hugging Face directory")
    ex.add_argument("weights", type=Path)
    ex.add_argument("out_dir", type=Path)
    ex.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (or a directory holding it)")
    im = sub.add_parser("import", help="Hugging Face directory -> our weights (safetensors + config JSON)")
    im.add_argument("hf_dir", type=Path)
    im.add_argument("out", type=Path, help="output .safetensors; its config goes beside it with suffix .json")
    args = p.parse_args(argv)
    if args.cmd == "export":
        export_hf(load_weights_file(args.weights), args.out_dir, args.tokenizer)
        print(f"wrote {args.out_dir}")
    else:
        model = import_hf(args.hf_dir)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
        args.out.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
