"""The SDK's job spec models accept exactly what the API accepts, so the two cannot drift apart.

A corpus of specs is generated from both the API's published OpenAPI schema (fetched from the running server)
and the SDK's own JSON schema: a valid spec per model, then one mutation per field (removed, null, wrong type,
each side of every bound, outside the enum) and an unknown field. For every spec:
- the SDK's verdict equals the API's own validation (the server's models, as `POST /v1/jobs` runs them);
- where the OpenAPI schema rejects, the SDK rejects; where the SDK rejects a spec the schema allows, the reason
  is one of the cross-field rules JSON Schema cannot state (a validator's `value_error`), shared by both sides.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import ValidationError

from distillery import specs as sdk
from service.api.schemas import SPEC_MODELS as API_MODELS

KINDS = ("distill", "teacher_cache", "benchmark")
COMPONENT = {"distill": "DistillSpec", "teacher_cache": "TeacherCacheSpec", "benchmark": "BenchmarkSpec"}


def _resolve(root: dict, s: dict) -> dict:
    while isinstance(s, dict) and "$ref" in s:
        target = root
        for part in s["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        s = target
    return s


def _options(root: dict, s: dict) -> list[dict]:
    s = _resolve(root, s)
    for key in ("oneOf", "anyOf"):
        if key in s:
            return [o for opt in s[key] for o in _options(root, opt)]
    return [s]


def _valid(root: dict, s: dict, depth: int = 0) -> Any:
    """A value the schema accepts (the first non-null alternative, every property filled)."""
    options = [o for o in _options(root, s) if o.get("type") != "null"] or _options(root, s)
    s = options[0]
    if "enum" in s:
        return s["enum"][0]
    if "const" in s:
        return s["const"]
    kind = s.get("type")
    if kind == "object":
        props = s.get("properties", {})
        return {k: _valid(root, v, depth + 1) for k, v in props.items() if k in s.get("required", []) or depth < 6}
    if kind == "array":
        return [_valid(root, s.get("items", {}), depth + 1)] * max(1, s.get("minItems", 1))
    if kind == "string":
        return "x" * max(1, s.get("minLength", 1))
    if kind in ("integer", "number"):
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        if lo is not None:
            v = lo + (1 if "exclusiveMinimum" in s else 0)
            if hi is not None and v >= hi:
                v = (lo + hi) / 2
        else:
            v = 1 if hi is None or hi > 1 else hi - 1
        return int(v) if kind == "integer" and float(v).is_integer() else v
    if kind == "boolean":
        return True
    return None


def _bounds(s: dict) -> list[Any]:
    """Values on each side of every numeric bound, and lengths around the string/array limits."""
    out: list[Any] = []
    step = 1 if s.get("type") == "integer" else 1e-6
    for key, sign in (("minimum", -1), ("exclusiveMinimum", -1), ("maximum", 1), ("exclusiveMaximum", 1)):
        if key in s:
            b = s[key]
            b = int(b) if s.get("type") == "integer" else b
            out += [b, b + sign * step, b - sign * step]
    if "minLength" in s:
        out += ["x" * (s["minLength"] - 1)] if s["minLength"] > 0 else []
    if "maxLength" in s:
        out += ["x" * s["maxLength"], "x" * (s["maxLength"] + 1)]
    if "enum" in s:
        out += ["not-one-of-them"]
    return out


def _corpus(root: dict, top: dict) -> list[Any]:
    """The valid spec, then each mutation of each field at every depth."""
    base = _valid(root, top)
    out = [base, {**base, "not_a_field": 1}]

    def walk(value: Any, schema: dict, path: list) -> None:
        for s in _options(root, schema):
            if s.get("type") == "object" and isinstance(value, dict):
                for name, sub in s.get("properties", {}).items():
                    here = path + [name]
                    out.append(_without(base, here))
                    for v in [None, "text", 3, 2.5, True, [], {}] + [b for o in _options(root, sub) for b in _bounds(o)]:
                        out.append(_with(base, here, v))
                    if name in value:
                        walk(value[name], sub, here)
                out.append(_with(base, path + ["not_a_field"], 1))
            elif s.get("type") == "array" and isinstance(value, list) and value:
                out.append(_with(base, path, value + [value[0]]))
                out.append(_with(base, path, []))
                walk(value[0], s.get("items", {}), path + [0])

    walk(base, top, [])
    return out


def _with(base: Any, path: list, value: Any) -> Any:
    doc = copy.deepcopy(base)
    target = doc
    for p in path[:-1]:
        target = target[p]
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(path[-1], int)):
        target[path[-1]] = value
    return doc


def _without(base: Any, path: list) -> Any:
    doc = copy.deepcopy(base)
    target = doc
    for p in path[:-1]:
        target = target[p]
    if isinstance(target, dict):
        target.pop(path[-1], None)
    return doc


def _verdict(model, spec) -> tuple[bool, set[str]]:
    try:
        model.model_validate(spec)
        return True, set()
    except ValidationError as e:
        return False, {err["type"] for err in e.errors()}


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(f"{server.url}/schema/openapi.json", timeout=30).json()


@pytest.mark.parametrize("kind", KINDS)
def test_sdk_spec_models_accept_exactly_what_the_api_accepts(openapi, kind):
    name = COMPONENT[kind]
    api_doc = {"components": openapi["components"]}
    api_top = {"$ref": f"#/components/schemas/{name}"}
    sdk_doc = sdk.SPEC_MODELS[kind].model_json_schema(ref_template="#/$defs/{model}")
    schema = jsonschema.Draft202012Validator({**api_doc, **api_top})

    corpus = _corpus(api_doc, api_top) + _corpus(sdk_doc, sdk_doc)
    assert len(corpus) > 60
    accepted = 0
    for spec in corpus:
        ok_sdk, why = _verdict(sdk.SPEC_MODELS[kind], spec)
        ok_api, _ = _verdict(API_MODELS[kind], spec)
        assert ok_sdk == ok_api, f"SDK {'accepts' if ok_sdk else 'rejects'} what the API does not: {spec}"
        ok_schema = schema.is_valid(spec)
        if not ok_schema:
            assert not ok_sdk, f"the SDK accepts a spec the OpenAPI schema rejects: {spec}"
        elif not ok_sdk:
            assert why <= {"value_error"}, f"rejected for {why}, which the OpenAPI schema does not say: {spec}"
        accepted += ok_sdk
    assert accepted >= 3   # the corpus exercised acceptance too, not only refusals


def test_the_published_schema_closes_every_spec_object(openapi):
    """`extra="forbid"` reaches the OpenAPI document: unknown fields are refused there too."""
    comps = openapi["components"]["schemas"]
    for name in ("DistillSpec", "TrainingSpec", "LossSpec", "BenchmarkSpec", "BenchmarkCandidate", "EvaluateSpec",
                 "TeacherCacheSpec", "JobCreate"):
        assert comps[name].get("additionalProperties") is False, name
