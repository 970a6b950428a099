"""RequestGuard: origin, CORS, bearer token and Content-Type checks around a tiny Starlette app."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from nnunet_bento.server.guard import TOKEN_ERROR, RequestGuard, bearer_token_matches

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
    ],
    lifespan=lifespan,
)


def client(token: str | None = TOKEN, allowed_origins: tuple[str, ...] = ()) -> TestClient:
    """A test client for APP behind the guard (base URL http://testserver)."""
    guard = RequestGuard(
        APP, token=token, allowed_origins=allowed_origins, multipart_paths=("/infer_file",)
    )
    return TestClient(guard)


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
    response = client(token=None).get("/model_info")
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
