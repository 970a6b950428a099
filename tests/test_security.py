"""A served instance with path roots and a token, attacked as a caller on the network would:
paths out of the roots, no token, foreign origins, other content types, server paths."""

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import psutil
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, bentoml_serve

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def area(demo_study, tmp_path_factory) -> Path:
    """roots/in (the input root, with the study), roots/out (the output root), outside/."""
    base = tmp_path_factory.mktemp("area")
    study = base / "roots" / "in" / "study"
    shutil.copytree(demo_study, study)
    (base / "roots" / "out").mkdir()
    shutil.copytree(demo_study, base / "outside" / "study")
    (study / "link_out").symlink_to(base / "outside" / "study")
    (base / "roots" / "in" / "study_link").symlink_to(base / "outside" / "study")
    (base / "roots" / "out" / "link_out").symlink_to(base / "outside")
    (study / "two_images").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(study / "T2" / "T2.nii.gz", study / "two_images" / name)
    return base


@pytest.fixture(scope="module")
def served(imported_models, area, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure")
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        "NNUNET_BENTO_INPUT_ROOTS": str(area / "roots" / "in"),
        "NNUNET_BENTO_OUTPUT_ROOT": str(area / "roots" / "out"),
        "NNUNET_BENTO_API_TOKEN": TOKEN,
    }
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log", env=env, token=TOKEN) as server:
        yield server


def valid_body(area: Path, name: str = "ok") -> dict:
    return {
        "nnunet_id": "organ2d",
        "study_path": str(area / "roots" / "in" / "study"),
        "series_folders": ["T2"],
        "output_dir": str(area / "roots" / "out" / name),
        "tta": False,
    }


def post(served, body: dict, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{served.url}/infer", json=body, headers=AUTH if headers is None else headers, **kwargs
    )


def assert_still_serving(served, area: Path, name: str) -> None:
    """A valid request right after an attack succeeds."""
    response = post(served, valid_body(area, f"{name}-{time.monotonic_ns()}"), timeout=300)
    assert response.status_code == 200, response.text
    assert Path(response.json()["nifti_prediction"][0]).is_file()


def assert_no_server_path(text: str, area: Path) -> None:
    for path in (area, REPO, Path(os.environ["BENTOML_HOME"]), Path.home()):
        assert str(path) not in text


OUTSIDE_CASES = {
    "study_path absolute": ({"study_path": "{outside}/study"}, "study_path"),
    "study_path dotdot": ({"study_path": "{roots}/in/../../outside/study"}, "study_path"),
    "study_path symlink": ({"study_path": "{roots}/in/study_link"}, "study_path"),
    "study_path missing outside": ({"study_path": "/nonexistent/study"}, "study_path"),
    "series absolute": ({"series_folders": ["{outside}/study/T2"]}, "series_folders[0]"),
    "series dotdot": ({"series_folders": ["../../../outside/study/T2"]}, "series_folders[0]"),
    "series symlink": ({"series_folders": ["link_out/T2"]}, "series_folders[0]"),
    "intersect_with dotdot": ({"intersect_with": "../x.nii.gz"}, "intersect_with"),
    "intersect_with symlink": ({"intersect_with": "link_out/T2/T2.nii.gz"}, "intersect_with"),
    "crop_from absolute": ({"crop_from": "{outside}/study/T2/T2.nii.gz"}, "crop_from"),
    "output_dir absolute": ({"output_dir": "{outside}/out"}, "output_dir"),
    "output_dir dotdot": ({"output_dir": "{roots}/out/../../outside/out"}, "output_dir"),
    "output_dir symlink": ({"output_dir": "{roots}/out/link_out/out"}, "output_dir"),
}


@pytest.mark.parametrize(("fields", "field"), OUTSIDE_CASES.values(), ids=OUTSIDE_CASES.keys())
def test_a_path_outside_its_root_is_403_naming_the_field(served, area, fields, field):
    places = {"outside": str(area / "outside"), "roots": str(area / "roots")}
    body = {**valid_body(area)}
    for key, value in fields.items():
        body[key] = json.loads(
            json.dumps(value)
            .replace("{outside}", places["outside"])
            .replace("{roots}", places["roots"])
        )
    response = post(served, body, timeout=60)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error.startswith(f"{field}:")
    assert_no_server_path(response.text, area)
    assert not (area / "outside" / "out").exists(), "nothing written outside the output root"
    assert_still_serving(served, area, f"after-{field}")


