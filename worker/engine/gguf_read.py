"""Reading a GGUF file (llama.cpp's format): its metadata, its tensors, and each tensor as float32.

`read` checks the magic and decodes the metadata with `gguf.GGUFReader`; `check_tensor_types` refuses a file
with a tensor type `gguf.quants` cannot dequantize before any weight is converted; `dequantize` turns one
tensor into a float32 array in Hugging Face's (row-major, out x in) shape. Part of gguf_import.py's import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.errors import UserError


@dataclass
class GgufFile:
    """What we need from the file: its metadata and tensors, read with `gguf.GGUFReader`."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf ReaderTensor
    arch: str = ""
    notes: list[str] = field(default_factory=list)  # what the import worked out or assumed, for its description

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)


def read(src: Path) -> GgufFile:
    """The metadata and tensors of `src`; a missing, non-GGUF or unreadable file, or one without an
    architecture, is a `UserError`."""
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
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{src}: GGUF metadata has no general.architecture")
    return GgufFile(src, metadata, tensors, arch)


def check_tensor_types(g: GgufFile) -> None:
    """Every tensor must be a float type or a quantization `gguf.quants` can dequantize."""
    bad: dict[str, list[str]] = {}
    probed: dict[Any, bool] = {}
    for name, t in g.tensors.items():
        qt = t.tensor_type
        if qt not in probed:
            probed[qt] = _can_dequantize(qt)
        if not probed[qt]:
            bad.setdefault(qt.name, []).append(name)
    if bad:
        what = "; ".join(f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in sorted(bad.items()))
        raise UserError(f"{g.path}: unsupported GGUF tensor type(s): {what}")


def _can_dequantize(qt: Any) -> bool:
    import gguf
    from gguf import GGMLQuantizationType as T

    if qt in (T.F32, T.F16, T.BF16):
        return True
    size = gguf.GGML_QUANT_SIZES.get(qt)
    if size is None or size[0] == 1:  # integer / f64 element types: no model weights we know of
        return False
    _, type_size = size
    try:  # probe one all-zero block through the public API
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qt)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def dequantize(t: Any) -> np.ndarray:
    """One tensor as float32, in HF (row-major, out x in) shape."""
    import gguf

    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(data, dtype=np.float32).reshape(shape)
