"""Model folders: resolving references, loading for training, tokenizer compatibility, depth pruning.

Models are mlx-lm folders (config.json + safetensors + tokenizer) on local disk, or GGUF files imported once
into a cache folder. Nothing here reaches a model hub: a reference that is not an existing local path is a
`UserError`, never a download.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import fused
from .errors import UserError
from .mlx_typed import flat_leaves, load_safetensors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "generation_config.json",
)


def resolve_model(ref: str | Path, import_root: Path, field: str = "model") -> Path:
    """A local mlx-lm folder as is, or a GGUF file imported (once, keyed by its content) under `import_root`."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{field}: {path} is a folder without config.json (not an mlx-lm model folder)")
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_import import import_gguf

        out = import_root / f"gguf-{file_digest(path)[:16]}"
        if not (out / "config.json").is_file():
            import_root.mkdir(parents=True, exist_ok=True)
            import_gguf(path, out)
        return out
    raise UserError(f"{field}: {ref} is neither a model folder nor a .gguf file")


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """Content hash of a model folder's weights and config: the teacher's part of a cache key."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def tokenizer_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode())
            h.update(file_digest(f).encode())
    return h.hexdigest()


def load_tokenizer(path: Path):
    from mlx_lm.utils import load_tokenizer as _load

    config = json.loads((path / "config.json").read_text())
    return _load(path, eos_token_ids=config.get("eos_token_id"))


def compute_dtype(model_dtype: mx.Dtype) -> mx.Dtype:
    """float32 on the CPU (where OpenBLAS's sgemm is the fast path), the model's own dtype on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else model_dtype


def load_model(path: Path, *, dtype: mx.Dtype | None = None):
    """Load an mlx-lm model folder for training/inference, cast to the compute dtype. Returns (model, tokenizer, config)."""
    from mlx_lm.utils import load_model as _load_model

    model, config = _load_model(path)
    floats = [v for _, v in _leaves(model) if mx.issubdtype(v.dtype, mx.floating)]
    target = dtype or compute_dtype(floats[0].dtype if floats else mx.float32)
    # Floating leaves only: a quantized model's packed uint32 weights stay as they are, its scales, biases and
    # norms follow the compute dtype (on the CPU, MLX's quantized matmul is ~9x slower in bfloat16 than float32).
    model.set_dtype(target)
    mx.eval(model.parameters())
    fused.install(model)  # on the CPU: compiled SiLU and attention softmax (fused.py)
    return model, load_tokenizer(path), config


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def quantization_of(config: dict) -> dict | None:
    """An mlx-lm folder's quantization (`bits`, `group_size`, `mode`, maybe per-layer entries), or None."""
    q = config.get("quantization")
    if q is None and isinstance(config.get("quantization_config"), dict) and "bits" in config["quantization_config"]:
        q = config["quantization_config"]
    return q if isinstance(q, dict) else None


def _quantize_targets(model: nn.Module) -> list[tuple[str, nn.Module, dict | bool]]:
    """(path, module, what the model's own predicate says) for every leaf mlx-lm's `quantize_model` may quantize."""
    predicate = getattr(model, "quant_predicate", None)
    out: list[tuple[str, nn.Module, dict | bool]] = []
    for path, m in flat_leaves(model.leaf_modules(), nn.Module.is_module):
        if not hasattr(m, "to_quantized") or "weight" not in m:
            continue
        verdict = predicate(path, m) if predicate is not None else True
        if verdict:
            out.append((path, m, verdict))
    return out


def skeleton(path: Path) -> nn.Module:
    """The folder's model built from its config alone (MLX arrays are lazy: no weight is read or computed), for
    checks on the model's structure before anything is loaded."""
    from mlx_lm.utils import _get_classes, load_config

    config = load_config(path)
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def check_group_size(model: nn.Module, group_size: int, field: str = "student.quantize") -> list:
    """Every layer mlx-lm would quantize must split its rows into groups of `group_size` (mlx-lm would silently
    leave the others in float); returns those layers as (path, module, predicate verdict)."""
    targets = _quantize_targets(model)
    dims = {path: m.weight.shape[-1] for path, m, _ in targets}
    bad = [
        (p, dims[p])
        for p, _, v in targets
        if dims[p] % (v.get("group_size", group_size) if isinstance(v, dict) else group_size)
    ]
    if bad:
        fits = [g for g in (32, 64, 128) if all(d % g == 0 for d in dims.values())]
        hint = f"use {' or '.join(map(str, fits))}" if fits else "no group size (32, 64 or 128) divides all of them"
        raise UserError(
            f"{field}.group_size: {group_size} does not divide the input size of {len(bad)} of the "
            f"model's {len(targets)} linear/embedding layers (e.g. {bad[0][0]}: {bad[0][1]}); {hint}"
        )
    if not targets:
        raise UserError(f"{field}: the model has no layer mlx-lm can quantize")
    return targets


def quantize(
    model: nn.Module,
    config: dict,
    *,
    bits: int,
    group_size: int,
    storage_dtype: mx.Dtype,
    field: str = "student.quantize",
) -> dict:
    """Affine-quantize `model` in place with mlx-lm's own `quantize_model` (same layers, same predicate, so the
    result saves as a folder `mlx_lm.load` rebuilds). Returns the config with its `quantization` entry.

    The weights are quantized in `storage_dtype` (the dtype the folder is saved in), exactly what
    `mlx_lm.convert -q` makes of the source; the scales and biases then return to the compute dtype (a lossless
    cast), so the model in memory holds the very values that are saved.
    """
    from mlx_lm.utils import quantize_model

    targets = check_group_size(model, group_size, field)
    compute = targets[0][1].weight.dtype
    for _, m, _ in targets:
        if mx.issubdtype(m.weight.dtype, mx.floating):
            m.weight = m.weight.astype(storage_dtype)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
        _, qconfig = quantize_model(model, config, group_size, bits, mode="affine")
    _cast_quantized(model, compute)
    mx.eval(model.parameters())
    return qconfig


def _cast_quantized(model: nn.Module, dtype: mx.Dtype) -> None:
    for _, m in model.named_modules():
        if "scales" in m and not m.children():
            m.update(
                {
                    k: v.astype(dtype)
                    for k, v in m.items()
                    if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)
                }
            )


