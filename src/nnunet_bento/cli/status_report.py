"""Job status, as nnunet_serve's entrypoint posts and logs it:
{job_id, status, output_error, output_log}."""

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)
RUNNING = "running"


def post_status(
    url: str,
    body: dict[str, Any],
    timeout_s: float = 10.0,
    attempts: int = 3,
    backoff_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST the status with a timeout, retrying with exponential backoff.

    A status server that cannot be reached is logged and ignored: it never turns a finished
    segmentation into a failure. Returns whether a POST got a 2xx answer.
    """
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(url, json=body, timeout=timeout_s)
            if response.is_success:
                return True
            problem = f"HTTP {response.status_code}"
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            problem = f"{type(error).__name__}: {error}"
            if isinstance(error, httpx.UnsupportedProtocol | httpx.InvalidURL):
                logger.warning("job status URL %r is not usable: %s", url, problem)
                return False
        logger.warning(
            "job status POST to %s failed (attempt %d/%d): %s", url, attempt, attempts, problem
        )
        if attempt < attempts:
            sleep(backoff_s * 2 ** (attempt - 1))
    return False


def update_log_file(path: Path, body: dict[str, Any]) -> None:
    """Write the status to a JSON log file, atomically.

    An existing file keeps its other keys: only status, output_error and output_log are
    updated, and job_id is added only when the file has none.
    """
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text() or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("log file %s is not JSON; it is replaced", path)
        if not isinstance(record, dict):
            logger.warning("log file %s does not hold a JSON object; it is replaced", path)
            record = {}
    for key in ("status", "output_error", "output_log"):
        record[key] = body[key]
    if not record.get("job_id"):
        record["job_id"] = body["job_id"]
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as stream:
            json.dump(record, stream, indent=2)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class JobReporter:
    """Reports one job's outcome to the status URL and the log file, when given."""

    job_id: str | None = None
    update_url: str | None = None
    log_file: Path | None = None
    success_message: str = "success"
    failure_message: str = "failure"

    def report(self, succeeded: bool, output_error: str = "", output_log: str = "") -> None:
        """The job's outcome: the success or the failure message."""
        self.send(
            self.success_message if succeeded else self.failure_message, output_error, output_log
        )

    def running(self) -> None:
        """The job has started."""
        self.send(RUNNING)

    def send(self, status: str, output_error: str = "", output_log: str = "") -> None:
        """Report a status; a status that cannot be reported is logged, never raised."""
        body = {
            "job_id": self.job_id,
            "status": status,
            "output_error": output_error,
            "output_log": output_log,
        }
        if self.log_file is not None:
            try:
                update_log_file(self.log_file, body)
            except OSError as error:
                logger.warning("cannot write the log file %s: %s", self.log_file, error)
        if self.update_url:
            post_status(self.update_url, body)
