"""Which models, datasets and jobs a job spec refers to, by field: what the API checks on create and what
dataset deletion looks for. Pure data, no database."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

Target = Literal["model", "dataset", "job"]


class Reference(NamedTuple):
    field: str  # dotted path in the request, e.g. spec.teachers.0.model
    target: Target
    id: str


def spec_references(kind: str, spec: dict[str, Any]) -> list[Reference]:
    refs: list[Reference] = []
    if kind == "distill":
        refs.append(Reference("spec.student.model", "model", spec["student"]["model"]))
        if spec["student"].get("adapter"):
            refs.append(Reference("spec.student.adapter", "job", spec["student"]["adapter"]))
        for i, teacher in enumerate(spec["teachers"]):
            refs.append(Reference(f"spec.teachers.{i}.model", "model", teacher["model"]))
        refs.append(Reference("spec.data.train", "dataset", spec["data"]["train"]))
        if isinstance(spec["data"].get("valid"), str):
            refs.append(Reference("spec.data.valid", "dataset", spec["data"]["valid"]))
        if spec["data"].get("preference"):
            refs.append(Reference("spec.data.preference", "dataset", spec["data"]["preference"]))
        if spec.get("evaluate"):
            refs += _benchmark_refs("spec.evaluate", spec["evaluate"])
    elif kind == "teacher_cache":
        refs.append(Reference("spec.teacher", "model", spec["teacher"]))
        refs.append(Reference("spec.data", "dataset", spec["data"]))
    elif kind == "benchmark":
        refs.append(Reference("spec.reference", "model", spec["reference"]))
        refs += _benchmark_refs("spec", spec)
    elif kind == "compare":  # its base distill spec's, under spec.base
        refs += [
            r._replace(field="spec.base." + r.field.removeprefix("spec."))
            for r in spec_references("distill", spec["base"])
        ]
        refs += [Reference(f"spec.domains.{name}", "dataset", ds) for name, ds in (spec.get("domains") or {}).items()]
    elif kind == "generate":
        refs += _candidate_refs("spec.models", spec["models"])
    return refs


_CANDIDATE_FIELDS: tuple[tuple[str, Target], ...] = (("model", "model"), ("adapter", "job"), ("student_of", "job"))


def _candidate_refs(at: str, candidates: list[dict[str, Any]]) -> list[Reference]:
    """The models and jobs of benchmark candidates, or of a generate job's models (the same shape)."""
    return [
        Reference(f"{at}.{i}.{name}", target, cand[name])
        for i, cand in enumerate(candidates)
        for name, target in _CANDIDATE_FIELDS
        if cand.get(name)
    ]


def _benchmark_refs(at: str, spec: dict[str, Any]) -> list[Reference]:
    """The candidates' models and jobs and the data of a benchmark spec, or of a distill spec's `evaluate`."""
    refs = _candidate_refs(f"{at}.candidates", spec.get("candidates") or [])
    for name in ("text", "mcq", "preference", "prompts"):
        if spec["data"].get(name):
            refs.append(Reference(f"{at}.data.{name}", "dataset", spec["data"][name]))
    return refs


def stored_references(kind: str, spec: dict[str, Any]) -> list[Reference]:
    """The references of a spec already stored (validated when created, but perhaps by an older version or
    written by hand): one that cannot be read refers to nothing we know."""
    try:
        return spec_references(kind, spec)
    except (KeyError, TypeError, AttributeError):
        return []


def dataset_ids(kind: str, spec: dict[str, Any]) -> set[str]:
    return {r.id for r in stored_references(kind, spec) if r.target == "dataset"}


def job_ids(kind: str, spec: dict[str, Any]) -> set[str]:
    return {r.id for r in stored_references(kind, spec) if r.target == "job"}
