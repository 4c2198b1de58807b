"""The training step's loss and gradients as one compiled graph (MLX on the CPU).

Why: `mx.compile` fuses the elementwise work of the forward *and* the backward into kernels that
`cpu_jit.enable()` lets the compiler vectorise, and it is the only way the compiled SiLU / softmax / exp of
`fused.py` stay compiled when differentiated. On a SmolLM2 student at 2 x 256 (one A/B run in one process)
the step took 4.58 s compiled against 5.31 s uncompiled.

What is compiled: `loss_and_grad(model, tokens, mask, teachers, weights, loss_cfg)` with the model's state and MLX's
random state (LoRA dropout) as implicit inputs and outputs, as mlx-lm's own trainer does. One graph per
(loss settings, teachers' kinds and constants); MLX traces it again for each new batch shape
(length-bucketed batches repeat their shapes; the cost of a trace is not measured yet). Teachers are dataclasses:
their array fields are the graph's inputs, the rest (a vocabulary size) part of the key. The teachers' weights
[n, B] (weighting.py; None without teachers) are an input too: an adaptive weighting changes them every batch.

Off (plain `loss_and_grad`) on a GPU, where MLX's kernels are already fused, and with
DISTILLERY_COMPILE_STEP=off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)


def wanted() -> bool:
    off = os.environ.get("DISTILLERY_COMPILE_STEP", "").strip().lower() in {"off", "0", "false", "no"}
    return not off and mx.default_device() == mx.cpu


class CompiledGradients:
    """`loss_and_grad` (nn.value_and_grad of the trainer's loss) called through compiled graphs."""

    def __init__(self, model: nn.Module, loss_and_grad: Callable):
        self.model, self.loss_and_grad = model, loss_and_grad
        self._graphs: dict[tuple, tuple[Callable | None, Callable]] = {}  # key: (compiled or None, plain)

    def __call__(
        self, model: nn.Module, tokens: mx.array, mask: mx.array, teachers: Sequence, weights: mx.array | None, loss_cfg
    ):
        parts = [_split(t) for t in teachers]
        arrays = [a for a, _ in parts] + ([] if weights is None else [{"weights": weights}])
        key = (
            _settings_key(loss_cfg),
            tuple((type(t), consts) for t, (_, consts) in zip(teachers, parts)),
            weights is None,
        )
        if key not in self._graphs:
            plain = self._graph([type(t) for t in teachers], [c for _, c in parts], weights is not None, loss_cfg)
            state = [self.model.state, mx.random.state]
            self._graphs[key] = (mx.compile(plain, inputs=state, outputs=state), plain)
        compiled, plain = self._graphs[key]
        if compiled is None:
            return plain(tokens, mask, arrays)
        parameters, random_key = self.model.parameters(), mx.random.state[0]  # type: ignore[index]
        try:  # traced on the first call and on each new batch shape
            return compiled(tokens, mask, arrays)
        except (IndexError, RuntimeError) as e:
            # MLX 0.32's compiler fails on some graphs (one: a loss that computes the same reduction twice and
            # returns one of them). Slower, not wrong: this setting runs uncompiled from now on, from the
            # state as it was (a failed trace leaves placeholders in the model).
            log.warning("training step not compiled (%s: %s); it runs uncompiled", type(e).__name__, e)
            self.model.update(parameters)
            hi, lo = (int(x) for x in random_key.tolist())
            mx.random.seed((hi << 32) | lo)  # sets exactly that key back
            self._graphs[key] = (None, plain)
            return plain(tokens, mask, arrays)

    def _graph(self, kinds: list[type], consts: list[tuple], weighted: bool, loss_cfg) -> Callable:
        model, loss_and_grad = self.model, self.loss_and_grad

        def graph(tokens, mask, teacher_arrays):
            teachers = [_join(k, a, c) for k, a, c in zip(kinds, teacher_arrays, consts)]
            weights = teacher_arrays[len(kinds)]["weights"] if weighted else None
            return loss_and_grad(model, tokens, mask, teachers, weights, loss_cfg)

        return graph


def _split(teacher) -> tuple[dict, tuple]:
    """A teacher dataclass's array fields (the graph's inputs) and its other fields (constants of the key)."""
    arrays: dict[str, mx.array | list[mx.array]] = {}
    consts = []
    for f in dataclasses.fields(teacher):
        value = getattr(teacher, f.name)
        if isinstance(value, mx.array):
            arrays[f.name] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, mx.array) for v in value):
            arrays[f.name] = list(value)  # e.g. a teacher's hidden states: inputs too
        else:
            consts.append((f.name, value))
    return arrays, tuple(consts)


def _join(kind: type, arrays: dict, consts: tuple):
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in arrays.items()}
    return kind(**fields, **dict(consts))


def _settings_key(loss_cfg) -> tuple:
    """The loss settings the graph bakes in (a pydantic spec, an override object or None)."""
    if loss_cfg is None:
        return ()
    if hasattr(loss_cfg, "model_dump"):
        return tuple(sorted((k, repr(v)) for k, v in loss_cfg.model_dump().items()))
    return tuple(sorted((k, repr(v)) for k, v in vars(loss_cfg).items()))
