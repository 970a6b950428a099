"""The hospital flow through one `bentoml serve` with a DICOM listener, a real Orthanc, dcmtk's
own tools and real webhook receivers: series in over DICOM, jobs made by routes, SEG and RT
Struct pushed back to Orthanc, signed webhooks when jobs end."""

import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import yaml
from conftest import REPO, bentoml_serve, free_port
from dicom_checks import highdicom_labels
from orthanc import orthanc
from pydicom.uid import generate_uid
from test_webhooks import Received, receiver

from nnunet_bento.io.dicom_series import read_dicom_series

pytestmark = pytest.mark.slow

DICOM = REPO / "examples" / "dicom"
CT = DICOM / "ct" / "CT"
MR = DICOM / "mr"
OUR_AE, MODALITY_AE = "NNUNET_BENTO", "MODALITY"
SECRET = "hospital-webhook-secret"
ORGAN_LABELS = {"prostate": 1, "bladder": 2}
ORGAN_REQUEST = {"nnunet_id": "organ", "use_folds": [0], "tta": False}
WAIT_S = 120  # the longest a test waits for what must happen
POLL_S = 0.2
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: The CT series to the organ model, results pushed to the PACS and the RIS told.
CT_ROUTE = {
    "name": "ct-organ",
    "match": {"Modality": "CT"},
    "request": {**ORGAN_REQUEST, "save_rt_struct_output": True},
    "push_to": ["pacs"],
    "notify": ["ris"],
}
SERIES_METRIC = re.compile(r'^nnunet_bento_listener_series_total\{outcome="(\w+)"\} ([0-9.e+]+)$')


def uid_of(folder: Path, keyword: str) -> str:
    first = min(folder.glob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True)[keyword].value)


CT_STUDY, CT_SERIES = uid_of(CT, "StudyInstanceUID"), uid_of(CT, "SeriesInstanceUID")


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    """Poll ``condition`` until it answers something true, at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(POLL_S)
    raise AssertionError(f"{what} did not happen within {WAIT_S} s")


def copy_series(folder: Path, target: Path, study_uid: str, **attributes: str) -> list[Path]:
    """The series as a new series of ``study_uid`` (new Series and SOP UIDs), with
    ``attributes`` changed."""
    target.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)
        dataset.save_as(target / path.name, enforce_file_format=True)
    return sorted(target.iterdir())


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def ris() -> Iterator[tuple[str, Received]]:
    with receiver(200) as hook:
        yield hook


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[str, Received]]:
    """A receiver that answers its first POST with a 500, then 200."""
    with receiver(500, 200) as hook:
        yield hook


class Hospital:
    """The served build with its listener, its folders, and how to follow its jobs."""

    def __init__(self, url: str, port: int, folder: Path) -> None:
        self.url = url
        self.port = port
        self.output_root = folder / "out"
        self.work_dir = folder / "work"

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=30)

    def listener_jobs(self) -> dict[str, dict]:
        response = self.get("/jobs", source="listener", limit=100)
        assert response.status_code == 200, response.text
        return {job["job_id"]: job for job in response.json()["jobs"]}

    def ended(self, job_id: str) -> dict:
        """The job once it is done or failed."""

        def state() -> dict | None:
            job = self.get(f"/jobs/{job_id}").json()
            return job if job["status"] in ("done", "failed", "cancelled") else None

        return wait_for(state, f"the end of job {job_id}")

    def series_counts(self) -> dict[str, float]:
        """The listener's settled series by outcome, as /metrics counts them."""
        counts: dict[str, float] = {}
        for line in self.get("/metrics").text.splitlines():
            match = SERIES_METRIC.match(line)
            if match:
                counts[match.group(1)] = float(match.group(2))
        return counts

    def settle(self, before: dict[str, float], **expected: int) -> None:
        """Wait until the listener settled as many more series as ``expected`` counts, and
        check that each outcome grew by its count."""
        total = sum(expected.values())

        def settled() -> dict[str, float] | None:
            counts = self.series_counts()
            grown = sum(counts.values()) - sum(before.values())
            return counts if grown >= total else None

        counts = wait_for(settled, f"{total} settled series")
        grown = {key: counts.get(key, 0) - before.get(key, 0) for key in counts}
        assert {key: value for key, value in grown.items() if value} == expected

    def dcmtk(self, tool: str, *args: str | Path) -> subprocess.CompletedProcess:
        """A dcmtk tool called from the modality's AE title to the listener."""
        return subprocess.run(
            [tool, "-aet", MODALITY_AE, "-aec", OUR_AE, *map(str, args)],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=WAIT_S,
            check=False,
        )

    def echo(self) -> bool:
        return self.dcmtk("echoscu", "127.0.0.1", str(self.port)).returncode == 0

    def store(self, files: list[Path], *options: str) -> None:
        """dcmtk's storescu sends the files in one association, as a modality would."""
        run = self.dcmtk("storescu", *options, "127.0.0.1", str(self.port), *files)
        assert run.returncode == 0, run.stdout + run.stderr

    def new_job(self, before: dict[str, dict]) -> dict:
        """The one listener job made since ``before``, once it ended done."""
        made = wait_for(lambda: set(self.listener_jobs()) - set(before), "a listener job")
        (job_id,) = made
        job = self.ended(job_id)
        assert job["status"] == "done", job
        return job


