"""OpenAPI request bodies for the handlers that parse their own body (streamed multipart uploads, or JSON
and multipart on one route), which Litestar cannot infer from a `data` parameter."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from pydantic import BaseModel


def _form_schema(fields: dict[str, str], required: list[str]) -> Schema:
    props = {name: Schema(type=OpenAPIType.STRING, format="binary" if kind == "binary" else None)
             for name, kind in fields.items()}
    return Schema(type=OpenAPIType.OBJECT, properties=props, required=required)


def multipart_body(fields: dict[str, str], required: list[str], json_fields: dict[str, str] | None = None,
                   json_required: list[str] | None = None) -> type[Operation]:
    """An Operation class whose request body is a multipart form (`fields`: name -> "binary" | "string"),
    and optionally, as an alternative, a JSON object of string fields."""
    content = {"multipart/form-data": OpenAPIMediaType(schema=_form_schema(fields, required))}
    if json_fields:
        content["application/json"] = OpenAPIMediaType(schema=_form_schema(json_fields, json_required or []))

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(content=content, required=True)

    return WithBody


def close_spec_schemas(app: Litestar, models: Iterable[type[BaseModel]]) -> None:
    """Mark the components of `extra="forbid"` models `additionalProperties: false`, which Litestar's pydantic
    plugin leaves out: the published schema then rejects unknown fields exactly as the API does."""
    openapi = app.plugins.get(OpenAPIPlugin).provide_openapi()
    schemas = openapi.components.schemas or {}
    for model in models:
        if model.model_config.get("extra") == "forbid" and model.__name__ in schemas:
            schemas[model.__name__].additional_properties = False
