"""The compiled CPU forms of fused.py and the compiled step against MLX's / mlx-lm's plain ones: values and
gradients, under `mx.grad` and inside `mx.compile`, and the model-level install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import activations as mlx_activations
from mlx_lm.models import base as mlx_base

from tests.helpers import tiny
from worker.engine import compiled_step, cpu_jit, fused, losses, models

ROOT = Path(__file__).resolve().parents[2]


def rand(rng, *shape, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))


def assert_close(got, want, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=rtol, atol=atol)


def value_and_grads(fn, args, argnums, compiled: bool):
    """fn's value and its gradients wrt `argnums` of a scalar projection (a random cotangent, fixed)."""
    out = fn(*args)
    weights = mx.array(np.random.default_rng(9).standard_normal(out.shape).astype(np.float32))

    def scalar(*a):
        return (fn(*a) * weights).sum()

    vg = mx.value_and_grad(scalar, argnums=argnums)
    if compiled:
        vg = mx.compile(vg)
    value, grads = vg(*args)
    grads = grads if isinstance(grads, tuple) else (grads,)  # MLX gives one argnum's gradient bare
    mx.eval(out, value, grads)
    return out, grads


@pytest.mark.parametrize("compiled", [False, True])
def test_swiglu_values_and_gradients(compiled):
    rng = np.random.default_rng(0)
    gate, up = rand(rng, 3, 7, 40, scale=4.0), rand(rng, 3, 7, 40)
    got, g_got = value_and_grads(fused.swiglu, (gate, up), (0, 1), compiled)
    want, g_want = value_and_grads(mlx_activations.swiglu, (gate, up), (0, 1), compiled)
    assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
def test_swiglu_gradients_at_the_extremes(compiled):
    """The backward writes the sigmoid three ways (so the compiled step can fuse each); all of them reach
    the right limits where e^x over- or underflows, with no NaN."""
    gate = mx.array(np.array([-1e4, -100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0, 1e4], np.float32))
    up = mx.array(np.linspace(-2.0, 2.0, 9).astype(np.float32))
    got, g_got = value_and_grads(fused.swiglu, (gate, up), (0, 1), compiled)
    want, g_want = value_and_grads(mlx_activations.swiglu, (gate, up), (0, 1), compiled)
    assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        assert np.isfinite(np.array(a)).all()
        assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
def test_masked_softmax_values_and_gradients(compiled):
    rng = np.random.default_rng(1)
    scores = rand(rng, 2, 3, 5, 9, scale=3.0)
    mask = fused.causal_mask(5, 9, mx.float32)
    got, (g_got,) = value_and_grads(fused.softmax_masked, (scores, mask), (0,), compiled)
    want, (g_want,) = value_and_grads(lambda s, m: mx.softmax(s + m, axis=-1), (scores, mask), (0,), compiled)
    assert_close(got, want)
    assert_close(g_got, g_want)
    assert (np.array(got)[..., 0, 5:] == 0).all()  # the first query (the 5th of 9 positions) sees 5 keys


def test_causal_mask_for_the_last_queries():
    m = np.array(fused.causal_mask(2, 4, mx.float32))
    assert (m == np.array([[0, 0, 0, -np.inf], [0, 0, 0, 0]])).all()


@pytest.mark.parametrize("mask", ["causal", None])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "queries", "keys"),
    # the last three are long enough for the causal blocks (fused.CAUSAL_BLOCK): 2 blocks, 3 with no sliver, 4
    [(4, 4, 6, 6), (6, 2, 6, 6), (6, 3, 2, 5), (2, 1, 300, 300), (2, 2, 400, 400), (4, 2, 511, 520)],
)
def test_attention_matches_mlx_lm(mask, heads, kv_heads, queries, keys):
    """Grouped key/value heads broadcast without copies, the causal mask of the last `queries` positions."""
    rng = np.random.default_rng(heads * 10 + queries)
    q, k, v = rand(rng, 2, heads, queries, 8), rand(rng, 2, kv_heads, keys, 8), rand(rng, 2, kv_heads, keys, 8)
    scale = 8**-0.5

    def ours(q, k, v):
        return fused.scaled_dot_product_attention(q, k, v, None, scale=scale, mask=mask)

    def theirs(q, k, v):
        return mlx_base.scaled_dot_product_attention(q, k, v, None, scale=scale, mask=mask)

    for compiled in (False, True):
        got, g_got = value_and_grads(ours, (q, k, v), (0, 1, 2), compiled)
        want, g_want = value_and_grads(theirs, (q, k, v), (0, 1, 2), compiled)
        assert got.shape == (2, heads, queries, 8)
        assert_close(got, want)
        for a, b in zip(g_got, g_want, strict=True):
            assert_close(a, b)


