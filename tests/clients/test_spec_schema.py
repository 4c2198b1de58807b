"""The job specs have one definition, `distillery_contract.specs`: the API validates with it, the SDK re-exports
it, and the API's OpenAPI document publishes exactly its JSON schemas.

The document is fetched from the running server, as an SDK user or a generated client sees it; each spec
component must equal the contract model's own `model_json_schema()`, keyword for keyword.
"""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

import distillery
import distillery_contract
from distillery import specs as sdk_specs
from distillery_contract import specs as contract
from service.http.schemas import SPEC_MODELS as API_MODELS

COMPONENT = {
    "distill": "DistillSpec",
    "teacher_cache": "TeacherCacheSpec",
    "benchmark": "BenchmarkSpec",
    "generate": "GenerateSpec",
    "compare": "CompareSpec",
}


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(f"{server.url}/schema/openapi.json", timeout=30).json()


def own_schemas() -> dict[str, dict]:
    """Every component the contract's spec models define, as pydantic writes them (refs into the document)."""
    out: dict[str, dict] = {}
    for model in contract.SPEC_MODELS.values():
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(doc.pop("$defs", {}))
        out[model.__name__] = doc
    return out


def test_the_published_spec_schemas_are_the_contracts_own(openapi):
    published = openapi["components"]["schemas"]
    own = own_schemas()
    assert set(COMPONENT.values()) <= set(own) and len(own) >= 20  # the specs and all their parts
    for name, schema in own.items():
        assert published.get(name) == schema, f"the published {name} is not the contract's own schema"


def test_every_request_model_of_the_contract_is_published(openapi):
    """Each public model of the contract is a component (none is left to Litestar's derivation), no private one."""
    published = openapi["components"]["schemas"]
    models = [
        v
        for v in vars(contract).values()
        if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == contract.__name__
    ]
    assert {m.__name__ for m in models if not m.__name__.startswith("_")} <= set(published)
    assert not [name for name in published if name.startswith("_")]


def test_the_published_schema_closes_every_spec_object(openapi):
    """`extra="forbid"` reaches the OpenAPI document: unknown fields are refused there too."""
    comps = openapi["components"]["schemas"]
    for name in (
        "DistillSpec",
        "TrainingSpec",
        "LossSpec",
        "BenchmarkSpec",
        "BenchmarkCandidate",
        "EvaluateSpec",
        "TeacherCacheSpec",
        "JobCreate",
    ):
        assert comps[name].get("additionalProperties") is False, name


def test_the_api_and_the_sdk_use_the_contracts_models_themselves():
    assert API_MODELS is contract.SPEC_MODELS
    assert {kind: m.__name__ for kind, m in API_MODELS.items()} == COMPONENT
    assert set(API_MODELS) == set(distillery_contract.JOB_KINDS)
    for name in contract.__all__:  # `distillery.specs` is a re-export, not a copy
        assert getattr(sdk_specs, name) is getattr(contract, name), name
    assert distillery.DistillSpec is contract.DistillSpec
    assert distillery.TeacherCacheSpec is contract.TeacherCacheSpec
    assert distillery.BenchmarkSpec is contract.BenchmarkSpec
