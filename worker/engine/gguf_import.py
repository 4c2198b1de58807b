"""Convert a GGUF model file (llama.cpp's format) into an mlx-lm model folder.

The folder holds what `mlx_lm.load(folder)` reads, with Hugging Face names and layouts:

* `config.json`: the HF-style model config, built from the GGUF metadata (`{arch}.block_count`, ...);
* `model.safetensors` (or `model-0000i-of-0000N.safetensors` + index for big models): every tensor
  dequantized with `gguf.quants.dequantize` and cast to the requested dtype, renamed to HF names;
* `tokenizer.json` + `tokenizer_config.json`: a fast tokenizer built from `tokenizer.ggml.*`, with the
  chat template from `tokenizer.chat_template` and the bos/eos/pad/unk tokens.

Two details of llama.cpp's converter are undone here:

* for `llama` it permutes the rows of the Q and K projections (and their biases) so that ggml's
  rotary embedding, which rotates interleaved pairs, matches HF's half-split one. We apply the
  inverse permutation, so the folder uses HF's layout (`rope_traditional = False`). Qwen2/Qwen3 are
  written unpermuted by llama.cpp, and are copied as they are.
* Llama 3.1+ files carry their rope scaling as a `rope_freqs` tensor of per-frequency factors rather
  than as parameters; we recover the `llama3` rope_scaling parameters from it (and check them).

The tokenizer is built by transformers' own GGUF code (`transformers.integrations.gguf.
gguf_tokenizer_mapping.convert_gguf_tokenizer`, the same one `AutoTokenizer.from_pretrained(...,
gguf_file=...)` uses, called here without torch). If that module is missing (another transformers
release), a byte-level BPE tokenizer is built directly with `tokenizers`.

The output is written into a sibling `OUT.tmp-XXXX` folder and renamed into place at the end, so a
failed or interrupted import never leaves a half-written model folder behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.errors import UserError

log = logging.getLogger(__name__)

# Architectures we convert: GGUF `general.architecture` -> (HF model_type, HF architectures entry).
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# Architectures whose Q/K rows llama.cpp permutes for ggml's rotary layout.
_PERMUTED_QK = {"llama"}

_DTYPES = ("float16", "bfloat16", "float32")

# Largest safetensors shard we write (the model is split above this; mlx-lm reads `model*.safetensors`).
SHARD_BYTES = 4 << 30

# GGUF tensor name -> HF name, for the per-layer tensors (`blk.N.<key>.<weight|bias>`).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Pre-tokenizer types (`tokenizer.ggml.pre`) transformers' table does not cover but llama.cpp defines:
# these split every digit on its own, then apply GPT-2's byte-level regex.
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact"}
# Pre-tokenizer types for which GPT-2's own byte-level regex is the right one.
_GPT2_PRES = {None, "default", "gpt-2", "gpt2"}


@dataclass
class _Gguf:
    """What we need from the file: its metadata and tensors, read with `gguf.GGUFReader`."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf ReaderTensor
    arch: str = ""
    notes: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)


# --------------------------------------------------------------------------------------------- public


def import_gguf(src: Path, out: Path, dtype: str = "float16") -> str:
    """Convert the GGUF file `src` into an mlx-lm folder `out`; returns a one-line description.

    Raises `UserError` for a file that is not GGUF, an unsupported architecture, tensor type or
    tokenizer, a bad `dtype`, or an `out` that already exists and is not empty.
    """
    src, out = Path(src), Path(out)
    if dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported for import-gguf; use one of {', '.join(_DTYPES)}")
    _check_out(out)
    g = _read(src)
    _check_tensor_types(g)
    config, layer_count = _build_config(g)
    _check_expected_tensors(g, config, {n for n in map(lambda t: _hf_name(g, t), g.tensors) if n is not None})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp(out)
    try:
        tok_info = _write_tokenizer(g, tmp, config)
        config.update(tok_info)
        params, types = _write_weights(g, tmp, config, dtype)
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    desc = (
        f"{config['model_type']}, {layer_count} layers, {params / 1e6:.1f}M params, "
        f"vocab {config['vocab_size']}, {dtype} (from {'/'.join(types)})"
    )
    if g.notes:
        desc += "; " + "; ".join(g.notes)
    return desc


# ---------------------------------------------------------------------------------------- reading


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder; choose another output path")
        if any(out.iterdir()):
            raise UserError(f"{out}: folder exists and is not empty; refusing to overwrite it (remove it first)")