def test_attention_with_an_explicit_mask_array_is_mlx_lms_own():
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, 1, 2, 4, 8), rand(rng, 1, 2, 4, 8), rand(rng, 1, 2, 4, 8)
    mask = mx.array(np.tril(np.ones((4, 4), bool)))
    got = fused.scaled_dot_product_attention(q, k, v, None, scale=0.3, mask=mask)
    want = mlx_base.scaled_dot_product_attention(q, k, v, None, scale=0.3, mask=mask)
    assert np.array_equal(np.array(got), np.array(want))
    with pytest.raises(ValueError, match="unknown attention mask"):
        fused.scaled_dot_product_attention(q, k, v, None, scale=0.3, mask="sliding")


@pytest.mark.parametrize("compiled", [False, True])
def test_logsumexp_with_masked_entries(compiled):
    rng = np.random.default_rng(4)
    x = np.array(rand(rng, 3, 11, 300, scale=5.0))
    x[0, :, 10:] = -1e30  # the loss's masked logits (student_buckets puts its top-k columns so)
    x = mx.array(x)
    got, (g_got,) = value_and_grads(fused.logsumexp_last, (x,), (0,), compiled)
    want, (g_want,) = value_and_grads(lambda a: mx.logsumexp(a, axis=-1, keepdims=True), (x,), (0,), compiled)
    assert got.shape == (3, 11, 1)
    assert_close(got, want)
    assert_close(g_got, g_want)


@pytest.fixture(scope="module")
def tiny_gqa(tiny_tokenizer, tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("gqa") / "m", tiny_tokenizer, layers=2, heads=4, kv_heads=2)


def test_install_swaps_the_model_module_and_keeps_its_outputs(tiny_gqa):
    model, _, _ = models.load_model(tiny_gqa)  # installs
    assert sorted(fused.installed(model)) == ["scaled_dot_product_attention", "swiglu"]
    tokens = mx.array(np.random.default_rng(5).integers(0, 500, (2, 17)))
    with_fused = model(tokens)
    fused.uninstall(model)
    try:
        assert fused.installed(model) == []
        plain = model(tokens)
        assert_close(with_fused, plain, rtol=1e-4, atol=1e-5)
    finally:
        assert sorted(fused.install(model)) == ["scaled_dot_product_attention", "swiglu"]
    assert sorted(fused.install(model)) == ["scaled_dot_product_attention", "swiglu"]  # again: unchanged


def test_compiled_step_equals_the_plain_gradients_step_after_step(tiny_gqa):
    """The compiled loss-and-grad reads the model's current parameters (state in, state out): after each
    update its loss and gradients are those of plain value_and_grad, for each teacher kind and loss setting."""
    model, _, _ = models.load_model(tiny_gqa)
    rng = np.random.default_rng(6)
    tokens = mx.array(rng.integers(0, 500, (2, 13)))
    mask = mx.array(rng.random((2, 12)) > 0.2)
    vocab = model.args.vocab_size
    dense = losses.DenseTeacher(logits=rand(rng, 2, 12, vocab, scale=2.0))

    def loss_fn(m, tokens, mask, teachers, weights, loss_cfg):
        logits = m(tokens[:, :-1])
        div = weights[0][:, None] * teachers[0].divergence(logits, loss_cfg.kind, loss_cfg.temperature)
        ce = losses.masked_cross_entropy_sum(logits, tokens[:, 1:], mask)
        n = mask.sum()
        return (mx.where(mask, div, 0.0).sum() + ce) / n, n

    class Cfg:
        def __init__(self, kind):
            self.kind, self.temperature = kind, 1.0

    plain = nn.value_and_grad(model, loss_fn)
    compiled = compiled_step.CompiledGradients(model, plain)
    seen = []
    for i, kind in enumerate(["forward_kl", "forward_kl", "jsd", "forward_kl"]):
        cfg = Cfg(kind)
        weights = mx.full((1, tokens.shape[0]), 0.5 + 0.25 * i)  # an input of the graph: each call's own
        (l_c, n_c), g_c = compiled(model, tokens, mask, [dense], weights, cfg)
        (l_p, n_p), g_p = plain(model, tokens, mask, [dense], weights, cfg)
        mx.eval(l_c, g_c, l_p, g_p)
        assert l_c.item() == pytest.approx(l_p.item(), rel=1e-5) and n_c.item() == n_p.item()
        for (_, a), (_, b) in zip(tree_flatten(g_c), tree_flatten(g_p), strict=True):
            assert_close(a, b, rtol=1e-3, atol=1e-6)
        # an update, as the optimizer makes: the next call must see it
        model.update(nn.utils.tree_map(lambda p, g: p - 0.5 * g, model.parameters(), g_p))
        mx.eval(model.parameters())
        seen.append(l_p.item())
    assert len(set(seen)) == len(seen)  # each call saw the updated parameters
    assert len(compiled._graphs) == 2  # one graph per loss setting
    assert all(c is not None for c, _ in compiled._graphs.values())  # both compiled


