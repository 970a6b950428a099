"""Routes for clients without a shared disk: study uploads and background jobs.

- ``POST /infer_file``: multipart ``archive`` (a .zip or .tar.gz of the study) and
  ``request`` (the /infer body without study_path and output_dir); answers a zip of the
  outputs with ``response.json``, paths relative to the archive's root.
- ``POST /jobs`` (the /infer body) and ``POST /jobs/upload`` (the /infer_file parts) answer
  202 with ``{"job_id": ...}``; ``GET /jobs/{id}``, ``GET /jobs/{id}/result`` and
  ``DELETE /jobs/{id}`` follow the job.

They live on the mounted Starlette app, not as BentoML APIs: BentoML's file parameters
download any URL given instead of a file, which would let a caller make the server fetch
from anywhere. Here the archive must be an uploaded file, streamed to disk under its size
limit. Uploads go to our work folder and are removed once the answer is sent or the job
expires.
"""

import asyncio
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from ..errors import NnunetBentoError, RequestError, TooLargeError
from ..io.archive import ArchiveLimits, extract_study, pack_outputs
from ..job_store import JobKind, JobRecord, JobStatus, JobStore
from ..pipeline import StepCallback
from ..request import SERVER_SET_FIELDS, InferenceRequest, InferenceResponse
from ..settings import ServeSettings
from .admission import RETRY_AFTER_S, Admission
from .error_body import error_response
from .request_body import parse_json, parse_request

logger = logging.getLogger("nnunet_bento")
UPLOAD_PATHS = ("/infer_file", "/jobs/upload")
CHUNK = 1 << 20
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


