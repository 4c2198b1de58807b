"""Hidden-state hints (worker/engine/hidden.py): the distances, the tap, the projection, a run with them."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.engine.test_distill import make_spec, run
from worker.engine import hidden, models
from worker.engine.train import Hooks


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def test_hint_distances_by_hand():
    s = mx.array([[[1.0, 0.0], [0.0, 3.0]]])  # [B=1, L=2, d=2]
    t = mx.array([[[2.0, 0.0], [0.0, 1.0]]])
    both = mx.ones((1, 2), dtype=mx.bool_)
    # mse: ‖s − t‖² / ‖t‖² = 1/4 and 4/1, mean 2.125
    assert hidden.hint_loss(s, t, both, "mse").item() == pytest.approx(2.125)
    # cosine: 1 − cos = 0 for both (same direction)
    assert hidden.hint_loss(s, t, both, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    ortho = mx.array([[[0.0, 1.0], [1.0, 0.0]]])
    assert hidden.hint_loss(s, ortho, both, "cosine").item() == pytest.approx(1.0)
    first = mx.array([[True, False]])  # only counted positions count
    assert hidden.hint_loss(s, t, first, "mse").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="loss.hidden.kind"):
        hidden.hint_loss(s, t, both, "l1")


def test_tap_reads_the_layer_outputs_the_model_computes(tiny_student):
    model, _, _ = models.load_model(tiny_student)
    tokens = mx.array(np.random.default_rng(0).integers(0, 200, (2, 7)))
    before = model(tokens)
    tap = hidden.Tap(model, [1, len(model.layers) - 1])
    logits = model(tokens)
    np.testing.assert_array_equal(np.array(logits), np.array(before))  # the tap changes nothing
    out = tap.take()
    assert sorted(out) == [1, len(model.layers) - 1] and out[1].shape == (2, 7, 64)
    # the last layer's output, through the final norm and the (tied) head, is the logits
    last = model.model.norm(out[len(model.layers) - 1])
    head = model.model.embed_tokens.as_linear(last) if model.args.tie_word_embeddings else model.lm_head(last)
    np.testing.assert_allclose(np.array(head), np.array(logits), rtol=1e-4, atol=1e-4)
    assert tap.take() == {}  # taken once


def test_a_projection_maps_the_student_width_to_the_teachers_and_learns(tiny_student, tiny_teacher):
    student, _, _ = models.load_model(tiny_student)
    teacher, _, _ = models.load_model(tiny_teacher)
    student.freeze()
    hints = hidden.Hints(student, [[1, 2]], "mse", 1.0, hidden.teacher_width(teacher))
    maps = student[hidden.PROJECTIONS]
    assert len(maps) == 1 and maps[0].weight.shape == (96, 64)  # d_student 64 -> d_teacher 96
    assert set(hidden.projection_weights(student)) == {"hidden_projections.0.weight"}
    teacher_tap = hidden.Tap(teacher, [2])
    tokens = mx.array(np.random.default_rng(1).integers(0, 200, (4, 9)))
    mask = mx.ones((4, 8), dtype=mx.bool_)
    teacher(tokens[:, :-1])
    target = teacher_tap.take()[2]

    def loss_fn(model):
        model(tokens[:, :-1])
        return hints.loss(model, [target], mask)

    step = nn.value_and_grad(student, loss_fn)
    import mlx.optimizers as optim

    opt = optim.Adam(learning_rate=5e-2)
    seen = []
    for _ in range(60):
        value, grads = step(student)
        opt.update(student, grads)
        mx.eval(student.parameters(), opt.state)
        seen.append(value.item())
    assert seen[-1] < 0.5 * seen[0]  # only the projection trains (the student is frozen), and it fits
    hidden.detach(student)
    assert hidden.PROJECTIONS not in student


def test_a_run_with_hidden_hints_across_widths(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        teacher_mode="online",
        loss={"hidden": {"pairs": [[1, 1], [3, 2]], "kind": "cosine", "weight": 0.5}},
        training={"steps": 4, "eval_every": 2, "checkpoint_every": 2},
    )
    summary = run(spec, tmp_path / "run", store)
    assert np.isfinite(summary["final"]["val_kl"])
    step = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert set(mx.load(str(step / "hints.safetensors"))) == {
        "hidden_projections.0.weight",
        "hidden_projections.1.weight",
    }
    shipped = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    assert not any(k.startswith("hidden_projections") for k in shipped)  # the adapter is mlx-lm's alone
    # a resumed run continues the projections exactly
    steps = []
    hooks = Hooks(
        on_metrics=lambda r: steps.append(r) if r["kind"] == "train" else None, should_stop=lambda: len(steps) >= 2
    )
    from worker.engine.errors import Cancelled

    with pytest.raises(Cancelled):
        run(spec, tmp_path / "resumed", store, hooks)
    run(spec, tmp_path / "resumed", store)

    def losses_of(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    assert losses_of(tmp_path / "resumed") == losses_of(tmp_path / "run")


def test_hint_layers_must_exist(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    from worker.engine.errors import UserError

    spec = make_spec(
        tiny_student, [tiny_teacher], tiny_text, teacher_mode="online", loss={"hidden": {"pairs": [[0, 3]]}}
    )
    with pytest.raises(UserError, match=r"loss.hidden.pairs: teacher_layer 3 in \[0, 3\] but teacher 0"):
        run(spec, tmp_path, store)
    with pytest.raises(ValueError, match="loss.hidden needs the teacher's hidden states"):
        make_spec(tiny_student, [tiny_teacher], tiny_text, loss={"hidden": {"pairs": [[0, 1]]}})