def requantize(module: nn.Module, like: nn.Module, storage_dtype: mx.Dtype) -> nn.Module:
    """A float Linear/Embedding (e.g. a fused adapter layer) quantized like `like`, in the storage dtype (as
    `mlx_lm fuse` does on the saved model), its scales and biases back in the compute dtype."""
    compute = module.weight.dtype
    module.weight = module.weight.astype(storage_dtype)
    q = module.to_quantized(group_size=like.group_size, bits=like.bits, mode=like.mode)
    q.update(
        {k: v.astype(compute) for k, v in q.items() if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)}
    )
    return q


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear computing `x @ dequantize(W).T`: the same parameters and the same function (up to float
    summation order), but on the CPU MLX's quantized matmul is 20-40x slower than OpenBLAS's sgemm on the
    dequantized matrix. Only the forward differs; the layer saves and fuses as the QuantizedLinear it is. The
    price: backward keeps each layer's dequantized matrix (float32 weights' memory, as without quantization)."""

    def __call__(self, x):
        w = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        x = x @ w.T.astype(x.dtype)
        if "bias" in self:
            x = x + self["bias"]
        return x


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """QuantizedEmbedding whose tied output projection (`as_linear`) multiplies by the dequantized matrix."""

    def as_linear(self, x):
        w = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        return x @ w.T.astype(x.dtype)


def dequantized_compute(model: nn.Module) -> int:
    """On the CPU, switch the quantized layers to dequantize-then-matmul (elsewhere MLX's quantized kernels are
    the fast path and nothing changes); returns how many were switched."""
    if mx.default_device() != mx.cpu:
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear and m.mode == "affine":
            m.__class__ = DequantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding and m.mode == "affine":
            m.__class__ = DequantizedEmbedding
            n += 1
    return n


def quantized_compute(model: nn.Module) -> int:
    """Undo `dequantized_compute`: MLX's own quantized kernels again (what a user's generation runs on)."""
    n = 0
    for _, m in model.named_modules():
        kind = type(m)  # not `type(m) is ...`: that narrows `m`, and mypy then refuses the new `__class__`
        if kind is DequantizedLinear:
            m.__class__ = nn.QuantizedLinear
            n += 1
        elif kind is DequantizedEmbedding:
            m.__class__ = nn.QuantizedEmbedding
            n += 1
    return n


def _leaves(module: nn.Module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def vocab_of(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def check_tokenizers(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Distillation matches distributions position by position: both sides must tokenize identically.

    The names go into the message as given, so they carry their role ("teacher X", "student Y").
    """
    tv, sv = vocab_of(teacher_tok), vocab_of(student_tok)
    problems = []
    if len(tv) != len(sv):
        problems.append(f"vocabulary sizes differ ({teacher_name}: {len(tv)}, {student_name}: {len(sv)})")
    only_t = sorted(set(tv) - set(sv), key=tv.__getitem__)
    only_s = sorted(set(sv) - set(tv), key=sv.__getitem__)
    if only_t:
        problems.append(f"{len(only_t)} tokens only in {teacher_name} (e.g. {only_t[:5]})")
    if only_s:
        problems.append(f"{len(only_s)} tokens only in {student_name} (e.g. {only_s[:5]})")
    moved = [t for t in tv if t in sv and tv[t] != sv[t]]
    if moved:
        ex = ", ".join(f"{t!r}: {tv[t]} vs {sv[t]}" for t in moved[:5])
        problems.append(f"{len(moved)} tokens have different ids ({ex})")
    if teacher_tok.eos_token_id != student_tok.eos_token_id:
        problems.append(f"end-of-sequence ids differ ({teacher_tok.eos_token_id} vs {student_tok.eos_token_id})")
    probe = "Distillery checks: naïve café, 1234 + 5678 = 6912.\n\tdef f(x): return x"
    if not problems and teacher_tok.encode(probe) != student_tok.encode(probe):
        problems.append("same vocabulary but the tokenizers split text differently (pre-tokenizer or normalizer)")
    if problems:
        raise UserError(f"{teacher_name} and {student_name} are not tokenizer-compatible: " + "; ".join(problems))


