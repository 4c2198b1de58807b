"""SmolLM2-135M-Instruct as a real model for tests: the product's own fetcher, with a test cache folder.

The cache is `$DISTILLERY_TEST_CACHE`, default `~/.cache/distillery-test`, so test runs don't touch the
user's own cache and later runs reuse the download and the import.
"""

from __future__ import annotations

import os
from pathlib import Path

from service.commands import realdata


def cache_dir() -> Path:
    root = Path(os.environ.get("DISTILLERY_TEST_CACHE") or "~/.cache/distillery-test").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    return realdata.smollm2_gguf(cache_dir())


def smollm2_mlx(dtype: str = "float16") -> Path:
    return realdata.smollm2_model(cache_dir(), dtype=dtype)
