"""Routes for clients without a shared disk: study uploads and background jobs.

- ``POST /infer_file``: multipart ``archive`` (a .zip or .tar.gz of the study) and
  ``request`` (the /infer body without study_path and output_dir); answers a zip of the
  outputs with ``response.json``, paths relative to the archive's root.
- ``POST /jobs`` (the /infer body) and ``POST /jobs/upload`` (the /infer_file parts) answer
  202 with ``{"job_id": ...}``; ``GET /jobs/{id}``, ``GET /jobs/{id}/result`` and
  ``DELETE /jobs/{id}`` follow the job; ``GET /jobs`` lists the jobs, the DICOM listener's
  (``create_job``) with them.
- A job calls the webhooks its request names (``notify``) once it ended, after its inputs are
  removed and its pipeline slot is free; their results join its record.

They live on the mounted Starlette app, not as BentoML APIs: BentoML's file parameters
download any URL given instead of a file, which would let a caller make the server fetch
from anywhere. Here the archive must be an uploaded file. Uploads go to our work folder and
are removed once the answer is sent or the job expires.

A request is admitted (503 when the queue is full) before its body is read. Every byte of a
body is counted as it streams in, chunked or not: a multipart body is parsed as it arrives
(``UploadBody``), its archive written straight into the work folder within
NNUNET_BENTO_MAX_UPLOAD_MB (413) and NNUNET_BENTO_MAX_WORK_MB (507); a JSON body is bounded by
MAX_JSON_BODY_BYTES (413). A refusal is answered at once; the server reads and discards the
rest of the body, so that the client gets the answer. Extraction, packing, removals and the
job store run in worker threads: the event loop only awaits them.
"""

import asyncio
import errno
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.background import BackgroundTask
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response

from ..errors import InsufficientStorageError, NnunetBentoError, RequestError, TooLargeError
from ..io.archive import ArchiveLimits, extract_study, pack_outputs
from ..io.work_folder import WorkBudget, WorkRoom
from ..job_store import JobKind, JobRecord, JobSource, JobStatus, JobStore
from ..pipeline import SegmentationPipeline, StepCallback
from ..plan import resolve_webhooks
from ..request import (
    SERVER_SET_FIELDS,
    InferenceRequest,
    InferenceResponse,
    format_validation_error,
)
from ..settings import ServeSettings
from ..webhooks import DeliveryResult, Webhook
from .admission import RETRY_AFTER_S, Admission, Place, ServerBusyError
from .error_body import error_response
from .job_webhooks import deliver_all, job_webhook_body
from .request_body import parse_json, parse_request

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

logger = logging.getLogger("nnunet_bento")
UPLOAD_PATHS = ("/infer_file", "/jobs/upload")
CHUNK = 1 << 20
#: The bound on a JSON body (POST /jobs) and on an upload's 'request' part.
MAX_JSON_BODY_BYTES = 1 << 20
#: The bound on the headers of one part of an upload.
MAX_PART_HEADER_BYTES = 16 << 10
#: What an upload's body may hold besides the archive: its 'request' part, headers, boundaries.
FORM_BYTES = MAX_JSON_BODY_BYTES + (64 << 10)
NO_ARCHIVE = "the upload needs a part 'archive': the study as a .zip or .tar.gz file"
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}


class JobIdConvertor(Convertor[str]):
    """A job id as JobStore makes them (URL-safe base64 text), so that no other path under
    /jobs, such as /jobs/upload, routes as a job."""

    regex = "[A-Za-z0-9_-]{16,128}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", JobIdConvertor())


@dataclass(frozen=True)
class RouteSpec:
    """A route of JobRoutes: its path, its method and the JobRoutes method that answers."""

    path: str
    method: str
    name: str


JOB_ROUTES = (
    RouteSpec("/infer_file", "POST", "infer_file"),
    RouteSpec("/jobs", "GET", "list_jobs"),
    RouteSpec("/jobs", "POST", "submit"),
    RouteSpec("/jobs/upload", "POST", "submit_upload"),
    RouteSpec("/jobs/{job_id:job_id}", "GET", "status"),
    RouteSpec("/jobs/{job_id:job_id}", "DELETE", "cancel"),
    RouteSpec("/jobs/{job_id:job_id}/result", "GET", "result"),
)


