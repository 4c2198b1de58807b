"""What a benchmark is given, and the models it measures: the resolved inputs and the rows of its report.

`BenchmarkInputs` is a benchmark spec with every model, adapter and dataset resolved to a local path (the caller
resolves ids; the engine only sees paths). `report_rows` makes one `Row` per model of the report, the reference first;
rows naming the same model share one load (`distinct_models`). `check_models` and `config_vocab_size` are the
pre-flight checks of the models, before any weights are loaded. Used by benchmark.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from distillery_contract.jobs import REFERENCE_LABEL
from distillery_contract.specs import BenchmarkSpec

from . import models
from .errors import UserError


@dataclass
class CandidateInput:
    label: str
    model: Path
    adapter: Path | None = None
    metrics: Path | None = None  # metrics.jsonl of the distill run that made the adapter: training curves


@dataclass
class BenchmarkInputs:
    """A benchmark spec with every reference resolved to a local path (candidates in the spec's order)."""

    reference: Path
    candidates: list[CandidateInput]
    text: Path | None = None
    mcq: Path | None = None
    preference: Path | None = None
    prompts: Path | None = None


@dataclass(eq=False)  # hashed by identity: rows key the per-phase results
class Row:
    """One model of the report: the reference or a candidate."""

    label: str
    name: str  # the model as the spec names it
    adapter_name: str | None
    path: Path
    adapter: Path | None
    field: str  # where it is in the spec, for error messages: "reference" or "candidates.N"
    is_reference: bool = False
    metrics: dict = dataclasses.field(default_factory=dict)  # not `field(...)`: the attribute above shadows it

    @property
    def key(self) -> tuple[Path, Path | None]:
        """Rows with the same key are the same model: loaded, evaluated and timed once."""
        return self.path.resolve(), self.adapter.resolve() if self.adapter else None


def report_rows(spec: BenchmarkSpec, inputs: BenchmarkInputs) -> list[Row]:
    """The reference first, then the candidates; a candidate that *is* the reference (same model, no adapter)
    becomes the reference's row under its own label."""
    if len(inputs.candidates) != len(spec.candidates):
        raise ValueError("inputs.candidates must resolve spec.candidates one to one")
    ref = Row(REFERENCE_LABEL, spec.reference, None, inputs.reference, None, "reference", is_reference=True)
    rows = []
    for i, (c, ci) in enumerate(zip(spec.candidates, inputs.candidates)):
        name = c.model or (f"student of {c.student_of}" if c.student_of else f"student of {c.adapter}")
        row = Row(c.label, name, c.adapter, ci.model, ci.adapter, f"candidates.{i}")
        if ref.label == REFERENCE_LABEL and row.key == ref.key:
            ref.label = row.label
            continue
        rows.append(row)
    for r in rows:
        if r.label == ref.label:
            raise UserError(f"{r.field}.label: {r.label!r} names the reference model's row; choose another label")
    return [ref, *rows]


def distinct_models(rows: list[Row]) -> list[Row]:
    """The first row of each model (rows with the same key are loaded, scored and timed once, and share the
    numbers), the reference first."""
    first: dict = {}
    for r in rows:
        first.setdefault(r.key, r)
    return list(first.values())


def check_models(rows: list[Row]):
    """Model and adapter folders exist; every candidate tokenizes like the reference. Returns its tokenizer."""
    for r in rows:
        where = f"{r.field}.model" if r.field != "reference" else "reference"
        if not (r.path / "config.json").is_file():
            raise UserError(f"{where}: {r.name} is not a model folder (no config.json)")
        if r.adapter is not None:
            missing = [f for f in ("adapter_config.json", "adapters.safetensors") if not (r.adapter / f).is_file()]
            if missing:
                raise UserError(
                    f"{r.field}.adapter: {r.adapter_name} is not an adapter folder (no {' or '.join(missing)})"
                )
    ref_tok = models.load_tokenizer(rows[0].path)
    for r in rows[1:]:
        try:
            models.check_tokenizers(
                ref_tok, models.load_tokenizer(r.path), f"reference {rows[0].name}", f"candidate {r.label!r} ({r.name})"
            )
        except UserError as e:
            raise UserError(f"{r.field}.model: {e}") from None
    return ref_tok


def config_vocab_size(path: Path) -> int | None:
    """The vocabulary size config.json declares (top level or `text_config`), for the pre-flight disk check."""
    config = json.loads((path / "config.json").read_text())
    for where in (config, config.get("text_config") or {}):
        if isinstance(where.get("vocab_size"), int):
            return where["vocab_size"]
    return None