def prune_layers(model: nn.Module, config: dict, keep: list[int]) -> dict:
    """Depth pruning: keep the listed transformer blocks, in order. Returns the student's new config."""
    layers = model.layers
    n = len(layers)
    bad = [i for i in keep if i >= n]
    if bad:
        raise UserError(f"student.keep_layers: indices {bad} out of range, the model has {n} layers (0..{n - 1})")
    model.model.layers = [layers[i] for i in keep]
    new = dict(config)
    new["num_hidden_layers"] = len(keep)
    for key, value in config.items():  # per-layer settings (e.g. layer_types) follow their layers
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            new[key] = [value[i] for i in keep]
    return new


def save_model_folder(out: Path, model: nn.Module, config: dict, source: Path, dtype: mx.Dtype | None = None) -> Path:
    """Write an mlx-lm folder (weights, config, the source's tokenizer files) that `mlx_lm.load` reads unchanged."""
    from mlx.utils import tree_flatten

    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out)
    copy_tokenizer(source, out)
    return out


def save_config(config: dict, out: Path) -> None:
    """config.json as mlx-lm writes it (`quantization` mirrored as `quantization_config`, keys sorted)."""
    from mlx_lm.utils import save_config as _save_config

    _save_config(dict(config), out / "config.json")


def copy_tokenizer(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)


def source_dtype(path: Path) -> mx.Dtype:
    """The dtype the folder's weights are stored in (so a derived student is saved like its source)."""
    for f in sorted(path.glob("*.safetensors")):
        for v in load_safetensors(f).values():
            if mx.issubdtype(v.dtype, mx.floating):
                return v.dtype
    return mx.float32
