"""Distillation losses against independent float64 NumPy references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from distillery_contract.specs import LossOverride, LossSpec
from worker.engine.losses import (
    DIVERGENCE_KINDS,
    LOG_PROB_FLOOR,
    DenseTeacher,
    FixedWeights,
    SparseTeacher,
    TeacherWeighting,
    dense_divergence,
    distill_loss,
    divergence,
    log_softmax_t,
    sparse_divergence,
    student_buckets,
    teacher_buckets,
)

# ------------------------------------------------------------------------------------------------------
# NumPy references (float64, probability space where that is the plain definition)


def np_logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    return z - np_logsumexp(z)[..., None]


def np_kl(log_a: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    a = np.exp(log_a)
    with np.errstate(invalid="ignore"):
        return np.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def np_divergence(kind: str, log_p: np.ndarray, log_q: np.ndarray, beta: float = 0.5, skew: float = 0.1):
    log_p, log_q = np.asarray(log_p, np.float64), np.asarray(log_q, np.float64)
    p, q = np.exp(log_p), np.exp(log_q)
    with np.errstate(divide="ignore"):
        if kind == "forward_kl":
            return np_kl(log_p, log_q)
        if kind == "reverse_kl":
            # The documented floor on the teacher's log-probs (exact answer: +inf where p = 0 < q).
            return np_kl(log_q, np.maximum(log_p, LOG_PROB_FLOOR))
        if kind == "jsd":
            log_m = np.log(beta * p + (1 - beta) * q)
            return beta * np_kl(log_p, log_m) + (1 - beta) * np_kl(log_q, log_m)
        if kind == "skew_kl":
            return np_kl(log_p, np.log(skew * p + (1 - skew) * q))
        if kind == "tvd":
            return 0.5 * np.abs(p - q).sum(-1)
    raise AssertionError(kind)


def np_buckets(log_probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Collapse full log-probs [..., V] onto the k ids plus one tail bucket [..., k + 1]."""
    top = np.take_along_axis(log_probs, ids, axis=-1)
    rest = log_probs.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=-1)
    return np.concatenate([top, np_logsumexp(rest)[..., None]], axis=-1)


def make_cache(teacher_logits: np.ndarray, k: int):
    """What the teacher cache stores at T = 1: top-k ids, their log-probs, log of the remaining mass."""
    log_p = np_log_softmax(teacher_logits)
    ids = np.argsort(-log_p, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(log_p, ids, axis=-1)
    rest = log_p.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=-1)
    return ids, top, np_logsumexp(rest)


def mxa(x, dtype=mx.float32) -> mx.array:
    return mx.array(np.asarray(x)).astype(dtype)


