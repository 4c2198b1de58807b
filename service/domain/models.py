"""Model registration. A path model is used where it lies (`Model.path` = the resolved server path); an
uploaded GGUF is stored as `<artifact_root>/models/<project id>/<model id>.gguf`, moved into place in the
caller's transaction and removed again if that is not committed. Both paths are absolute. No HTTP here:
refusals are service.core.errors', results are rows."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core import transaction
from service.core.db.models import Model, new_id
from service.core.errors import Invalid, NotFound
from service.core.labels import check_label
from service.core.paging import Page, page
from service.core.settings import Settings
from service.domain.model_inspect import ModelPathError, gguf_magic_ok, inspect_model_path
from service.domain.uploaded import Upload

TEXT_FIELDS = ("name",)


def model_dir(settings: Settings, project_id: str) -> Path:
    return Path(settings.artifact_root).expanduser().resolve() / "models" / project_id


def protected_storage(settings: Settings) -> list[Path]:
    """The server's own folders: other projects' uploads, outputs, teacher caches and imported models."""
    cache = Path(settings.cache_dir)
    return [Path(settings.artifact_root), cache / "teacher-caches", cache / "models"]


def register_path(session: Session, settings: Settings, project_id: str, name: str | None, path: str) -> Model:
    """A model folder (mlx-lm) or a .gguf file on the server, used where it lies."""
    if name is not None and (problem := check_label(name)):
        raise Invalid("name", problem)
    try:
        found = inspect_model_path(path, settings.model_roots, protected_storage(settings))
    except ModelPathError as e:
        raise Invalid("path", str(e)) from None
    model_id = new_id("mdl")
    return _add(
        session,
        Model(
            id=model_id,
            project_id=project_id,
            name=name or _default_name(found.path.name, model_id),
            source="path",
            format=found.format,
            path=str(found.path),
            fingerprint=found.fingerprint,
            info=found.info,
        ),
    )


def register_upload(session: Session, settings: Settings, project_id: str, upload: Upload) -> Model:
    """Store an uploaded GGUF file (the temporary file is the caller's to discard otherwise)."""
    name = upload.fields.get("name") or None  # an empty field means no name
    if name is not None and (problem := check_label(name)):
        raise Invalid("name", problem)
    if not gguf_magic_ok(upload.path):
        raise Invalid(
            "file",
            "not a GGUF file (it does not start with 'GGUF'); upload an mlx-lm folder by "
            "registering its server path instead",
        )
    model_id = new_id("mdl")
    final = model_dir(settings, project_id) / f"{model_id}.gguf"
    os.replace(upload.path, final)
    transaction.undo(session, lambda: final.unlink(missing_ok=True))
    return _add(
        session,
        Model(
            id=model_id,
            project_id=project_id,
            name=name or _default_name(re.split(r"[/\\]", upload.filename or "")[-1], model_id),
            source="upload",
            format="gguf",
            path=str(final),
            fingerprint=upload.sha256,
            info={"size_bytes": upload.size},
        ),
    )


def list_models(session: Session, project_id: str, limit: int, after: str | None) -> Page[Model]:
    return page(session, select(Model).where(Model.project_id == project_id), Model.id, limit, after)


def get_model(session: Session, project_id: str, model_id: str) -> Model:
    row = session.get(Model, model_id)
    if row is None or row.project_id != project_id:
        raise NotFound("model", model_id)
    return row


def _add(session: Session, row: Model) -> Model:
    session.add(row)
    session.flush()
    return row


def _default_name(file_name: str, model_id: str) -> str:
    return file_name if file_name and check_label(file_name) is None else model_id
