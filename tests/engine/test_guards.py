"""Training never ships a student worse than its start: step 0 competes for best, the divergence guard rolls
back, `learning_rate: auto` searches the rate. Unit tests of the guard and the search, then runs on tiny models."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from distillery_contract.specs import DivergenceGuardSpec
from tests.engine.test_distill import make_spec, run, train_losses
from worker.engine import lr_search
from worker.engine.errors import Cancelled
from worker.engine.guard import OK, ROLLBACK, SKIP, DivergenceGuard
from worker.engine.train import Hooks, TrainState


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


# ---------------------------------------------------------------------------------------------- the guard


def test_guard_skips_a_lone_spike_and_rolls_back_on_two():
    guard, state = DivergenceGuard(DivergenceGuardSpec(window=8, loss_spike=3.0)), TrainState()
    for loss in (1.0, 1.2, 0.9):  # the window needs max(3, 8 // 4) steps before it judges
        assert guard.check_step(state, loss, 1.0).action == OK
    assert guard.check_step(state, 3.5, 1.0).action == SKIP  # 3.5 > 3 x median 1.0
    assert state.recent_losses == [1.0, 1.2, 0.9]  # a spike does not enter the window
    assert guard.check_step(state, 1.1, 1.0).action == OK  # a healthy step resets the count
    assert guard.check_step(state, 3.5, 1.0).action == SKIP
    verdict = guard.check_step(state, 4.0, 1.0)
    assert verdict.action == ROLLBACK and "2 steps in a row" in verdict.reason
    guard.forget(state)
    assert state.recent_losses == [] and state.guard_spikes == 0


def test_guard_gradient_norm_and_non_finite():
    guard, state = DivergenceGuard(DivergenceGuardSpec(grad_norm_spike=10.0)), TrainState()
    assert guard.check_step(state, math.nan, 1.0).action == ROLLBACK  # at once, even before the window fills
    assert guard.check_step(state, 1.0, math.inf).action == ROLLBACK
    for _ in range(4):
        guard.check_step(state, 1.0, 2.0)
    assert guard.check_step(state, 1.0, 19.0).action == OK
    assert guard.check_step(state, 1.0, 25.0).action == SKIP  # 25 > 10 x median 2.0
    off = DivergenceGuard(DivergenceGuardSpec(enabled=False))
    assert off.check_step(TrainState(), math.nan, 1.0).action == OK


def test_guard_on_evaluations():
    guard = DivergenceGuard(DivergenceGuardSpec(val_tolerance=0.05))
    assert guard.check_eval(1.04, 1.0).action == OK
    assert guard.check_eval(1.06, 1.0).action == ROLLBACK
    assert guard.check_eval(math.nan, 1.0).action == ROLLBACK


# ---------------------------------------------------------------------------------------------- the search


def test_search_chooses_the_lowest_val_kl_and_falls_back_to_the_smallest_rate():
    scores = {1e-4: 0.30, 3e-4: 0.25, 1e-3: math.inf, 3e-5: 0.35}
    seen = []
    out = lr_search.search(list(scores), 4, 0.40, lambda r: {"val_kl": scores[r]}, seen.append)
    assert out["chosen"] == 3e-4 and [t["learning_rate"] for t in seen] == [3e-5, 1e-4, 3e-4, 1e-3]
    assert out["steps_per_trial"] == 4 and out["start_val_kl"] == 0.40
    worse = lr_search.search([1e-3, 1e-4], 4, 0.20, lambda r: {"val_kl": 0.3}, lambda t: None)
    assert worse["chosen"] == 1e-4 and "no trial improved" in worse["reason"]


def test_default_rates_and_trial_length():
    assert lr_search.default_rates("lora", 135_000_000) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    assert lr_search.default_rates("full", 135_000_000) == [1e-6, 3e-6, 1e-5, 3e-5, 1e-4]
    assert max(lr_search.default_rates("lora", 7_000_000_000)) < 1e-3
    assert [lr_search.trial_steps(n, None) for n in (10, 40, 100, 1000)] == [4, 4, 10, 20]
    assert lr_search.trial_steps(1000, 7) == 7


# ---------------------------------------------------------------------------------------------- runs


def cancel_after(spec, out, store, steps: int) -> None:
    """Run `spec` into `out` and cancel it once `steps` train steps are logged (a checkpoint is kept)."""
    seen = []
    hooks = Hooks(
        on_metrics=lambda r: seen.append(r) if r["kind"] == "train" else None, should_stop=lambda: len(seen) >= steps
    )
    with pytest.raises(Cancelled):
        run(spec, out, store, hooks)


def events_of():
    seen = []
    return seen, Hooks(on_event=lambda k, m, d: seen.append((k, m, d)))


def test_a_student_as_good_as_its_teacher_ships_unchanged(tiny_teacher, tiny_text, tmp_path, store):
    # the teacher teaching itself: no trained step can beat the start, and a high rate makes every one worse
    spec = make_spec(
        tiny_teacher,
        [tiny_teacher],
        tiny_text,
        training={
            "steps": 8,
            "learning_rate": 0.1,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "eval_every": 2,
            "checkpoint_every": 4,
        },
    )
    seen, hooks = events_of()
    summary = run(spec, tmp_path, store, hooks)
    kinds = [k for k, _, _ in seen]
    assert summary["best"]["step"] == 0 and summary["shipped"] == "start"
    assert summary["final"] == summary["initial"] and summary["last"]["val_kl"] > summary["initial"]["val_kl"]
    assert summary["rollbacks"] and "rollback" in kinds
    stop = summary["train"]["stop_reason"]  # out of rollbacks ("diverged") or at the end of its steps
    codes = {w["code"] for w in summary["warnings"]}
    assert codes == {"no_improvement", "diverged" if stop == "diverged" else "rolled_back"}
    assert stop != "diverged" or len(summary["rollbacks"]) == 3
    assert any(k == "warning" and "starting student" in m for k, m, _ in seen)
    out = mx.load(str(tmp_path / "adapters.safetensors"))
    assert out and all(not mx.any(v).item() for k, v in out.items() if k.endswith("lora_b"))  # LoRA's identity
    # each rollback halves the rate, and the steps after it train at the lower rate
    scales = [r["lr_scale"] for r in summary["rollbacks"]]
    assert scales == [0.5 ** (i + 1) for i in range(len(scales))]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = summary["rollbacks"][0]["step"] + 1
    assert [r["lr"] for r in records if r["kind"] == "train" and r["step"] == after] == [pytest.approx(0.05)]


@pytest.fixture
def nan_at_step_six(monkeypatch):
    """The 6th step's loss and gradients come out non-finite (as a blown-up step would), every run alike."""
    from worker.engine import train as train_mod

    real = train_mod.Trainer._gradients

    def gradients(self, state, loss_cfg, seed_step=0):
        result = real(self, state, loss_cfg, seed_step)
        if state.step == 5:
            result.loss, result.grad_norm = math.nan, math.nan
            result.grads = tree_map(lambda g: g * math.nan, result.grads)
        return result

    monkeypatch.setattr(train_mod.Trainer, "_gradients", gradients)


