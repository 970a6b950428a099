"""RequestGuard: Host, origin, CORS, bearer token and Content-Type checks around a tiny Starlette
app; the route templates that label requests in /metrics."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.types import Message

from nnunet_bento.server.guard import (
    TOKEN_ERROR,
    UNKNOWN_ROUTE,
    RequestGuard,
    bearer_token_matches,
    host_name,
    route_template,
)

TOKEN = "s3cret-Token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIEWER = "http://viewer.example"
lifespan_events: list[str] = []


async def model_info(request: Request) -> JSONResponse:
    return JSONResponse({"name": "organ"})


async def infer(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ready")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    lifespan_events.append("startup")
    yield


APP = Starlette(
    routes=[
        Route("/model_info", model_info, methods=["GET", "POST"]),
        Route("/infer", infer, methods=["POST"]),
        Route("/infer_file", infer, methods=["POST"]),
        Route("/readyz", readyz),
        Mount("/jobs", routes=[Route("/{job_id:str}", model_info, methods=["GET", "DELETE"])]),
    ],
    lifespan=lifespan,
)
FOREIGN_HOST = {"Host": "rebind.example"}


def client(
    token: str | None = TOKEN,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = (),
    base_url: str = "http://testserver",
) -> TestClient:
    """A test client for APP behind the guard."""
    guard = RequestGuard(
        APP,
        token=token,
        allowed_origins=allowed_origins,
        allowed_hosts=allowed_hosts,
        multipart_paths=("/infer_file",),
    )
    return TestClient(guard, base_url=base_url)


def error_of(response: httpx.Response) -> str:
    """The error of a nnunet_serve-shaped JSON failure body."""
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "failed"
    return body["error"]


def cors_headers(response: httpx.Response) -> dict[str, str]:
    """The response's Access-Control-* headers."""
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"Bearer  {TOKEN} ", True),
        ("Bearer wrong", False),
        (f"Bearer {TOKEN}x", False),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_token_matches(header: str | None, expected: bool) -> None:
    assert bearer_token_matches(header, TOKEN) is expected


def test_bearer_token_never_matches_an_empty_token() -> None:
    assert not bearer_token_matches("Bearer ", "")


def test_empty_token_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="pass None"):
        RequestGuard(APP, token="")


def test_missing_token_is_401() -> None:
    response = client().get("/model_info")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response) == TOKEN_ERROR


def test_wrong_token_is_401() -> None:
    response = client().get("/model_info", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response) == TOKEN_ERROR


def test_right_token_passes() -> None:
    response = client().get("/model_info", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"name": "organ"}


def test_open_paths_need_no_token() -> None:
    response = client().get("/readyz")
    assert response.status_code == 200
    assert response.text == "ready"


def test_no_token_configured_means_no_check() -> None:
    response = client(token=None, base_url="http://localhost").get("/model_info")
    assert response.status_code == 200
    assert response.json() == {"name": "organ"}


