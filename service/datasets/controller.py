"""`/v1/datasets`: upload (multipart, streamed), list, get, soft delete."""

from __future__ import annotations

import anyio.to_thread
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter

from service.api.deps import ID_PATTERN, CallerDep, PathId, SessionDep, SettingsDep
from service.api.idempotency import Replay, header_key
from service.api.openapi import multipart_body
from service.api.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.api.schemas import DatasetOut, DatasetPage
from service.api.uploads import receive_upload
from service.datasets import service


class DatasetController(Controller):
    path = "/datasets"
    tags = ["datasets"]

    @post(
        "/",
        request_max_body_size=None,
        summary="Upload a JSONL dataset",
        operation_class=multipart_body({"file": "binary", "name": "string", "format": "string"}, ["file"]),
        description="multipart/form-data: `file` (JSONL), optional `name` (a label) and `format` "
        "(text, completions, chat, preference, mcq; detected when absent).",
    )
    async def upload(
        self, request: Request, session: SessionDep, caller: CallerDep, settings: SettingsDep
    ) -> Response[DatasetOut]:
        key = header_key(request)
        upload = await receive_upload(
            request,
            service.dataset_dir(settings, caller.project_id),
            settings.max_upload_bytes,
            service.TEXT_FIELDS,
            service.upload_check,
        )
        result = await anyio.to_thread.run_sync(
            lambda: service.create_dataset(session, settings, caller.project_id, upload, key, request.url.path)
        )
        if isinstance(result, Replay):
            return result.response()
        status, body = result
        return Response(body, status_code=status)

    @get("/", sync_to_thread=True, summary="List datasets, newest first")
    def list(
        self,
        session: SessionDep,
        caller: CallerDep,
        limit: int = Parameter(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        after: str | None = Parameter(default=None, max_length=80, pattern=ID_PATTERN),
    ) -> DatasetPage:
        return service.list_datasets(session, caller.project_id, limit, after)

    @get("/{dataset_id:str}", sync_to_thread=True, summary="Get a dataset")
    def retrieve(self, session: SessionDep, caller: CallerDep, dataset_id: PathId) -> DatasetOut:
        return service.get_dataset_out(session, caller.project_id, dataset_id)

    @delete("/{dataset_id:str}", sync_to_thread=True, summary="Delete a dataset (refused while a job uses it)")
    def remove(self, session: SessionDep, caller: CallerDep, dataset_id: PathId) -> None:
        service.delete_dataset(session, caller.project_id, dataset_id)
