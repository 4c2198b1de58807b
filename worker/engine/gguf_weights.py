"""The weights of a GGUF model, as the mlx-lm folder holds them: HF names, HF layouts, safetensors shards.

GGUF tensor names (`blk.N.attn_q.weight`, `token_embd.weight`, ...) map to HF names
(`model.layers.N.self_attn.q_proj.weight`, ...). For `llama`, llama.cpp's converter permutes the rows of the Q
and K projections (and their biases) so that ggml's rotary embedding, which rotates interleaved pairs, matches
HF's half-split one; `unpermute` applies the inverse, so the folder uses HF's layout (`rope_traditional =
False`). Qwen2/Qwen3 are written unpermuted by llama.cpp, and are copied as they are. `write_weights`
dequantizes every tensor, casts it to the requested dtype and writes `model.safetensors` (or
`model-0000i-of-0000N.safetensors` + index for big models). Part of gguf_import.py's import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.errors import UserError
from worker.engine.gguf_read import GgufFile, dequantize

# Architectures whose Q/K rows llama.cpp permutes for ggml's rotary layout.
PERMUTED_QK = {"llama"}

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


def hf_name(g: GgufFile, name: str) -> str | None:
    """The HF name of GGUF tensor `name`, or None for one that is not a weight (`rope_freqs`, in the config)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name == "rope_freqs.weight":
        return None  # folded into config.rope_scaling
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    raise UserError(f"{g.path}: tensor {name!r} has no counterpart in the {g.arch} model (unsupported GGUF variant)")


def check_expected_tensors(g: GgufFile, config: dict[str, Any]) -> None:
    """Fail here, naming the file, rather than later in mlx_lm.load with a bare missing-key error."""
    names = {n for n in (hf_name(g, t) for t in g.tensors) if n is not None}
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


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: rows per head go from interleaved pairs back to halves.

    llama.cpp: `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_weights(g: GgufFile, folder: Path, config: dict[str, Any], dtype: str) -> tuple[int, list[str]]:
    """Every weight into `folder` as safetensors; returns (parameter count, the GGUF tensor types, floats last)."""
    import mlx.core as mx

    mx_dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[dtype]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    shard: dict[str, mx.array] = {}
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
        hf = hf_name(g, name)
        if hf is None:
            continue
        types.add(t.tensor_type.name)
        w = dequantize(t)
        if g.arch in PERMUTED_QK:
            if ".attn_q." in name:
                w = unpermute(w, heads)
            elif ".attn_k." in name:
                w = unpermute(w, kv_heads)
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
