"""The nnunet_serve-compatible error body, {status: failed, error}, for our errors and
BentoML's own."""

import json
from typing import Any

from starlette.responses import JSONResponse

Message = dict[str, Any]


def error_response(
    status_code: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The nnunet_serve-compatible error body with its HTTP status."""
    return JSONResponse({"status": "failed", "error": message}, status_code, headers=headers)


def error_body_of(body: bytes) -> bytes:
    """BentoML's own error JSON (e.g. validation errors) in the nnunet_serve-compatible form."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    if not isinstance(payload, dict) or payload.get("status") == "failed":
        return body
    error = str(payload.get("error", "request failed"))
    details = payload.get("detail")
    if isinstance(details, list):
        problems = [
            f"{'.'.join(str(p) for p in d.get('loc', ()) if p != 'body') or 'body'}: {d.get('msg')}"
            for d in details
            if isinstance(d, dict)
        ]
        error = f"{error}: {'; '.join(problems)}" if problems else error
    return json.dumps({"status": "failed", "error": error}).encode()


class ErrorBodyMiddleware:
    """Buffers JSON responses with status >= 400 and rewrites them with error_body_of."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] >= 400 and is_json:
                    start = message
                    return
            elif start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = error_body_of(b"".join(chunks))
                headers = [
                    (k, str(len(body)).encode() if k == b"content-length" else v)
                    for k, v in start.get("headers", [])
                ]
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, capture)
