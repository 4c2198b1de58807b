"""`/v1/datasets`: upload (multipart, streamed), list, get, soft delete."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import Parameter

from service.domain import datasets as service
from service.domain.uploaded import Upload
from service.http.deps import ID_PATTERN, CallerDep, PathId, SessionDep, SettingsDep
from service.http.idempotency import idempotent, writes
from service.http.openapi import multipart_body
from service.http.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.http.schemas import DatasetOut, DatasetPage, dataset_out
from service.http.uploads import receive_upload


async def provide_upload(request: Request, caller: CallerDep, settings: SettingsDep) -> AsyncIterator[Upload]:
    """The uploaded file, streamed to a temporary file while validated; removed after the request unless the
    dataset was stored."""
    upload = await receive_upload(
        request,
        service.dataset_dir(settings, caller.project_id),
        settings.max_upload_bytes,
        service.TEXT_FIELDS,
        service.upload_check,
    )
    try:
        yield upload
    finally:
        upload.discard()


class DatasetController(Controller):
    path = "/datasets"
    tags = ["datasets"]

    @post(
        "/",
        request_max_body_size=None,
        summary="Upload a JSONL dataset",
        operation_class=multipart_body({"file": "binary", "name": "string", "format": "string"}, ["file"]),
        description="multipart/form-data: `file` (JSONL), optional `name` (a label) and `format` "
        "(text, completions, chat, preference, mcq, prompts; detected when absent).",
        dependencies={"upload": Provide(provide_upload)},
    )
    @idempotent(body="upload")
    def upload(
        self, upload: NamedDependency[Upload], session: SessionDep, caller: CallerDep, settings: SettingsDep
    ) -> DatasetOut:
        return dataset_out(service.create_dataset(session, settings, caller.project_id, upload))

    @get("/", sync_to_thread=True, summary="List datasets, newest first")
    def list(
        self,
        session: SessionDep,
        caller: CallerDep,
        limit: int = Parameter(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        after: str | None = Parameter(default=None, max_length=80, pattern=ID_PATTERN),
    ) -> DatasetPage:
        datasets = service.list_datasets(session, caller.project_id, limit, after)
        return DatasetPage(data=[dataset_out(d) for d in datasets.items], has_more=datasets.has_more)

    @get("/{dataset_id:str}", sync_to_thread=True, summary="Get a dataset")
    def retrieve(self, session: SessionDep, caller: CallerDep, dataset_id: PathId) -> DatasetOut:
        return dataset_out(service.get_dataset(session, caller.project_id, dataset_id))

    @delete("/{dataset_id:str}", summary="Delete a dataset (refused while a job uses it)")
    @writes
    def remove(self, session: SessionDep, caller: CallerDep, dataset_id: PathId) -> None:
        service.delete_dataset(session, caller.project_id, dataset_id)
