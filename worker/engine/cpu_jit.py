"""Let MLX's CPU compiler vectorise the kernels it fuses (Linux x86-64).

Why: `mx.compile` on the CPU writes each fused elementwise graph as C++ and builds it with the `g++` it finds
on PATH, as `g++ -std=c++17 -O3 -Wall -fPIC -shared` and nothing else. Without `-march` the compiler may not
use FMA or AVX, so MLX's `simd::exp` (a polynomial of six `fma` calls) calls libm's `fmaf` six times per
element; without `-fno-math-errno -fno-trapping-math` GCC will not vectorise the loop; and the out-of-line
`exp` is not inlined. A fused exp then costs ~20 ns per element, 30 times NumPy's, and the exp-heavy parts
of a transformer (SiLU, the attention's softmax, the loss's log-sum-exp over the vocabulary) take more time
than its matrix products (bench/peer_speed.py; worker/engine/fused.py has the kernels that use this).

How: `enable()` puts a two-line `g++` script first on PATH that runs the real compiler with
`-march=native -finline-limit=1000 -fno-math-errno -fno-trapping-math` added: IEEE semantics are kept
(infinities and NaNs behave as before: -ffast-math is not used), the loop is vectorised, `exp` inlined. The
kernels are built for this machine, as a JIT's are. MLX caches built kernels under
`$TMPDIR/mlx/<version>/cpu`, named by their graph only, so kernels built without the flags would be reused:
TMPDIR is pointed at a folder of our own, keyed by the flags (Python's own `tempfile` keeps the folder it
had: `tempfile.tempdir` is pinned first).

No-op, returning "unchanged: <reason>": with DISTILLERY_CPU_JIT=off, off Linux, off x86-64 (MLX's arm64
SIMD types already vectorise), without g++ on PATH.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = "-march=native -finline-limit=1000 -fno-math-errno -fno-trapping-math"
_lock = threading.Lock()
_result: str | None = None


def enable() -> str:
    """Make MLX's CPU JIT build vectorised kernels; idempotent. Returns what it did."""
    global _result
    with _lock:
        if _result is None:
            try:
                _result = _enable()
            except Exception as e:  # never fatal: compiled kernels still work, only slower
                _result = f"unchanged: {type(e).__name__}: {e}"
                log.warning("MLX's CPU JIT flags not set: %s", e)
            else:
                log.info("cpu_jit: %s", _result)
        return _result


def _enable() -> str:
    if os.environ.get("DISTILLERY_CPU_JIT", "").strip().lower() in {"off", "0", "false", "no"}:
        return "unchanged: DISTILLERY_CPU_JIT=off"
    if sys.platform != "linux":
        return f"unchanged: {sys.platform}"
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"unchanged: {platform.machine()}"
    real = shutil.which("g++")
    if real is None:
        return "unchanged: no g++ on PATH (MLX does not fuse CPU kernels without it)"
    root = _cache_root() / hashlib.sha256(f"{real}\n{FLAGS}".encode()).hexdigest()[:16]
    shim_dir, kernels = root / "bin", root / "tmp"
    kernels.mkdir(parents=True, exist_ok=True)
    _write_shim(shim_dir / "g++", real)
    tempfile.tempdir = tempfile.gettempdir()  # Python's temporary files stay where they were
    os.environ["TMPDIR"] = str(kernels)
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return f"g++ {FLAGS} (kernels in {kernels})"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillery" / "mlx-jit"


def _write_shim(path: Path, real: str) -> None:
    """The script, written to a temporary file and renamed into place (concurrent workers are safe)."""
    text = f'#!/bin/sh\nexec "{real}" {FLAGS} "$@"\n'
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
