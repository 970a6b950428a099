"""The nnunet_serve-compatible error body, {status: failed, error}, for our errors and
BentoML's and Starlette's own."""

import json
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

from ..request import format_problems

Message = dict[str, Any]
ERROR_MEDIA_TYPES = (b"application/json", b"text/plain")


def error_response(
    status_code: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The nnunet_serve-compatible error body with its HTTP status."""
    return JSONResponse({"status": "failed", "error": message}, status_code, headers=headers)


def validation_message(details: list[Any]) -> str:
    """BentoML's serialized validation errors ({loc, msg, type} each) as the request model's
    errors are worded."""
    return format_problems(detail for detail in details if isinstance(detail, dict))


def error_message(payload: Any, status_code: int) -> str:
    """The operator-facing message of a foreign error payload (JSON or plain text)."""
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    if isinstance(payload, dict):
        details = payload.get("detail")
        if isinstance(details, list) and details:
            return validation_message(details)
        if payload.get("error"):
            return str(payload["error"])
    if isinstance(payload, str) and payload.strip():
        return payload.strip()
    return HTTPStatus(status_code).phrase


def error_body_of(body: bytes, status_code: int) -> bytes:
    """An error body in the nnunet_serve-compatible form: ours as it is, any other rewritten."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = body.decode(errors="replace")
    if isinstance(payload, dict) and payload.get("status") == "failed":
        return body
    return json.dumps({"status": "failed", "error": error_message(payload, status_code)}).encode()


class ErrorBodyMiddleware:
    """Buffers JSON and plain-text responses with status >= 400 and rewrites them with
    error_body_of, so that every error a client sees has the same shape."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                media_type = headers.get(b"content-type", b"text/plain")
                if message["status"] >= 400 and media_type.startswith(ERROR_MEDIA_TYPES):
                    start = message
                    return
            elif start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = error_body_of(b"".join(chunks), start["status"])
                await send({**start, "headers": json_headers(start, len(body))})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, capture)


def json_headers(start: Message, length: int) -> list[tuple[bytes, bytes]]:
    """The response start's headers for a JSON body of ``length`` bytes."""
    kept = [
        (key, value)
        for key, value in start.get("headers", [])
        if key not in (b"content-length", b"content-type")
    ]
    length_header = (b"content-length", str(length).encode())
    return [*kept, length_header, (b"content-type", b"application/json")]
