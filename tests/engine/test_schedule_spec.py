"""Learning-rate schedule, stages and spec validation."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from distillery_contract.specs import DistillSpec, LossSpec, TrainingSpec
from worker.engine import schedule

MIN = {"student": {"model": "s"}, "teachers": [{"model": "t"}], "data": {"train": "d"}}


def test_warmup_then_cosine_to_floor():
    tr = TrainingSpec(steps=11, learning_rate=1.0, warmup_steps=2, min_lr_ratio=0.1)
    (stage,) = schedule.stages(tr, LossSpec())
    lrs = [schedule.learning_rate(stage, s, "cosine", 0.1) for s in range(11)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 9)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert schedule.learning_rate(stage, 5, "constant", 0.1) == 1.0
    assert schedule.learning_rate(stage, 2, "linear", 0.0) == pytest.approx(1.0)


def test_stages_inherit_and_override():
    tr = TrainingSpec(
        learning_rate=1e-3,
        warmup_steps=3,
        stages=[{"steps": 4, "loss": {"alpha": 0.0}}, {"name": "kd", "steps": 6, "learning_rate": 5e-4}],
    )
    a, b = schedule.stages(tr, LossSpec(kind="jsd", alpha=0.7))
    assert tr.steps == 10 and (a.start, a.end, b.start, b.end) == (0, 4, 4, 10)
    assert a.loss.alpha == 0.0 and a.loss.kind == "jsd" and b.loss.alpha == 0.7
    assert a.warmup_steps == 3 and b.warmup_steps == 0 and b.learning_rate == 5e-4 and b.name == "kd"
    assert schedule.stage_at([a, b], 3) is a and schedule.stage_at([a, b], 4) is b


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"training": {"steps": -1}}, "training.steps"),
        ({"training": {"learning_rat": 1}}, "training.learning_rat"),
        ({"loss": {"kind": "kl"}}, "loss.kind"),
        ({"loss": {"alpha": 1.5}}, "loss.alpha"),
        ({"teachers": []}, "teachers"),
        ({"student": {"model": "s", "keep_layers": [2, 1]}}, "student.keep_layers"),
        ({"training": {"param_groups": [{"pattern": "(", "lr_mult": 1}]}}, "training.param_groups.0.pattern"),
        ({"training": {"steps": 3, "stages": [{"steps": 2}]}}, "training"),
        ({"data": {"train": "d", "valid": 0.9}}, "data.valid"),
        ({"adapter": {"layers": 0}}, "adapter.layers"),
    ],
)
def test_invalid_specs_name_the_field(patch, field):
    with pytest.raises(ValidationError) as e:
        DistillSpec.model_validate({**MIN, **patch})
    locs = {".".join(str(p) for p in err["loc"]) for err in e.value.errors()}
    assert any(loc.startswith(field) for loc in locs), locs


def test_defaults():
    spec = DistillSpec.model_validate(MIN)
    assert spec.teacher_mode == "offline" and spec.loss.top_k == 64 and spec.adapter.type == "lora"
    assert spec.data.valid == 0.05


def test_presets_fill_what_the_spec_leaves_out():
    from distillery_contract.specs import PRESETS, DistillSpec

    base = {"student": {"model": "s"}, "teachers": [{"model": "t"}], "data": {"train": "d"}}
    fast = DistillSpec.model_validate({**base, "preset": "fast"})
    assert (fast.adapter.rank, fast.loss.top_k, fast.training.batch_size, fast.training.max_seq_len) == (8, 32, 8, 256)
    assert fast.training.learning_rate == "auto" and fast.training.lr_search.rates == [3e-5, 1e-4, 3e-4]
    # what the spec says wins, also inside a nested section
    mine = DistillSpec.model_validate(
        {
            **base,
            "preset": "quality",
            "adapter": {"rank": 4},
            "training": {"learning_rate": 2e-4, "lr_search": {"steps": 3}},
        }
    )
    assert mine.adapter.rank == 4 and mine.loss.top_k == 128 and mine.training.grad_accum == 2
    assert mine.training.learning_rate == 2e-4
    assert (
        mine.training.lr_search.steps == 3
        and mine.training.lr_search.rates == PRESETS["quality"]["training"]["lr_search"]["rates"]
    )
    memory = DistillSpec.model_validate({**base, "preset": "memory"})
    assert (memory.training.batch_size, memory.training.grad_accum) == (1, 8)
    # a stored spec (every field filled in) validates to itself: the API stores the dump, the worker reads it
    assert DistillSpec.model_validate(mine.model_dump(mode="json")) == mine
    with pytest.raises(Exception, match="preset"):
        DistillSpec.model_validate({**base, "preset": "turbo"})
    assert DistillSpec.model_validate(base).training.learning_rate == "auto"  # the default