class JobCreated(BaseModel):
    """The 202 answer of POST /jobs and /jobs/upload."""

    job_id: str
    status: JobStatus


class StageProgress(BaseModel):
    """The stage a job runs: index (0-based, as stage_N) and count."""

    index: int
    count: int | None


class Notification(BaseModel):
    """How the delivery to one webhook ended (webhooks.DeliveryResult)."""

    webhook: str
    delivered: bool
    attempts: int
    status: int | None = Field(description="The last HTTP status; null when none came.")
    error: str | None


class JobState(BaseModel):
    """What GET and DELETE /jobs/{job_id} answer: a job's state, never a result or a path.
    JobRecord.to_public gives it; a field that either lacks is an error, not a silent drop."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    kind: JobKind
    source: JobSource = Field(description="api, or listener for the DICOM listener's jobs.")
    status: JobStatus
    stage: StageProgress | None
    step: str | None
    created: str
    started: str | None
    finished: str | None
    error: str | None
    status_code: int | None
    notifications: list[Notification] | None = Field(
        description="The webhooks that the job called when it ended (notify); null before."
    )


class JobQuery(BaseModel):
    """The query of GET /jobs."""

    model_config = ConfigDict(extra="forbid")

    status: JobStatus | None = Field(None, description="Only the jobs in this state.")
    source: JobSource | None = Field(None, description="Only the jobs of this source.")
    limit: int = Field(50, ge=1, le=100, description="Jobs per page.")
    after: str | None = Field(
        None, max_length=200, description="The `next` cursor of the previous page."
    )


class JobList(BaseModel):
    """What GET /jobs answers: jobs, newest first, and the cursor of the next page."""

    jobs: list[JobState]
    next: str | None = Field(description="Give it as `after` for the next page; null at the end.")


class UploadForm(BaseModel):
    """The multipart parts of /infer_file and /jobs/upload (read by receive_upload)."""

    archive: bytes = Field(description="The study as a .zip or .tar.gz file.")
    request: str = Field(
        description="JSON: the /infer body without the fields the server sets itself "
        f"({', '.join(SERVER_SET_FIELDS)})."
    )


class JobHost(Protocol):
    """What the upload and job routes need from the service that runs them."""

    settings: ServeSettings
    admission: Admission
    pipeline: SegmentationPipeline

    async def run_admitted(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse: ...

    def failure_for(self, nnunet_id: Any, error: Exception) -> JSONResponse: ...


@dataclass(frozen=True)
class JobOrigin:
    """Where a job comes from: its source; the study and series it is about, when the source
    knows them (the listener); and what to do, in a worker thread, once it ended."""

    source: JobSource = "api"
    study_uid: str | None = None
    series_uids: tuple[str, ...] = ()
    on_end: Callable[[], None] | None = None


API_ORIGIN = JobOrigin()


class JobCancelledError(NnunetBentoError):
    """The job was cancelled (DELETE /jobs/{id}); nothing is committed."""

    status_code = 409


@dataclass(frozen=True)
class Upload:
    """An extracted upload: its work folder, the study root in it and the output folder."""

    folder: Path
    study: Path

    @property
    def output(self) -> Path:
        return self.folder / "out"

    @property
    def result(self) -> Path:
        return self.folder / "result.zip"


def archive_limits(settings: ServeSettings) -> ArchiveLimits:
    return ArchiveLimits(
        max_upload_bytes=settings.nnunet_bento_max_upload_mb << 20,
        max_unpacked_bytes=settings.nnunet_bento_max_unpacked_mb << 20,
        max_entries=100_000,
    )


def upload_too_large(settings: ServeSettings) -> str:
    return (
        f"the archive is larger than NNUNET_BENTO_MAX_UPLOAD_MB "
        f"({settings.nnunet_bento_max_upload_mb} MB)"
    )


def json_too_large() -> str:
    return f"the body is larger than {MAX_JSON_BODY_BYTES >> 20} MiB, the bound on JSON bodies"


async def body_chunks(request: Request, bound: int, too_large: str) -> AsyncIterator[bytes]:
    """The request body as it streams in, every byte counted, chunked or not: TooLargeError
    (``too_large``) as soon as it passes ``bound`` bytes, before a byte more is read."""
    if int(request.headers.get("content-length") or 0) > bound:
        raise TooLargeError(too_large)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > bound:
                raise TooLargeError(too_large)
            yield chunk
    except ClientDisconnect:
        raise RequestError("the client closed the connection before the body ended") from None


async def read_json_body(request: Request) -> bytes:
    """The body of a JSON request, refused (413) past MAX_JSON_BODY_BYTES."""
    body = bytearray()
    async with aclosing(body_chunks(request, MAX_JSON_BODY_BYTES, json_too_large())) as chunks:
        async for chunk in chunks:
            body += chunk
    return bytes(body)


class UploadBody:
    """The multipart body of an upload, parsed as it streams in: the 'archive' part goes
    straight to a file in the upload's folder, each byte counted against
    NNUNET_BENTO_MAX_UPLOAD_MB (413) and charged to the work folder's room (507); the 'request'
    part is kept, up to MAX_JSON_BODY_BYTES. Nothing else is spooled anywhere."""

    def __init__(self, path: Path, settings: ServeSettings, room: WorkRoom) -> None:
        self.path = path
        self.settings = settings
        self.room = room
        self.max_archive = archive_limits(settings).max_upload_bytes
        self.pending = bytearray()
        self.archive_bytes = 0
        self.request = bytearray()
        self.part: str | None = None
        self.parts: list[str] = []
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.header_bytes = 0
        self.disposition = b""
        self.ended = False

    async def receive(self, request: Request) -> bytes:
        """Read the whole body; answers the 'request' part (b"{}" when absent)."""
        media_type, options = parse_options_header(request.headers.get("content-type"))
        if media_type != b"multipart/form-data" or b"boundary" not in options:
            raise RequestError(
                "an upload is a multipart/form-data body with the parts 'archive' and 'request'"
            )
        try:
            parser = MultipartParser(options[b"boundary"], self.callbacks())
        except FormParserError as error:
            raise RequestError(f"the multipart body cannot be read: {error}") from None
        bound = self.max_archive + FORM_BYTES
        file = await anyio.to_thread.run_sync(self.path.open, "xb")
        try:
            async with aclosing(
                body_chunks(request, bound, upload_too_large(self.settings))
            ) as chunks:
                async for chunk in chunks:
                    parser.write(chunk)
                    if len(self.pending) >= CHUNK:
                        await self.flush(file)
            await self.flush(file)
        except FormParserError as error:
            raise RequestError(f"the multipart body cannot be read: {error}") from None
        finally:
            await anyio.to_thread.run_sync(file.close)
        if not self.ended:
            raise RequestError("the multipart body ends before its closing boundary")
        if "archive" not in self.parts:
            raise RequestError(NO_ARCHIVE)
        return bytes(self.request) or b"{}"

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.part, self.disposition, self.header_bytes = None, b"", 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.add_header_bytes(self.header_name, data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.add_header_bytes(self.header_value, data[start:end])

    def add_header_bytes(self, buffer: bytearray, data: bytes) -> None:
        """Keep a piece of a part header, refusing headers past MAX_PART_HEADER_BYTES."""
        self.header_bytes += len(data)
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise RequestError(
                f"the headers of an upload part are longer than {MAX_PART_HEADER_BYTES} bytes"
            )
        buffer += data

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        """Name the part from its Content-Disposition: 'archive' (a file) or 'request'."""
        _, options = parse_options_header(self.disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "archive" and b"filename" not in options:
            raise RequestError(NO_ARCHIVE)
        if name not in ("archive", "request"):
            raise RequestError(
                f"the upload has a part {name[:100]!r}; it takes the parts 'archive' and 'request'"
            )
        if name in self.parts:
            raise RequestError(f"the upload has the part {name!r} twice")
        self.part = name
        self.parts.append(name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part == "request":
            if len(self.request) + end - start > MAX_JSON_BODY_BYTES:
                raise TooLargeError(
                    f"the 'request' part is larger than {MAX_JSON_BODY_BYTES >> 20} MiB, the "
                    "bound on JSON bodies"
                )
            self.request += data[start:end]
            return
        self.archive_bytes += end - start
        if self.archive_bytes > self.max_archive:
            raise TooLargeError(upload_too_large(self.settings))
        self.room.charge(end - start)
        self.pending += data[start:end]

    def on_end(self) -> None:
        self.ended = True

    async def flush(self, file: BinaryIO) -> None:
        """Write the archive bytes received so far to ``file``, in a worker thread."""
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            await anyio.to_thread.run_sync(write_upload, file, data)


def write_upload(file: BinaryIO, data: bytes) -> None:
    """Write bytes of an upload; a full disk is a 507."""
    try:
        file.write(data)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise InsufficientStorageError("no space is left on disk for the upload") from None
        raise


async def receive_upload(
    request: Request, settings: ServeSettings, budget: WorkBudget
) -> tuple[Upload, dict]:
    """Check and store the multipart parts: the archive (streamed to disk within its bounds,
    then extracted entry by entry in a worker thread) and the request fields. Nothing stays
    behind on error."""
    limits = archive_limits(settings)
    room = await anyio.to_thread.run_sync(budget.measure)
    folder = settings.nnunet_bento_work_dir / "uploads" / uuid.uuid4().hex
    await anyio.to_thread.run_sync(folder.mkdir)
    try:
        text = await UploadBody(folder / "upload", settings, room).receive(request)
        body = request_fields(text)
        study = await anyio.to_thread.run_sync(
            extract_study, folder / "upload", folder / "study", limits, room
        )
        await anyio.to_thread.run_sync((folder / "upload").unlink)
    except BaseException:
        await remove_folder(folder)
        raise
    return Upload(folder, study), body


async def remove_folder(folder: Path) -> None:
    """Remove ``folder`` in a worker thread, also while the request is being cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(partial(shutil.rmtree, folder, ignore_errors=True))