def test_rollback_restores_the_best_weights_and_resume_is_exact(
    tiny_student, tiny_teacher, tiny_text, tmp_path, store, nan_at_step_six
):
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        training={
            "steps": 10,
            "learning_rate": 3e-3,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "eval_every": 2,
            "checkpoint_every": 2,
        },
    )
    seen, hooks = events_of()
    straight = run(spec, tmp_path / "straight", store, hooks)
    (rolled,) = [d for k, _, d in seen if k == "rollback"]
    assert rolled["step"] == 6 and rolled["to_step"] == 4 and rolled["lr_scale"] == 0.5
    assert "non-finite" in rolled["reason"] and straight["rollbacks"] == [rolled]
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert train[6]["guard"] == "rollback" and train[7]["lr"] == pytest.approx(1.5e-3)
    evals = {r["step"]: r["val_kl"] for r in records if r["kind"] == "eval"}
    # step 6 was not applied and the weights went back to step 4's: step 6's evaluation equals step 4's
    assert evals[6] == evals[4]
    assert straight["final"]["val_kl"] < straight["initial"]["val_kl"] and straight["shipped"] == "trained"
    assert {w["code"] for w in straight["warnings"]} == {"rolled_back"}

    # killed just after the rollback, resumed: the same steps, rollbacks and result
    cancel_after(spec, tmp_path / "resumed", store, steps=7)
    resumed = run(spec, tmp_path / "resumed", store)
    assert resumed["rollbacks"] == straight["rollbacks"] and resumed["best"] == straight["best"]
    assert train_losses(tmp_path / "resumed")[:5] == train_losses(tmp_path / "straight")[:5]
    np.testing.assert_allclose(
        train_losses(tmp_path / "resumed")[6:], train_losses(tmp_path / "straight")[6:], rtol=1e-5
    )


def test_auto_learning_rate(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    rates = [1e-4, 3e-3, 1.0]
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        training={"steps": 6, "learning_rate": "auto", "lr_search": {"rates": rates, "steps": 3}},
    )
    seen, hooks = events_of()
    summary = run(spec, tmp_path / "auto", store, hooks)
    search = summary["lr_search"]
    trials = {t["learning_rate"]: t["val_kl"] for t in search["trials"]}
    assert sorted(trials) == rates and search["steps_per_trial"] == 3
    assert search["chosen"] == min(trials, key=trials.get) == summary["learning_rate"]
    assert search["chosen"] == 3e-3  # 1e-4 barely moves in 3 steps; 1.0 diverges
    assert [k for k, _, _ in seen].count("lr_trial") == 3
    # the trials leave no trace: the run equals one given the chosen rate from the start
    fixed = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 6, "learning_rate": 3e-3})
    plain = run(fixed, tmp_path / "fixed", store)
    assert train_losses(tmp_path / "auto") == train_losses(tmp_path / "fixed")
    assert summary["final"]["val_kl"] == plain["final"]["val_kl"] and plain["lr_search"] is None

    # a resumed run keeps the chosen rate and does not search again
    cancel_after(spec, tmp_path / "resumed", store, steps=3)
    seen, hooks = events_of()
    again = run(spec, tmp_path / "resumed", store, hooks)
    assert "lr_trial" not in [k for k, _, _ in seen]
    assert {k: v for k, v in again["lr_search"].items() if k != "seconds"} == {
        k: v for k, v in search.items() if k != "seconds"
    }
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "auto")


def test_a_capable_student_improves_with_the_searched_rate(tiny_teacher, tiny_text, tmp_path, store):
    # the teacher without its middle layer: close to the teacher from the start, as real students are
    spec = make_spec(
        tiny_teacher,
        [tiny_teacher],
        tiny_text,
        student={"model": str(tiny_teacher), "keep_layers": [0, 2]},
        training={
            "steps": 8,
            "learning_rate": "auto",
            "lr_search": {"steps": 3},
            "eval_every": 4,
            "checkpoint_every": 4,
        },
    )
    summary = run(spec, tmp_path, store)
    assert summary["lr_search"]["chosen"] in lr_search.default_rates("lora", 1)
    assert summary["final"]["val_kl"] < 0.9 * summary["initial"]["val_kl"]
    assert summary["best"]["step"] > 0 and summary["shipped"] == "trained" and summary["warnings"] == []
