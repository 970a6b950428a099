"""The OpenAPI document (/docs.json) of a served instance with a token: every route the app
serves is in it with each status it answers; undeclared methods are 405 with Allow; the GET and
POST forms of an API answer alike."""

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import REPO, bentoml_serve
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from nnunet_bento.server.guard import OPEN_PATHS, RequestGuard

TOKEN = "openapi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
#: BentoML's own pages beside the API: its web UI and the schema its Python client reads.
BENTOML_PAGES = {("/", "GET"), ("/schema.json", "GET")}
#: Every (path, method) that the app which `bentoml serve` builds answers, HEAD aside: the
#: routes of BentoML's app and of the apps mounted on it (not a folder of static files).
APP_OPERATIONS = """
import json

import service
from _bentoml_impl.server.app import ServiceAppFactory
from starlette.routing import Mount, Route


def operations(routes, prefix=""):
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            yield from operations(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            yield from ([prefix + route.path_format, m] for m in route.methods - {"HEAD"})


service.SegmentationService.inject_config()
app = ServiceAppFactory(service.SegmentationService, is_main=True)()
print(json.dumps(sorted(operations(app.routes))))
"""


@pytest.fixture(scope="module")
def served(imported_models, demo_study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi")
    (folder / "in").mkdir()
    env = {
        "NNUNET_BENTO_INPUT_ROOTS": str(folder / "in"),
        "NNUNET_BENTO_OUTPUT_ROOT": str(folder / "out"),
        "NNUNET_BENTO_WORK_DIR": str(folder / "work"),
        "NNUNET_BENTO_API_TOKEN": TOKEN,
    }
    spec = REPO / "model-serve-spec.yaml"
    with bentoml_serve(spec, folder / "serve.log", env=env, token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def document(served) -> dict:
    response = httpx.get(f"{served.url}/docs.json", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def app_operations(imported_models) -> set[tuple[str, str]]:
    """The operations of the app that service.py builds, read in a process of its own."""
    env = {**os.environ, "MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml")}
    run = subprocess.run(
        [sys.executable, "-c", APP_OPERATIONS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return {tuple(operation) for operation in json.loads(run.stdout.splitlines()[-1])}


def operations(document: dict) -> dict[tuple[str, str], dict]:
    """The document's operations by (path, METHOD)."""
    return {
        (path, method.upper()): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def error_of(response: httpx.Response) -> str:
    """The error of our failure body, checking its shape."""
    body = response.json()
    assert set(body) == {"status", "error"} and body["status"] == "failed", body
    return body["error"]


@pytest.mark.slow
def test_the_document_lists_every_route_and_method_that_the_app_serves(document, app_operations):
    assert {("/infer_file", "POST"), ("/jobs/{job_id}", "DELETE")} <= app_operations
    assert set(operations(document)) == app_operations - BENTOML_PAGES


@pytest.mark.slow
def test_every_operation_documents_401_and_no_421_when_a_token_is_set(document):
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (path, method), operation in operations(document).items():
        guarded = path not in OPEN_PATHS
        assert ("401" in operation["responses"]) is guarded, (path, method)
        assert "421" not in operation["responses"], (path, method)
        assert operation["security"] == ([{"bearer": []}] if guarded else []), (path, method)


@pytest.mark.slow
def test_every_error_status_has_the_error_body_and_bodies_need_their_media_type(document):
    for (path, method), operation in operations(document).items():
        errors = {status for status in operation["responses"] if int(status) >= 400}
        assert {"403", "500"} <= errors, (path, method)
        assert method != "POST" or {"400", "415"} <= errors, (path, method)
        for status in errors:
            assert operation["responses"][status]["content"] == ERROR_BODY, (path, method)
    schema = document["components"]["schemas"]["ErrorBody"]
    assert schema["required"] == ["status", "error"]


@pytest.mark.slow
def test_upload_and_job_routes_document_their_parts_parameters_and_answers(document):
    found = operations(document)
    schemas = document["components"]["schemas"]
    for path in ("/infer_file", "/jobs/upload"):
        (media_type,) = found[path, "POST"]["requestBody"]["content"].items()
        assert media_type[0] == "multipart/form-data"
        parts = schemas[media_type[1]["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
        assert parts["archive"]["format"] == "binary" and parts["request"]["type"] == "string"
    assert "application/zip" in found["/infer_file", "POST"]["responses"]["200"]["content"]
    for path in ("/jobs", "/jobs/upload"):
        accepted = found[path, "POST"]["responses"]["202"]
        assert set(accepted["links"]) == {"status", "result", "cancel"}
    assert set(schemas["JobCreated"]["required"]) == {"job_id", "status"}
    for path, method in (("/jobs/{job_id}", "GET"), ("/jobs/{job_id}", "DELETE")):
        assert found[path, method]["parameters"][0]["name"] == "job_id"
        assert {"200", "404"} <= set(found[path, method]["responses"])
    deleted = found["/jobs/{job_id}", "DELETE"]["responses"]
    assert "content" not in deleted["204"] and "409" not in deleted
    result = found["/jobs/{job_id}/result", "GET"]["responses"]["200"]["content"]
    assert set(result) == {"application/json", "application/zip"}


@pytest.mark.slow
def test_undeclared_methods_are_405_with_allow_and_bad_bodies_415(served):
    put = httpx.put(f"{served.url}/livez", content=b"x", headers={"Content-Type": "text/plain"})
    assert put.status_code == 405 and put.headers["allow"] == "GET, HEAD"
    assert "PUT is not allowed" in error_of(put)
    delete = httpx.delete(f"{served.url}/infer", headers=AUTH)
    assert delete.status_code == 405 and delete.headers["allow"] == "POST"
    both = httpx.patch(f"{served.url}/model_info", headers=AUTH)
    assert both.status_code == 405 and both.headers["allow"] == "GET, HEAD, POST"
    plain = {**AUTH, "Content-Type": "text/plain"}
    text = httpx.post(f"{served.url}/jobs", content=b"x", headers=plain)
    assert text.status_code == 415 and "send application/json" in error_of(text)
    nowhere = httpx.get(f"{served.url}/jobs/upload", headers=AUTH)
    assert nowhere.status_code == 405 and nowhere.headers["allow"] == "POST"
    assert error_of(httpx.get(f"{served.url}/nowhere", headers=AUTH)) == "Not Found"


@pytest.mark.slow
def test_with_a_token_any_host_is_served(served):
    foreign = {**AUTH, "Host": "rebind.example"}
    response = httpx.get(f"{served.url}/model_info", headers=foreign)
    assert response.status_code == 200 and "organ" in response.json()


@pytest.mark.slow
def test_get_and_post_of_model_info_answer_alike(served):
    def get() -> dict:
        return httpx.get(f"{served.url}/model_info", headers=AUTH).json()

    answers = [get(), get()]
    while answers[-1] != answers[-2] and len(answers) < 20:
        answers.append(get())
    posted = httpx.post(f"{served.url}/model_info", json={}, headers=AUTH)
    assert posted.status_code == 200
    assert posted.json() == answers[-1] == served.client.model_info()
    assert "organ" in answers[-1]


def test_the_guard_answers_405_before_it_checks_the_content_type():
    async def answer(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/livez", answer), Route("/infer", answer, methods=["POST"])],
        middleware=[Middleware(RequestGuard, token=None)],
    )
    client = TestClient(app, base_url="http://localhost")
    text = {"Content-Type": "text/plain"}
    put = client.put("/livez", content=b"x", headers=text)
    assert put.status_code == 405 and put.headers["allow"] == "GET, HEAD"
    assert client.post("/infer", content=b"x", headers=text).status_code == 415
    assert client.get("/livez").text == "ok"
