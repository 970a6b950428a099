"""Our Python client: by path on a shared disk, or by upload from anywhere.

    client = Client("http://segmentation:3000", token="...")
    client.model_info()
    client.infer(nnunet_id="organ", study_path=..., series_folders=["T2"], output_dir=...)
    client.infer_study("study01/", "out/study01", nnunet_id="organ", series_folders=["T2"])

``infer_study`` packs the local study, runs it as an upload job with a progress bar (stage
and step, on a terminal), downloads the result zip and extracts it into ``output_dir``. It is
built on ``bentoml.SyncHTTPClient`` (which sends the token and waits for the server) and
retries with backoff on 503 and on connection errors.
"""

import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import bentoml
import httpx
from tqdm import tqdm

from .errors import NnunetBentoError
from .io.archive import ArchiveLimits, extract_study
from .request import OUTPUT_FIELDS, STEPS

RETRIED_STATUS = 503
DONE = ("done", "failed", "cancelled")
RESULT_LIMITS = ArchiveLimits(
    max_upload_bytes=1 << 40, max_unpacked_bytes=1 << 40, max_entries=1_000_000
)


class ClientError(NnunetBentoError):
    """The server answered an error: its HTTP status and its message."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class Client:
    """nnunet-bento over HTTP."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 3600,
        retries: int = 4,
        backoff_s: float = 2.0,
        server_ready_timeout: float = 60,
    ) -> None:
        self.bento = bentoml.SyncHTTPClient(
            url, token=token, timeout=timeout, server_ready_timeout=server_ready_timeout
        )
        self.http: httpx.Client = self.bento.client
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self.bento.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model_info(self) -> dict[str, Any]:
        return self._call("GET", "/model_info").json()

    def infer(self, **fields: Any) -> dict[str, Any]:
        """POST /infer: the server reads and writes the paths of the request."""
        return self._call("POST", "/infer", json=fields).json()

    def infer_study(
        self,
        study_dir: Path | str,
        output_dir: Path | str,
        members: Iterable[str] | None = None,
        poll_s: float = 1.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Upload the study (or only ``members``, paths relative to it), run it as a job, and
        extract its outputs into ``output_dir``; returns the response with local paths."""
        study_dir, output_dir = Path(study_dir), Path(output_dir)
        with tempfile.TemporaryDirectory(prefix="nnunet-bento-client-") as work:
            archive = pack_study(study_dir, Path(work) / "study.zip", members)
            job_id = self.submit_upload(archive, fields)
            self.wait(job_id, len(model_ids(fields)), poll_s)
            result = Path(work) / "result.zip"
            self.download_result(job_id, result)
            extracted = extract_study(result, Path(work) / "result", RESULT_LIMITS)
            response = localised(extracted, output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            for path in extracted.rglob("*"):
                if path.is_file() and path.name != "response.json":
                    target = output_dir / path.relative_to(extracted)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    path.replace(target)
        return response

    def submit_upload(self, archive: Path, fields: dict[str, Any]) -> str:
        """POST /jobs/upload; the job's id."""
        with open(archive, "rb") as stream:
            files = {"archive": (archive.name, stream, "application/zip")}
            data = {"request": json.dumps(fields)}
            return self._call("POST", "/jobs/upload", files=files, data=data).json()["job_id"]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """DELETE /jobs/{job_id}: a queued or running job is cancelled, and its state answered;
        a done, failed or cancelled job is deleted with its result files (None)."""
        response = self._call("DELETE", f"/jobs/{job_id}")
        return None if response.status_code == 204 else response.json()

    def wait(self, job_id: str, n_stages: int, poll_s: float) -> dict[str, Any]:
        """Poll the job until it ends, with a progress bar of stage and step on a terminal."""
        with tqdm(total=n_stages * len(STEPS), unit="step", disable=not sys.stderr.isatty()) as bar:
            while True:
                status = self.status(job_id)
                if status["stage"] is not None and status["step"] in STEPS:
                    bar.n = status["stage"]["index"] * len(STEPS) + STEPS.index(status["step"])
                    bar.set_postfix_str(f"stage {status['stage']['index']}: {status['step']}")
                    bar.refresh()
                if status["status"] in DONE:
                    break
                time.sleep(poll_s)
        if status["status"] != "done":
            message = status["error"] or f"job {job_id} was {status['status']}"
            raise ClientError(status["status_code"] or 409, message)
        return status

    def download_result(self, job_id: str, path: Path) -> None:
        path.write_bytes(self._call("GET", f"/jobs/{job_id}/result").content)

    def _call(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with backoff on 503 and on connection errors."""
        attempt = 0
        while True:
            try:
                response = self.http.request(method, route, **kwargs)
                if response.status_code != RETRIED_STATUS or attempt == self.retries:
                    return checked(response)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            rewind(kwargs)
            time.sleep(self.backoff_s * 2**attempt)
            attempt += 1


def checked(response: httpx.Response) -> httpx.Response:
    """The response, or ClientError with the server's status and message."""
    if response.is_success:
        return response
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    raise ClientError(response.status_code, message)


def rewind(kwargs: dict[str, Any]) -> None:
    """Rewind uploaded file streams before a retry."""
    for _, stream, *_ in (kwargs.get("files") or {}).values():
        stream.seek(0)


def model_ids(fields: dict[str, Any]) -> list[str]:
    ids = fields.get("nnunet_id", [])
    return [ids] if isinstance(ids, str) else list(ids)


def pack_study(study_dir: Path, archive: Path, members: Iterable[str] | None = None) -> Path:
    """Zip the study folder (or only ``members`` under it) with paths relative to it."""
    roots = [study_dir / member for member in members] if members else [study_dir]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        for root in roots:
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for path in files:
                bundle.write(path, path.relative_to(study_dir).as_posix())
    return archive


def localised(extracted: Path, output_dir: Path) -> dict[str, Any]:
    """response.json of a result zip, its relative output paths made paths under output_dir."""
    response = json.loads((extracted / "response.json").read_text())
    return map_paths(response, lambda value: str(output_dir / value))


def map_paths(value: Any, local: Callable[[str], str]) -> Any:
    """Apply ``local`` to every output path (the strings of the response's file fields)."""
    if isinstance(value, dict):
        return {
            key: (map_paths_in(item, local) if key in OUTPUT_FIELDS else map_paths(item, local))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [map_paths(item, local) for item in value]
    return value


def map_paths_in(value: Any, local: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return local(value)
    if isinstance(value, list):
        return [map_paths_in(item, local) for item in value]
    return value
