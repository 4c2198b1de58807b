"""Stages and the learning-rate schedule: warmup, then cosine / linear / constant decay, per stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distillery_contract.specs import LossSpec, ParamGroup, TrainingSpec


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    start: int  # first global step (0-based) of the stage
    steps: int
    learning_rate: float
    warmup_steps: int
    loss: LossSpec  # the run's loss with the stage's overrides applied
    param_groups: list[ParamGroup]

    @property
    def end(self) -> int:
        return self.start + self.steps


def stages(training: TrainingSpec, loss: LossSpec, learning_rate: float | None = None) -> list[Stage]:
    """The run as a list of stages; a spec without `stages` is one stage covering every step.

    `learning_rate` is the run's peak rate when the spec says `auto` (the one the search chose).
    """
    if learning_rate is None:
        if training.learning_rate == "auto":
            raise ValueError("learning_rate is 'auto': pass the rate the search chose")
        learning_rate = float(training.learning_rate)
    if not training.stages:
        return [Stage(0, "main", 0, training.steps, learning_rate, training.warmup_steps, loss, training.param_groups)]
    out, start = [], 0
    for i, s in enumerate(training.stages):
        overrides = s.loss.model_dump(exclude_none=True) if s.loss else {}
        out.append(
            Stage(
                index=i,
                name=s.name or f"stage{i + 1}",
                start=start,
                steps=s.steps,
                learning_rate=s.learning_rate or learning_rate,
                warmup_steps=s.warmup_steps if s.warmup_steps is not None else (training.warmup_steps if i == 0 else 0),
                loss=loss.model_copy(update=overrides),
                param_groups=s.param_groups if s.param_groups is not None else training.param_groups,
            )
        )
        start += s.steps
    return out


def stage_at(all_stages: list[Stage], step: int) -> Stage:
    for s in all_stages:
        if step < s.end:
            return s
    return all_stages[-1]


def learning_rate(stage: Stage, step: int, kind: str, min_ratio: float) -> float:
    """LR for global step `step` (0-based): linear warmup to the stage's peak, then decay to min_ratio * peak."""
    t = step - stage.start
    peak = stage.learning_rate
    if t < stage.warmup_steps:
        return peak * (t + 1) / stage.warmup_steps
    if kind == "constant":
        return peak
    span = max(stage.steps - stage.warmup_steps, 1)
    progress = min((t - stage.warmup_steps) / span, 1.0)
    floor = peak * min_ratio
    if kind == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
