"""A split of examples together with where its teacher signal comes from, batch by batch.

`CachedTeacher` reads rows from a TeacherCache (offline mode); `OnlineTeacher` runs the teacher model on the
batch (online mode). Both hand the loss a `losses.SparseTeacher` / `losses.DenseTeacher`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import cancel, hidden, losses
from . import data as data_mod
from .cache import TeacherCache


@dataclass
class CachedTeacher:
    cache: TeacherCache
    rows_of: np.ndarray  # example index in the split -> example index in the cache

    def for_batch(self, example_ids: np.ndarray, tokens: mx.array) -> losses.SparseTeacher:
        ids, lps, tail = self.cache.rows(self.rows_of[example_ids], tokens.shape[1] - 1)
        return losses.SparseTeacher(mx.array(ids), mx.array(lps), mx.array(tail), self.cache.vocab_size)


@dataclass
class OnlineTeacher:
    model: Callable[[mx.array], mx.array]  # the loaded teacher: tokens [B, L] -> logits [B, L, V]
    hidden_layers: list[int] = field(default_factory=list)  # layers whose outputs hidden-state hints read

    def __post_init__(self):
        self._tap = hidden.Tap(self.model, self.hidden_layers) if self.hidden_layers else None  # type: ignore[arg-type]

    def for_batch(self, example_ids: np.ndarray, tokens: mx.array) -> losses.DenseTeacher:
        logits = mx.stop_gradient(self.model(tokens[:, :-1]))
        states: tuple[mx.array, ...] = ()
        if self._tap is not None:
            taken = self._tap.take()
            states = tuple(mx.stop_gradient(taken[i]) for i in self.hidden_layers)
        mx.eval(logits, states)
        return losses.DenseTeacher(logits, states)


@dataclass
class Split:
    examples: list[data_mod.Example]
    teachers: list[CachedTeacher | OnlineTeacher] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(e.tokens) for e in self.examples]

    @property
    def tokens(self) -> int:
        return int(sum(self.lengths))

    def batch(self, example_ids: np.ndarray, pad_id: int, with_teachers: bool = True):
        """(tokens [B, L], target mask [B, L - 1] aligned with the logits, teachers for the batch). A cancel
        point: every training step, learning-rate trial and evaluation batch comes through here."""
        cancel.point("a batch")
        toks, tmask = data_mod.collate([self.examples[i] for i in example_ids], pad_id)
        tokens = mx.array(toks)
        mask = mx.array(tmask[:, 1:])
        teachers = [t.for_batch(example_ids, tokens) for t in self.teachers] if with_teachers else []
        return tokens, mask, teachers
