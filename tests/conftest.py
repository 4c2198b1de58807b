"""Shared fixtures: tiny offline models and datasets, built once per test session; a migrated PostgreSQL
database for the session (API and worker tests share it; each test empties it first) and a fresh, empty one
per test (for tests that run `distillery-server migrate` themselves). Helpers: tests/helpers/services.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.engine import blas, cpu_jit

blas.enable()  # before anything imports MLX: tests run on OpenBLAS like the worker does
cpu_jit.enable()  # and MLX's CPU kernels are built as the worker builds them

from tests.helpers import tiny  # noqa: E402
from tests.helpers.services import create_pg_database, drop_pg_database  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_root) -> Path:
    out = tiny_root / "tokenizer"
    tiny.build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tiny_root, tiny_tokenizer) -> Path:
    """A 3-layer model briefly pretrained on real prose: a peaked, non-trivial teacher."""
    out = tiny.build_model(tiny_root / "teacher", tiny_tokenizer, hidden=96, layers=3, seed=1)
    tiny.pretrain(out)
    return out


@pytest.fixture(scope="session")
def tiny_student(tiny_root, tiny_tokenizer) -> Path:
    """An untrained 4-layer model sharing the teacher's tokenizer."""
    return tiny.build_model(tiny_root / "student", tiny_tokenizer, hidden=64, layers=4, seed=2)


@pytest.fixture(scope="session")
def tiny_text(tiny_root) -> dict[str, Path]:
    return {
        "train": tiny.write_jsonl(tiny_root / "train.jsonl", tiny.text_records(48, offset=0)),
        "valid": tiny.write_jsonl(tiny_root / "valid.jsonl", tiny.text_records(8, offset=100)),
    }


# ---------------------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database for the whole session (tests truncate it before use)."""
    url = create_pg_database("distillery_test")
    yield url
    drop_pg_database(url)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A new, empty (unmigrated) PostgreSQL database, dropped after the test."""
    url = create_pg_database("distillery_e2e", migrate=False)
    yield url
    drop_pg_database(url)
