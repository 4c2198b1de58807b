"""What a model path is, checked before it is registered: mlx-lm folder or GGUF file, inside the allowed
roots, readable; plus a cheap fingerprint and a summary of its config. Pure filesystem work, no MLX."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

GGUF_MAGIC = b"GGUF"
CONFIG_KEYS = ("model_type", "num_hidden_layers", "vocab_size", "hidden_size")


class ModelPathError(ValueError):
    """The path cannot be registered; the message says why (it is about the `path` field)."""


@dataclass(frozen=True)
class InspectedModel:
    format: str           # mlx | gguf
    path: Path            # resolved
    fingerprint: str
    info: dict[str, Any]


def inspect_model_path(raw: str, roots: list[Path]) -> InspectedModel:
    if "\x00" in raw:
        raise ModelPathError("contains a NUL character")
    if not PurePosixPath(raw).is_absolute():
        raise ModelPathError(f"must be an absolute path on the server, got {raw!r}")
    if ".." in PurePosixPath(raw).parts:
        raise ModelPathError("must not contain '..' segments")
    try:
        path = Path(raw).resolve(strict=True)
    except FileNotFoundError:
        raise ModelPathError(f"no such file or folder: {raw}") from None
    except (OSError, RuntimeError) as e:   # permission denied on a parent, symlink loop
        raise ModelPathError(f"cannot be resolved: {e}") from None
    allowed = [Path(r).expanduser().resolve() for r in roots]
    _check_inside(path, allowed, raw)
    if path.is_dir():
        return _inspect_folder(path, allowed)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _inspect_gguf(path)
    raise ModelPathError("must be an mlx-lm model folder (config.json + *.safetensors) or a .gguf file")


def gguf_magic_ok(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _check_inside(path: Path, allowed: list[Path], shown: str) -> None:
    # Checked on the resolved path, so a symlink inside a root that points outside it is refused.
    if allowed and not any(path == root or path.is_relative_to(root) for root in allowed):
        raise ModelPathError(f"{shown} is outside the allowed model roots ({', '.join(map(str, allowed))})")


def _inspect_folder(folder: Path, allowed: list[Path]) -> InspectedModel:
    config_path = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not config_path.is_file() or not weights:
        raise ModelPathError(f"{folder} is not an mlx-lm model folder: it needs config.json and *.safetensors")
    for f in [config_path, *weights]:
        _check_inside(f.resolve(), allowed, str(f))
        if not os.access(f, os.R_OK):
            raise ModelPathError(f"{f} is not readable by the server")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelPathError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelPathError(f"{config_path} must hold a JSON object")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    info = {k: config.get(k, text_config.get(k)) for k in CONFIG_KEYS}
    info["weights_bytes"] = sum(w.stat().st_size for w in weights)
    return InspectedModel("mlx", folder, _fingerprint(folder, [p for p in folder.iterdir() if p.is_file()]), info)


def _inspect_gguf(path: Path) -> InspectedModel:
    if not os.access(path, os.R_OK):
        raise ModelPathError(f"{path} is not readable by the server")
    if not gguf_magic_ok(path):
        raise ModelPathError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    return InspectedModel("gguf", path, _fingerprint(path.parent, [path]), {"size_bytes": path.stat().st_size})


def _fingerprint(base: Path, files: list[Path]) -> str:
    """sha256 over (name, size, mtime) of the files: cheap, and changes when the weights are replaced."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
