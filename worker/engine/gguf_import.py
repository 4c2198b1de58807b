"""Convert a GGUF model file (llama.cpp's format) into an mlx-lm model folder.

The folder holds what `mlx_lm.load(folder)` reads, with Hugging Face names and layouts:

* `config.json`: the HF-style model config, built from the GGUF metadata (gguf_config.py);
* `model.safetensors` (or `model-0000i-of-0000N.safetensors` + index for big models): every tensor
  dequantized with `gguf.quants.dequantize` and cast to the requested dtype, renamed to HF names, llama's Q/K
  rows un-permuted (gguf_weights.py);
* `tokenizer.json` + `tokenizer_config.json`: a fast tokenizer built from `tokenizer.ggml.*`, with the
  chat template from `tokenizer.chat_template` and the bos/eos/pad/unk tokens (gguf_tokenizer.py).

The file is read by gguf_read.py. This module checks the output path and assembles the folder: the output is
written into a sibling `OUT.tmp-XXXX` folder and renamed into place at the end, so a failed or interrupted
import never leaves a half-written model folder behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from worker.engine.errors import UserError
from worker.engine.gguf_config import build_config, check_architecture
from worker.engine.gguf_read import check_tensor_types, read
from worker.engine.gguf_tokenizer import write_tokenizer
from worker.engine.gguf_weights import check_expected_tensors, write_weights

_DTYPES = ("float16", "bfloat16", "float32")


def import_gguf(src: Path, out: Path, dtype: str = "float16") -> str:
    """Convert the GGUF file `src` into an mlx-lm folder `out`; returns a one-line description.

    Raises `UserError` for a file that is not GGUF, an unsupported architecture, tensor type or
    tokenizer, a bad `dtype`, or an `out` that already exists and is not empty.
    """
    src, out = Path(src), Path(out)
    if dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported for import-gguf; use one of {', '.join(_DTYPES)}")
    _check_out(out)
    g = read(src)
    check_architecture(g)
    check_tensor_types(g)
    config, layer_count = build_config(g)
    check_expected_tensors(g, config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp(out)
    try:
        tok_info = write_tokenizer(g, tmp, config)
        config.update(tok_info)
        params, types = write_weights(g, tmp, config, dtype)
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


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder; choose another output path")
        if any(out.iterdir()):
            raise UserError(f"{out}: folder exists and is not empty; refusing to overwrite it (remove it first)")


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
