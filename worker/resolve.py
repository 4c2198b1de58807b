"""A job spec's references → local paths, read from the database and scoped to the job's project.

Models are used where they lie (GGUF files are imported once into `<cache_dir>/models`); datasets must lie
under the artifact root; a starting adapter is the output folder of a succeeded distill job. A reference that
does not resolve is the user's to fix: `UserError`, naming the field; a stored file the service lost is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from sqlalchemy import ColumnElement, select

from service.core.db.models import Dataset, Job, Model
from service.core.db.session import session_scope
from service.core.settings import Settings
from service.core.storage import job_output_dir
from worker.engine.errors import UserError

Row = TypeVar("Row", Model, Dataset, Job)  # a table whose rows belong to a project


def artifact_root(settings: Settings) -> Path:
    return Path(settings.artifact_root).expanduser().resolve()


def stored_path(settings: Settings, path: str) -> Path:
    """A path as stored in a row: absolute, or relative to the artifact root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else artifact_root(settings) / p


class Resolver:
    """Each lookup is its own short transaction: no transaction stays open while a GGUF file is imported."""

    def __init__(self, settings: Settings, project_id: str):
        self.settings, self.project_id = settings, project_id

    def _row(self, table: type[Row], ref: str, *where: ColumnElement[bool]) -> Row | None:
        with session_scope() as session:
            return session.scalar(select(table).where(table.id == ref, table.project_id == self.project_id, *where))

    def model(self, ref: str, field: str) -> Path:
        from worker.engine.models import resolve_model  # MLX: only inside a run

        row = self._row(Model, ref)
        if row is None:
            raise UserError(f"{field}: model {ref!r} not found in this project")
        path = stored_path(self.settings, row.path)
        if not path.exists():
            raise UserError(f"{field}: model {ref} ({row.name}): {path} no longer exists on the worker")
        return resolve_model(path, Path(self.settings.cache_dir).expanduser() / "models", field)

    def dataset(self, ref: str, field: str) -> Path:
        row = self._row(Dataset, ref, Dataset.deleted_at.is_(None))
        if row is None:
            raise UserError(f"{field}: dataset {ref!r} not found in this project")
        # the file is the service's to keep: when it is not where it should be, that is an internal error
        root = artifact_root(self.settings)
        path = stored_path(self.settings, row.path).resolve()
        if not path.is_relative_to(root):
            raise RuntimeError(
                f"dataset {ref} lies at {path}, outside this worker's artifact root {root}: "
                "DISTILLERY_ARTIFACT_ROOT must name the same storage on the API and every worker"
            )
        if not path.is_file():
            raise RuntimeError(f"dataset {ref}: its file {path} is missing from the artifact root")
        return path

    def adapter(self, ref: str, field: str) -> Path:
        row = self._row(Job, ref)
        if row is None or row.kind != "distill":
            raise UserError(f"{field}: {ref!r} is not a distill job of this project")
        if row.status != "succeeded":
            raise UserError(f"{field}: job {ref} is {row.status}; a starting adapter comes from a succeeded job")
        path = job_output_dir(self.settings.artifact_root, row)
        if not (path / "adapters.safetensors").is_file():
            raise UserError(f"{field}: job {ref} has no adapter in {path}")
        return path

    def distill_job_dir(self, ref: str, field: str) -> tuple[Job, Path]:
        """A succeeded distill job of the project and its output folder."""
        row = self._row(Job, ref)
        if row is None or row.kind != "distill":
            raise UserError(f"{field}: {ref!r} is not a distill job of this project")
        if row.status != "succeeded":
            raise UserError(f"{field}: job {ref} is {row.status}; its output is there once it has succeeded")
        return row, job_output_dir(self.settings.artifact_root, row)

    def student_of(self, ref: str, field: str) -> Path:
        """The student a distill job trained: the `student/` folder it built (e.g. pruned), or its student model."""
        row, out = self.distill_job_dir(ref, field)
        if (out / "student" / "config.json").is_file():
            return out / "student"
        return self.model(row.spec["student"]["model"], f"{field} (job {ref}'s student.model)")
