"""`/v1/models`: register a server path (JSON) or upload a GGUF file (multipart); list; get."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import Parameter, SkipValidation
from pydantic import ValidationError

from service.domain import models as service
from service.domain.uploaded import Upload
from service.http.deps import ID_PATTERN, CallerDep, PathId, SessionDep, SettingsDep
from service.http.idempotency import fingerprint, idempotent
from service.http.openapi import multipart_body
from service.http.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.http.problems import Problem, from_field_errors, pydantic_errors
from service.http.schemas import ModelOut, ModelPage, ModelRegister, model_out
from service.http.uploads import receive_upload

MAX_JSON_BODY = 64 << 10


@dataclass(frozen=True)
class PathRegistration:
    """A JSON body `{"name", "path"}`, and the bytes it was read from (which identify the request)."""

    body: ModelRegister
    raw: bytes

    def fingerprint(self, method: str, path: str) -> str:
        return fingerprint(method, path, self.raw)


# a JSON registration or an upload; not validated again as a handler parameter (msgspec takes no union of classes)
RegistrationDep = NamedDependency[SkipValidation[PathRegistration | Upload]]


async def provide_registration(
    request: Request, caller: CallerDep, settings: SettingsDep
) -> AsyncIterator[PathRegistration | Upload]:
    """The request's body: a GGUF upload (removed after the request unless stored) or a path to register."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/"):
        yield await _json_body(request)
        return
    upload = await receive_upload(
        request, service.model_dir(settings, caller.project_id), settings.max_upload_bytes, service.TEXT_FIELDS
    )
    try:
        yield upload
    finally:
        upload.discard()


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
        dependencies={"registration": Provide(provide_registration)},
    )
    @idempotent(body="registration")
    def register(
        self,
        registration: RegistrationDep,
        session: SessionDep,
        caller: CallerDep,
        settings: SettingsDep,
    ) -> ModelOut:
        if isinstance(registration, Upload):
            return model_out(service.register_upload(session, settings, caller.project_id, registration))
        body = registration.body
        return model_out(service.register_path(session, settings, caller.project_id, body.name, body.path))

    @get("/", sync_to_thread=True, summary="List models, newest first")
    def list(
        self,
        session: SessionDep,
        caller: CallerDep,
        limit: int = Parameter(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        after: str | None = Parameter(default=None, max_length=80, pattern=ID_PATTERN),
    ) -> ModelPage:
        models = service.list_models(session, caller.project_id, limit, after)
        return ModelPage(data=[model_out(m) for m in models.items], has_more=models.has_more)

    @get("/{model_id:str}", sync_to_thread=True, summary="Get a model")
    def retrieve(self, session: SessionDep, caller: CallerDep, model_id: PathId) -> ModelOut:
        return model_out(service.get_model(session, caller.project_id, model_id))


async def _json_body(request: Request) -> PathRegistration:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Problem(415, 'send JSON {"name", "path"} (application/json) or a multipart/form-data GGUF upload')
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise Problem(413, f"a JSON body is limited to {MAX_JSON_BODY} bytes")
    try:
        return PathRegistration(ModelRegister.model_validate_json(raw), raw)
    except ValidationError as e:
        errors = pydantic_errors(e)
        if any(err["message"].startswith("Invalid JSON") for err in errors):
            raise Problem(400, f"the body is not valid JSON: {errors[0]['message']}") from None
        raise from_field_errors(errors) from None
