"""worker.engine.cpu_memory: MLX keeps large freed buffers for the next step instead of returning them."""

from __future__ import annotations

import mlx.core as mx
import pytest

from worker.engine import cpu_memory


@pytest.fixture
def restore_cache_limit():
    before = mx.set_cache_limit(0)
    mx.set_cache_limit(before)
    yield
    mx.set_cache_limit(before)
    mx.clear_cache()


def test_a_freed_large_buffer_is_kept_and_reused(restore_cache_limit, monkeypatch):
    monkeypatch.delenv("DISTILLERY_MLX_CACHE_MB", raising=False)
    said = cpu_memory.enable()
    assert "cache limit" in said
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    assert limit == mx.get_memory_limit() // 4
    mx.clear_cache()
    a = mx.ones((16 * 2**20,))  # 64 MiB: above MLX's own default limit of 32 MiB
    mx.eval(a)
    del a
    assert mx.get_cache_memory() >= 64 * 2**20  # kept, not handed back
    b = mx.ones((16 * 2**20,))
    mx.eval(b)
    assert mx.get_cache_memory() < 64 * 2**20  # the next array of that size took it
    del b


def test_the_limit_can_be_set_and_bad_values_are_named(restore_cache_limit, monkeypatch):
    monkeypatch.setenv("DISTILLERY_MLX_CACHE_MB", "100")
    assert cpu_memory.enable() == "MLX CPU buffer cache limit 100 MiB"
    limit = mx.set_cache_limit(0)
    assert limit == 100 * 2**20
    monkeypatch.setenv("DISTILLERY_MLX_CACHE_MB", "lots")
    assert "DISTILLERY_MLX_CACHE_MB='lots'" in cpu_memory.enable()