def request_fields(text: str | bytes) -> dict[str, Any]:
    """The 'request' part: a JSON object, without the fields the server sets itself."""
    fields = parse_json(text, "the 'request' part")
    if not isinstance(fields, dict):
        raise RequestError("the 'request' part must be a JSON object (the /infer body)")
    given = sorted(set(fields) & set(SERVER_SET_FIELDS))
    if given:
        raise RequestError(
            f"the 'request' part of an upload may not give {', '.join(given)}: the server "
            "sets where the uploaded study and its outputs go"
        )
    return fields


def study_root(upload: Upload, fields: dict[str, Any]) -> Path:
    """The archive's root, or its one top folder (a zipped study folder) when the series the
    request names are not at the root."""
    extracted = upload.folder / "study"
    series = fields.get("series_folders") or []
    names = [name for item in series for name in (item if isinstance(item, list) else [item])]
    strings = [name for name in names if isinstance(name, str)]
    if strings and all((extracted / name).exists() for name in strings):
        return extracted
    return upload.study


def answered_at_once(request: InferenceRequest) -> InferenceRequest:
    """``request`` for a route that answers when it ends; a webhook is only for a job."""
    if request.notify:
        raise RequestError(
            "notify is for background jobs (POST /jobs, POST /jobs/upload): this route "
            "answers when the request ends"
        )
    return request


