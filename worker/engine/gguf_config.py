"""The GGUF architectures we convert, and the Hugging Face `config.json` built from a file's metadata.

`ARCHS` maps GGUF's `general.architecture` to the HF model type and class; `build_config` reads
`{arch}.block_count`, `{arch}.attention.*`, `{arch}.rope.*` and friends into the config mlx-lm builds the model
from. Llama 3.1+ files carry their rope scaling as a `rope_freqs` tensor of per-frequency factors rather than as
parameters; the `llama3` rope_scaling parameters are recovered from it (and checked). Part of gguf_import.py's
import.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from worker.engine.errors import UserError
from worker.engine.gguf_read import GgufFile, dequantize

# Architectures we convert: GGUF `general.architecture` -> (HF model_type, HF architectures entry).
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
_DEFAULT_ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}


def check_architecture(g: GgufFile) -> None:
    if g.arch not in ARCHS:
        raise UserError(
            f"{g.path}: GGUF architecture {g.arch!r} is not supported by import-gguf (supported: {', '.join(ARCHS)})"
        )


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _scalar(g: GgufFile, key: str, default: Any = None, required: bool = False) -> Any:
    v = g.arch_key(key, default)
    if v is None and required:
        raise UserError(f"{g.path}: GGUF metadata lacks {g.arch}.{key}")
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise UserError(f"{g.path}: per-layer values for {g.arch}.{key} ({v[:4]}...) are not supported")
        v = v[0]
    return v


def build_config(g: GgufFile) -> tuple[dict[str, Any], int]:
    """(the HF config, the number of layers) of a supported architecture (see `check_architecture`)."""
    model_type, hf_arch = ARCHS[g.arch]
    hidden = int(_scalar(g, "embedding_length", required=True))
    layers = int(_scalar(g, "block_count", required=True))
    heads = int(_scalar(g, "attention.head_count", required=True))
    kv_heads = int(_scalar(g, "attention.head_count_kv", heads))
    head_dim = int(_scalar(g, "attention.key_length", hidden // heads))
    value_dim = int(_scalar(g, "attention.value_length", head_dim))
    rope_dim = int(_scalar(g, "rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise UserError(f"{g.path}: key_length {head_dim} != value_length {value_dim} is not supported")
    if rope_dim != head_dim:
        raise UserError(
            f"{g.path}: partial rotary embedding (rope dims {rope_dim} of head dim {head_dim}) is not supported"
        )
    if g.arch == "qwen2" and head_dim != hidden // heads:
        raise UserError(f"{g.path}: qwen2 with head_dim {head_dim} != hidden/heads is not supported")

    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise UserError(f"{g.path}: GGUF has no token_embd.weight tensor")
    vocab = int(embd.shape[1])  # ggml order: [hidden, vocab]
    ffn = _scalar(g, "feed_forward_length")
    if ffn is None:
        gate = g.tensors.get("blk.0.ffn_gate.weight")
        if gate is None:
            raise UserError(f"{g.path}: GGUF metadata lacks {g.arch}.feed_forward_length")
        ffn = int(gate.shape[1])

    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(ffn),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_scalar(g, "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_scalar(g, "rope.freq_base", _DEFAULT_ROPE_THETA[g.arch])),
        "vocab_size": vocab,
        "max_position_embeddings": int(_scalar(g, "context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "hidden_act": "silu",
        "rope_traditional": False,
    }
    if g.arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    scaling = _rope_scaling(g, head_dim, config["rope_theta"])
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config, layers


def _rope_scaling(g: GgufFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = g.arch_key("rope.scaling.type")
    factor = g.arch_key("rope.scaling.factor")
    orig = g.arch_key("rope.scaling.original_context_length")
    scaling: dict[str, Any] | None = None
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        scaling = None
    elif kind == "linear":
        scaling = {"rope_type": "linear", "type": "linear", "factor": _f32(factor)}
    elif kind == "yarn":
        scaling = {"rope_type": "yarn", "type": "yarn", "factor": _f32(factor)}
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = g.arch_key(f"rope.scaling.{gguf_key}")
            if v is not None:
                scaling[hf_key] = _f32(v)
    else:
        raise UserError(f"{g.path}: rope scaling type {kind!r} is not supported")

    freqs_t = g.tensors.get("rope_freqs.weight")
    if freqs_t is not None:
        if scaling is not None:
            raise UserError(f"{g.path}: both rope_freqs and rope scaling {kind!r}: not supported")
        factors = np.asarray(dequantize(freqs_t), dtype=np.float64).reshape(-1)
        scaling = _llama3_scaling_from_factors(g, factors, head_dim, theta)
    return scaling


def _llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter writes as `rope_freqs` for Llama 3.1+ rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def _llama3_scaling_from_factors(
    g: GgufFile, factors: np.ndarray, head_dim: int, theta: float
) -> dict[str, Any] | None:
    if np.allclose(factors, 1.0):
        return None
    factor = float(np.round(factors.max(), 4))
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048), (1.0, 4.0, 16384)):
        if len(factors) == head_dim // 2 and np.allclose(
            _llama3_rope_factors(head_dim, theta, factor, low, high, orig), factors, rtol=1e-3, atol=1e-4
        ):
            g.notes.append(f"llama3 rope scaling x{factor:g} recovered from rope_freqs")
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": orig,
            }
    raise UserError(f"{g.path}: rope_freqs factors do not match Llama 3 rope scaling; not supported")