def _read(src: Path) -> _Gguf:
    import gguf

    if not src.is_file():
        raise UserError(f"{src}: no such file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{src}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(src), "r")
    except Exception as e:  # truncated or corrupt file, unknown version, ...
        raise UserError(f"{src}: cannot read this GGUF file (truncated or corrupt?): {e}") from e

    metadata: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        try:
            metadata[key] = fld.contents()
        except Exception:  # a value type this gguf release cannot decode: we do not need it
            continue
    tensors = {t.name: t for t in reader.tensors}
    g = _Gguf(src, metadata, tensors)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{src}: GGUF metadata has no general.architecture")
    if arch not in _ARCHS:
        raise UserError(
            f"{src}: GGUF architecture {arch!r} is not supported by import-gguf (supported: {', '.join(_ARCHS)})"
        )
    g.arch = arch
    return g


def _check_tensor_types(g: _Gguf) -> None:
    """Every tensor must be a float type or a quantization `gguf.quants` can dequantize."""
    import gguf
    from gguf import GGMLQuantizationType as T

    bad: dict[str, list[str]] = {}
    probed: dict[Any, bool] = {}
    for name, t in g.tensors.items():
        qt = t.tensor_type
        if qt not in probed:
            probed[qt] = _can_dequantize(gguf, T, qt)
        if not probed[qt]:
            bad.setdefault(qt.name, []).append(name)
    if bad:
        what = "; ".join(f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in sorted(bad.items()))
        raise UserError(f"{g.path}: unsupported GGUF tensor type(s): {what}")


def _can_dequantize(gguf: Any, T: Any, qt: Any) -> bool:
    if qt in (T.F32, T.F16, T.BF16):
        return True
    size = gguf.GGML_QUANT_SIZES.get(qt)
    if size is None or size[0] == 1:  # integer / f64 element types: no model weights we know of
        return False
    block, type_size = size
    try:  # probe one all-zero block through the public API
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qt)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------- config


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _scalar(g: _Gguf, key: str, default: Any = None, required: bool = False) -> Any:
    v = g.arch_key(key, default)
    if v is None and required:
        raise UserError(f"{g.path}: GGUF metadata lacks {g.arch}.{key}")
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise UserError(f"{g.path}: per-layer values for {g.arch}.{key} ({v[:4]}...) are not supported")
        v = v[0]
    return v


def _build_config(g: _Gguf) -> tuple[dict[str, Any], int]:
    model_type, hf_arch = _ARCHS[g.arch]
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

    default_theta = {"llama": 10000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}[g.arch]
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
        "rope_theta": _f32(_scalar(g, "rope.freq_base", default_theta)),
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


def _rope_scaling(g: _Gguf, head_dim: int, theta: float) -> dict[str, Any] | None:
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
        factors = np.asarray(_dequantize(freqs_t), dtype=np.float64).reshape(-1)
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