@pytest.fixture(scope="module")
def hospital(imported_models, pacs, ris, flaky, tmp_path_factory) -> Iterator[Hospital]:
    folder = tmp_path_factory.mktemp("hospital")
    port = free_port()
    listener = {
        "ae_title": OUR_AE,
        "port": port,
        "host": "127.0.0.1",
        "allowed_calling_ae": ["ORTHANC", MODALITY_AE],
        "settle_s": 1,
        "routes": [
            CT_ROUTE,
            {
                "name": "mr-lesion",
                "series": [{"SeriesDescription": "t2"}, {"SeriesDescription": "adc"}],
                "request": {"nnunet_id": "lesion", "tta": False},
            },
        ],
    }
    webhooks = {
        "webhooks": [
            {"name": "ris", "url": ris[0], "secret_env": "HOSPITAL_HOOK_SECRET"},
            {"name": "flaky", "url": flaky[0], "secret_env": "HOSPITAL_HOOK_SECRET"},
        ]
    }
    nodes = {"nodes": [{"name": "pacs", "dicomweb_url": pacs.dicomweb_url}]}
    for name, document in (("listener", listener), ("webhooks", webhooks), ("nodes", nodes)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(document))
    env = {
        "NNUNET_BENTO_LISTENER": str(folder / "listener.yaml"),
        "NNUNET_BENTO_WEBHOOKS": str(folder / "webhooks.yaml"),
        "NNUNET_BENTO_DICOM_NODES": str(folder / "nodes.yaml"),
        "NNUNET_BENTO_INPUT_ROOTS": str(DICOM),
        "NNUNET_BENTO_OUTPUT_ROOT": str(folder / "out"),
        "NNUNET_BENTO_WORK_DIR": str(folder / "work"),
        "HOSPITAL_HOOK_SECRET": SECRET,
    }
    shutil.copy(REPO / "model-serve-spec.yaml", folder / "spec.yaml")
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log", env=env) as server:
        server.client.model_info()  # ready
        hospital = Hospital(server.url, port, folder)
        wait_for(hospital.echo, "an answer to C-ECHO")
        yield hospital


@pytest.fixture(scope="module")
def reference_labels(hospital) -> np.ndarray:
    """The labels of the SEG that /infer writes for the demo CT series, by path."""
    response = httpx.post(
        f"{hospital.url}/infer",
        json={
            **ORGAN_REQUEST,
            "study_path": str(CT.parent),
            "series_folders": ["CT"],
            "is_dicom": True,
            "output_dir": str(hospital.output_root / "reference"),
        },
        timeout=300,
    )
    assert response.status_code == 200, response.text
    (seg,) = response.json()["dicom_segmentation"]
    return highdicom_labels(Path(seg), read_dicom_series(CT), ORGAN_LABELS)


def signed(received: Received, secret: str = SECRET) -> list[dict]:
    """The bodies received, each checked against its signature header."""
    for body, header in zip(received.bodies, received.signatures, strict=True):
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(expected, header), "the signature verifies"
    return [json.loads(body) for body in received.bodies]


def orthanc_instance(pacs, sop_uid: str, folder: Path) -> pydicom.Dataset:
    """An instance stored in Orthanc, downloaded into ``folder``."""
    with pacs.rest() as client:
        found = client.post("/tools/lookup", content=sop_uid).raise_for_status().json()
        (instance,) = [item["ID"] for item in found if item["Type"] == "Instance"]
        path = folder / f"{sop_uid}.dcm"
        path.write_bytes(client.get(f"/instances/{instance}/file").raise_for_status().content)
    return pydicom.dcmread(path)


