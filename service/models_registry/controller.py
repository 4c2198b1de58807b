"""`/v1/models`: register a server path (JSON) or upload a GGUF file (multipart); list; get."""

from __future__ import annotations

import anyio.to_thread
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from pydantic import ValidationError

from service.api.deps import ID_PATTERN, CallerDep, PathId, SessionDep, SettingsDep
from service.api.idempotency import IdempotencyKey, Replay, fingerprint, header_key
from service.api.openapi import multipart_body
from service.api.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.api.problems import Problem, from_field_errors, pydantic_errors
from service.api.schemas import ModelOut, ModelPage, ModelRegister
from service.api.uploads import receive_upload
from service.models_registry import service

MAX_JSON_BODY = 64 << 10


class ModelController(Controller):
    path = "/models"
    tags = ["models"]

    @post(
        "/",
        request_max_body_size=None,
        summary="Register a model",
        operation_class=multipart_body(
            {"file": "binary", "name": "string"},
            ["file"],
            json_fields={"name": "string", "path": "string"},
            json_required=["path"],
        ),
        description='JSON `{"name", "path"}`: an mlx-lm folder (config.json + *.safetensors) or a .gguf file '
        "on the server, by absolute path (inside the configured model roots, if any). "
        "multipart/form-data: a GGUF file upload (`file`, optional `name`).",
    )
    async def register(
        self, request: Request, session: SessionDep, caller: CallerDep, settings: SettingsDep
    ) -> Response[ModelOut]:
        key = header_key(request)
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            upload = await receive_upload(
                request, service.model_dir(settings, caller.project_id), settings.max_upload_bytes, service.TEXT_FIELDS
            )
            result = await anyio.to_thread.run_sync(
                lambda: service.register_upload(session, settings, caller.project_id, upload, key, request.url.path)
            )
        else:
            body, raw = await _json_body(request)
            idem = IdempotencyKey(key, fingerprint(request.method, request.url.path, raw)) if key else None
            result = await anyio.to_thread.run_sync(
                lambda: service.register_path(session, settings, caller.project_id, body, idem)
            )
        if isinstance(result, Replay):
            return result.response()
        status, payload = result
        return Response(payload, status_code=status)

    @get("/", sync_to_thread=True, summary="List models, newest first")
    def list(
        self,
        session: SessionDep,
        caller: CallerDep,
        limit: int = Parameter(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        after: str | None = Parameter(default=None, max_length=80, pattern=ID_PATTERN),
    ) -> ModelPage:
        return service.list_models(session, caller.project_id, limit, after)

    @get("/{model_id:str}", sync_to_thread=True, summary="Get a model")
    def retrieve(self, session: SessionDep, caller: CallerDep, model_id: PathId) -> ModelOut:
        return service.get_model(session, caller.project_id, model_id)


async def _json_body(request: Request) -> tuple[ModelRegister, bytes]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Problem(415, 'send JSON {"name", "path"} (application/json) or a multipart/form-data GGUF upload')
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise Problem(413, f"a JSON body is limited to {MAX_JSON_BODY} bytes")
    try:
        return ModelRegister.model_validate_json(raw), raw
    except ValidationError as e:
        errors = pydantic_errors(e)
        if any(err["message"].startswith("Invalid JSON") for err in errors):
            raise Problem(400, f"the body is not valid JSON: {errors[0]['message']}") from None
        raise from_field_errors(errors) from None
