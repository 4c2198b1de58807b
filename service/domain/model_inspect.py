"""What a model path is, checked before it is registered: mlx-lm folder or GGUF file, inside the allowed
roots, readable; plus a cheap fingerprint and a summary of its config. Pure filesystem work, no MLX."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

GGUF_MAGIC = b"GGUF"
CONFIG_KEYS = ("model_type", "num_hidden_layers", "vocab_size", "hidden_size")


class ModelPathError(ValueError):
    """The path cannot be registered; the message says why (it is about the `path` field)."""


@dataclass(frozen=True)
class InspectedModel:
    format: str  # mlx | gguf
    path: Path  # resolved
    fingerprint: str
    info: dict[str, Any]


def inspect_model_path(raw: str, roots: list[Path], protected: Sequence[Path] = ()) -> InspectedModel:
    """Check a path a caller wants registered. `roots`: the folders models may come from ([] = anywhere);
    `protected`: the server's own storage (artifacts, caches: other projects' files), never registrable.

    The answer must not tell whether a path outside the roots exists, so the path is placed first (as
    written, then with its symlinks resolved as far as they go) and only a path inside gets "no such file"."""
    if "\x00" in raw:
        raise ModelPathError("contains a NUL character")
    if not PurePosixPath(raw).is_absolute():
        raise ModelPathError(f"must be an absolute path on the server, got {raw!r}")
    if ".." in PurePosixPath(raw).parts:
        raise ModelPathError("must not contain '..' segments")
    allowed = [Path(r).expanduser().resolve() for r in roots]
    storage = [Path(p).expanduser().resolve() for p in protected]
    _check_placed(Path(raw), allowed, storage, raw)
    try:
        path = Path(raw).resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unreadable parent: the same answer as outside
        raise ModelPathError(_outside(raw, allowed)) from None
    _check_placed(path, allowed, storage, raw)
    if not path.exists():
        raise ModelPathError(f"no such file or folder: {raw}")
    if path.is_dir():
        return _inspect_folder(path, allowed, storage)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _inspect_gguf(path)
    raise ModelPathError("must be an mlx-lm model folder (config.json + *.safetensors) or a .gguf file")


def gguf_magic_ok(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _outside(shown: str, allowed: list[Path]) -> str:
    return (
        f"{shown} is outside the allowed model roots ({', '.join(map(str, allowed))})"
        if allowed
        else f"{shown} is not a path models may be registered from"
    )


def _check_placed(path: Path, allowed: list[Path], storage: list[Path], shown: str) -> None:
    # Checked as written and again resolved, so a symlink inside a root that points outside it is refused.
    if allowed and not any(_inside(path, root) for root in allowed):
        raise ModelPathError(_outside(shown, allowed))
    if any(_inside(path, folder) for folder in storage):
        raise ModelPathError(
            _outside(shown, allowed)
            if allowed
            else f"{shown} is inside the server's own storage; upload a GGUF file instead"
        )


def _inspect_folder(folder: Path, allowed: list[Path], storage: list[Path]) -> InspectedModel:
    config_path = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not config_path.is_file() or not weights:
        raise ModelPathError(f"{folder} is not an mlx-lm model folder: it needs config.json and *.safetensors")
    # every file the worker may read (tokenizer, templates, weights), not only the weights
    files = [p for p in folder.iterdir() if p.is_file()]
    for f in files:
        _check_placed(f.resolve(), allowed, storage, str(f))
        if not os.access(f, os.R_OK):
            raise ModelPathError(f"{f} is not readable by the server")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelPathError(f"{config_path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelPathError(f"{config_path} is nested too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise ModelPathError(f"{config_path} must hold a JSON object")
    text_config: dict[str, Any] = config["text_config"] if isinstance(config.get("text_config"), dict) else {}
    info = {k: _plain(config.get(k, text_config.get(k))) for k in CONFIG_KEYS}
    info["weights_bytes"] = sum(w.stat().st_size for w in weights)
    return InspectedModel("mlx", folder, _fingerprint(folder, files), info)


def _plain(value: Any) -> Any:
    """A config value as stored in the model's info: scalars only (a nested value there is not a model's)."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else None


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