def test_text_plain_post_is_415() -> None:
    response = client().post(
        "/infer", content=b"hi", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert error_of(response) == "Content-Type text/plain is not accepted; send application/json"


def test_missing_content_type_is_415() -> None:
    response = client().post("/infer", content=b"", headers=AUTH)
    assert response.status_code == 415
    assert error_of(response) == "Content-Type is missing; send application/json"


def test_json_with_charset_passes() -> None:
    headers = {**AUTH, "Content-Type": "Application/JSON; charset=utf-8"}
    response = client().post("/infer", content=b"{}", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_empty_json_object_to_model_info_passes() -> None:
    response = client().post("/model_info", json={}, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"name": "organ"}


def test_multipart_passes_on_multipart_paths() -> None:
    files = {"image": ("ct.nii.gz", b"data")}
    response = client().post("/infer_file", files=files, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_multipart_is_415_on_other_paths() -> None:
    response = client().post("/infer", files={"image": ("ct.nii.gz", b"data")}, headers=AUTH)
    assert response.status_code == 415
    assert error_of(response).startswith("Content-Type multipart/form-data is not accepted")


def test_multipart_paths_name_both_accepted_types() -> None:
    headers = {**AUTH, "Content-Type": "text/plain"}
    response = client().post("/infer_file", content=b"hi", headers=headers)
    assert response.status_code == 415
    assert error_of(response).endswith("; send application/json or multipart/form-data")


def test_foreign_origin_is_403() -> None:
    response = client().get("/model_info", headers={**AUTH, "Origin": "http://evil.example"})
    assert response.status_code == 403
    assert error_of(response) == (
        "origin http://evil.example is not allowed; set NNUNET_BENTO_ALLOWED_ORIGINS to allow it"
    )
    assert cors_headers(response) == {}


def test_foreign_origin_is_403_on_open_paths_too() -> None:
    response = client().get("/readyz", headers={"Origin": "http://evil.example"})
    assert response.status_code == 403
    assert "http://evil.example" in error_of(response)


def test_origin_with_root_name_prefix_is_403() -> None:
    response = client(allowed_origins=(VIEWER,)).get(
        "/model_info", headers={**AUTH, "Origin": f"{VIEWER}.attacker.example"}
    )
    assert response.status_code == 403
    assert "is not allowed" in error_of(response)


def test_same_origin_passes_without_cors_headers() -> None:
    response = client().get("/model_info", headers={**AUTH, "Origin": "http://testserver"})
    assert response.status_code == 200
    assert response.json() == {"name": "organ"}
    assert cors_headers(response) == {}


def test_allowed_origin_gets_cors_headers() -> None:
    response = client(allowed_origins=(f"{VIEWER}/",)).get(
        "/model_info", headers={**AUTH, "Origin": VIEWER}
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == VIEWER
    assert response.headers["vary"] == "Origin"


def test_guard_refusals_carry_cors_headers_for_allowed_origins() -> None:
    response = client(allowed_origins=(VIEWER,)).get("/model_info", headers={"Origin": VIEWER})
    assert response.status_code == 401
    assert error_of(response) == TOKEN_ERROR
    assert response.headers["access-control-allow-origin"] == VIEWER


def test_preflight_from_allowed_origin_is_204_without_token() -> None:
    headers = {"Origin": VIEWER, "Access-Control-Request-Method": "POST"}
    response = client(allowed_origins=(VIEWER,)).options("/infer", headers=headers)
    assert response.status_code == 204
    assert cors_headers(response) == {
        "access-control-allow-origin": VIEWER,
        "access-control-allow-methods": "GET, POST, DELETE",
        "access-control-allow-headers": "Authorization, Content-Type",
        "access-control-max-age": "600",
    }
    assert response.headers["vary"] == "Origin"


def test_preflight_from_foreign_origin_is_403() -> None:
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    response = client(allowed_origins=(VIEWER,)).options("/infer", headers=headers)
    assert response.status_code == 403
    assert cors_headers(response) == {}
    assert "is not allowed" in error_of(response)


def test_no_cors_headers_when_none_configured() -> None:
    headers = {"Origin": "http://testserver", "Access-Control-Request-Method": "POST"}
    response = client().options("/infer", headers=headers)
    assert response.status_code == 401
    assert cors_headers(response) == {}
    assert "vary" not in response.headers


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"Bearer {TOKEN}x"}, 401),
        ({**AUTH, "Origin": "http://evil.example"}, 403),
        ({**AUTH, "Content-Type": "text/plain"}, 415),
    ],
)
def test_token_is_never_echoed(headers: dict[str, str], status: int) -> None:
    response = client().post("/infer", content=b"x", headers=headers)
    assert response.status_code == status
    assert TOKEN not in response.text
    assert all(TOKEN not in value for value in response.headers.values())


