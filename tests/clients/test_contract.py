"""`distillery_contract` is the one definition of what the API, the workers and the SDK share, and a pure one:
it imports pydantic and the standard library only, so the SDK installs without the server's stack, and the API
process needs nothing of the worker's (no MLX, no numpy).
"""

from __future__ import annotations

import subprocess
import sys

import distillery_contract as contract
from distillery import types as sdk_types
from distillery_contract import jobs, records, specs
from service.core import lifecycle
from service.http import schemas


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded by `code` in a fresh interpreter, beyond those a bare interpreter loads."""
    probe = (
        "import sys; before = set(sys.modules); {code}; "
        "print(' '.join(sorted({{m.split('.')[0] for m in set(sys.modules) - before}})))"
    )
    done = subprocess.run([sys.executable, "-c", probe.format(code=code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.split())


PYDANTIC = {"pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection"}


def test_the_contract_imports_only_pydantic_and_the_standard_library():
    loaded = _modules_after("import distillery_contract")
    third_party = {m for m in loaded if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert third_party <= PYDANTIC | {"distillery_contract"}, third_party - PYDANTIC


def test_the_sdk_imports_no_server_or_engine_code():
    loaded = _modules_after("import distillery, distillery.cli")
    assert not loaded & {"service", "worker", "mlx", "mlx_lm", "numpy", "litestar", "sqlalchemy", "celery"}


def test_the_api_imports_no_worker_code():
    loaded = _modules_after("import service.http.app; service.http.app.create_app")
    assert not loaded & {"worker", "mlx", "mlx_lm"}, loaded & {"worker", "mlx", "mlx_lm"}


def test_statuses_have_one_definition():
    for name in ("QUEUED", "RUNNING", "CANCEL_REQUESTED", "SUCCEEDED", "FAILED", "CANCELLED", "TERMINAL", "ACTIVE"):
        assert getattr(lifecycle, name) is getattr(jobs, name), name
    assert schemas.JOB_STATUSES is jobs.JOB_STATUSES and schemas.JOB_KINDS is jobs.JOB_KINDS
    assert sdk_types.TERMINAL is jobs.TERMINAL
    assert set(jobs.TERMINAL) | {jobs.QUEUED, *jobs.ACTIVE} == set(jobs.JOB_STATUSES)
    assert not set(jobs.TERMINAL) & set(jobs.ACTIVE)


def test_the_service_defaults_are_the_specs_defaults():
    """lifecycle fills in a spec's top_k / max_seq_len (teacher cache keys, evaluation specs) with these."""
    assert specs.LossSpec().top_k == specs.TeacherCacheSpec(teacher="t", data="d").top_k == jobs.DEFAULT_TOP_K
    assert specs.TrainingSpec().max_seq_len == jobs.DEFAULT_MAX_SEQ_LEN
    assert specs.TeacherCacheSpec(teacher="t", data="d").max_seq_len == jobs.DEFAULT_MAX_SEQ_LEN


def test_an_evaluation_spec_is_a_valid_benchmark_with_the_reserved_labels():
    spec = specs.DistillSpec.model_validate(
        {
            "student": {"model": "s"},
            "teachers": [{"model": "t"}],
            "data": {"train": "ds_1"},
            "evaluate": {"data": {"text": "ds_2"}, "candidates": [{"label": "sft", "adapter": "job_1"}]},
        }
    )
    bench = specs.BenchmarkSpec.model_validate(lifecycle.evaluation_spec("job_9", spec.model_dump(mode="json")))
    labels = [c.label for c in bench.candidates]
    assert labels == [jobs.BASELINE_LABEL, jobs.DISTILLED_LABEL, "sft"]
    assert bench.max_seq_len == jobs.DEFAULT_MAX_SEQ_LEN


def test_a_dataset_error_names_the_line():
    checker = records.JsonlChecker("train.jsonl")
    checker.feed(b'{"text": "ok"}\n{"text": ""}\n')
    try:
        checker.close()
    except contract.DatasetError as e:
        assert str(e) == "train.jsonl:2: field 'text' is empty"
    else:
        raise AssertionError("an empty text was accepted")
    assert contract.TRAINABLE_FORMATS == ("text", "completions", "chat")
    assert set(contract.FORMATS) == set(contract.REQUIRED) == set(contract.OPTIONAL)