class JobState(BaseModel):
    """What GET and DELETE /jobs/{job_id} answer: a job's state, never a result or a path.
    JobRecord.to_public gives it; a field that either lacks is an error, not a silent drop."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    kind: JobKind
    status: JobStatus
    stage: StageProgress | None
    step: str | None
    created: str
    started: str | None
    finished: str | None
    error: str | None
    status_code: int | None


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

    async def run_pipeline(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse: ...

    async def run_admitted(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse: ...

    def failure_for(self, nnunet_id: Any, error: Exception) -> JSONResponse: ...


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


async def receive_upload(request: Request, settings: ServeSettings) -> tuple[Upload, dict]:
    """Check and store the multipart parts: the archive (streamed to disk under its limit,
    then extracted entry by entry) and the request fields. Nothing stays behind on error."""
    limits = archive_limits(settings)
    declared = int(request.headers.get("content-length") or 0)
    if declared > limits.max_upload_bytes + CHUNK:
        raise TooLargeError(upload_too_large(settings))
    try:
        form = await request.form(max_files=1, max_fields=2, max_part_size=CHUNK)
    except HTTPException as error:
        raise RequestError(f"the multipart body cannot be read: {error.detail}") from None
    try:
        archive, fields = form.get("archive"), form.get("request")
        if not isinstance(archive, UploadFile):
            raise RequestError(
                "the upload needs a part 'archive': the study as a .zip or .tar.gz file"
            )
        body = request_fields(fields if isinstance(fields, str) else "{}")
        folder = settings.nnunet_bento_work_dir / "uploads" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            await save_archive(archive, folder / "upload", limits.max_upload_bytes, settings)
            study = extract_study(folder / "upload", folder / "study", limits)
            (folder / "upload").unlink()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    finally:
        await form.close()
    return Upload(folder, study), body


def upload_too_large(settings: ServeSettings) -> str:
    return (
        f"the archive is larger than NNUNET_BENTO_MAX_UPLOAD_MB "
        f"({settings.nnunet_bento_max_upload_mb} MB)"
    )


async def save_archive(
    archive: UploadFile, path: Path, limit: int, settings: ServeSettings
) -> None:
    """Copy the uploaded archive to ``path``, refusing it once it passes ``limit`` bytes."""
    written = 0
    with open(path, "wb") as stream:
        while chunk := await archive.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise TooLargeError(upload_too_large(settings))
            stream.write(chunk)


def request_fields(text: str) -> dict[str, Any]:
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


def upload_request(upload: Upload, fields: dict[str, Any]) -> InferenceRequest:
    """The /infer request for an extracted upload."""
    study = study_root(upload, fields)
    return parse_request({**fields, "study_path": str(study), "output_dir": str(upload.output)})


async def receive_upload_request(
    request: Request, settings: ServeSettings
) -> tuple[Upload, InferenceRequest]:
    """The stored upload and its /infer request; nothing stays behind on error."""
    upload, fields = await receive_upload(request, settings)
    try:
        return upload, upload_request(upload, fields)
    except BaseException:
        shutil.rmtree(upload.folder, ignore_errors=True)
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

    def __init__(self, host: JobHost) -> None:
        self.host = host
        self.settings = settings = host.settings
        self.jobs = JobStore(
            settings.nnunet_bento_work_dir / "jobs.sqlite", settings.nnunet_bento_job_ttl_s
        )
        self.tasks: set[asyncio.Task] = set()

    async def infer_file(self, request: Request) -> Response:
        """Run an uploaded study now; answer the zip of its outputs."""
        try:
            upload, inference = await receive_upload_request(request, self.settings)
        except NnunetBentoError as error:
            return error_response(error.status_code, str(error))
        try:
            response = await self.host.run_pipeline(inference)
            return zip_response(pack_result(response, upload), remove=upload.folder)
        except Exception as error:
            shutil.rmtree(upload.folder, ignore_errors=True)
            return self.host.failure_for(inference.nnunet_id, error)

    async def submit(self, request: Request) -> Response:
        """Queue an /infer body as a job: 202 with its id."""
        try:
            inference = parse_request(parse_json(await request.body(), "the body"))
        except RequestError as error:
            return error_response(error.status_code, str(error))
        return self.start_job("infer", inference, None)

    async def submit_upload(self, request: Request) -> Response:
        """Queue an uploaded study as a job: 202 with its id."""
        try:
            upload, inference = await receive_upload_request(request, self.settings)
        except NnunetBentoError as error:
            return error_response(error.status_code, str(error))
        return self.start_job("upload", inference, upload)

    def start_job(
        self, kind: JobKind, inference: InferenceRequest, upload: Upload | None
    ) -> Response:
        self.expire()
        if self.host.admission.full():
            if upload is not None:
                shutil.rmtree(upload.folder, ignore_errors=True)
            return error_response(503, self.host.admission.busy_message(), RETRY_HEADERS)
        record = self.jobs.create(kind, upload.folder if upload is not None else None)
        task = asyncio.create_task(self.run_job(record.job_id, inference, upload))
        self.tasks.add(task)
        task.add_done_callback(self.job_ended)
        created = JobCreated(job_id=record.job_id, status=record.status)
        return JSONResponse(created.model_dump(), status_code=202)

    def job_ended(self, task: asyncio.Task) -> None:
        """Forget the task; a job that broke outside its own error handling is logged."""
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a job failed outside its error handling", exc_info=task.exception())

    async def run_job(
        self, job_id: str, inference: InferenceRequest, upload: Upload | None
    ) -> None:
        """Run one job to its end, recording its progress and outcome."""
        n_stages = len(inference.model_ids)

        def on_step(stage: int, step: str) -> None:
            self.jobs.progress(job_id, stage, n_stages, step)

        def check() -> None:
            if self.jobs.is_cancelled(job_id):
                raise JobCancelledError(f"job {job_id} was cancelled; nothing was written")

        try:
            async with self.host.admission.slot():
                if not self.jobs.start(job_id):
                    return
                response = await self.host.run_admitted(inference, on_step, check)
            if upload is None:
                self.jobs.finish(job_id, response.model_dump(mode="json"))
            else:
                self.jobs.finish(job_id, None, str(pack_result(response, upload)))
        except Exception as error:
            failure = self.host.failure_for(inference.nnunet_id, error)
            self.jobs.fail(job_id, json.loads(failure.body)["error"], failure.status_code)
        finally:
            if upload is not None:
                keep = self.jobs.get(job_id)
                self.remove_upload_inputs(upload, keep)

    @staticmethod
    def remove_upload_inputs(upload: Upload, record: JobRecord | None) -> None:
        """Keep only the result zip of a finished upload job."""
        if record is None or record.result_file is None:
            shutil.rmtree(upload.folder, ignore_errors=True)
            return
        for path in upload.folder.iterdir():
            if path != upload.result:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    def record(self, request: Request) -> JobRecord | None:
        self.expire()
        return self.jobs.get(request.path_params["job_id"])

    async def status(self, request: Request) -> Response:
        """A job's state: queued, running (stage i of n, step), done, failed or cancelled."""
        record = self.record(request)
        if record is None:
            return unknown_job(request)
        return job_state(record)

    async def result(self, request: Request) -> Response:
        """A finished job's result: the /infer response of a job by path, the zip of an upload
        job. A failed job answers its own status and error; an unfinished one 409."""
        record = self.record(request)
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


def job_state(record: JobRecord) -> JSONResponse:
    """The public state of a job (JobState)."""
    return JSONResponse(JobState.model_validate(record.to_public()).model_dump(mode="json"))


def unknown_job(request: Request) -> Response:
    return error_response(
        404,
        f"unknown job {request.path_params['job_id']!r} (finished jobs expire after "
        "NNUNET_BENTO_JOB_TTL_S)",
    )