def _llama3_scaling_from_factors(g: _Gguf, factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
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


# ---------------------------------------------------------------------------------------- weights


def _dequantize(t: Any) -> np.ndarray:
    """One tensor as float32, in HF (row-major, out x in) shape."""
    import gguf

    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: rows per head go from interleaved pairs back to halves.

    llama.cpp: `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(g: _Gguf, name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name == "rope_freqs.weight":
        return None  # folded into config.rope_scaling
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    raise UserError(f"{g.path}: tensor {name!r} has no counterpart in the {g.arch} model (unsupported GGUF variant)")


def _write_weights(g: _Gguf, folder: Path, config: dict[str, Any], dtype: str) -> tuple[int, list[str]]:
    import mlx.core as mx

    mx_dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[dtype]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    shard: dict[str, Any] = {}
    shard_bytes = 0
    shards: list[tuple[Path, list[str]]] = []
    params = 0
    types: set[str] = set()

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            path = folder / f"shard-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
            shards.append((path, list(shard)))
            shard, shard_bytes = {}, 0

    for name, t in g.tensors.items():
        hf = _hf_name(g, name)
        if hf is None:
            continue
        types.add(t.tensor_type.name)
        w = _dequantize(t)
        if g.arch in _PERMUTED_QK:
            if ".attn_q." in name:
                w = _unpermute(w, heads)
            elif ".attn_k." in name:
                w = _unpermute(w, kv_heads)
        arr = mx.array(w).astype(mx_dtype)
        mx.eval(arr)
        del w
        params += arr.size
        shard[hf] = arr
        shard_bytes += arr.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()

    if len(shards) == 1:
        shards[0][0].rename(folder / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        total = len(shards)
        for i, (path, names) in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            path.rename(folder / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": params * mx_dtype.size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    order = ["F32", "F16", "BF16"]
    return params, sorted(types, key=lambda s: (s in order, order.index(s) if s in order else 0, s))


def _check_expected_tensors(g: _Gguf, config: dict[str, Any], names: set[str]) -> None:
    """Fail here, naming the file, rather than later in mlx_lm.load with a bare missing-key error."""
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        need.append("lm_head.weight")
    per_layer = [
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    if g.arch == "qwen2":
        per_layer_bias = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    else:
        per_layer_bias = []
    if g.arch == "qwen3":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    for i in range(config["num_hidden_layers"]):
        need += [f"model.layers.{i}.{p}.weight" for p in per_layer]
        need += [f"model.layers.{i}.{p}.bias" for p in per_layer_bias]
    missing = [n for n in need if n not in names]
    if missing:
        raise UserError(f"{g.path}: GGUF lacks tensors the {g.arch} model needs, e.g. {', '.join(missing[:3])}")


# -------------------------------------------------------------------------------------- tokenizer

# GGUF metadata key (after `tokenizer.`) -> the key transformers' GGUF tokenizer code expects.
# Same table as transformers' GGUF_TOKENIZER_MAPPING["tokenizer"]; kept here for the fallback path.
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}


def _tokenizer_dict(g: _Gguf) -> dict[str, Any]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

        keys = GGUF_TOKENIZER_MAPPING["tokenizer"]
    except Exception:
        keys = _TOKENIZER_KEYS
    return {name: g.get(f"tokenizer.{key}") for key, name in keys.items() if g.get(f"tokenizer.{key}") is not None}


def _transformers_gguf_tokenizer() -> tuple[Any, Any]:
    """transformers' GGUF tokenizer builder and its pre-tokenizer table, or (None, {}) if absent.

    `AutoTokenizer.from_pretrained(..., gguf_file=...)` would be the obvious call, but it reads the
    file with a torch-based reader; the builder it uses underneath needs only `tokenizers`.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
            convert_gguf_tokenizer,
        )
    except ImportError:  # a transformers release without this module
        return None, {}
    return convert_gguf_tokenizer, GGUF_PRE_TOKENIZER_SPLITS


def _backend_tokenizer(g: _Gguf, td: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` for the vocabulary in the file."""
    kind = td.get("tokenizer_type")
    convert_gguf_tokenizer, known_splits = _transformers_gguf_tokenizer()
    if convert_gguf_tokenizer is not None:
        try:
            backend, _ = convert_gguf_tokenizer(g.arch, td)
        except ValueError as e:
            raise UserError(f"{g.path}: cannot build a tokenizer: {e}") from e
    elif kind == "gpt2":
        backend = _byte_level_bpe(td)
    else:
        raise UserError(
            f"{g.path}: tokenizer model {kind!r} needs transformers' GGUF tokenizer support "
            "(transformers.integrations.gguf), which this transformers release lacks"
        )

    if kind == "gpt2":
        pre = td.get("pre_tokenizer_type")
        if pre in _DIGIT_SPLIT_PRES:
            from tokenizers import pre_tokenizers

            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
        elif pre not in _GPT2_PRES and pre not in known_splits:
            g.notes.append(f"pre-tokenizer {pre!r} unknown, GPT-2 splitting used")
            log.warning("%s: pre-tokenizer %r is not known; using GPT-2's byte-level splitting", g.path, pre)
    return backend


def _byte_level_bpe(td: dict[str, Any]) -> Any:
    """Fallback: a byte-level BPE tokenizer straight from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(td["tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in td.get("merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = td.get("pre_tokenizer_type")
    if pre in ("qwen2", "deepseek-r1-qwen"):
        split = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    elif pre in ("llama3", "llama-bpe", "llama-v3"):
        split = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    else:
        split = None
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = td.get("token_type") or []
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok


def _write_tokenizer(g: _Gguf, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write tokenizer.json + tokenizer_config.json; returns the token ids for config.json."""
    td = _tokenizer_dict(g)
    tokens = td.get("tokens")
    if not tokens:
        raise UserError(f"{g.path}: GGUF has no tokenizer.ggml.tokens; cannot build a tokenizer")
    backend = _backend_tokenizer(g, td)

    def token(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    kind = td.get("tokenizer_type")
    add_bos = g.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = g.get("tokenizer.ggml.add_eos_token", False)
    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    chat_template = g.get("tokenizer.chat_template")

    from transformers import PreTrainedTokenizerFast

    add_bos = bool(add_bos and specials["bos_token"])
    add_eos = bool(add_eos and specials["eos_token"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        model_max_length=config["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in specials.items() if v is not None},
    )
    fast.save_pretrained(str(folder))
    # chat template and special tokens in tokenizer_config.json itself (readable by any transformers).
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.update({k: v for k, v in specials.items() if v is not None})
    tok_cfg.update(add_bos_token=add_bos, add_eos_token=add_eos)
    if chat_template:
        tok_cfg["chat_template"] = chat_template
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").unlink(missing_ok=True)

    ids: dict[str, Any] = {}
    bos, pad = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.padding_token_id")
    eos = [g.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos = list(dict.fromkeys(i for i in eos if isinstance(i, int)))
    if isinstance(bos, int):
        ids["bos_token_id"] = bos
    if eos:
        ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if isinstance(pad, int):
        ids["pad_token_id"] = pad
    return ids


def _make_tmp(out: Path) -> Path:
    """An empty sibling folder `OUT.tmp-XXXXXXXX` (mode from the umask, unlike mkdtemp's 0700)."""
    for _ in range(100):
        tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise UserError(f"{out}: cannot create a temporary folder beside it")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        _check_out(out)  # still empty (someone may have written there meanwhile)
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError as e:
        raise UserError(f"{out}: cannot move the imported model into place: {e}") from e