def test_lifespan_passes_through() -> None:
    lifespan_events.clear()
    with client() as test_client:
        response = test_client.get("/readyz")
    assert response.status_code == 200
    assert lifespan_events == ["startup"]


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("localhost:1234", "localhost"),
        ("LocalHost.", "localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:3000", "[::1]"),
        ("[::1", "[::1"),
        ("seg.example", "seg.example"),
        ("seg.example:x", "seg.example:x"),
    ],
)
def test_host_name_drops_the_port_and_the_final_dot(host: str, name: str) -> None:
    assert host_name(host) == name


@pytest.mark.parametrize(
    "host", ["rebind.example", "rebind.example:12345", "localhost.rebind.example", "127.0.0.2"]
)
def test_a_foreign_host_without_a_token_is_421(host: str) -> None:
    response = client(token=None).get("/model_info", headers={"Host": host})
    assert response.status_code == 421
    error = error_of(response)
    assert error.startswith(f"Host {host_name(host)} is not served")
    assert "add the name to NNUNET_BENTO_ALLOWED_HOSTS, or set NNUNET_BENTO_API_TOKEN" in error


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1234", "127.0.0.1:80", "[::1]:8080", "LOCALHOST"]
)
def test_a_loopback_host_on_any_port_is_served_without_a_token(host: str) -> None:
    response = client(token=None).get("/model_info", headers={"Host": host})
    assert response.status_code == 200
    assert response.json() == {"name": "organ"}


def test_an_allowed_host_is_served_without_a_token() -> None:
    allowed = client(token=None, allowed_hosts=("Seg.Example", "other.example:3000"))
    for host in ("seg.example", "seg.example:3000", "other.example"):
        assert allowed.get("/model_info", headers={"Host": host}).status_code == 200, host
    assert allowed.get("/model_info", headers=FOREIGN_HOST).status_code == 421


def test_the_probes_answer_any_host_without_a_token() -> None:
    response = client(token=None).get("/readyz", headers=FOREIGN_HOST)
    assert response.status_code == 200
    assert response.text == "ready"


def test_with_a_token_any_host_is_served() -> None:
    response = client().get("/model_info", headers={**AUTH, **FOREIGN_HOST})
    assert response.status_code == 200
    assert response.json() == {"name": "organ"}
    assert client().get("/model_info", headers=FOREIGN_HOST).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/infer", {"Content-Type": "text/plain"}),
        ("DELETE", "/infer", {}),
        ("GET", "/model_info", {"Origin": "http://evil.example"}),
        ("OPTIONS", "/infer", {"Origin": VIEWER, "Access-Control-Request-Method": "POST"}),
    ],
    ids=["before-415", "before-405", "before-403", "before-preflight"],
)
def test_the_host_is_checked_first(method: str, path: str, headers: dict[str, str]) -> None:
    guarded = client(token=None, allowed_origins=(VIEWER,))
    response = guarded.request(method, path, content=b"x", headers={**headers, **FOREIGN_HOST})
    assert response.status_code == 421
    assert "NNUNET_BENTO_ALLOWED_HOSTS" in error_of(response)
    assert cors_headers(response) == {}


def test_a_request_without_a_host_header_is_421_without_a_token() -> None:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": "/model_info", "headers": [], "app": APP}
    asyncio.run(RequestGuard(APP, token=None)(scope, receive, send))
    assert messages[0]["status"] == 421
    assert b"a request without a Host header is not served" in messages[1]["body"]


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", "/model_info", "/model_info"),
        ("PATCH", "/model_info", "/model_info"),
        ("GET", "/jobs/Zm9vYmFyYmF6cXV4MTIz", "/jobs/{job_id}"),
        ("DELETE", "/jobs/1.2.840.10008.5.1.4", "/jobs/{job_id}"),
        ("GET", "/studies/1.2.840.10008/series/T2.nii.gz", UNKNOWN_ROUTE),
        ("GET", "/", UNKNOWN_ROUTE),
    ],
)
def test_a_request_is_labelled_by_its_route_template(method: str, path: str, template: str) -> None:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    assert route_template(APP.routes, scope) == template
