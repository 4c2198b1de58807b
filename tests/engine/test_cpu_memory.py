"""worker.engine.cpu_memory: while training, MLX keeps large freed buffers for the next step."""

from __future__ import annotations

import mlx.core as mx
import pytest

from worker.engine import cpu_memory

BIG = 16 * 2**20  # float32s: 64 MiB, above MLX's own default cache limit of 32 MiB


def cache_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


@pytest.fixture
def restore_cache_limit():
    before = cache_limit()
    yield before
    mx.set_cache_limit(before)
    mx.clear_cache()


def test_inside_a_freed_large_buffer_is_kept_and_reused_and_afterwards_not(restore_cache_limit, monkeypatch):
    monkeypatch.delenv("DISTILLERY_MLX_CACHE_MB", raising=False)
    mx.set_cache_limit(32 * 2**20)
    with cpu_memory.reusing_buffers():
        assert cache_limit() == mx.get_memory_limit() // 4
        a = mx.ones((BIG,))
        mx.eval(a)
        del a
        assert mx.get_cache_memory() >= 4 * BIG  # kept, not handed back
        b = mx.ones((BIG,))
        mx.eval(b)
        assert mx.get_cache_memory() < 4 * BIG  # the next array of that size took it
        del b
    assert cache_limit() == 32 * 2**20
    assert mx.get_cache_memory() == 0
    c = mx.ones((BIG,))
    mx.eval(c)
    del c
    assert mx.get_cache_memory() < 4 * BIG  # outside, above the limit: returned


def test_the_limit_can_be_set_and_bad_values_are_named(restore_cache_limit, monkeypatch):
    monkeypatch.setenv("DISTILLERY_MLX_CACHE_MB", "100")
    assert cpu_memory.enable() == "MLX CPU buffer cache limit 100 MiB"
    assert cache_limit() == 100 * 2**20
    monkeypatch.setenv("DISTILLERY_MLX_CACHE_MB", "lots")
    assert "DISTILLERY_MLX_CACHE_MB='lots'" in cpu_memory.enable()
    assert cache_limit() == 100 * 2**20
