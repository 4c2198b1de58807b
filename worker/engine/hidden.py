"""Hidden-state hints (`loss.hidden`): chosen student layers' outputs pulled toward chosen teacher layers'.

Multi-level distillation (FitNets' hints; AMTML-KD's intermediate-level transfer): besides the output
distribution, the student learns the teacher's intermediate representations. For each pair
[student_layer, teacher_layer] the output of that transformer block (its residual stream) is compared at every
counted position:

- mse: ‖P h_s − h_t‖² / ‖h_t‖², the squared error relative to the teacher's norm, averaged over positions (a
  pruned student's residual stream has its teacher's scale). Across widths the projection maps the student's
  RMS-normalised state to the teacher's (P ĥ_s against h_t / rms(h_t)): residual streams' scales differ by
  orders of magnitude between models (SmolLM2's are ~1000x a fresh student's), and a projection learning such
  a scale at a student's learning rate would take thousands of steps;
- cosine: 1 − cos(P h_s, h_t).

P is the identity when the widths match and a learned linear map (d_student → d_teacher, one per pair, trained
with the student) when they differ. The projections live on the student model as `hidden_projections` while it
trains, so the optimizer, the compiled step, the learning-rate search and every checkpoint
(`hints.safetensors`) treat them as the student's own trainable weights; they are never part of the shipped
adapter or the fused model (`detach`).

Layer outputs are read with a tap: the tapped layer's class is swapped for a subclass that records its output
on each call (same instance and parameters, so the model's weights, adapters and compiled graphs are
unaffected), on the student and on the online teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

PROJECTIONS = "hidden_projections"  # the student model's attribute while it trains
_TAPPED: dict[type, type] = {}  # layer class -> its recording subclass


def transformer_layers(model: nn.Module) -> list:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("the model has no transformer layers to read hidden states from")
    return list(layers)


class Tap:
    """Records the outputs of `layer_ids` of `model` on each forward: `outputs[i]` [B, L, d]."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int]):
        self.outputs: dict[int, mx.array] = {}
        layers = transformer_layers(model)
        for i in layer_ids:
            layer = layers[i]
            base = type(layer)
            if base not in _TAPPED.values():
                layer.__class__ = _recording_class(base)
            _SLOTS.setdefault(id(layer), []).append((self, i))

    def take(self) -> dict[int, mx.array]:
        out, self.outputs = self.outputs, {}
        return out


_SLOTS: dict[int, list[tuple[Tap, int]]] = {}


def _recording_class(base: type) -> type:
    if base not in _TAPPED:

        def __call__(self, *args, **kwargs):
            out = base.__call__(self, *args, **kwargs)
            for tap, i in _SLOTS.get(id(self), ()):
                tap.outputs[i] = out[0] if isinstance(out, tuple) else out
            return out

        _TAPPED[base] = type(f"Tapped{base.__name__}", (base,), {"__call__": __call__})
    return _TAPPED[base]


def hint_loss(student_h: mx.array, teacher_h: mx.array, mask: mx.array, kind: str) -> mx.array:
    """Mean over counted positions of the pair's distance (above); `student_h` already projected."""
    s, t = student_h.astype(mx.float32), mx.stop_gradient(teacher_h.astype(mx.float32))
    if kind == "mse":
        per = mx.sum((s - t) ** 2, axis=-1) / mx.maximum(mx.sum(t * t, axis=-1), 1e-6)
    elif kind == "cosine":
        dot = mx.sum(s * t, axis=-1)
        norms = mx.sqrt(mx.sum(s * s, axis=-1) * mx.sum(t * t, axis=-1))
        per = 1.0 - dot / mx.maximum(norms, 1e-6)
    else:
        raise ValueError(f"loss.hidden.kind: {kind!r} is not mse or cosine")
    m = mask.astype(mx.float32)
    return mx.sum(per * m) / mx.maximum(mx.sum(m), 1.0)


def _rms(x: mx.array) -> mx.array:
    return mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _rms_normed(x: mx.array) -> mx.array:
    return x / _rms(x)


class Hints:
    """The hint term of the loss: pairs, their kind and weight, the student's tap and projections."""

    def __init__(self, student: nn.Module, pairs: Sequence[Sequence[int]], kind: str, weight: float, teacher_dims: int):
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.kind, self.weight = kind, float(weight)
        self.teacher_layers = sorted({t for _, t in self.pairs})
        self.tap = Tap(student, sorted({s for s, _ in self.pairs}))
        student_dims = _width(student)
        if student_dims != teacher_dims:
            # one map per pair, trained with the student; a fixed key, so a run starts from the same maps
            key = mx.random.key(len(self.pairs) * 7919 + student_dims)
            maps = []
            for k in mx.random.split(key, len(self.pairs)):
                linear = nn.Linear(student_dims, teacher_dims, bias=False)
                scale = 1.0 / math.sqrt(student_dims)
                linear.weight = mx.random.uniform(-scale, scale, (teacher_dims, student_dims), key=k)
                maps.append(linear)
            setattr(student, PROJECTIONS, maps)

    def loss(self, student: nn.Module, teacher_hidden: Sequence[mx.array], mask: mx.array) -> mx.array:
        """The weighted hint loss of the last student forward against the teacher's layers (`teacher_layers`
        order), summed over pairs."""
        mine = self.tap.take()
        theirs = dict(zip(self.teacher_layers, teacher_hidden))
        maps = getattr(student, PROJECTIONS, None)
        total = mx.array(0.0)
        for p, (s, t) in enumerate(self.pairs):
            h, target = mine[s], theirs[t]
            if maps is not None:
                h = maps[p](_rms_normed(h.astype(mx.float32)))
                if self.kind == "mse":  # to the teacher's scale: P ĥ_s against h_t / rms(h_t)
                    h = h * mx.stop_gradient(_rms(target.astype(mx.float32)))
            total = total + hint_loss(h, target, mask, self.kind)
        return self.weight * total


def _width(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    dims = getattr(args, "hidden_size", None)
    if dims is None:
        raise ValueError("the student's config has no hidden_size")
    return int(dims)


def teacher_width(model: nn.Module) -> int:
    return _width(model)


def detach(model: nn.Module) -> None:
    """Take the projections off the student (before its adapter ships or it is fused)."""
    if PROJECTIONS in model:
        model.pop(PROJECTIONS)


def projection_weights(model: nn.Module) -> dict[str, mx.array]:
    from .mlx_typed import flat_arrays

    return {k: v for k, v in flat_arrays(model.parameters()) if k.startswith(PROJECTIONS + ".")}