def upload_request(upload: Upload, fields: dict[str, Any]) -> InferenceRequest:
    """The /infer request for an extracted upload."""
    study = study_root(upload, fields)
    return parse_request({**fields, "study_path": str(study), "output_dir": str(upload.output)})


async def receive_upload_request(
    request: Request, settings: ServeSettings, budget: WorkBudget
) -> tuple[Upload, InferenceRequest]:
    """The stored upload and its /infer request; nothing stays behind on error."""
    upload, fields = await receive_upload(request, settings, budget)
    try:
        return upload, await anyio.to_thread.run_sync(upload_request, upload, fields)
    except BaseException:
        await remove_folder(upload.folder)
        raise


def relative_response(response: InferenceResponse, upload: Upload) -> dict[str, Any]:
    """The response with paths relative to the archive's root (outputs as stage_N/...)."""
    record = response.model_dump(mode="json")
    for key in SERVER_SET_FIELDS:
        record["request"].pop(key, None)
    text = json.dumps(record)
    for folder in (upload.output, upload.study, upload.folder / "study"):
        text = text.replace(f"{folder}/", "").replace(str(folder), ".")
    return json.loads(text)


def pack_result(response: InferenceResponse, upload: Upload) -> Path:
    """The result zip of an upload: the outputs and response.json."""
    outputs = upload.output
    outputs.mkdir(exist_ok=True)
    return pack_outputs(outputs, relative_response(response, upload), upload.result)


