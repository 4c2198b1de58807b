"""Model folders: resolving references, loading for training, tokenizer compatibility, depth pruning.

Models are mlx-lm folders (config.json + safetensors + tokenizer) on local disk, or GGUF files imported once
into a cache folder. Nothing here reaches a model hub: a reference that is not an existing local path is a
`UserError`, never a download.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "generation_config.json")


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
    if "quantization" not in config:
        model.set_dtype(target)
    mx.eval(model.parameters())
    return model, load_tokenizer(path), config


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
    only_t = sorted(set(tv) - set(sv), key=tv.get)
    only_s = sorted(set(sv) - set(tv), key=sv.get)
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
        raise UserError(f"{teacher_name} and {student_name} are not tokenizer-compatible: "
                        + "; ".join(problems))


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
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def source_dtype(path: Path) -> mx.Dtype:
    """The dtype the folder's weights are stored in (so a derived student is saved like its source)."""
    for f in sorted(path.glob("*.safetensors")):
        for v in mx.load(str(f)).values():
            if mx.issubdtype(v.dtype, mx.floating):
                return v.dtype
    return mx.float32
