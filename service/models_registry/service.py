"""Model registration. A path model is used where it lies (`Model.path` = the resolved server path); an
uploaded GGUF is stored as `<artifact_root>/models/<project id>/<model id>.gguf`. Both paths are absolute."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api import idempotency
from service.api.idempotency import IdempotencyKey, Replay
from service.api.pagination import page
from service.api.problems import invalid, not_found
from service.api.schemas import ModelOut, ModelPage, ModelRegister, check_label, model_out, to_json
from service.api.uploads import Upload
from service.db.models import Model, new_id
from service.models_registry.inspect import ModelPathError, gguf_magic_ok, inspect_model_path
from service.settings import Settings

TEXT_FIELDS = ("name",)


def model_dir(settings: Settings, project_id: str) -> Path:
    return Path(settings.artifact_root).expanduser().resolve() / "models" / project_id


def protected_storage(settings: Settings) -> list[Path]:
    """The server's own folders: other projects' uploads, outputs, teacher caches and imported models."""
    cache = Path(settings.cache_dir)
    return [Path(settings.artifact_root), cache / "teacher-caches", cache / "models"]


def register_path(
    session: Session, settings: Settings, project_id: str, body: ModelRegister, idem: IdempotencyKey | None
) -> tuple[int, dict] | Replay:
    replay = idempotency.find(session, project_id, idem)
    if replay is not None:
        return replay
    if body.name is not None and (problem := check_label(body.name)):
        raise invalid("name", problem)
    try:
        found = inspect_model_path(body.path, settings.model_roots, protected_storage(settings))
    except ModelPathError as e:
        raise invalid("path", str(e)) from None
    model_id = new_id("mdl")
    row = Model(
        id=model_id,
        project_id=project_id,
        name=body.name or _default_name(found.path.name, model_id),
        source="path",
        format=found.format,
        path=str(found.path),
        fingerprint=found.fingerprint,
        info=found.info,
    )
    return _commit(session, project_id, row, idem)


def register_upload(
    session: Session, settings: Settings, project_id: str, upload: Upload, idem_key: str | None, request_path: str
) -> tuple[int, dict] | Replay:
    """Store an uploaded GGUF file. Always consumes `upload.path`."""
    try:
        idem = IdempotencyKey(idem_key, upload.fingerprint("POST", request_path)) if idem_key else None
        replay = idempotency.find(session, project_id, idem)
        if replay is not None:
            return replay
        name = upload.fields.get("name") or None  # an empty field means no name
        if name is not None and (problem := check_label(name)):
            raise invalid("name", problem)
        if not gguf_magic_ok(upload.path):
            raise invalid(
                "file",
                "not a GGUF file (it does not start with 'GGUF'); upload an mlx-lm folder by "
                "registering its server path instead",
            )
        model_id = new_id("mdl")
        final = model_dir(settings, project_id) / f"{model_id}.gguf"
        os.replace(upload.path, final)
    finally:
        upload.discard()
    label = name or _default_name(re.split(r"[/\\]", upload.filename or "")[-1], model_id)
    row = Model(
        id=model_id,
        project_id=project_id,
        name=label,
        source="upload",
        format="gguf",
        path=str(final),
        fingerprint=upload.sha256,
        info={"size_bytes": upload.size},
    )
    try:
        result = _commit(session, project_id, row, idem)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    if isinstance(result, Replay):
        final.unlink(missing_ok=True)
    return result


def list_models(session: Session, project_id: str, limit: int, after: str | None) -> ModelPage:
    rows, has_more = page(session, select(Model).where(Model.project_id == project_id), Model.id, limit, after)
    return ModelPage(data=[model_out(r) for r in rows], has_more=has_more)


def get_model(session: Session, project_id: str, model_id: str) -> ModelOut:
    row = session.get(Model, model_id)
    if row is None or row.project_id != project_id:
        raise not_found("model", model_id)
    return model_out(row)


def _commit(session: Session, project_id: str, row: Model, idem: IdempotencyKey | None) -> tuple[int, dict] | Replay:
    session.add(row)
    session.flush()
    body = to_json(model_out(row))
    idempotency.remember(session, project_id, idem, 201, body)
    replay = idempotency.commit(session, project_id, idem)
    return replay if replay is not None else (201, body)


def _default_name(file_name: str, model_id: str) -> str:
    return file_name if file_name and check_label(file_name) is None else model_id