def study_modalities(pacs, study_uid: str) -> set[str]:
    """The modalities of the series that Orthanc holds in a study."""
    with pacs.rest() as client:
        found = client.post("/tools/lookup", content=study_uid).raise_for_status().json()
        (study,) = [item["ID"] for item in found if item["Type"] == "Study"]
        series = client.get(f"/studies/{study}/series").raise_for_status().json()
    return {item["MainDicomTags"]["Modality"] for item in series}


def pushed_seg_labels(hospital: Hospital, pacs, job_id: str, folder: Path) -> np.ndarray:
    """The labels of the SEG that job ``job_id`` pushed, read back from Orthanc; the RT Struct
    went to the source study too."""
    result = hospital.get(f"/jobs/{job_id}/result").json()
    pushed = {Path(item["file"]).name: item for item in result["push"]}
    assert {name: item["status"] for name, item in pushed.items()} == {
        "prediction.dcm": "stored",
        "struct.dcm": "stored",
    }
    seg = orthanc_instance(pacs, pushed["prediction.dcm"]["sop_instance_uid"], folder)
    struct = orthanc_instance(pacs, pushed["struct.dcm"]["sop_instance_uid"], folder)
    assert (seg.Modality, struct.Modality) == ("SEG", "RTSTRUCT")
    assert seg.StudyInstanceUID == struct.StudyInstanceUID == CT_STUDY
    seg_path = folder / f"{seg.SOPInstanceUID}.dcm"
    return highdicom_labels(seg_path, read_dicom_series(CT), ORGAN_LABELS)


def test_a_ct_series_from_storescu_comes_back_to_orthanc_segmented(
    hospital, pacs, ris, reference_labels, tmp_path
):
    before, counts = hospital.listener_jobs(), hospital.series_counts()
    hospital.store(sorted(CT.glob("*.dcm")))
    job = hospital.new_job(before)
    hospital.settle(counts, routed=1)
    assert job["source"] == "listener" and job["kind"] == "infer"

    labels = pushed_seg_labels(hospital, pacs, job["job_id"], tmp_path)
    np.testing.assert_array_equal(labels, reference_labels)
    output = hospital.output_root / CT_STUDY / "ct-organ" / CT_SERIES
    assert (output / "stage_0" / "prediction.dcm").is_file()

    received = ris[1]
    ended = wait_for(
        lambda: hospital.get(f"/jobs/{job['job_id']}").json()["notifications"], "the webhook"
    )
    assert [(n["webhook"], n["delivered"], n["attempts"]) for n in ended] == [("ris", True, 1)]
    mine = [body for body in signed(received) if body["job_id"] == job["job_id"]]
    assert len(mine) == 1
    (body,) = mine
    assert body["event"] == "job.done"
    assert (body["study_instance_uid"], body["series_instance_uids"]) == (CT_STUDY, [CT_SERIES])
    assert f"{CT_STUDY}/ct-organ/{CT_SERIES}/stage_0/prediction.dcm" in body["outputs"]
    assert body["models"][0]["id"] == "organ"
    assert "Demo^Ct" not in json.dumps(body) and "DEMO-CT" not in json.dumps(body)

    # the same series again, unchanged: no second job
    counts = hospital.series_counts()
    hospital.store(sorted(CT.glob("*.dcm")))
    hospital.settle(counts, unchanged=1)
    assert set(hospital.listener_jobs()) == set(before) | {job["job_id"]}
    assert not list((hospital.work_dir / "listener").rglob("*.dcm")), "its files are removed"


def test_the_same_series_in_jpeg_lossless_gives_the_same_seg(
    hospital, pacs, reference_labels, tmp_path
):
    compressed = tmp_path / "jpeg"
    compressed.mkdir()
    for path in sorted(CT.glob("*.dcm")):
        run = subprocess.run(["dcmcjpeg", path, compressed / path.name], capture_output=True)
        assert run.returncode == 0, run.stderr
    before, counts = hospital.listener_jobs(), hospital.series_counts()
    hospital.store(sorted(compressed.iterdir()), "-xs")
    job = hospital.new_job(before)
    hospital.settle(counts, routed=1)  # changed content: a job again
    labels = pushed_seg_labels(hospital, pacs, job["job_id"], tmp_path)
    np.testing.assert_array_equal(labels, reference_labels)


