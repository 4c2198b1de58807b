"""Checkpoints of a run: `step-NNNNNNN/` to resume exactly, `best-NNNNNNN/` to ship and to roll back to.

Every checkpoint holds the adapter (mlx-lm's format), the optimizer state, the train state and, with
`teacher_weighting: learned`, the teacher gate's state (`weighting.safetensors`) and, with `loss.hidden` across
widths, the hints' projections (`hints.safetensors`), so a run can continue from it bit for bit. The newest `keep` step checkpoints are kept. Best checkpoints are named by their
step and kept while the run's state or a kept step checkpoint refers to them: a run resumed from an older
step checkpoint then finds the best it had at that step, not a later one a killed worker wrote after it.
Folders are written under a temporary name and renamed, so a half-written checkpoint is never read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import hidden
from . import student as student_mod
from .mlx_typed import load_safetensors


class Checkpoints:
    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def best_path(self, step: int) -> Path:
        return self.root / f"best-{step:07d}"

    def save(self, model, optimizer, acfg: dict, state, weighting=None) -> Path:
        path = self._write(f"step-{state.step:07d}", model, optimizer, acfg, asdict(state), weighting=weighting)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self._prune_best(state.best_step)
        return path

    def save_best(self, model, optimizer, acfg: dict, state, stage_index: int, weighting=None) -> Path:
        info = {"step": state.step, "val_kl": state.best_val_kl, "stage": stage_index}
        return self._write(self.best_path(state.step).name, model, optimizer, acfg, asdict(state), info, weighting)

    def _write(
        self, name: str, model, optimizer, acfg: dict, state: dict, best: dict | None = None, weighting=None
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path, tmp = self.root / name, self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        student_mod.save_adapter(model, acfg, tmp)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if weighting is not None and (arrays := weighting.state()):
            mx.save_safetensors(str(tmp / "weighting.safetensors"), arrays)
        if projections := hidden.projection_weights(model):
            mx.save_safetensors(str(tmp / "hints.safetensors"), projections)
        if best is not None:
            (tmp / "best.json").write_text(json.dumps(best))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    def _prune_best(self, current: int | None) -> None:
        wanted = {current}
        for p in self.root.glob("step-*"):
            if (p / "state.json").is_file():
                wanted.add(json.loads((p / "state.json").read_text()).get("best_step"))
        for p in self.root.glob("best-*"):
            if int(p.name.split("-")[1]) not in wanted:
                shutil.rmtree(p, ignore_errors=True)

    def drop_after(self, step: int) -> None:
        """On resume: best checkpoints a killed run wrote after the step it resumes from (they will be rewritten)."""
        for p in self.root.glob("best-*"):
            if int(p.name.split("-")[1]) > step:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict:
        return json.loads((path / "state.json").read_text())

    @staticmethod
    def restore(path: Path, model, optimizer=None, weighting=None) -> None:
        """The adapter weights, the optimizer state when an optimizer is given, the weighting's when one is."""
        model.load_weights(str(path / "adapters.safetensors"), strict=False)
        if (path / "hints.safetensors").is_file():  # the hints' projections (hidden.py), while they train
            model.load_weights(str(path / "hints.safetensors"), strict=False)
        if optimizer is not None:
            optimizer.state = tree_unflatten(list(load_safetensors(path / "optimizer.safetensors").items()))
        if weighting is not None and (path / "weighting.safetensors").is_file():
            weighting.load_state(load_safetensors(path / "weighting.safetensors"))