def test_a_graph_mlx_cannot_compile_runs_uncompiled(tiny_gqa, caplog):
    model, _, _ = models.load_model(tiny_gqa)
    tokens = mx.array(np.random.default_rng(7).integers(0, 500, (2, 9)))
    mask = mx.ones((2, 8), dtype=mx.bool_)

    def loss_fn(m, tokens, mask, teachers, weights, loss_cfg):  # mask.sum() twice, one returned: MLX 0.32 fails on it
        return losses.masked_cross_entropy_sum(m(tokens[:, :-1]), tokens[:, 1:], mask) / mask.sum(), mask.sum()

    plain = nn.value_and_grad(model, loss_fn)
    compiled = compiled_step.CompiledGradients(model, plain)
    for _ in range(2):
        (loss, n), grads = compiled(model, tokens, mask, [], None, None)
        (want, _), want_grads = plain(model, tokens, mask, [], None, None)
        assert loss.item() == want.item() and n.item() == 16
        for (_, a), (_, b) in zip(tree_flatten(grads), tree_flatten(want_grads), strict=True):
            assert np.array_equal(np.array(a), np.array(b))
    ((compiled_graph, _),) = compiled._graphs.values()
    assert compiled_graph is None and "training step not compiled" in caplog.text  # until MLX fixes it


def test_compiled_step_is_off_on_request(monkeypatch):
    assert compiled_step.wanted()  # the tests run on the CPU
    monkeypatch.setenv("DISTILLERY_COMPILE_STEP", "off")
    assert not compiled_step.wanted()


def run_python(code: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return out.stdout


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="the shim is for x86-64 Linux")
def test_cpu_jit_shim_builds_kernels_with_its_flags_in_its_own_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"DISTILLERY_CPU_JIT"}}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    code = (
        "import shutil, tempfile, os, mlx.core as mx\n"
        "from worker.engine import cpu_jit\n"
        "print(cpu_jit.enable()); print(cpu_jit.enable())\n"
        "print(shutil.which('g++')); print(tempfile.gettempdir()); print(os.environ['TMPDIR'])\n"
        "f = mx.compile(lambda x: mx.exp(x) * mx.sigmoid(x))\n"
        "x = mx.linspace(-20, 20, 1001)\n"
        "print(mx.abs(f(x) - mx.exp(x) * mx.sigmoid(x)).max().item() / mx.abs(f(x)).max().item())\n"
    )
    first, again, gxx, pytmp, kernels, err = run_python(code, env).splitlines()
    assert first == again and first.startswith(f"g++ {cpu_jit.FLAGS}")
    shim = Path(gxx)
    assert shim.is_relative_to(tmp_path / "cache") and cpu_jit.FLAGS in shim.read_text()
    assert pytmp == str(tmp_path / "tmp")  # Python's own temporary files stay where they were
    assert Path(kernels).is_relative_to(tmp_path / "cache")
    assert any(Path(kernels, "mlx").rglob("*.so"))  # MLX built the fused kernel there, with the shim
    assert float(err) < 1e-6

    env["DISTILLERY_CPU_JIT"] = "off"
    off = run_python("from worker.engine import cpu_jit; print(cpu_jit.enable())", env).strip()
    assert off == "unchanged: DISTILLERY_CPU_JIT=off"


def _plain_bucket_logits(z, ids):
    """The same buckets from MLX's own ops: the gather, a masked copy of z and its log-sum-exp."""
    top = mx.take_along_axis(z, ids, axis=-1)
    rest = mx.put_along_axis(z, ids, mx.array(-1e30, z.dtype), axis=-1)
    return mx.concatenate([top, mx.logsumexp(rest, axis=-1, keepdims=True)], axis=-1)


@pytest.mark.parametrize("compiled", [False, True])
def test_bucket_logits_values_and_gradients_equal_mlxs_own_ops(compiled):
    rng = np.random.default_rng(8)
    z = rand(rng, 2, 5, 300, scale=3.0)
    ids = np.stack([rng.permutation(300)[:16] for _ in range(10)]).reshape(2, 5, 16)
    ids[1, 4, :] = 0  # a padding row's dummies: one id sixteen times
    ids[0, 2, 3] = ids[0, 2, 9]  # and one repeat inside a real row
    ids = mx.array(ids.astype(np.int32))
    got, (g_got,) = value_and_grads(lambda x: fused.bucket_logits(x, ids), (z,), (0,), compiled)
    want, (g_want,) = value_and_grads(lambda x: _plain_bucket_logits(x, ids), (z,), (0,), compiled)
    assert got.shape == (2, 5, 17)
    assert_close(got, want)
    assert_close(g_got, g_want)


def test_bucket_logits_with_a_tail_below_float32s_range_stay_finite():
    """A row whose every other logit is 200 below its top: the tail sum underflows and is held at the floor
    (the top buckets exact, the tail ~-87 below them, gradients finite)."""
    z = np.full((1, 50), -200.0, np.float32)
    z[0, :3] = [0.0, -1.0, -2.0]
    ids = mx.array(np.array([[0, 1, 2]], np.int32))
    got, (grad,) = value_and_grads(lambda x: fused.bucket_logits(x, ids), (mx.array(z),), (0,), True)
    got = np.array(got)
    np.testing.assert_allclose(got[0, :3], [0.0, -1.0, -2.0])
    assert -90 < got[0, 3] < -80
    assert np.isfinite(np.array(grad)).all()