@pytest.mark.parametrize("target", ["detached", "linked"])
def test_a_file_of_a_series_read_from_outside_the_roots_is_403(served, area, target):
    """An .mhd whose ElementDataFile names a file outside the roots, or an image file that
    links out of the study: refused before anything is read, with nothing written."""
    image = sitk.ReadImage(str(area / "roots" / "in" / "study" / "T2" / "T2.nii.gz"))
    series = area / "roots" / "in" / "study" / target
    series.mkdir()
    if target == "detached":
        secret = area / "outside" / "secret.raw"
        sitk.WriteImage(image, str(series / "T2.mhd"))
        (series / "T2.raw").rename(secret)
        header = series / "T2.mhd"
        header.write_text(header.read_text().replace("= T2.raw", f"= {secret}"))
    else:
        sitk.WriteImage(image, str(area / "outside" / "T2.mha"))
        (series / "T2.mha").symlink_to(area / "outside" / "T2.mha")
    body = {**valid_body(area, f"read-{target}"), "series_folders": [target]}
    response = post(served, {**body, "save_nifti_inputs": True}, timeout=60)
    assert response.status_code == 403, response.text
    assert response.json()["error"].startswith("series_folders[0]: ")
    assert_no_server_path(response.text, area)
    assert not (area / "roots" / "out" / f"read-{target}").exists()


def test_an_error_inside_the_roots_names_the_study_files_relative_to_it(served, area):
    response = post(served, {**valid_body(area), "series_folders": ["two_images"]}, timeout=60)
    assert response.status_code == 400
    assert "a.nii.gz, b.nii.gz" in response.json()["error"]
    assert_no_server_path(response.text, area)


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": TOKEN}, 401)],
    ids=["missing", "wrong", "no-scheme"],
)
def test_a_missing_or_wrong_token_is_401_on_every_route(served, area, headers, status):
    assert post(served, valid_body(area), headers=headers).status_code == status
    for route in ("/model_info", "/request-params"):
        response = httpx.get(f"{served.url}{route}", headers=headers)
        assert response.status_code == status
        assert TOKEN not in response.text
    assert httpx.get(f"{served.url}/readyz").status_code == 200, "probes need no token"
    assert httpx.get(f"{served.url}/model_info", headers=AUTH).status_code == 200
    assert_still_serving(served, area, "after-token")


def test_the_python_client_sends_the_token(served, area):
    info = served.client.model_info()
    assert "organ" in info
    response = served.client.infer(**valid_body(area, "client"))
    assert Path(response["nifti_prediction"][0]).is_file()


def test_a_text_plain_body_is_415(served, area):
    response = httpx.post(
        f"{served.url}/infer",
        content=json.dumps(valid_body(area, "plain")),
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    assert response.status_code == 415
    assert "text/plain" in response.json()["error"]
    assert not (area / "roots" / "out" / "plain").exists()
    assert_still_serving(served, area, "after-plain")


def test_a_foreign_origin_is_403_and_gets_no_cors_headers(served, area):
    response = post(
        served, valid_body(area, "cors"), headers={**AUTH, "Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    assert "origin https://evil.example is not allowed" in response.json()["error"]
    assert "access-control-allow-origin" not in response.headers
    assert not (area / "roots" / "out" / "cors").exists()
    own = post(served, valid_body(area, "own"), headers={**AUTH, "Origin": served.url}, timeout=300)
    assert own.status_code == 200, "the server's own origin keeps working"


def test_model_info_carries_no_server_path_and_no_training_files(served, area):
    response = httpx.get(f"{served.url}/model_info", headers=AUTH)
    assert response.status_code == 200
    info = response.json()
    assert set(info) == {"organ", "organ2d", "lesion", "organ_nomirror"}
    assert all("dataset" not in model["model_information"] for model in info.values())
    assert_no_server_path(response.text, area)


def test_the_runner_listens_on_no_tcp_port(served):
    """bentoml serve hands the ModelRunner worker a Unix socket; the only TCP port open
    beyond loopback-only control sockets of the process manager is the HTTP port."""
    server = psutil.Process(served.process.pid)
    (runner,) = [p for p in server.children(recursive=True) if "ModelRunner" in p.cmdline()]
    command = runner.cmdline()
    runner_fd = int(command[command.index("--fd") + 1])
    assert runner_fd in {c.fd for c in runner.net_connections(kind="unix")}
    assert runner_fd not in {c.fd for c in runner.net_connections(kind="inet")}
    http_port = int(served.url.rsplit(":", 1)[1])
    listening = {
        (connection.laddr.ip, connection.laddr.port)
        for process in [server, *server.children(recursive=True)]
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    }
    assert ("127.0.0.1", http_port) in listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), "nothing bound beyond loopback"
