"""Job bodies (`{"kind", "spec"}`) from what users have at hand: a typed spec, a dict, or a YAML/JSON file.
They are checked here with the models the API validates with (distillery_contract.specs), so a mistake is
reported before anything is sent, naming the field and, for a file, its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distillery_contract.specs import (
    SPEC_MODELS,
    BenchmarkSpec,
    CompareSpec,
    DistillSpec,
    GenerateSpec,
    TeacherCacheSpec,
)

from ._exceptions import DistilleryError

KIND_OF = {
    DistillSpec: "distill",
    TeacherCacheSpec: "teacher_cache",
    BenchmarkSpec: "benchmark",
    GenerateSpec: "generate",
    CompareSpec: "compare",
}


class SpecError(DistilleryError, ValueError):
    """A job spec is invalid; `errors` lists `{field, message, line}` (line only for files)."""

    def __init__(self, source: str, errors: list[dict[str, Any]]) -> None:
        self.source, self.errors = source, errors
        parts = [
            f"{source}:{e['line']}: {e['field']}: {e['message']}"
            if e.get("line")
            else f"{source}: {e['field']}: {e['message']}"
            for e in errors
        ]
        super().__init__("; ".join(parts))


def job_body(spec: Any, parent_id: str | None = None) -> dict[str, Any]:
    source, node = "job", None
    if isinstance(spec, BaseModel):
        kind = KIND_OF.get(type(spec))
        if kind is None:
            raise DistilleryError(f"not a job spec: {type(spec).__name__}")
        body = {"kind": kind, "spec": spec.model_dump(mode="json", exclude_unset=True)}
    elif isinstance(spec, dict):
        body = spec
    elif isinstance(spec, (str, Path)):
        path = Path(spec)
        if isinstance(spec, str) and "\n" in spec:
            text = spec
        elif path.is_file():
            source, text = str(path), path.read_text()
        else:
            raise DistilleryError(f"job file {spec} does not exist")
        try:
            node = yaml.compose(text)
            body = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise DistilleryError(f"{source}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    else:
        raise DistilleryError(f"cannot make a job of a {type(spec).__name__}")
    if not isinstance(body, dict):
        raise SpecError(source, [{"field": "(top)", "message": "a job is a mapping with `kind` and `spec`"}])
    body = dict(body)
    if parent_id:
        body["parent_id"] = parent_id
    _check(body, source, node)
    return body


def _check(body: dict[str, Any], source: str, node: Any) -> None:
    errors = []
    unknown = set(body) - {"kind", "spec", "parent_id"}
    for key in sorted(unknown):
        errors.append({"field": key, "message": "unknown field (a job has kind, spec, parent_id)"})
    model = SPEC_MODELS.get(body.get("kind"))
    if model is None:
        errors.append(
            {"field": "kind", "message": f"must be one of {', '.join(SPEC_MODELS)}, got {body.get('kind')!r}"}
        )
    elif not isinstance(body.get("spec"), dict):
        errors.append({"field": "spec", "message": "a mapping of the job's settings is required"})
    else:
        try:
            model.model_validate(body["spec"])
        except ValidationError as e:
            for err in e.errors():
                loc = ["spec", *err["loc"]]
                errors.append({"field": ".".join(str(p) for p in loc), "message": err["msg"]})
    for err in errors:
        line = _line_of(node, err["field"].split(".")) if node is not None else None
        if line:
            err["line"] = line
    if errors:
        raise SpecError(source, errors)


def _line_of(node: Any, path: list[str]) -> int | None:
    """The 1-based line of the deepest YAML node on `path` (the field itself, or its parent when missing)."""
    line = node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            match = node.value[int(part)]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line
