"""Clients without a shared disk: uploads, background jobs, the Python Client and
`predict --url`, against a real server with a token and path roots."""

import io
import json
import shutil
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, bentoml_serve, cli_predict

from nnunet_bento.client import Client, ClientError, pack_study

pytestmark = pytest.mark.slow

TOKEN = "remote-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = REPO / "examples" / "models"
DICOM_MR = REPO / "examples" / "dicom" / "mr"


@pytest.fixture(scope="module")
def area(demo_study, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("remote")
    shutil.copytree(demo_study, base / "in" / "study")
    (base / "out").mkdir()
    return base


@pytest.fixture(scope="module")
def served(imported_models, area, tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote-serve")
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        "NNUNET_BENTO_INPUT_ROOTS": str(area / "in"),
        "NNUNET_BENTO_OUTPUT_ROOT": str(area / "out"),
        "NNUNET_BENTO_API_TOKEN": TOKEN,
        "NNUNET_BENTO_WORK_DIR": str(area / "work"),
        "NNUNET_BENTO_MAX_UPLOAD_MB": "1",
        "NNUNET_BENTO_MAX_UNPACKED_MB": "8",
        "NNUNET_BENTO_MAX_PIPELINES": "1",
        "NNUNET_BENTO_MAX_QUEUE": "4",
    }
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log", env=env, token=TOKEN) as s:
        yield s


@pytest.fixture(scope="module")
def client(served) -> Client:
    with Client(served.url, token=TOKEN, backoff_s=0.5) as remote:
        yield remote


def study_zip(area: Path, members=("T2",)) -> Path:
    return pack_study(area / "in" / "study", area / f"study-{time.monotonic_ns()}.zip", members)


def upload(served, archive: bytes | Path, fields: dict, route: str = "/infer_file", **kw):
    data = archive.read_bytes() if isinstance(archive, Path) else archive
    return httpx.post(
        f"{served.url}{route}",
        files={"archive": ("study.zip", data, "application/zip")},
        data={"request": json.dumps(fields)},
        headers=kw.get("headers", AUTH),
        timeout=300,
    )


def labels(path: Path | str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def uploads(area: Path) -> set[Path]:
    """The upload folders in the work folder (a finished upload job keeps its result zip)."""
    return set((area / "work" / "uploads").glob("*"))


def test_infer_file_gives_the_files_of_infer_by_path(served, area, tmp_path):
    before = uploads(area)
    fields = {"nnunet_id": "organ", "series_folders": ["T2"], "save_preview": True}
    response = upload(served, study_zip(area), fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    bundle = zipfile.ZipFile(io.BytesIO(response.content))
    result = json.loads(bundle.read("response.json"))
    assert result["nifti_prediction"] == ["stage_0/prediction.nii.gz"]
    assert "study_path" not in result["request"], "no server path in the response"
    bundle.extractall(tmp_path / "upload")
    by_path = httpx.post(
        f"{served.url}/infer",
        json={
            **fields,
            "study_path": str(area / "in" / "study"),
            "output_dir": str(area / "out" / "bypath"),
        },
        headers=AUTH,
        timeout=300,
    ).json()
    np.testing.assert_array_equal(
        labels(tmp_path / "upload" / "stage_0" / "prediction.nii.gz"),
        labels(by_path["nifti_prediction"][0]),
    )
    assert (tmp_path / "upload" / "stage_0" / "preview.png").is_file()
    assert uploads(area) == before, "the upload is removed once the answer is sent"


def test_infer_file_from_curl(served, area, tmp_path):
    archive = study_zip(area)
    result = tmp_path / "result.zip"
    completed = subprocess.run(
        [
            "curl",
            "-sf",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-F",
            f"archive=@{archive}",
            "-F",
            'request={"nnunet_id": "organ2d", "series_folders": ["T2"]}',
            "-o",
            str(result),
            f"{served.url}/infer_file",
        ],
        check=False,
    )
    assert completed.returncode == 0
    assert "stage_0/prediction.nii.gz" in zipfile.ZipFile(result).namelist()


def test_a_dicom_study_travels_as_an_upload_and_its_seg_comes_back(served, tmp_path):
    archive = pack_study(DICOM_MR, tmp_path / "mr.zip", ["T2"])
    fields = {"nnunet_id": "organ", "series_folders": ["T2"], "is_dicom": True}
    response = upload(served, archive, fields | {"save_rt_struct_output": True})
    assert response.status_code == 200, response.text
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert {"stage_0/prediction.dcm", "stage_0/struct.dcm", "response.json"} <= set(names)


def test_a_job_goes_queued_running_done_with_stage_and_step(served, area, client):
    slow = {
        "nnunet_id": ["organ", "organ"],
        "series_folders": [["T2"], ["T2"]],
        "use_folds": [0, 1],
    }
    first = client.submit_upload(study_zip(area), slow)
    second = client.submit_upload(
        study_zip(area), {"nnunet_id": "organ2d", "series_folders": ["T2"]}
    )
    seen: list[tuple] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = client.status(second)
        seen.append(
            (status["status"], status["stage"] and status["stage"]["index"], status["step"])
        )
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    order = [state for state, _, _ in seen]
    assert order[0] == "queued" and order[-1] == "done", order
    assert "running" in order
    assert any(state == "running" and step in ("read", "predict") for state, _, step in seen)
    client.wait(first, 2, poll_s=0.2)
    result = httpx.get(f"{served.url}/jobs/{second}/result", headers=AUTH)
    assert "stage_0/prediction.nii.gz" in zipfile.ZipFile(io.BytesIO(result.content)).namelist()


def test_a_job_by_path_answers_the_infer_response(served, area, client):
    body = {
        "nnunet_id": "organ2d",
        "study_path": str(area / "in" / "study"),
        "series_folders": ["T2"],
        "output_dir": str(area / "out" / "job"),
    }
    job = httpx.post(f"{served.url}/jobs", json=body, headers=AUTH).json()["job_id"]
    client.wait(job, 1, poll_s=0.2)
    result = httpx.get(f"{served.url}/jobs/{job}/result", headers=AUTH).json()
    assert Path(result["nifti_prediction"][0]).is_file()


def test_a_cancelled_job_commits_nothing(served, area, client):
    body = {
        "nnunet_id": ["organ"] * 4,
        "study_path": str(area / "in" / "study"),
        "series_folders": [["T2"]] * 4,
        "output_dir": str(area / "out" / "cancelled"),
        "use_folds": [0, 1],
    }
    job = httpx.post(f"{served.url}/jobs", json=body, headers=AUTH).json()["job_id"]
    while client.status(job)["status"] == "queued":
        time.sleep(0.05)
    cancelled = client.cancel(job)
    assert cancelled["status"] == "cancelled"
    time.sleep(3)
    assert client.status(job)["status"] == "cancelled"
    assert httpx.get(f"{served.url}/jobs/{job}/result", headers=AUTH).status_code == 409
    assert not (area / "out" / "cancelled").exists()


def test_unknown_jobs_and_wrong_tokens(served):
    assert httpx.get(f"{served.url}/jobs/nope", headers=AUTH).status_code == 404
    assert httpx.get(f"{served.url}/jobs/nope").status_code == 401
    assert (
        httpx.delete(f"{served.url}/jobs/nope", headers={"Authorization": "Bearer x"}).status_code
        == 401
    )


def test_client_and_predict_url_give_the_files_of_in_process_predict(
    served, area, client, tmp_path
):
    study = area / "in" / "study"
    local = cli_predict(
        *("-i", str(study / "T2"), "-m", str(MODELS / "organ"), "-o", str(tmp_path / "local")),
        *("-f", "0", "1"),
    )
    assert local.returncode == 0, local.stderr
    response = client.infer_study(
        study, tmp_path / "client", ["T2"], nnunet_id="organ", series_folders=["T2"]
    )
    assert response["nifti_prediction"] == [
        str(tmp_path / "client" / "stage_0" / "prediction.nii.gz")
    ]
    remote = cli_predict(
        *("-i", str(study / "T2"), "-m", "organ", "-o", str(tmp_path / "remote")),
        *("--url", served.url, "--token", TOKEN),
    )
    assert remote.returncode == 0, remote.stderr
    expected = labels(tmp_path / "local" / "prediction.nii.gz")
    np.testing.assert_array_equal(labels(response["nifti_prediction"][0]), expected)
    np.testing.assert_array_equal(labels(tmp_path / "remote" / "prediction.nii.gz"), expected)


def zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries:
            bundle.writestr(name, data)
    return buffer.getvalue()


def symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("T2/link.nii.gz")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


BAD_UPLOADS = {
    "dotdot entry": (lambda: zip_with([("../evil.nii.gz", b"x")]), 400, "'..'"),
    "absolute entry": (lambda: zip_with([("/etc/evil", b"x")]), 400, "absolute"),
    "symlink entry": (lambda: zip_with([(symlink_entry(), b"/etc/passwd")]), 400, "link"),
    "over the size limit": (
        lambda: np.random.default_rng(0).bytes(1_200_000),
        413,
        "NNUNET_BENTO_MAX_UPLOAD_MB",
    ),
    "zip bomb": (
        lambda: zip_with([("T2/zeros.nii", bytes(50_000_000))]),
        413,
        "unpacked size limit",
    ),
    "not an archive": (lambda: b"GIF89a not an archive", 400, "not a zip or tar.gz archive"),
    "empty archive": (lambda: zip_with([]), 400, "the archive is empty"),
}


@pytest.mark.parametrize(
    ("archive", "status", "message"), BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys()
)
def test_a_bad_upload_is_refused_and_leaves_nothing(served, area, archive, status, message):
    before = uploads(area)
    response = upload(served, archive(), {"nnunet_id": "organ2d", "series_folders": ["T2"]})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert uploads(area) == before


def test_an_archive_whose_series_do_not_match_is_404_and_leaves_nothing(served, area):
    before = uploads(area)
    response = upload(served, study_zip(area), {"nnunet_id": "organ2d", "series_folders": ["T9"]})
    assert response.status_code == 404
    assert "input series T9 does not exist" in response.json()["error"]
    assert uploads(area) == before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"nnunet_id": "organ2d", "study_path": "/etc"}, "may not give study_path"),
        ({"nnunet_id": "organ2d", "output_dir": "/tmp/x"}, "may not give output_dir"),
    ],
)
def test_an_upload_may_not_name_server_paths(served, area, fields, message):
    response = upload(served, study_zip(area), fields)
    assert response.status_code == 400 and message in response.json()["error"]


def test_an_archive_given_as_a_url_is_refused(served):
    response = httpx.post(
        f"{served.url}/infer_file",
        files={"request": (None, '{"nnunet_id": "organ2d"}')},
        data={"archive": "http://127.0.0.1:1/study.zip"},
        headers=AUTH,
    )
    assert response.status_code == 400
    assert "needs a part 'archive'" in response.json()["error"]


def test_upload_routes_take_multipart_only_and_need_the_token(served, area):
    assert upload(served, study_zip(area), {}, headers={}).status_code == 401
    response = httpx.post(f"{served.url}/infer_file", json={}, headers=AUTH)
    assert response.status_code in (400, 415)


def test_the_client_raises_the_servers_status_and_message(client):
    with pytest.raises(ClientError) as raised:
        client.infer(nnunet_id="nope", study_path="/x", output_dir="/y", series_folders=["T2"])
    assert raised.value.status_code in (400, 403)
