"""Service latency against real processes: `distillery-server api` on a fresh PostgreSQL database with Redis as
the broker, and (for part c) a real `distillery-server worker`.

  (a) job submission: p50/p99 of N `POST /v1/jobs` (teacher_cache specs, and offline distill specs whose
      teacher caches exist already), no worker running;
  (b) `GET /v1/jobs/{id}` throughput, sequential and with a few concurrent clients (threads, one httpx client
      each);
  (c) submit-to-running through Redis: M small teacher_cache jobs, one at a time, each submitted while the
      worker is idle; latency = the job's `started_at` (set by the worker's claim) - its `created_at` (set by
      the API), both server clocks on this machine; plus the client's view (POST sent -> `started` seen by
      polling every 5 ms).

    python bench/service_latency.py [--n 200] [--gets 1000] [--clients 4] [--m 20]

Needs PostgreSQL (DISTILLERY_TEST_PG, default postgresql+psycopg://postgres@127.0.0.1:5432) and Redis
(--redis, default redis://127.0.0.1:6379/12, flushed). Client, API, database and worker share this machine's
CPUs, so every figure includes their contention.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.helpers import tiny  # noqa: E402
from tests.helpers.services import create_pg_database, drop_pg_database, free_port, wait_for  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def cli(env: dict, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "service.commands.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode:
        raise SystemExit(f"distillery-server {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def start(env: dict, folder: Path, name: str, *args: str) -> subprocess.Popen:
    log = open(folder / f"{name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "service.commands.cli", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="submissions per spec kind in (a)")
    ap.add_argument("--gets", type=int, default=1000, help="GET /v1/jobs/{id} requests per mode in (b)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in (b)")
    ap.add_argument("--m", type=int, default=20, help="jobs in (c)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    args = ap.parse_args()

    import redis

    broker = redis.Redis.from_url(args.redis)
    broker.flushdb()
    db_url = create_pg_database("distillery_bench", migrate=False)
    work = Path(tempfile.mkdtemp(prefix="distillery-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        DISTILLERY_DATABASE_URL=db_url,
        DISTILLERY_BROKER_URL=args.redis,
        DISTILLERY_ARTIFACT_ROOT=str(work / "artifacts"),
        DISTILLERY_CACHE_DIR=str(work / "cache"),
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    procs: list[subprocess.Popen] = []
    rows: list[tuple[str, str]] = []
    try:
        t = time.perf_counter()
        tok = work / "tokenizer"
        tiny.build_tokenizer(tok)
        teacher = tiny.build_model(work / "teacher", tok, hidden=96, layers=3, seed=1)
        student = tiny.build_model(work / "student", tok, hidden=64, layers=4, seed=2)
        train = tiny.write_jsonl(work / "train.jsonl", tiny.text_records(32, offset=0))
        valid = tiny.write_jsonl(work / "valid.jsonl", tiny.text_records(8, offset=100))
        cli(env, "migrate")
        key = cli(env, "keys", "create", "--project", "bench").strip().splitlines()[-1]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(api := start(env, work, "api", "api", "--port", str(port)))

        def ready():
            if api.poll() is not None:
                raise SystemExit(f"the API exited:\n{(work / 'api.log').read_text()}")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "the API", interval=0.2)
        print(f"setup (tiny models, migrate, key, API up): {time.perf_counter() - t:.1f}s; work dir {work}")
        headers = {"Authorization": f"Bearer {key}"}
        c = httpx.Client(base_url=url, headers=headers, timeout=30)
        ids = {}
        for name, path in (("train", train), ("valid", valid)):
            with open(path, "rb") as f:
                r = c.post("/v1/datasets", files={"file": (path.name, f)}, data={"name": name})
            r.raise_for_status()
            ids[name] = r.json()["id"]
        for name, path in (("teacher", teacher), ("student", student)):
            r = c.post("/v1/models", json={"name": name, "path": str(path)})
            r.raise_for_status()
            ids[name] = r.json()["id"]

        def cache_spec(top_k: int = 16) -> dict:
            return {
                "kind": "teacher_cache",
                "spec": {"teacher": ids["teacher"], "data": ids["train"], "top_k": top_k, "max_seq_len": 48},
            }

        distill = {
            "kind": "distill",
            "spec": {
                "student": {"model": ids["student"]},
                "teachers": [{"model": ids["teacher"]}],
                "teacher_mode": "offline",
                "data": {"train": ids["train"], "valid": ids["valid"]},
                "loss": {"top_k": 16},
                "adapter": {"rank": 4},
                "training": {"steps": 4, "batch_size": 4, "max_seq_len": 48},
            },
        }

        # ---------------------------------------------------------------- (a) submission latency
        for _ in range(10):  # warm-up: connections, caches, the first cache jobs of the distill spec
            c.post("/v1/jobs", json=cache_spec()).raise_for_status()
            c.post("/v1/jobs", json=distill).raise_for_status()
        job_ids: list[str] = []
        for label, body in (("teacher_cache", cache_spec()), ("distill (offline, caches exist)", distill)):
            lat = []
            t_all = time.perf_counter()
            for _ in range(args.n):
                t0 = time.perf_counter()
                r = c.post("/v1/jobs", json=body)
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text
                job_ids.append(r.json()["id"])
            wall = time.perf_counter() - t_all
            rows.append(
                (
                    f"(a) POST /v1/jobs {label}",
                    f"n={args.n}  p50 {pct(lat, 0.5) * 1e3:6.1f} ms  p99 {pct(lat, 0.99) * 1e3:6.1f} ms  "
                    f"max {max(lat) * 1e3:6.1f} ms  ({args.n / wall:.0f}/s)",
                )
            )
            print(rows[-1][0], rows[-1][1])
        queued = broker.llen("distillery")

        # ---------------------------------------------------------------- (b) GET throughput
        target = job_ids[len(job_ids) // 2]
        lat = []
        t0 = time.perf_counter()
        for _ in range(args.gets):
            t1 = time.perf_counter()
            c.get(f"/v1/jobs/{target}").raise_for_status()
            lat.append(time.perf_counter() - t1)
        seq_rps = args.gets / (time.perf_counter() - t0)
        rows.append(
            (
                "(b) GET /v1/jobs/{id} sequential",
                f"{seq_rps:7.0f} req/s  p50 {pct(lat, 0.5) * 1e3:5.1f} ms  p99 {pct(lat, 0.99) * 1e3:5.1f} ms",
            )
        )
        print(*rows[-1])
        per = args.gets // args.clients
        lats: list[list[float]] = [[] for _ in range(args.clients)]
        errors: list[str] = []

        def client_loop(i: int) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=30) as ci:
                for k in range(per):
                    t1 = time.perf_counter()
                    r = ci.get(f"/v1/jobs/{job_ids[(i * per + k) % len(job_ids)]}")
                    lats[i].append(time.perf_counter() - t1)
                    if r.status_code != 200:
                        errors.append(r.text)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        conc_rps = per * args.clients / (time.perf_counter() - t0)
        all_lat = [x for lst in lats for x in lst]
        rows.append(
            (
                f"(b) GET /v1/jobs/{{id}} {args.clients} clients",
                f"{conc_rps:7.0f} req/s  p50 {pct(all_lat, 0.5) * 1e3:5.1f} ms  "
                f"p99 {pct(all_lat, 0.99) * 1e3:5.1f} ms  errors {len(errors)}",
            )
        )
        print(*rows[-1])

        # ---------------------------------------------------------------- (c) submit -> running
        # the jobs of (a) stay queued in the database; their messages go, so the worker sees only (c)'s
        broker.flushdb()
        wenv = {**env, "DISTILLERY_ENQUEUE_GRACE_SECONDS": "86400"}
        procs.append(
            worker := start(
                wenv, work, "worker", "worker", "--loglevel", "info", "--hostname", f"bench-{os.getpid()}@%h"
            )
        )

        def run_one(top_k: int, poll: float = 0.005) -> tuple[float, float, float]:
            t0 = time.time()
            r = c.post("/v1/jobs", json=cache_spec(top_k))
            assert r.status_code == 201, r.text
            jid = r.json()["id"]
            seen = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited:\n{(work / 'worker.log').read_text()[-4000:]}")
                j = c.get(f"/v1/jobs/{jid}").json()
                if seen is None and j["started_at"]:
                    seen = time.time()
                if j["status"] in ("succeeded", "failed", "cancelled"):
                    assert j["status"] == "succeeded", j
                    return ts(j["started_at"]) - ts(j["created_at"]), seen - t0, ts(j["created_at"]) - t0
                time.sleep(poll if seen is None else 0.05)
            raise SystemExit(f"job {jid} did not finish:\n{(work / 'worker.log').read_text()[-4000:]}")

        t0 = time.perf_counter()
        run_one(100)  # warm-up: worker start, MLX import, first model load (not counted)
        print(f"worker up and first job done in {time.perf_counter() - t0:.1f}s")
        server, client_seen = [], []
        for i in range(args.m):
            time.sleep(0.3)  # the worker back at its idle wait
            s, cseen, _ = run_one(101 + i)
            server.append(s)
            client_seen.append(cseen)
        rows.append(
            (
                "(c) submit -> started_at (server clocks)",
                f"m={args.m}  p50 {pct(server, 0.5) * 1e3:6.1f} ms  p99 {pct(server, 0.99) * 1e3:6.1f} ms  "
                f"max {max(server) * 1e3:6.1f} ms",
            )
        )
        print(*rows[-1])
        rows.append(
            (
                "(c) POST sent -> running seen (client)",
                f"m={args.m}  p50 {pct(client_seen, 0.5) * 1e3:6.1f} ms  p99 {pct(client_seen, 0.99) * 1e3:6.1f} ms"
                f"  (5 ms polling)",
            )
        )
        print(*rows[-1])

        print()
        print(
            f"Distillery service latency — API ({url}) on PostgreSQL, Redis broker; "
            f"{os.cpu_count()} CPUs shared by client, API, PostgreSQL, Redis and worker"
        )
        width = max(len(r[0]) for r in rows)
        print("-" * (width + 70))
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
        print("-" * (width + 70))
        print(f"(a) left {queued} messages in Redis (no worker); (c) used a fresh teacher_cache job each time")
        print(
            f"RESULT submit_p50_ms={pct_a(rows)} get_seq_rps={seq_rps:.0f} get_{args.clients}c_rps={conc_rps:.0f} "
            f"submit_to_running_p50_ms={pct(server, 0.5) * 1e3:.1f} submit_to_running_p99_ms={pct(server, 0.99) * 1e3:.1f}"
        )
        c.close()
    finally:
        for p in reversed(procs):
            stop(p)
        broker.flushdb()
        broker.close()
        drop_pg_database(db_url)


def pct_a(rows: list[tuple[str, str]]) -> str:
    """The p50 of the first (a) row, for the RESULT line."""
    value = rows[0][1]
    return value.split("p50", 1)[1].split("ms", 1)[0].strip()


if __name__ == "__main__":
    main()
