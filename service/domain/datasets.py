"""Dataset storage: validated uploads under `<artifact_root>/datasets/<project id>/<dataset id>.jsonl`.

The file is renamed into place only after validation, in the caller's transaction: if that is not committed
the file is removed again (service.core.transaction.undo), so a bad request leaves no row and no file. `Dataset.path`
is absolute. No HTTP here: refusals are service.core.errors', results are rows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from distillery_contract.records import FORMATS, DatasetError, JsonlChecker
from service.core import transaction
from service.core.db.models import Dataset, Job, new_id, utcnow
from service.core.errors import Conflict, FieldError, Invalid, InvalidDataset, NotFound
from service.core.labels import check_label
from service.core.lifecycle import TERMINAL
from service.core.paging import Page, page
from service.core.references import dataset_ids
from service.core.settings import Settings
from service.domain.uploaded import Upload

TEXT_FIELDS = ("name", "format")
UPLOAD_NAME = "<upload>"  # the file's name in validation messages, replaced by the client's file name


def dataset_dir(settings: Settings, project_id: str) -> Path:
    return Path(settings.artifact_root).expanduser().resolve() / "datasets" / project_id


def upload_check(fields: dict[str, str]) -> JsonlChecker:
    """The validator an upload's bytes go through as they arrive (with the format, if sent before the file)."""
    fmt = fields.get("format") or None
    return JsonlChecker(UPLOAD_NAME, fmt if fmt in FORMATS else None)


def create_dataset(session: Session, settings: Settings, project_id: str, upload: Upload) -> Dataset:
    """Validate an upload and move it into place (the temporary file is the caller's to discard otherwise)."""
    display = _display_name(upload.filename)
    label = upload.fields.get("name") or None  # an empty field means no name
    if label is not None and (problem := check_label(label)):
        raise Invalid("name", problem)
    fmt = upload.fields.get("format") or None
    if fmt is not None and fmt not in FORMATS:
        raise Invalid("format", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    checker = upload.check
    if checker is None or checker.stated != fmt:  # no check yet, or the format came after the file
        checker = JsonlChecker(UPLOAD_NAME, fmt)
        checker.feed_file(upload.path)
    try:
        parsed_format = checker.close()
    except DatasetError as e:
        raise _invalid_dataset(str(e), UPLOAD_NAME, display or "upload") from None
    dataset_id = new_id("ds")
    final = dataset_dir(settings, project_id) / f"{dataset_id}.jsonl"
    os.replace(upload.path, final)  # same directory, so atomic
    transaction.undo(session, lambda: final.unlink(missing_ok=True))
    row = Dataset(
        id=dataset_id,
        project_id=project_id,
        name=label or display or dataset_id,
        format=parsed_format,
        path=str(final),
        sha256=upload.sha256,
        size_bytes=upload.size,
        records=checker.count,
    )
    session.add(row)
    session.flush()
    return row


def list_datasets(session: Session, project_id: str, limit: int, after: str | None) -> Page[Dataset]:
    stmt = select(Dataset).where(Dataset.project_id == project_id, Dataset.deleted_at.is_(None))
    return page(session, stmt, Dataset.id, limit, after)


def get_dataset(session: Session, project_id: str, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.project_id != project_id or row.deleted_at is not None:
        raise NotFound("dataset", dataset_id)
    return row


def delete_dataset(session: Session, project_id: str, dataset_id: str) -> None:
    """Soft delete: hidden from the API and from new jobs; the file stays for the jobs that used it."""
    row = get_dataset(session, project_id, dataset_id)
    live = session.scalars(select(Job).where(Job.project_id == project_id, Job.status.not_in(TERMINAL))).all()
    users = [j.id for j in live if dataset_id in dataset_ids(j.kind, j.spec or {})]
    if users:
        raise Conflict(
            f"dataset {dataset_id} is used by unfinished job(s) {', '.join(users[:5])}; "
            "cancel them or wait for them to finish"
        )
    row.deleted_at = utcnow()
    session.flush()


def _display_name(filename: str | None) -> str | None:
    """The client's file name without any directory part, if it is a valid label: used as the default name
    and in messages only."""
    if not filename:
        return None
    base = re.split(r"[/\\]", filename)[-1].strip()
    return base if base and check_label(base) is None else None


_LINE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): (?P<message>.*)$")


def _invalid_dataset(message: str, tmp_name: str, display: str) -> InvalidDataset:
    """The checker's report (`file:line: problem` per bad line) as an error whose entries name the lines."""
    message = message.replace(tmp_name, display)
    errors: list[FieldError] = []
    for text in message.splitlines():
        m = _LINE.match(text)
        if m:
            errors.append({"line": int(m["line"]), "message": m["message"]})
    if not errors:
        errors.append({"field": "file", "message": message})
    return InvalidDataset(message, errors)
