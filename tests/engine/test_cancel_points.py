"""Cancel points (worker/engine/cancel.py): a run told to stop now stops within the phase it is in (the
learning-rate search, an evaluation), not only at its next training step, and keeps its checkpoints."""

from __future__ import annotations

import pytest

from tests.engine.test_distill import make_spec, run
from worker.engine import cancel
from worker.engine.errors import Cancelled
from worker.engine.train import Hooks


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def test_a_cancel_point_raises_only_inside_a_block_that_asks():
    cancel.point("nothing asks")  # outside any block: nothing happens (the local command line, the tests)
    flag = {"stop": False}
    with cancel.stop_now_when(lambda: flag["stop"]):
        cancel.point("not yet")
        flag["stop"] = True
        with pytest.raises(Cancelled, match="cancelled during an evaluation"):
            cancel.point("an evaluation")
    cancel.point("after the block")


def test_a_cancel_during_the_learning_rate_search_stops_the_search(
    tiny_student, tiny_teacher, tiny_text, tmp_path, store
):
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        training={"learning_rate": "auto", "lr_search": {"steps": 6, "rates": [1e-4, 1e-3, 1e-2]}},
    )
    events, batches, flag = [], [], {"stop": False}

    def on_event(kind, message, data):
        events.append((kind, data))
        if kind == "lr_search" and "rates" in data:  # the search starts: the user cancels now
            flag["stop"] = True

    with cancel.stop_now_when(lambda: flag["stop"] and bool(batches.append(1) or True)):
        with pytest.raises(Cancelled, match="during a batch"):
            run(spec, tmp_path / "out", store, Hooks(on_event=on_event))
    kinds = [k for k, _ in events]
    assert "lr_trial" not in kinds and batches == [1]  # stopped at the first batch of the first trial


def test_a_cancel_during_an_evaluation_keeps_the_checkpoints(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 6, "eval_every": 4})
    flag, steps = {"stop": False}, []

    def on_metrics(record):
        if record["kind"] == "train":
            steps.append(record["step"])
            flag["stop"] = record["step"] == 4  # cancelled as step 4's evaluation begins

    with cancel.stop_now_when(lambda: flag["stop"]):
        with pytest.raises(Cancelled):
            run(spec, tmp_path / "out", store, Hooks(on_metrics=on_metrics))
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "out" / "checkpoints" / "step-0000003").is_dir()  # the run's checkpoint is kept
    events = []
    run(spec, tmp_path / "out", store, Hooks(on_event=lambda k, m, d: events.append(k)))  # and resumes from it
    assert "resumed" in events