def test_orthanc_sends_a_study_in_two_associations_and_one_job_results(hospital, pacs, tmp_path):
    study_uid = generate_uid()
    files = copy_series(CT, tmp_path / "ct", study_uid)
    with pacs.rest() as client:
        ids = [client.post("/instances", content=path.read_bytes()).json()["ID"] for path in files]
        modality = {"AET": OUR_AE, "Host": "127.0.0.1", "Port": hospital.port}
        client.put("/modalities/listener", json=modality).raise_for_status()
        before, counts = hospital.listener_jobs(), hospital.series_counts()
        for half in (ids[:12], ids[12:]):
            store = {"Resources": half, "Synchronous": True}
            client.post("/modalities/listener/store", json=store, timeout=60).raise_for_status()
    job = hospital.new_job(before)
    hospital.settle(counts, routed=1)
    assert set(hospital.listener_jobs()) - set(before) == {job["job_id"]}
    result = hospital.get(f"/jobs/{job['job_id']}/result").json()
    seg = next(item for item in result["push"] if Path(item["file"]).name == "prediction.dcm")
    assert orthanc_instance(pacs, seg["sop_instance_uid"], tmp_path).StudyInstanceUID == study_uid
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert (hospital.output_root / study_uid / "ct-organ" / series_uid).is_dir()


def test_a_series_that_matches_no_route_makes_no_job_and_leaves_no_files(hospital, tmp_path):
    files = copy_series(MR / "T2", tmp_path / "scout", generate_uid(), SeriesDescription="scout")
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    before, counts = hospital.listener_jobs(), hospital.series_counts()
    hospital.store(files)
    hospital.settle(counts, unrouted=1)
    assert hospital.listener_jobs().keys() == before.keys()
    left = [path for path in hospital.work_dir.rglob("*") if series_uid in str(path)]
    assert left == []
    log = (hospital.work_dir.parent / "serve.log").read_text()
    assert f"series {series_uid} ('scout', MR) matches no route" in log


@pytest.mark.parametrize("order", [("T2", "ADC"), ("ADC", "T2")])
def test_a_multi_series_route_makes_one_job_of_t2_and_adc_in_either_order(
    hospital, tmp_path, order
):
    study_uid = generate_uid()
    series = {name: copy_series(MR / name, tmp_path / name, study_uid) for name in order}
    before, counts = hospital.listener_jobs(), hospital.series_counts()
    hospital.store(series[order[0]])
    hospital.settle(counts, waiting=1)
    assert hospital.listener_jobs().keys() == before.keys(), "no job before both settled"
    hospital.store(series[order[1]])
    job = hospital.new_job(before)
    hospital.settle(counts, waiting=1, routed=1)
    assert set(hospital.listener_jobs()) - set(before) == {job["job_id"]}
    t2_uid = pydicom.dcmread(series["T2"][0], stop_before_pixels=True).SeriesInstanceUID
    output = hospital.output_root / study_uid / "mr-lesion" / t2_uid
    assert (output / "stage_0" / "prediction.nii.gz").is_file()
    result = hospital.get(f"/jobs/{job['job_id']}/result").json()
    assert result["request"]["nnunet_id"] == "lesion"


