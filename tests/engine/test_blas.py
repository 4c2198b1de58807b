"""worker.engine.blas: MLX's cblas_* served by a renamed copy of scipy-openblas32 (Linux only).

Each case runs in a fresh interpreter: the copy joins the global symbol scope and MLX binds its BLAS
symbols once, when it is imported. Which library libmlx.so's `cblas_sgemm` really binds to is read from
the dynamic linker's own trace (LD_DEBUG=bindings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest

from worker.engine import blas

REPO = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(
    sys.platform != "linux" or find_spec("scipy_openblas32") is None or find_spec("mlx") is None,
    reason="needs Linux with mlx and scipy-openblas32",
)

MATMUL = """
import json
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((300, 200), dtype=np.float32)
b = rng.standard_normal((200, 150), dtype=np.float32)
out = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
print(json.dumps({"first": first, "second": second, "close": bool(np.allclose(out, a @ b, rtol=1e-4, atol=1e-4))}))
"""
ENABLE = "from worker.engine import blas\nfirst = blas.enable()\nsecond = blas.enable()\n"


def run_child(code: str, cache: Path, trace: Path, **env: str) -> tuple[dict, str]:
    """Run `code` + MATMUL in a fresh interpreter; returns its report and what libmlx's cblas_sgemm bound to."""
    trace.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k not in {"DISTILLERY_BLAS", "LD_DEBUG", "LD_PRELOAD"}}
    full_env.update(XDG_CACHE_HOME=str(cache), LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(trace / "ld"), **env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + MATMUL],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    targets = {
        line.split(" to ", 1)[1].split(" [", 1)[0]
        for file in trace.glob("ld.*")
        for line in file.read_text(errors="replace").splitlines()
        if "binding file " in line and "/libmlx.so [" in line.split(" to ", 1)[0] and "`cblas_sgemm'" in line
    }
    assert len(targets) == 1, f"libmlx.so's cblas_sgemm bound to {targets or 'nothing seen'}"
    return report, targets.pop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@linux_only
def test_enable_serves_mlx_sgemm_from_openblas(cache, tmp_path):
    report, bound = run_child(ENABLE, cache, tmp_path)
    assert report["first"].startswith("OpenBLAS "), report["first"]
    assert report["second"] == report["first"]  # idempotent
    assert report["close"]
    copy = Path(bound)
    assert copy.parent == cache / "distillery" / "blas" and copy.name.startswith("libdistillery_openblas-")
    assert str(copy) in report["first"] and "cblas_sgemm" in report["first"]


@linux_only
def test_copy_exports_cblas_and_hides_unprefixed_names(cache, tmp_path):
    run_child(ENABLE, cache, tmp_path)
    (copy,) = (cache / "distillery" / "blas").glob("libdistillery_openblas-*.so")
    private = ("scipy_", "distillery_hidden_")
    exported = {name for name, defined in blas._dynsyms(copy) if defined and not name.startswith(private)}
    assert {"cblas_sgemm", "cblas_dgemm", "cblas_cgemm"} <= exported
    assert {name for name in exported if not name.startswith("cblas_")} == set()


@linux_only
def test_off_leaves_the_wheel_blas(cache, tmp_path):
    report, bound = run_child(ENABLE, cache, tmp_path, DISTILLERY_BLAS="off")
    assert report["first"] == report["second"] == "unchanged: DISTILLERY_BLAS=off"
    assert report["close"]
    assert "mlx_cpu.libs/libblas" in bound


@linux_only
def test_after_mlx_import_changes_nothing(cache, tmp_path):
    report, bound = run_child("import mlx.core\n" + ENABLE, cache, tmp_path)
    assert report["first"].startswith("unchanged: mlx already imported")
    assert report["close"]
    assert "mlx_cpu.libs/libblas" in bound


@linux_only
def test_failure_falls_back_to_the_wheel_blas(cache, tmp_path):
    code = """
    from worker.engine import blas
    def broken(src):
        raise RuntimeError("no patchelf here")
    blas._renamed_copy = broken
    first = blas.enable()
    second = blas.enable()
    """
    report, bound = run_child(code, cache, tmp_path)
    assert report["first"] == report["second"] == "unchanged: RuntimeError: no patchelf here"
    assert report["close"]
    assert "mlx_cpu.libs/libblas" in bound


@linux_only
def test_without_scipy_openblas_is_a_no_op(cache, tmp_path):
    code = """
    import importlib.util
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "scipy_openblas32" else real(name, *a)
    """
    report, bound = run_child(textwrap.dedent(code) + ENABLE, cache, tmp_path)
    assert report["first"] == "unchanged: scipy-openblas32 not installed"
    assert "mlx_cpu.libs/libblas" in bound


@linux_only
def test_concurrent_first_use_builds_one_copy(tmp_path):
    cache = tmp_path / "cache"
    code = "from worker.engine import blas\nprint(blas.enable())\n"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("DISTILLERY_BLAS", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(out.startswith("OpenBLAS ") for out in outs), outs
    assert [p.name for p in (cache / "distillery" / "blas").iterdir()] == [outs[0].rsplit("/", 1)[1]]


def test_macos_is_a_no_op(monkeypatch):
    monkeypatch.delenv("DISTILLERY_BLAS", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas._enable() == "unchanged: macOS"