def close(actual: mx.array, expected: np.ndarray, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(np.array(actual.astype(mx.float32)), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------------
# Inputs

B, L, V = 2, 3, 64


def case_logits(case: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(teacher logits, student logits) [B, L, V] for one kind of teacher distribution."""
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(B, L, V)) * 3
    teacher = rng.normal(size=(B, L, V)) * 3
    if case == "peaked":  # almost all mass on one token
        hot = rng.integers(0, V, size=(B, L))
        np.put_along_axis(teacher, hot[..., None], 30.0, axis=-1)
    elif case == "very_peaked":  # log-probs down to about -150
        teacher = rng.normal(size=(B, L, V)) * 40
    elif case == "zeros":  # exact zeros in p
        teacher[rng.random(size=(B, L, V)) < 0.4] = -np.inf
        teacher[..., 0] = 1.0  # at least one token with mass
    return teacher, student


CASES = ["spread", "peaked", "very_peaked", "zeros"]


# ------------------------------------------------------------------------------------------------------
# divergence


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_divergence_matches_numpy(kind, case):
    teacher, student = case_logits(case)
    log_p, log_q = np_log_softmax(teacher), np_log_softmax(student)
    got = divergence(kind, mxa(log_p), mxa(log_q), beta=0.3, skew=0.2)
    assert got.shape == (B, L) and got.dtype == mx.float32
    close(got, np_divergence(kind, log_p, log_q, beta=0.3, skew=0.2))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_divergence_nonnegative_and_zero_for_equal(kind, case):
    teacher, student = case_logits(case)
    log_p, log_q = mxa(np_log_softmax(teacher)), mxa(np_log_softmax(student))
    assert np.all(np.array(divergence(kind, log_p, log_q)) >= -1e-6)
    np.testing.assert_allclose(np.array(divergence(kind, log_p, log_p)), 0.0, atol=1e-6)


def test_tvd_at_most_one_and_one_for_disjoint_supports():
    teacher, student = case_logits("spread")
    assert np.all(np.array(divergence("tvd", mxa(np_log_softmax(teacher)), mxa(np_log_softmax(student)))) <= 1.0)
    log_p = np.full(V, -np.inf)
    log_p[: V // 2] = -math.log(V // 2)
    log_q = log_p[::-1].copy()
    close(divergence("tvd", mxa(log_p), mxa(log_q)), 1.0)


def test_jsd_symmetry_and_bound():
    teacher, student = case_logits("spread")
    log_p, log_q = mxa(np_log_softmax(teacher)), mxa(np_log_softmax(student))
    close(divergence("jsd", log_p, log_q, beta=0.5), np.array(divergence("jsd", log_q, log_p, beta=0.5)))
    # In general the roles swap with beta: JSD_b(p, q) = JSD_{1-b}(q, p).
    close(divergence("jsd", log_p, log_q, beta=0.2), np.array(divergence("jsd", log_q, log_p, beta=0.8)))
    # Bounded by the entropy of (b, 1 - b), reached exactly for disjoint supports (zeros on both sides).
    beta = 0.3
    entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert np.all(np.array(divergence("jsd", log_p, log_q, beta=beta)) <= entropy + 1e-6)
    disjoint_p = np.full(V, -np.inf)
    disjoint_p[:4] = -math.log(4)
    disjoint_q = disjoint_p[::-1].copy()
    close(divergence("jsd", mxa(disjoint_p), mxa(disjoint_q), beta=beta), entropy)


def test_skew_kl_limits():
    teacher, student = case_logits("peaked")
    log_p, log_q = mxa(np_log_softmax(teacher)), mxa(np_log_softmax(student))
    close(divergence("skew_kl", log_p, log_q, skew=0.0), np.array(divergence("forward_kl", log_p, log_q)))
    # Skewing towards p can only shrink the divergence (convexity of KL in its second argument).
    skewed = np.array(divergence("skew_kl", log_p, log_q, skew=0.5))
    assert np.all(skewed <= np.array(divergence("forward_kl", log_p, log_q)))


def test_reverse_kl_with_teacher_zeros_is_large_but_finite():
    teacher, student = case_logits("zeros")
    got = np.array(divergence("reverse_kl", mxa(np_log_softmax(teacher)), mxa(np_log_softmax(student))))
    assert np.all(np.isfinite(got)) and np.all(got > 100)


def test_invalid_arguments_raise():
    log_p = mxa(np_log_softmax(np.zeros(V)))
    with pytest.raises(ValueError, match="unknown divergence kind"):
        divergence("kl", log_p, log_p)
    with pytest.raises(ValueError):
        divergence("jsd", log_p, log_p, beta=1.0)
    with pytest.raises(ValueError):
        divergence("skew_kl", log_p, log_p, skew=1.0)
    with pytest.raises(ValueError):
        log_softmax_t(log_p, 0.0)
    logits = mx.zeros((1, 2, V))
    with pytest.raises(ValueError, match="unknown divergence kind"):
        dense_divergence(logits, logits, "nope", 1.0)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        distill_loss(
            logits,
            mx.zeros((1, 2), mx.int32),
            mx.ones((1, 2)),
            [DenseTeacher(logits)],
            None,
            SimpleNamespace(kind="nope"),
        )


# ------------------------------------------------------------------------------------------------------
# Temperature and dense


def test_log_softmax_t_float16_in_float32_out():
    _, student = case_logits("spread")
    got = log_softmax_t(mxa(student, mx.float16), 2.5)
    assert got.dtype == mx.float32
    close(got, np_log_softmax(np.array(mxa(student, mx.float16).astype(mx.float32)), 2.5))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_dense_divergence_is_t_squared_times_softened_divergence(kind, temperature):
    teacher, student = case_logits("spread", seed=1)
    got = dense_divergence(mxa(student), mxa(teacher), kind, temperature, beta=0.4, skew=0.3)
    ref = np_divergence(kind, np_log_softmax(teacher, temperature), np_log_softmax(student, temperature), 0.4, 0.3)
    close(got, temperature**2 * ref)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dense_forward_kl_gradient_is_t_times_q_minus_p(temperature):
    # d/ds [T² KL(softmax(t/T) ‖ softmax(s/T))] = T (q − p): the reason for the T² factor.
    teacher, student = case_logits("spread", seed=2)
    grad = mx.grad(lambda s: dense_divergence(s, mxa(teacher), "forward_kl", temperature).sum())(mxa(student))
    p, q = np.exp(np_log_softmax(teacher, temperature)), np.exp(np_log_softmax(student, temperature))
    close(grad, temperature * (q - p), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Sparse (cached teacher)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_sparse_equals_divergence_on_hand_made_buckets(kind, case):
    teacher, student = case_logits(case, seed=3)
    k = 8
    ids, top, tail = make_cache(teacher, k)
    got = sparse_divergence(mxa(student), mxa(ids, mx.int32), mxa(top), mxa(tail), kind, 1.0, V, skew=0.25)
    ref = np_divergence(
        kind, np_buckets(np_log_softmax(teacher), ids), np_buckets(np_log_softmax(student), ids), skew=0.25
    )
    close(got, ref)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_sparse_is_a_lower_bound_on_dense(kind):
    teacher, student = case_logits("spread", seed=4)
    ids, top, tail = make_cache(teacher, 5)
    sparse = np.array(sparse_divergence(mxa(student), mxa(ids, mx.int32), mxa(top), mxa(tail), kind, 1.0, V))
    dense = np.array(dense_divergence(mxa(student), mxa(teacher), kind, 1.0))
    assert np.all(sparse <= dense + 1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_sparse_with_k_equal_v_minus_1_is_dense(kind, temperature):
    # One uncached token: the tail bucket is that token, and a uniform tail over one token is exact at any T.
    teacher, student = case_logits("spread", seed=5)
    ids, top, tail = make_cache(teacher, V - 1)
    sparse = sparse_divergence(mxa(student), mxa(ids, mx.int32), mxa(top), mxa(tail), kind, temperature, V)
    close(sparse, np.array(dense_divergence(mxa(student), mxa(teacher), kind, temperature)), rtol=1e-4, atol=1e-5)


def test_sparse_forward_kl_approaches_dense_when_tail_is_tiny():
    teacher, student = case_logits("spread", seed=6)
    teacher[..., :8] += 40.0  # the top 8 hold all but ~1e-15 of the mass
    ids, top, tail = make_cache(teacher, 8)
    assert np.all(tail < -25)
    sparse = sparse_divergence(mxa(student), mxa(ids, mx.int32), mxa(top), mxa(tail), "forward_kl", 1.0, V)
    close(sparse, np.array(dense_divergence(mxa(student), mxa(teacher), "forward_kl", 1.0)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 5.0])
def test_teacher_buckets_uniform_tail_at_temperature(temperature):
    teacher, student = case_logits("spread", seed=7)
    k = 6
    ids, top, tail = make_cache(teacher, k)
    # Reference: spell out the modelled teacher over all V tokens (tail spread evenly), soften, re-bucket.
    modelled = np.repeat((tail - math.log(V - k))[..., None], V, axis=-1)
    np.put_along_axis(modelled, ids, top, axis=-1)
    ref_p = np_buckets(np_log_softmax(modelled, temperature), ids)
    close(teacher_buckets(mxa(top), mxa(tail), temperature, V), ref_p)

    ref_q = np_buckets(np_log_softmax(student, temperature), ids)
    close(student_buckets(mxa(student), mxa(ids, mx.int32), temperature), ref_q)
    for kind in DIVERGENCE_KINDS:
        got = sparse_divergence(mxa(student), mxa(ids, mx.int32), mxa(top), mxa(tail), kind, temperature, V)
        close(got, temperature**2 * np_divergence(kind, ref_p, ref_q))

    if temperature > 1:  # the uniform tail over-estimates the true softened tail mass
        true_tail = np_buckets(np_log_softmax(teacher, temperature), ids)[..., -1]
        assert np.all(true_tail <= ref_p[..., -1] + 1e-9)


def test_sparse_at_t1_uses_cache_values_as_is():
    teacher, _ = case_logits("peaked", seed=8)
    ids, top, tail = make_cache(teacher, 4)
    close(teacher_buckets(mxa(top), mxa(tail), 1.0, V), np.concatenate([top, tail[..., None]], axis=-1), atol=1e-6)


def test_sparse_float16_cache():
    teacher, student = case_logits("spread", seed=9)
    ids, top, tail = make_cache(teacher, 16)
    got = sparse_divergence(
        mxa(student, mx.float16), mxa(ids, mx.int32), mxa(top, mx.float16), mxa(tail, mx.float16), "forward_kl", 1.0, V
    )
    ref = np_divergence(
        "forward_kl",
        np_buckets(np_log_softmax(teacher), ids),
        np_buckets(np_log_softmax(np.array(mxa(student, mx.float16).astype(mx.float32))), ids),
    )
    close(got, ref, rtol=5e-3, atol=5e-3)  # float16 rounding of the cached log-probs


@pytest.mark.parametrize("tail_dummy", [0.0, np.nan, -np.inf])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_sparse_padding_dummies_stay_finite(kind, tail_dummy):
    _, student = case_logits("spread", seed=10)
    k = 4
    ids = mx.zeros((B, L, k), mx.int32)
    top = mx.zeros((B, L, k), mx.float16)
    tail = mx.full((B, L), tail_dummy, mx.float16)

    def f(s):
        return sparse_divergence(s, ids, top, tail, kind, 2.0, V).sum()

    value, grad = mx.value_and_grad(f)(mxa(student))
    assert np.isfinite(value.item()) and np.all(np.isfinite(np.array(grad)))


def test_sparse_top_k_equal_to_vocab_stays_finite():
    teacher, student = case_logits("spread", seed=11)
    log_p = np_log_softmax(teacher)
    ids = np.argsort(-log_p, axis=-1)
    top = np.take_along_axis(log_p, ids, axis=-1)
    tail = np.full((B, L), -np.inf)  # nothing left
    for kind in DIVERGENCE_KINDS:

        def f(s, kind=kind):
            return sparse_divergence(s, mxa(ids, mx.int32), mxa(top), mxa(tail), kind, 1.0, V).sum()

        value, grad = mx.value_and_grad(f)(mxa(student))
        close(value, np_divergence(kind, log_p, np_log_softmax(student)).sum(), rtol=1e-4, atol=1e-4)
        assert np.all(np.isfinite(np.array(grad)))


# ------------------------------------------------------------------------------------------------------
# distill_loss

DB, DL, DV = 3, 6, 32


def loss_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(DB, DL, DV)) * 2
    teachers = [rng.normal(size=(DB, DL, DV)) * 2 for _ in range(2)]
    mask = np.ones((DB, DL), np.int32)
    mask[:, 0] = 0  # prompt position
    mask[1, 4:] = 0  # padding
    mask[2, 2:] = 0
    targets = rng.integers(0, DV, size=(DB, DL))
    targets[mask == 0] = -100  # an ignore index must never be used to index
    return student, teachers, mask, targets


def np_masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float((values * mask).sum() / mask.sum())


def np_ce(student: np.ndarray, targets: np.ndarray) -> np.ndarray:
    log_q = np_log_softmax(student)
    return -np.take_along_axis(log_q, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]


def cfg(**kw):
    base = dict(kind="forward_kl", temperature=1.0, alpha=1.0, beta=0.5, skew=0.1)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_distill_loss_matches_reference(kind, alpha):
    student, (teacher, _), mask, targets = loss_inputs()
    T = 2.0
    loss, ntoks = distill_loss(
        mxa(student),
        mxa(targets, mx.int32),
        mxa(mask, mx.int32),
        [DenseTeacher(mxa(teacher))],
        None,
        cfg(kind=kind, temperature=T, alpha=alpha, beta=0.3, skew=0.2),
    )
    kd = np_masked_mean(
        T**2 * np_divergence(kind, np_log_softmax(teacher, T), np_log_softmax(student, T), 0.3, 0.2), mask
    )
    ce = np_masked_mean(np_ce(student, targets), mask)
    close(loss, alpha * kd + (1 - alpha) * ce)
    assert ntoks.item() == mask.sum()


def test_masked_positions_do_not_change_the_loss():
    student, (teacher, _), mask, targets = loss_inputs()
    ids, top, tail = make_cache(teacher, 4)
    rng = np.random.default_rng(1)
    noisy = lambda x: np.where(mask[..., None] == 0, rng.normal(size=x.shape) * 50, x)  # noqa: E731

    def loss_of(s, t, tg, cache):
        teachers = [DenseTeacher(mxa(t)), SparseTeacher(mxa(cache[0], mx.int32), mxa(cache[1]), mxa(cache[2]), DV)]
        return distill_loss(mxa(s), mxa(tg, mx.int32), mxa(mask), teachers, [1, 1], cfg(alpha=0.5, temperature=1.5))

    base, ntoks = loss_of(student, teacher, targets, (ids, top, tail))
    other_targets = np.where(mask == 0, 7, targets)
    padded_cache = (
        np.where(mask[..., None] == 0, 0, ids),
        np.where(mask[..., None] == 0, 0.0, top),
        np.where(mask == 0, np.nan, tail),
    )
    changed, _ = loss_of(noisy(student), noisy(teacher), other_targets, padded_cache)
    close(changed, base.item())
    assert ntoks.item() == mask.sum() == 9


def test_gradient_is_zero_at_masked_positions():
    student, (teacher, _), mask, targets = loss_inputs()

    def f(s):
        return distill_loss(s, mxa(targets, mx.int32), mxa(mask), [DenseTeacher(mxa(teacher))], None, cfg(alpha=0.5))

    (loss, ntoks), grad = mx.value_and_grad(f)(mxa(student))
    grad = np.array(grad)
    assert np.all(grad[mask == 0] == 0) and np.any(grad[mask == 1] != 0)
    assert ntoks.item() == mask.sum()


def test_no_counted_tokens_gives_zero_loss():
    student, (teacher, _), mask, targets = loss_inputs()
    loss, ntoks = distill_loss(
        mxa(student), mxa(targets, mx.int32), mx.zeros((DB, DL)), [DenseTeacher(mxa(teacher))], None, cfg(alpha=0.5)
    )
    assert loss.item() == 0.0 and ntoks.item() == 0


def test_alpha_zero_is_masked_cross_entropy_and_ignores_teachers():
    student, _, mask, targets = loss_inputs()
    ce = nn.losses.cross_entropy(mxa(student), mxa(np.maximum(targets, 0), mx.int32), reduction="none")
    expected = float(np.array(ce * mxa(mask)).sum() / mask.sum())
    no_teacher, ntoks = distill_loss(mxa(student), mxa(targets, mx.int32), mxa(mask), [], None, cfg(alpha=0.0))
    close(no_teacher, expected)
    poisoned = DenseTeacher(mx.full((DB, DL, DV), float("nan")))
    with_teacher, _ = distill_loss(mxa(student), mxa(targets, mx.int32), mxa(mask), [poisoned], None, cfg(alpha=0.0))
    assert with_teacher.item() == no_teacher.item()
    assert ntoks.item() == mask.sum()


def test_alpha_one_ignores_targets():
    student, (teacher, _), mask, targets = loss_inputs()
    args = (mxa(student),)
    a, _ = distill_loss(*args, mxa(targets, mx.int32), mxa(mask), [DenseTeacher(mxa(teacher))], None, cfg())
    b, _ = distill_loss(*args, mx.full((DB, DL), 10**6, mx.int32), mxa(mask), [DenseTeacher(mxa(teacher))], None, cfg())
    assert a.item() == b.item()


def test_alpha_positive_needs_a_teacher():
    student, _, mask, targets = loss_inputs()
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(mxa(student), mxa(targets, mx.int32), mxa(mask), [], None, cfg(alpha=0.5))


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_multiple_teachers_are_a_weighted_sum(alpha):
    student, (t1, t2), mask, targets = loss_inputs()
    ids, top, tail = make_cache(t2, 6)
    dense = DenseTeacher(mxa(t1))
    sparse = SparseTeacher(mxa(ids, mx.int32), mxa(top, mx.float16), mxa(tail, mx.float16), DV)
    c = cfg(kind="jsd", temperature=2.0, alpha=alpha)
    s, tg, m = mxa(student), mxa(targets, mx.int32), mxa(mask)
    single = [distill_loss(s, tg, m, [t], None, c)[0].item() for t in (dense, sparse)]
    both, _ = distill_loss(s, tg, m, [dense, sparse], [1.0, 3.0], c)
    close(both, 0.25 * single[0] + 0.75 * single[1])
    equal, _ = distill_loss(s, tg, m, [dense, sparse], None, c)
    close(equal, 0.5 * single[0] + 0.5 * single[1])


def test_per_instance_weights():
    student, (t1, t2), mask, targets = loss_inputs()
    T = 1.5
    weights = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 6.0]])  # [n_teachers, B]
    teachers = [DenseTeacher(mxa(t1)), DenseTeacher(mxa(t2))]
    loss, _ = distill_loss(
        mxa(student), mxa(targets, mx.int32), mxa(mask), teachers, weights, cfg(kind="reverse_kl", temperature=T)
    )
    per_teacher = [
        T**2 * np_divergence("reverse_kl", np_log_softmax(t, T), np_log_softmax(student, T)) for t in (t1, t2)
    ]
    w = weights / weights.sum(axis=0)
    expected = sum(w[i][:, None] * per_teacher[i] for i in range(2))
    close(loss, np_masked_mean(expected, mask))

    # Identical columns are the same as fixed weights.
    fixed, _ = distill_loss(mxa(student), mxa(targets, mx.int32), mxa(mask), teachers, FixedWeights([1, 3]), cfg())
    columns, _ = distill_loss(
        mxa(student), mxa(targets, mx.int32), mxa(mask), teachers, FixedWeights(np.array([[1, 1, 1], [3, 3, 3]])), cfg()
    )
    close(columns, fixed.item())


def test_teacher_weighting_protocol():
    student, (t1, t2), mask, targets = loss_inputs()
    teachers = [DenseTeacher(mxa(t1)), DenseTeacher(mxa(t2))]
    calls = []

    class FirstTeacherOnly:
        def __call__(self, teachers, student_logits, mask):
            calls.append((len(teachers), student_logits.shape, mask.shape))
            return mx.array([[1.0] * DB, [0.0] * DB])

    weighting = FirstTeacherOnly()
    assert isinstance(weighting, TeacherWeighting) and isinstance(FixedWeights([1, 1]), TeacherWeighting)
    got, _ = distill_loss(mxa(student), mxa(targets, mx.int32), mxa(mask), teachers, weighting, cfg())
    alone, _ = distill_loss(mxa(student), mxa(targets, mx.int32), mxa(mask), teachers[:1], None, cfg())
    close(got, alone.item())
    assert calls == [(2, (DB, DL, DV), (DB, DL))]


def test_weight_validation():
    student, (t1, _), mask, targets = loss_inputs()
    for bad in ([1.0, -1.0], [0.0, 0.0], [], [[1.0], [float("nan")]]):
        with pytest.raises(ValueError):
            FixedWeights(bad)
    args = (mxa(student), mxa(targets, mx.int32), mxa(mask), [DenseTeacher(mxa(t1))])
    with pytest.raises(ValueError, match="shape"):
        distill_loss(*args, [1.0, 1.0], cfg())
    with pytest.raises(ValueError, match="batch"):
        distill_loss(*args, FixedWeights(np.ones((1, DB + 1))), cfg())


def test_loss_cfg_from_spec_and_override():
    student, (t1, _), mask, targets = loss_inputs()
    args = (mxa(student), mxa(targets, mx.int32), mxa(mask), [DenseTeacher(mxa(t1))], None)
    spec = LossSpec(kind="skew_kl", temperature=2.0, alpha=0.6, skew=0.3)
    from_spec, _ = distill_loss(*args, spec)
    from_namespace, _ = distill_loss(*args, cfg(kind="skew_kl", temperature=2.0, alpha=0.6, skew=0.3))
    assert from_spec.item() == from_namespace.item()
    # Unset override fields fall back to LossSpec's defaults.
    from_override, _ = distill_loss(*args, LossOverride(alpha=0.6))
    close(from_override, distill_loss(*args, LossSpec(alpha=0.6))[0].item())


@pytest.mark.parametrize("teacher_type", ["dense", "sparse"])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_gradients_finite_with_extreme_float16_logits(kind, teacher_type):
    rng = np.random.default_rng(12)
    student = mxa(rng.choice([-1e4, 1e4], size=(DB, DL, DV)) + rng.normal(size=(DB, DL, DV)), mx.float16)
    teacher = rng.choice([-1e4, 1e4], size=(DB, DL, DV))
    teacher[rng.random(size=teacher.shape) < 0.3] = -np.inf  # exact zeros in p
    teacher[..., 0] = 1e4
    if teacher_type == "dense":
        teachers = [DenseTeacher(mxa(teacher, mx.float16))]
    else:
        ids, top, _ = make_cache(teacher, 4)
        tail = np.full((DB, DL), -np.inf)  # the top 4 hold all the mass
        teachers = [SparseTeacher(mxa(ids, mx.int32), mxa(top, mx.float16), mxa(tail, mx.float16), DV)]
    _, _, mask, targets = loss_inputs()

    for temperature in (1.0, 4.0):

        def f(s, temperature=temperature):
            return distill_loss(
                s, mxa(targets, mx.int32), mxa(mask), teachers, None, cfg(kind=kind, temperature=temperature, alpha=0.5)
            )

        (loss, _), grad = mx.value_and_grad(f)(student)
        assert np.isfinite(loss.item()), (kind, temperature)
        assert grad.dtype == mx.float16
        assert np.all(np.isfinite(np.array(grad.astype(mx.float32)))), (kind, temperature)


def test_student_tail_is_exact_when_tiny():
    # a sharp student whose mass outside the teacher's top-k is ~1e-14: log(1 - sum q) would lose it entirely
    from worker.engine.losses import student_buckets

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, size=(2, 3, 500))
    logits[..., :4] += 40.0
    ids = np.broadcast_to(np.arange(4), (2, 3, 4))
    ref_logq = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    ref_tail = np.log(np.exp(ref_logq[..., 4:]).sum(-1))
    assert ref_tail.max() < -25
    got = np.array(student_buckets(mxa(logits.astype(np.float32)), mxa(ids, mx.int32), 1.0))
    np.testing.assert_allclose(got[..., -1], ref_tail, atol=1e-3)
    np.testing.assert_allclose(got[..., :4], np.take_along_axis(ref_logq, ids, -1), atol=1e-5)
