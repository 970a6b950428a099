"""Signed webhooks named in the NNUNET_BENTO_WEBHOOKS file: who is told when a job ends.

Guarantees:

- The file is server configuration (trusted: http and loopback URLs are allowed). It is
  validated at start-up, an error naming the webhook and the field; the secret lives in the
  environment variable that ``secret_env`` names, never in the file.
- A delivery POSTs one JSON body with ``X-Nnunet-Bento-Signature: sha256=<hex>``, the
  HMAC-SHA256 of exactly those bytes keyed with the secret, so that a receiver verifies it
  with ``hmac.compare_digest`` before it parses the body.
- Redirects are never followed: a 3xx answer is a failed delivery, as is any other 4xx.
- Connection errors, timeouts and 5xx answers are retried, ``attempts`` times at most,
  waiting ``backoff_s``, then twice as long, and so on.
- ``deliver`` never raises: it answers a ``DeliveryResult``.
- ``job_payload`` names the job, the study and series UIDs, the models, the outputs (relative
  to the output root), the push results and the error: never a patient's name or ID.
"""

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator

from .config_file import read_config_file
from .errors import SpecError
from .pacs.connect import ERRNO_TEXT
from .pacs.nodes import NodeName

logger = logging.getLogger("nnunet_bento")
WEBHOOKS_ENV = "NNUNET_BENTO_WEBHOOKS"
SIGNATURE_HEADER = "X-Nnunet-Bento-Signature"
EVENTS = ("job.done", "job.failed")
TIMEOUT_S = 10.0
ATTEMPTS = 4
BACKOFF_S = 1.0
Event = Literal["job.done", "job.failed"]


class Webhook(BaseModel):
    """A URL told about finished jobs, and the environment variable holding its secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NodeName
    url: HttpUrl
    secret_env: str = Field(min_length=1)

    @field_validator("secret_env")
    @classmethod
    def _secret_set(cls, name: str) -> str:
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set")
        return name


@dataclass(frozen=True)
class DeliveryResult:
    """How a delivery ended: delivered (a 2xx answer), after how many attempts, the last
    HTTP status (None when no answer came) and, when not delivered, why."""

    webhook: str
    delivered: bool
    attempts: int
    status: int | None = None
    error: str | None = None


def load_webhooks(path: Path) -> dict[str, Webhook]:
    """Read and validate a webhooks file (YAML, ``webhooks:`` a list); SpecError names the
    webhook and the field."""
    return parse_webhooks(read_config_file(path, "webhooks file", WEBHOOKS_ENV), str(path))


def parse_webhooks(raw: Any, source: str) -> dict[str, Webhook]:
    """Validate a loaded webhooks document: every entry, and no name twice."""
    if not isinstance(raw, dict) or not isinstance(raw.get("webhooks"), list) or len(raw) > 1:
        raise SpecError(f"{source}: expected a mapping with one field, a 'webhooks' list")
    webhooks: dict[str, Webhook] = {}
    for index, entry in enumerate(raw["webhooks"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"webhook {name!r}" if isinstance(name, str) and name else f"webhook #{index + 1}"
        try:
            webhook = Webhook.model_validate(entry)
        except ValidationError as error:
            problems = "; ".join(
                f"{label}, field {'.'.join(map(str, problem['loc'])) or 'entry'!r}: "
                f"{problem['msg'].removeprefix('Value error, ')}"
                for problem in error.errors()
            )
            raise SpecError(f"{source}: {problems}") from None
        if webhook.name in webhooks:
            raise SpecError(f"{source}: {label}, field 'name': used by two webhooks")
        webhooks[webhook.name] = webhook
    return webhooks


def job_payload(
    *,
    event: Event,
    job_id: str,
    study_instance_uid: str | None,
    series_instance_uids: Sequence[str],
    models: Sequence[tuple[str, str]],
    outputs: Iterable[Path],
    output_root: Path,
    push: Sequence[Mapping[str, Any]] = (),
    error: str | None = None,
) -> dict[str, Any]:
    """The body of a job's webhook; ``models`` are (id, version) pairs, ``outputs`` paths
    under ``output_root`` (ValueError otherwise); the study is None when no DICOM names it."""
    if event not in EVENTS:
        raise ValueError(f"event {event!r}: expected one of {', '.join(EVENTS)}")
    root = Path(output_root)
    return {
        "event": event,
        "job_id": job_id,
        "study_instance_uid": study_instance_uid,
        "series_instance_uids": list(series_instance_uids),
        "models": [{"id": model_id, "version": version} for model_id, version in models],
        "outputs": [Path(path).relative_to(root).as_posix() for path in outputs],
        "push": [dict(record) for record in push],
        "error": error,
    }


def signature(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def deliver(
    webhook: Webhook,
    payload: Mapping[str, Any],
    *,
    timeout_s: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryResult:
    """POST ``payload`` to ``webhook``, signed, retrying connection errors, timeouts and 5xx
    answers; never raises."""
    try:
        result = _deliver(webhook, payload, timeout_s, attempts, backoff_s, sleep)
    except Exception as error:  # the contract: a result, never an exception
        logger.exception("webhook %s: delivery failed", webhook.name)
        result = DeliveryResult(webhook.name, False, 0, None, f"{type(error).__name__}: {error}")
    if result.delivered:
        logger.info("webhook %s: delivered (%d attempt(s))", webhook.name, result.attempts)
    else:
        logger.warning(
            "webhook %s: not delivered after %d attempt(s): %s",
            webhook.name,
            result.attempts,
            result.error,
        )
    return result


def _deliver(
    webhook: Webhook,
    payload: Mapping[str, Any],
    timeout_s: float,
    attempts: int,
    backoff_s: float,
    sleep: Callable[[float], None],
) -> DeliveryResult:
    secret = os.environ.get(webhook.secret_env)
    if not secret:
        return DeliveryResult(
            webhook.name, False, 0, None, f"environment variable {webhook.secret_env} is not set"
        )
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "nnunet-bento",
        SIGNATURE_HEADER: signature(secret.encode(), body),
    }
    status: int | None = None
    reason = "no attempt was made"
    attempt = 0
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(1, max(attempts, 1) + 1):
            if attempt > 1:
                sleep(backoff_s * 2 ** (attempt - 2))
            try:
                response = client.post(str(webhook.url), content=body, headers=headers)
            except httpx.TransportError as error:
                status, reason = None, _transport_reason(error, timeout_s)
                continue
            status = response.status_code
            if response.is_success:
                return DeliveryResult(webhook.name, True, attempt, status)
            reason = _status_reason(response)
            if status < 500:
                break
    return DeliveryResult(webhook.name, False, attempt, status, reason)


def _status_reason(response: httpx.Response) -> str:
    """'HTTP 404 Not Found', saying so when the answer was a redirect."""
    reason = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    if response.is_redirect:
        return f"{reason}: redirects are not followed; configure the final URL in {WEBHOOKS_ENV}"
    return reason


def _transport_reason(error: httpx.TransportError, timeout_s: float) -> str:
    """'no answer within 10 s', 'connection refused', or the error's kind."""
    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    found = ERRNO_TEXT.search(str(error))
    return (
        found.group(1).strip().lower() if found else f"connection failed ({type(error).__name__})"
    )
