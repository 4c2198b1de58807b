"""How long a cancel of a running distill job takes to end it: from the committed `cancel_requested` to the job's
`cancelled` row, measured against a real `distillery-server worker` (SQLite, Redis db 13, the production lease
of 60 s), with the cancel sent in each phase of a run:

  train    between training steps (after the first checkpoint)
  search   during the learning-rate search (`learning_rate: auto`, long trials)
  eval     during a long evaluation (the step-0 evaluation of a large validation set)

    python bench/cancel_latency.py [--phases train,search,eval] [--repeats 2]

Prints one RESULT line per phase: the latencies measured, in seconds. Tiny models (tests/helpers/tiny.py), so
the figures are about where a run looks at its cancel flag, not about the model's speed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from tests.helpers import tiny  # noqa: E402
from tests.helpers.services import redis_client, wait_for  # noqa: E402


def spec(refs: dict, phase: str) -> dict:
    training = {
        "steps": 100000,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "max_seq_len": 128,
        "eval_every": 100000,
        "checkpoint_every": 5,
        "eval_batches": 2,
        "seed": 3,
    }
    valid = refs["valid"]
    if phase == "search":
        training.update(learning_rate="auto", lr_search={"steps": 200, "rates": [1e-4, 1e-3]})
    if phase == "eval":
        training.update(eval_batches=None)
        valid = refs["big_valid"]
    return {
        "student": {"model": refs["student"]},
        "teachers": [{"model": refs["teacher"]}],
        "teacher_mode": "online",
        "data": {"train": refs["train"], "valid": valid},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0, "top_k": 16},
        "adapter": {"type": "lora", "rank": 4, "scale": 10.0},
        "training": training,
    }


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the worker
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="train,search,eval")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    broker = "redis://127.0.0.1:6379/13"
    redis_client(broker).flushdb()
    folder = Path(tempfile.mkdtemp(prefix="cancel-latency-"))
    from tests.worker.conftest import Service, sqlite_url

    svc = Service(folder, sqlite_url(folder), broker)
    svc.env["DISTILLERY_LEASE_SECONDS"] = "60"  # the production default: heartbeats every 20 s
    os.environ.update({k: v for k, v in svc.env.items() if k.startswith("DISTILLERY_")})
    from service.core import lifecycle
    from service.core.db.models import Checkpoint, Job, JobEvent
    from service.core.db.session import session_scope

    tok = folder / "tok"
    tiny.build_tokenizer(tok)
    teacher = tiny.build_model(folder / "teacher", tok, hidden=96, layers=3, seed=1)
    student = tiny.build_model(folder / "student", tok, hidden=64, layers=4, seed=2)
    refs = {
        "teacher": svc.add_model(teacher, "teacher"),
        "student": svc.add_model(student, "student"),
        "train": svc.add_dataset(tiny.write_jsonl(folder / "train.jsonl", tiny.text_records(48)), "train"),
        "valid": svc.add_dataset(tiny.write_jsonl(folder / "valid.jsonl", tiny.text_records(8, offset=100)), "v"),
        "big_valid": svc.add_dataset(
            tiny.write_jsonl(folder / "big.jsonl", tiny.text_records(48, chars=1200) * 12), "big"
        ),
    }
    svc.start_worker()

    def has_event(job_id: str, kind: str) -> bool:
        with session_scope(svc.database_url) as s:
            return s.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.kind == kind)) is not None

    def ready(job_id: str, phase: str) -> bool:
        with session_scope(svc.database_url) as s:
            if phase == "train":
                return s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id)) is not None
            status = s.get(Job, job_id).status
        if status in lifecycle.TERMINAL:
            raise SystemExit(f"job {job_id} ended {status} before its {phase} phase:\n{svc.logs()}")
        if phase == "search":
            return has_event(job_id, "lr_search")
        return status == "running" and has_event(job_id, "student")  # eval: the model is loaded, step 0 runs

    try:
        for phase in args.phases.split(","):
            figures = []
            for _ in range(args.repeats):
                job_id = svc.submit("distill", spec(refs, phase))
                wait_for(
                    lambda job_id=job_id, phase=phase: ready(job_id, phase),
                    300,
                    f"job {job_id} in its {phase} phase",
                    interval=0.05,
                )
                if phase == "eval":
                    time.sleep(0.5)
                with session_scope(svc.database_url) as s:
                    lifecycle.request_cancel(s, s.get(Job, job_id))
                t0 = time.monotonic()

                def ended(job_id=job_id):
                    with session_scope(svc.database_url) as s:
                        return s.get(Job, job_id).status in lifecycle.TERMINAL

                wait_for(ended, 600, f"job {job_id} to end", interval=0.02)
                figures.append(time.monotonic() - t0)
                with session_scope(svc.database_url) as s:
                    status = s.get(Job, job_id).status
                assert status == "cancelled", status
            print(f"RESULT cancel_latency phase={phase} seconds={' '.join(f'{x:.2f}' for x in figures)}", flush=True)
    finally:
        svc.stop_workers()


if __name__ == "__main__":
    main()
