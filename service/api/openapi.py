"""OpenAPI request bodies for the handlers that parse their own body (streamed multipart uploads, or JSON
and multipart on one route), which Litestar cannot infer from a `data` parameter."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Reference, RequestBody, Schema
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


def publish_pydantic_schemas(app: Litestar, models: Iterable[type[BaseModel]]) -> None:
    """Replace the components Litestar derived from these pydantic models with pydantic's own JSON schema.

    Litestar's derivation drops what the API enforces on optional fields (`max_grad_norm: float | None` with
    `gt=0` loses its bound) and `extra="forbid"`; pydantic's schema is exactly what the API validates, so the
    published document accepts what the API accepts (less the cross-field rules no JSON schema can state)."""
    # the plugin's document is built once and cached; it is public in effect though its module is private
    openapi = app.plugins.get(OpenAPIPlugin).provide_openapi()
    schemas = openapi.components.schemas
    for model in models:
        if model.__name__ == "JobCreate":   # `spec` is checked by a plain validator: keep Litestar's oneOf of
            schemas["JobCreate"].additional_properties = False    # the spec models, and close the object
            continue
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in {**doc.pop("$defs", {}), model.__name__: doc}.items():
            schemas[name] = _to_schema(sub)


_RENAMED = {"not": "schema_not", "if": "schema_if", "else": "schema_else"}


def _to_schema(node: Any) -> Any:
    """A JSON schema (dict) as Litestar's `Schema` objects (`$ref` as a `Reference`)."""
    if isinstance(node, list):
        return [_to_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return Reference(ref=node["$ref"])
    fields = {}
    for key, value in node.items():
        name = _RENAMED.get(key) or re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        if name == "type":
            value = [OpenAPIType(v) for v in value] if isinstance(value, list) else OpenAPIType(value)
        elif name == "properties":
            value = {k: _to_schema(v) for k, v in value.items()}
        elif name in ("items", "additional_properties", "any_of", "one_of", "all_of", "schema_not"):
            value = _to_schema(value)
        fields[name] = value
    return Schema(**fields)