def test_a_webhook_that_answers_500_then_200_is_retried_and_delivered_once(hospital, flaky):
    received = flaky[1]
    response = httpx.post(
        f"{hospital.url}/jobs",
        json={
            "nnunet_id": "no-such-model",
            "study_path": str(CT.parent),
            "series_folders": ["CT"],
            "output_dir": str(hospital.output_root / "failing"),
            "notify": ["flaky"],
        },
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert hospital.ended(job_id)["status"] == "failed"
    notifications = wait_for(
        lambda: hospital.get(f"/jobs/{job_id}").json()["notifications"], "the webhook's result"
    )
    assert notifications == [
        {"webhook": "flaky", "delivered": True, "attempts": 2, "status": 200, "error": None}
    ]
    first, second = signed(received)
    assert first == second, "the same body, retried"
    assert (first["event"], first["job_id"]) == ("job.failed", job_id)
    assert "no-such-model" in first["error"]
    assert received.signatures[0] == received.signatures[1]


def test_notify_names_configured_webhooks_of_jobs_only(hospital):
    base = {**ORGAN_REQUEST, "study_path": str(CT.parent), "series_folders": ["CT"]}
    output = str(hospital.output_root / "refused")
    infer = httpx.post(
        f"{hospital.url}/infer", json={**base, "output_dir": output, "notify": ["ris"]}
    )
    assert infer.status_code == 400 and "background jobs" in infer.json()["error"]
    job = httpx.post(
        f"{hospital.url}/jobs",
        json={**base, "output_dir": output, "notify": ["ris", "http://10.0.0.1/hook"]},
    ).json()
    failed = hospital.ended(job["job_id"])
    assert failed["status_code"] == 400 and "notify[1]: unknown webhook" in failed["error"]
    for query in ({"limit": 101}, {"status": "lost"}, {"after": "nope"}, {"colour": "red"}):
        assert hospital.get("/jobs", **query).status_code == 400, query


def test_nnunet_bento_listen_sends_routed_series_to_the_server_as_upload_jobs(
    hospital, pacs, ris, tmp_path
):
    port = free_port()
    listener = {
        "port": port,
        "allowed_calling_ae": [MODALITY_AE],
        "settle_s": 1,
        "routes": [CT_ROUTE],
    }
    (tmp_path / "listener.yaml").write_text(yaml.safe_dump(listener))
    env = {
        **os.environ,
        "NNUNET_BENTO_LISTENER": str(tmp_path / "listener.yaml"),
        "NNUNET_BENTO_WORK_DIR": str(tmp_path / "work"),
    }
    command = [sys.executable, "-m", "nnunet_bento.cli", "listen", "--url", hospital.url]
    with open(tmp_path / "listen.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        alone = Hospital(hospital.url, port, tmp_path)
        wait_for(alone.echo, "an answer to C-ECHO from nnunet-bento listen")
        study_uid = generate_uid()
        before = {job["job_id"] for job in hospital.get("/jobs", source="api").json()["jobs"]}
        alone.store(copy_series(CT, tmp_path / "ct", study_uid))

        def new_upload_job() -> set[str]:
            jobs = hospital.get("/jobs", source="api").json()["jobs"]
            return {job["job_id"] for job in jobs if job["kind"] == "upload"} - before

        (job_id,) = wait_for(new_upload_job, "an upload job from nnunet-bento listen")
        assert hospital.ended(job_id)["status"] == "done"
        assert study_modalities(pacs, study_uid) == {"SEG", "RTSTRUCT"}
        assert not list((tmp_path / "work" / "listener").rglob("*.dcm")), "sent, then removed"
        body = wait_for(
            lambda: [b for b in signed(ris[1]) if b["job_id"] == job_id], "the job's webhook"
        )
        assert body[0]["study_instance_uid"] == study_uid
        assert "stage_0/prediction.dcm" in body[0]["outputs"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, (tmp_path / "listen.log").read_text()


@pytest.mark.parametrize(
    ("route", "env", "expected"),
    [
        (
            {"push_to": ["nowhere"]},
            {"NNUNET_BENTO_OUTPUT_ROOT": "out"},
            "listener.yaml: route 'ct', field 'push_to': unknown DICOM node 'nowhere'",
        ),
        (
            {"request": {"nnunet_id": "lesion"}},
            {"NNUNET_BENTO_OUTPUT_ROOT": "out"},
            "listener.yaml: route 'ct', field 'series': model 'lesion' takes 2 series",
        ),
        ({}, {}, "NNUNET_BENTO_LISTENER needs NNUNET_BENTO_OUTPUT_ROOT"),
    ],
    ids=["unknown node", "channels", "no output root"],
)
def test_a_listener_problem_stops_start_up_in_one_line(
    imported_models, tmp_path, route, env, expected
):
    config = {
        "port": free_port(),
        "allowed_calling_ae": [MODALITY_AE],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "request": ORGAN_REQUEST} | route],
    }
    (tmp_path / "listener.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-c", "import service"],
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if k != "NNUNET_BENTO_OUTPUT_ROOT"},
            "MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml"),
            "NNUNET_BENTO_LISTENER": str(tmp_path / "listener.yaml"),
            "NNUNET_BENTO_WORK_DIR": str(tmp_path / "work"),
            **{k: str(tmp_path / v) for k, v in env.items()},
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("nnunet-bento cannot start: ") and expected in line, run.stderr
