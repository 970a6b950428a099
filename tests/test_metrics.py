"""A served instance without a token: the Host check (DNS rebinding), /metrics labelled by route
templates, and DELETE of finished jobs with their result files."""

import secrets
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, bentoml_serve
from prometheus_client.parser import text_string_to_metric_families

from nnunet_bento.client import Client, pack_study
from nnunet_bento.server.guard import PROBE_PATHS, UNKNOWN_ROUTE

pytestmark = pytest.mark.slow

ALLOWED_HOST = "seg.example"
FOREIGN = {"Host": "rebind.example"}


@pytest.fixture(scope="module")
def area(demo_study, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("no-token")
    shutil.copytree(demo_study, base / "in" / "study")
    return base


@pytest.fixture(scope="module")
def served(imported_models, area):
    env = {
        "NNUNET_BENTO_INPUT_ROOTS": str(area / "in"),
        "NNUNET_BENTO_OUTPUT_ROOT": str(area / "out"),
        "NNUNET_BENTO_WORK_DIR": str(area / "work"),
        "NNUNET_BENTO_ALLOWED_HOSTS": ALLOWED_HOST,
    }
    with bentoml_serve(REPO / "model-serve-spec.yaml", area / "serve.log", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def client(served) -> Client:
    with Client(served.url, backoff_s=0.5) as remote:
        yield remote


def wait_for(served, job_id: str, statuses: tuple[str, ...]) -> dict:
    """The job's state once its status is one of ``statuses``."""
    deadline = time.monotonic() + 300
    while (state := httpx.get(f"{served.url}/jobs/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


def failed_job(served, area: Path) -> str:
    """A job that fails at once (400): it names no model of the registry."""
    body = {
        "nnunet_id": "no-such-model",
        "study_path": str(area / "in" / "study"),
        "output_dir": str(area / "out" / "failed"),
    }
    job_id = httpx.post(f"{served.url}/jobs", json=body).json()["job_id"]
    wait_for(served, job_id, ("failed",))
    return job_id


def test_a_foreign_host_is_421_before_validation_and_the_probes_answer_it(served):
    refused = httpx.get(f"{served.url}/model_info", headers=FOREIGN)
    assert refused.status_code == 421
    assert "add the name to NNUNET_BENTO_ALLOWED_HOSTS" in refused.json()["error"]
    invalid = {"nnunet_id": 3}
    assert httpx.post(f"{served.url}/infer", json=invalid).status_code == 400
    assert httpx.post(f"{served.url}/infer", json=invalid, headers=FOREIGN).status_code == 421
    for probe in PROBE_PATHS:
        assert httpx.get(f"{served.url}{probe}", headers=FOREIGN).status_code == 200, probe
    for host in ("localhost:1234", f"{ALLOWED_HOST}:80"):
        response = httpx.get(f"{served.url}/model_info", headers={"Host": host})
        assert response.status_code == 200 and "organ" in response.json(), host


def test_the_document_lists_421_on_every_route_but_the_probes(served):
    document = httpx.get(f"{served.url}/docs.json").json()
    assert "NNUNET_BENTO_ALLOWED_HOSTS" in document["info"]["description"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert ("421" in operation["responses"]) is (path not in PROBE_PATHS), (path, method)
            assert "401" not in operation["responses"], (path, method)


def test_metrics_label_requests_by_route_template(served, area):
    job_id = failed_job(served, area)
    for _ in range(3):
        assert httpx.get(f"{served.url}/jobs/{job_id}").status_code == 200
        assert httpx.get(f"{served.url}/jobs/{job_id}/result").status_code == 400
    unknown = [f"/studies/1.2.840.{secrets.randbelow(10**9)}/{secrets.token_hex(6)}.dcm"]
    unknown += [f"/{secrets.token_hex(8)}" for _ in range(49)]
    for path in unknown:
        assert httpx.get(f"{served.url}{path}").status_code == 404
    text = httpx.get(f"{served.url}/metrics").text
    assert job_id not in text
    assert not [path for path in unknown if path.rsplit("/", 1)[1] in text]
    endpoints = {
        sample.labels["endpoint"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("service_name") == "SegmentationService"
        and "endpoint" in sample.labels
    }
    assert {"/jobs/{job_id}", "/jobs/{job_id}/result", UNKNOWN_ROUTE} <= endpoints
    routes = httpx.get(f"{served.url}/docs.json").json()["paths"]
    assert len(endpoints) <= len(routes) + 1, sorted(endpoints)


def test_delete_removes_a_finished_job_and_its_result_files(served, area, client):
    job_id = failed_job(served, area)
    assert httpx.delete(f"{served.url}/jobs/{job_id}").status_code == 204
    assert httpx.get(f"{served.url}/jobs/{job_id}").status_code == 404
    assert httpx.delete(f"{served.url}/jobs/{job_id}").status_code == 404
    archive = pack_study(area / "in" / "study", area / "study.zip", ["T2"])
    fields = {"nnunet_id": "organ2d", "series_folders": ["T2"], "tta": False}
    job_id = client.submit_upload(archive, fields)
    assert wait_for(served, job_id, ("done", "failed"))["status"] == "done"
    (folder,) = (area / "work" / "uploads").iterdir()
    assert (folder / "result.zip").is_file()
    assert client.cancel(job_id) is None
    assert not folder.exists()
    assert httpx.get(f"{served.url}/jobs/{job_id}").status_code == 404
    assert httpx.get(f"{served.url}/jobs/{job_id}/result").status_code == 404


def test_delete_cancels_a_running_job_and_then_removes_it(served, area, client):
    body = {
        "nnunet_id": ["organ"] * 4,
        "study_path": str(area / "in" / "study"),
        "series_folders": [["T2"]] * 4,
        "output_dir": str(area / "out" / "cancelled"),
        "use_folds": [0, 1],
        "tta": False,
    }
    job_id = httpx.post(f"{served.url}/jobs", json=body).json()["job_id"]
    wait_for(served, job_id, ("running",))
    cancelled = client.cancel(job_id)
    assert cancelled is not None and cancelled["status"] == "cancelled"
    assert client.status(job_id)["status"] == "cancelled"
    assert httpx.delete(f"{served.url}/jobs/{job_id}").status_code == 204
    assert httpx.get(f"{served.url}/jobs/{job_id}").status_code == 404
