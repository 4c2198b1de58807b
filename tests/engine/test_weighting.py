"""Teacher weightings (worker/engine/weighting.py) on hand-made teachers whose quality we choose."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from worker.engine import losses, weighting

V = 8  # vocabulary
B, L = 8, 6  # instances, positions


def domains_batch(seed: int = 0):
    """Instances of two domains: rows 0..3 use tokens 0..3, rows 4..7 tokens 4..7 (their content tells them
    apart). Returns tokens [B, L + 1], mask [B, L], domain [B]."""
    rng = np.random.default_rng(seed)
    domain = np.array([0] * (B // 2) + [1] * (B // 2))
    tokens = rng.integers(0, 4, (B, L + 1)) + 4 * domain[:, None]
    return mx.array(tokens.astype(np.int32)), mx.ones((B, L), dtype=mx.bool_), domain


def expert(tokens: mx.array, right_rows: np.ndarray, p_right: float = 0.9) -> losses.DenseTeacher:
    """A teacher that gives the reference token p_right on `right_rows` and is uniform elsewhere."""
    targets = np.array(tokens[:, 1:])
    probs = np.full((B, L, V), 1.0 / V)
    for b in np.flatnonzero(right_rows):
        probs[b] = (1 - p_right) / (V - 1)
        probs[b, np.arange(L), targets[b]] = p_right
    return losses.DenseTeacher(mx.array(np.log(probs).astype(np.float32)))


def sparse_of(dense: losses.DenseTeacher, k: int) -> losses.SparseTeacher:
    log_p = np.array(dense.logits)
    ids = np.argsort(-log_p, axis=-1)[..., :k]
    lps = np.take_along_axis(log_p, ids, axis=-1)
    tail = np.log(np.maximum(1 - np.exp(lps).sum(-1), 1e-12))
    return losses.SparseTeacher(mx.array(ids.astype(np.int32)), mx.array(lps), mx.array(tail), V)


def test_reference_logprobs_in_and_outside_the_top_k():
    tokens, _, _ = domains_batch()
    dense = expert(tokens, np.ones(B, bool), p_right=0.9)
    exact = np.log(0.9)
    np.testing.assert_allclose(np.array(weighting.reference_logprobs(dense, tokens[:, 1:])), exact, rtol=1e-5)
    sparse = sparse_of(dense, k=2)  # the reference is the top token: its own log-prob
    np.testing.assert_allclose(np.array(weighting.reference_logprobs(sparse, tokens[:, 1:])), exact, rtol=1e-5)
    # a teacher whose top-k misses the reference: the tail's mass spread over the tail's V - k tokens
    wrong = expert(tokens, np.zeros(B, bool))
    wrong_sparse = sparse_of(wrong, k=3)
    ref = np.array(weighting.reference_logprobs(wrong_sparse, tokens[:, 1:]))
    ids = np.array(wrong_sparse.topk_ids)
    missed = ~(ids == np.array(tokens[:, 1:])[..., None]).any(-1)
    assert missed.any()
    np.testing.assert_allclose(ref[missed], math.log((1 - 3 / V) / (V - 3)), rtol=1e-5)


def test_confidence_gives_each_instance_to_the_teacher_that_is_right_on_it():
    tokens, mask, domain = domains_batch()
    teachers = [expert(tokens, domain == 0), expert(tokens, domain == 1)]
    w = np.array(weighting.ConfidenceWeights([1, 1]).weights(tokens, mask, teachers))
    right = 0.9 / (0.9 + 1 / V)  # w_i ∝ exp(mean log p_i) = p_i: 0.9 against 1/8
    np.testing.assert_allclose(w[0, domain == 0], right, rtol=1e-5)
    np.testing.assert_allclose(w[1, domain == 1], right, rtol=1e-5)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-6)
    # the prior counts, and a higher temperature flattens
    prior = np.array(weighting.ConfidenceWeights([1, 3]).weights(tokens, mask, teachers))
    assert np.all(prior[1] > w[1])
    flat = np.array(weighting.ConfidenceWeights([1, 1], temperature=10).weights(tokens, mask, teachers))
    assert 0.5 < flat[0, 0] < w[0, 0]
    # from a cache (top-k) as from the logits
    cached = [sparse_of(t, k=3) for t in teachers]
    np.testing.assert_allclose(
        np.array(weighting.ConfidenceWeights([1, 1]).weights(tokens, mask, cached)), w, rtol=1e-5
    )


def _embedding(dims: int = 16):
    table = mx.array(np.random.default_rng(1).normal(size=(V, dims)).astype(np.float32))
    return (lambda t: table[t]), dims


def _train_gate(gate: weighting.LearnedWeights, right_of, steps: int) -> None:
    for step in range(steps):
        tokens, mask, domain = domains_batch(seed=step)
        gate.learn(tokens, mask, right_of(tokens, domain))


def test_learned_gate_learns_which_teacher_is_right_where():
    embed, dims = _embedding()
    gate = weighting.LearnedWeights([1, 1], embed, dims, learning_rate=0.02, balance=0.1, seed=0)
    tokens, mask, domain = domains_batch(seed=999)
    start = np.array(gate.weights(tokens, mask, [expert(tokens, domain == 0), expert(tokens, domain == 1)]))
    np.testing.assert_allclose(start, 0.5, atol=0.05)  # starts near the prior

    def right_of(tokens, domain):
        return [expert(tokens, domain == 0), expert(tokens, domain == 1)]

    _train_gate(gate, right_of, 150)
    w = np.array(gate.weights(tokens, mask, right_of(tokens, domain)))
    assert np.all(w[0, domain == 0] > 0.8) and np.all(w[1, domain == 1] > 0.8), w
    # the score's weights do not move while the gate learns: the confidence weights
    np.testing.assert_allclose(
        np.array(gate.yardstick(tokens, mask, right_of(tokens, domain))),
        np.array(weighting.ConfidenceWeights([1, 1]).weights(tokens, mask, right_of(tokens, domain))),
    )


@pytest.mark.parametrize("balance", [0.0, 1.0])
def test_the_balance_barrier_keeps_the_gate_from_collapsing(balance):
    """Teacher 0 is right everywhere: without the barrier the gate gives it (nearly) every instance, with it
    teacher 1 keeps a share."""
    embed, dims = _embedding()
    gate = weighting.LearnedWeights([1, 1], embed, dims, learning_rate=0.05, balance=balance, seed=0)

    def right_of(tokens, domain):
        return [expert(tokens, np.ones(B, bool)), expert(tokens, np.zeros(B, bool))]

    _train_gate(gate, right_of, 150)
    tokens, mask, domain = domains_batch(seed=999)
    share = float(np.array(gate.weights(tokens, mask, right_of(tokens, domain)))[1].mean())
    if balance == 0.0:
        assert share < 0.05
    else:
        assert share > 0.2


def test_learned_state_round_trips_and_continues_identically():
    embed, dims = _embedding()

    def right_of(tokens, domain):
        return [expert(tokens, domain == 0), expert(tokens, domain == 1)]

    a = weighting.LearnedWeights([1, 2], embed, dims, learning_rate=0.02, seed=4)
    _train_gate(a, right_of, 5)
    saved = a.state()
    assert any(k.startswith("adam.") for k in saved) and any(k.startswith("gate.") for k in saved)
    b = weighting.LearnedWeights([1, 2], embed, dims, learning_rate=0.02, seed=5)  # another start
    b.load_state(saved)
    for step in range(5, 10):  # both go on from the saved state
        tokens, mask, domain = domains_batch(seed=step)
        a.learn(tokens, mask, right_of(tokens, domain))
        b.learn(tokens, mask, right_of(tokens, domain))
    tokens, mask, domain = domains_batch(seed=50)
    np.testing.assert_array_equal(
        np.array(a.weights(tokens, mask, right_of(tokens, domain))),
        np.array(b.weights(tokens, mask, right_of(tokens, domain))),
    )


def test_make_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="teacher_weighting"):
        weighting.make("loudest", [1, 1])
    assert weighting.make("fixed", [1, 3]).prior.tolist() == [0.25, 0.75]