def zip_response(path: Path, remove: Path | None = None) -> FileResponse:
    """The result zip; ``remove`` is deleted once the answer is sent."""
    task = BackgroundTask(shutil.rmtree, remove, ignore_errors=True) if remove else None
    return FileResponse(path, media_type="application/zip", filename="result.zip", background=task)


class JobRoutes:
    """The upload and job routes of one API worker, running on its host service."""

    def __init__(self, host: JobHost, jobs: JobStore) -> None:
        self.host = host
        self.settings = settings = host.settings
        self.jobs = jobs
        self.budget = WorkBudget(settings.nnunet_bento_work_dir, settings.nnunet_bento_max_work_mb)
        self.tasks: set[asyncio.Task] = set()

    async def infer_file(self, request: Request) -> Response:
        """Run an uploaded study now; answer the zip of its outputs."""
        try:
            place = self.host.admission.admit()
        except ServerBusyError as error:
            return refusal(error)
        try:
            return await self.run_upload(request, place)
        finally:
            place.release()

    async def run_upload(self, request: Request, place: Place) -> Response:
        """Receive the upload of an admitted request, run it and answer the zip."""
        try:
            upload, inference = await receive_upload_request(request, self.settings, self.budget)
        except NnunetBentoError as error:
            return refusal(error)
        try:
            async with place.slot():
                response = await self.host.run_admitted(answered_at_once(inference))
            result = await anyio.to_thread.run_sync(pack_result, response, upload)
            return zip_response(result, remove=upload.folder)
        except Exception as error:
            await remove_folder(upload.folder)
            return self.host.failure_for(inference.nnunet_id, error)

    async def submit(self, request: Request) -> Response:
        """Queue an /infer body as a job: 202 with its id."""
        return await self.queue_job("infer", request)

    async def submit_upload(self, request: Request) -> Response:
        """Queue an uploaded study as a job: 202 with its id."""
        return await self.queue_job("upload", request)

    async def queue_job(self, kind: JobKind, request: Request) -> Response:
        """Admit the job before its body is read, then read the body and start the job."""
        try:
            place = self.host.admission.admit()
        except ServerBusyError as error:
            return refusal(error)
        try:
            if kind == "upload":
                upload, inference = await receive_upload_request(
                    request, self.settings, self.budget
                )
            else:
                upload, inference = (
                    None,
                    parse_request(parse_json(await read_json_body(request), "the body")),
                )
            return await self.start_job(kind, inference, upload, place)
        except NnunetBentoError as error:
            return refusal(error)
        finally:
            place.release()

    async def start_job(
        self, kind: JobKind, inference: InferenceRequest, upload: Upload | None, place: Place
    ) -> Response:
        """Record the job and start its task, which takes ``place`` over: 202 with its id."""
        record = await self.create_job(kind, inference, upload, place.hand_over().slot())
        created = JobCreated(job_id=record.job_id, status=record.status)
        return JSONResponse(created.model_dump(), status_code=202)

    async def create_job(
        self,
        kind: JobKind,
        inference: InferenceRequest,
        upload: Upload | None,
        slot: AbstractAsyncContextManager[Any],
        origin: JobOrigin = API_ORIGIN,
    ) -> JobRecord:
        """Record a queued job and start its task, which runs inside ``slot`` (a pipeline slot
        with the request's place, or the listener's wait for a slot): its record."""
        folder = upload.folder if upload is not None else None
        try:
            await anyio.to_thread.run_sync(self.expire)
            record = await anyio.to_thread.run_sync(self.jobs.create, kind, folder, origin.source)
        except BaseException:
            if folder is not None:
                await remove_folder(folder)
            raise
        task = asyncio.create_task(self.run_job(record.job_id, inference, upload, slot, origin))
        self.tasks.add(task)
        task.add_done_callback(self.job_ended)
        return record

    def job_ended(self, task: asyncio.Task) -> None:
        """Forget the task; a job that broke outside its own error handling is logged."""
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a job failed outside its error handling", exc_info=task.exception())

    async def run_job(
        self,
        job_id: str,
        inference: InferenceRequest,
        upload: Upload | None,
        slot: AbstractAsyncContextManager[Any],
        origin: JobOrigin,
    ) -> None:
        """Run one job to its end, recording its progress and outcome, then call its webhooks;
        the job store and the result's packing run in worker threads (``on_step`` and
        ``check`` run in the pipeline's)."""
        n_stages = len(inference.model_ids)
        response: InferenceResponse | None = None
        call: tuple[tuple[Webhook, ...], dict[str, Any]] | None = None

        def on_step(stage: int, step: str) -> None:
            self.jobs.progress(job_id, stage, n_stages, step)

        def check() -> None:
            if self.jobs.is_cancelled(job_id):
                raise JobCancelledError(f"job {job_id} was cancelled; nothing was written")

        try:
            async with slot:
                if not await anyio.to_thread.run_sync(self.jobs.start, job_id):
                    return
                response = await self.host.run_admitted(inference, on_step, check)
            if upload is None:
                result, result_file = response.model_dump(mode="json"), None
            else:
                result = None
                result_file = str(await anyio.to_thread.run_sync(pack_result, response, upload))
            await anyio.to_thread.run_sync(self.jobs.finish, job_id, result, result_file)
        except Exception as error:
            failure = self.host.failure_for(inference.nnunet_id, error)
            error_text = json.loads(failure.body)["error"]
            await anyio.to_thread.run_sync(self.jobs.fail, job_id, error_text, failure.status_code)
        finally:
            with anyio.CancelScope(shield=True):
                call = await self.webhook_call(job_id, inference, response, origin)
                if upload is not None:
                    await anyio.to_thread.run_sync(self.remove_upload_inputs, upload, job_id)
                if origin.on_end is not None:
                    await anyio.to_thread.run_sync(origin.on_end)
        if call is not None:
            results = await deliver_all(*call)
            await anyio.to_thread.run_sync(self.jobs.notified, job_id, results)

    async def webhook_call(
        self,
        job_id: str,
        inference: InferenceRequest,
        response: InferenceResponse | None,
        origin: JobOrigin,
    ) -> tuple[tuple[Webhook, ...], dict[str, Any]] | None:
        """The webhooks that an ended job calls and the body it sends them, built while its
        outputs are still there; None for a job that calls none (or was cancelled)."""
        try:
            webhooks = resolve_webhooks(inference.notify, self.host.pipeline.planner.webhooks)
        except RequestError:  # the job failed with this very error
            return None
        record = await anyio.to_thread.run_sync(self.jobs.get, job_id)
        if not webhooks or record is None or record.status not in ("done", "failed"):
            return None
        subject = (origin.study_uid, origin.series_uids) if origin.study_uid else None
        try:
            body = await anyio.to_thread.run_sync(
                job_webhook_body,
                record,
                inference,
                response if record.status == "done" else None,
                self.host.pipeline.planner.registry,
                self.host.pipeline.roots.output_root,
                subject,
            )
        except Exception as error:
            logger.exception("job %s: its webhook body could not be made", job_id)
            failed = f"the body could not be made: {type(error).__name__}; see the server log"
            results = [
                asdict(DeliveryResult(hook.name, False, 0, None, failed)) for hook in webhooks
            ]
            await anyio.to_thread.run_sync(self.jobs.notified, job_id, results)
            return None
        return webhooks, body

    def remove_upload_inputs(self, upload: Upload, job_id: str) -> None:
        """Keep only the result zip of a finished upload job (in a worker thread)."""
        record = self.jobs.get(job_id)
        if record is None or record.result_file is None:
            shutil.rmtree(upload.folder, ignore_errors=True)
            return
        for path in upload.folder.iterdir():
            if path != upload.result:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    async def list_jobs(self, request: Request) -> Response:
        """The jobs, newest first, the listener's with them: `status` and `source` filter them,
        `limit` (at most 100) bounds a page, and `after` takes the `next` cursor of the page
        before. Until named clients exist, every caller sees every job."""
        try:
            query = JobQuery.model_validate(dict(request.query_params))
        except ValidationError as error:
            return error_response(400, format_validation_error(error))
        await anyio.to_thread.run_sync(self.expire)
        try:
            page = await anyio.to_thread.run_sync(
                partial(self.jobs.page, query.status, query.source, query.limit, query.after)
            )
        except ValueError as error:
            return error_response(400, f"after: {error}")
        jobs = [JobState.model_validate(record.to_public()) for record in page.records]
        return JSONResponse(JobList(jobs=jobs, next=page.next).model_dump(mode="json"))

    async def record(self, request: Request) -> JobRecord | None:
        """The job that the path names, once older jobs expire (in a worker thread)."""
        await anyio.to_thread.run_sync(self.expire)
        return await anyio.to_thread.run_sync(self.jobs.get, request.path_params["job_id"])

    async def status(self, request: Request) -> Response:
        """A job's state: queued, running (stage i of n, step), done, failed or cancelled."""
        record = await self.record(request)
        if record is None:
            return unknown_job(request)
        return job_state(record)

    async def result(self, request: Request) -> Response:
        """A finished job's result: the /infer response of a job by path, the zip of an upload
        job. A failed job answers its own status and error; an unfinished one 409."""
        record = await self.record(request)
        if record is None:
            return unknown_job(request)
        if record.status == "failed":
            return error_response(record.status_code or 500, record.error or "the job failed")
        if record.status != "done":
            return error_response(
                409, f"job {record.job_id} is {record.status}; its result is not ready"
            )
        if record.result_file is not None:
            return zip_response(Path(record.result_file))
        return JSONResponse(record.result_json)

    async def cancel(self, request: Request) -> Response:
        """Cancel a queued or running job: it stops at its next step, nothing of it is written,
        and its state, which it answers, stays readable. Delete a done, failed or cancelled job:
        its record and result files are removed (204)."""
        job_id = request.path_params["job_id"]
        await anyio.to_thread.run_sync(self.expire)
        if await anyio.to_thread.run_sync(self.delete, job_id):
            return Response(status_code=204)
        record = await anyio.to_thread.run_sync(self.jobs.cancel, job_id)
        if record is None:
            return unknown_job(request)
        return job_state(record)

    def delete(self, job_id: str) -> bool:
        """Forget a done, failed or cancelled job and remove its result files (in a worker
        thread); whether it was."""
        record = self.jobs.delete(job_id)
        if record is not None:
            remove_result(record)
        return record is not None

    def expire(self) -> None:
        """Forget jobs past NNUNET_BENTO_JOB_TTL_S and remove their result files."""
        for record in self.jobs.expire():
            remove_result(record)


def remove_result(record: JobRecord) -> None:
    """Remove the result files of a forgotten job: the folder of an upload job's zip."""
    if record.result_file:
        shutil.rmtree(Path(record.result_file).parent, ignore_errors=True)


def refusal(error: NnunetBentoError) -> Response:
    """The answer to a refused request: its status and message, with Retry-After for a 503."""
    headers = RETRY_HEADERS if error.status_code == 503 else None
    return error_response(error.status_code, str(error), headers)


def job_state(record: JobRecord) -> JSONResponse:
    """The public state of a job (JobState)."""
    return JSONResponse(JobState.model_validate(record.to_public()).model_dump(mode="json"))


def unknown_job(request: Request) -> Response:
    return error_response(
        404,
        f"unknown job {request.path_params['job_id']!r} (finished jobs expire after "
        "NNUNET_BENTO_JOB_TTL_S)",
    )
