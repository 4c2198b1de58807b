"""Preference-aware distillation (worker/engine/preference.py): the margin, its losses, the metrics, a run."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from tests.engine.test_distill import make_spec, run
from tests.helpers import tiny
from worker.engine import preference
from worker.engine.errors import UserError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def test_margin_losses_by_hand():
    s, t = mx.array([1.0, -1.0]), mx.array([0.5, 0.5])
    assert preference.margin_loss(s, t, "mse").item() == pytest.approx((0.5**2 + 1.5**2) / 2)
    # Bradley-Terry: BCE(σ(s), σ(t)); at s = t = 0 it is log 2, and s = t is its minimum
    zero = mx.array([0.0])
    assert preference.margin_loss(zero, zero, "bradley_terry").item() == pytest.approx(math.log(2))
    t1 = mx.array([0.8])
    at = preference.margin_loss(t1, t1, "bradley_terry").item()
    p = 1 / (1 + math.exp(-0.8))
    assert at == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-5)  # the entropy of σ(t)
    for off in (-0.5, 0.5):
        assert preference.margin_loss(t1 + off, t1, "bradley_terry").item() > at
    # the temperature scales the margins: s / τ against t / τ
    assert preference.margin_loss(mx.array([2.0]), mx.array([1.0]), "bradley_terry", 2.0).item() == pytest.approx(
        preference.margin_loss(mx.array([1.0]), mx.array([0.5]), "bradley_terry").item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="loss.preference.kind"):
        preference.margin_loss(s, t, "hinge")


def test_pair_margins_are_length_normalised_log_probs():
    V = 5
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, V)).astype(np.float32)  # rows: chosen, rejected

    def model(x):
        return mx.array(logits[:, : x.shape[1]])

    tokens = mx.array(np.array([[1, 2, 3, 4, 0], [1, 4, 4, 0, 0]], dtype=np.int32))
    mask = mx.array(np.array([[False, True, True, True], [False, True, False, False]]))  # 3 and 1 response tokens
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    chosen = np.mean([log_p[0, t, int(tokens[0, t + 1])] for t in (1, 2, 3)])
    rejected = log_p[1, 1, int(tokens[1, 2])]
    got = preference.pair_margins(model, tokens, mask)
    assert got.shape == (1,) and got.item() == pytest.approx(chosen - rejected, rel=1e-5)


def test_metrics_by_hand():
    student = np.array([1.0, -0.5, 0.2, 0.0])
    teacher = np.array([2.0, 0.5, -0.1, 0.3])
    out = preference.metrics(student, teacher, ["harmless", "harmless", None, "helpful"])
    assert out["val_pref_accuracy"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)  # a tie is half a pair
    assert out["val_pref_agreement"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert out["val_pref_margin_gap"] == pytest.approx((1 + 1 + 0.3 + 0.3) / 4)
    assert out["val_harmless_accuracy"] == pytest.approx(0.5)
    assert "val_harmless_accuracy" not in preference.metrics(student, teacher, [None] * 4)


def _preference_file(path, n=30):
    """Real prose as chosen, the same prose spelt backwards as rejected: a teacher pretrained on prose clearly
    prefers the first, an untrained student has no preference."""
    records = []
    for i, r in enumerate(tiny.text_records(n, offset=200)):
        words = r["text"].split()
        prompt, rest = " ".join(words[:4]), " ".join(words[4:16])
        subject = "harmless" if i % 3 == 0 else "helpful"
        records.append({"prompt": prompt, "chosen": " " + rest, "rejected": " " + rest[::-1], "subject": subject})
    return tiny.write_jsonl(path, records)


def test_pairs_held_out_and_drawn_from_seed_and_step(tiny_student, tmp_path):
    from worker.engine.models import load_tokenizer

    tok = load_tokenizer(tiny_student)
    train, valid = preference.load_pairs(_preference_file(tmp_path / "p.jsonl"), tok, 48)
    assert (len(train), len(valid)) == (27, 3)  # every tenth pair held out
    term = preference.PreferenceTerm(
        train,
        valid,
        np.zeros(27),
        np.zeros(3),
        kind="mse",
        weight=1.0,
        batch_pairs=4,
        temperature=1.0,
        seed=5,
        pad_id=0,
    )
    first_pass = np.concatenate([term.pairs_at(s) for s in range(27 // 4)])
    assert len(set(first_pass.tolist())) == len(first_pass)  # a pass draws each pair at most once
    assert term.pairs_at(3).tolist() == term.pairs_at(3).tolist()
    assert term.pairs_at(7).tolist() != term.pairs_at(0).tolist()
    bad = tmp_path / "bad.jsonl"
    tiny.write_jsonl(bad, [{"text": "not a pair"}])
    with pytest.raises(UserError, match="data.preference: bad.jsonl is 'text' data, expected preference"):
        preference.load_pairs(bad, tok, 48)


def test_a_run_keeps_the_teachers_ranking(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    pref = _preference_file(tmp_path / "pref.jsonl", n=80)
    base = {"data": {"train": str(tiny_text["train"]), "valid": str(tiny_text["valid"]), "preference": str(pref)}}
    events = []
    from worker.engine.train import Hooks

    # eight held-out pairs and a moderate rate: with four pairs and 1e-2 the held-out gap went either way with
    # the teacher's pretraining rounding
    training = {"steps": 10, "learning_rate": 3e-3}
    plain = run(
        make_spec(tiny_student, [tiny_teacher], tiny_text, **base, training=training), tmp_path / "plain", store
    )
    for key in ("val_pref_accuracy", "val_pref_agreement", "val_pref_margin_gap", "val_harmless_accuracy"):
        assert key in plain["initial"] and key in plain["final"]
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        **base,
        loss={"preference": {"weight": 5.0, "kind": "mse", "batch_pairs": 8}},
        training=training,
    )
    trained = run(spec, tmp_path / "pref", store, Hooks(on_event=lambda k, m, d: events.append((k, m))))
    assert any(k == "preference" and "72 preference pairs to train on, 8 held out" in m for k, m in events)
    records = [json.loads(x) for x in (tmp_path / "pref" / "metrics.jsonl").read_text().splitlines()]
    assert all("preference_loss" in r for r in records if r["kind"] == "train")
    evals = [r for r in records if r["kind"] == "eval"]
    print("GAPS", [e["val_pref_margin_gap"] for e in evals], plain["last"]["val_pref_margin_gap"])
    # the held-out margins move toward the teacher's, more than the same run without the preference term's
    assert evals[-1]["val_pref_margin_gap"] < evals[0]["val_pref_margin_gap"]
    assert evals[-1]["val_pref_margin_gap"] < plain["last"]["val_pref_margin_gap"]
    assert trained["final"]["val_pref_agreement"] >= trained["initial"]["val_pref_agreement"]


def test_loss_preference_needs_pairs(tiny_student, tiny_teacher, tiny_text):
    with pytest.raises(ValueError, match="loss.preference needs data.preference"):
        make_spec(tiny_student, [tiny_teacher], tiny_text, loss={"preference": {"weight": 1.0}})
