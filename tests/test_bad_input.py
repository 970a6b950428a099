"""Bad requests, bad files, faults and load against a real server: each gets the right 4xx or
5xx with a message that names the problem, nothing is left behind, and the next request works.

The server runs in a private mount namespace where `out/ro` is a read-only bind mount and
`out/full` a 64 KiB tmpfs, with small bounds so that they can be reached by the demo data.
"""

import gzip
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, bentoml_serve

pytestmark = pytest.mark.slow

DICOM = REPO / "examples" / "dicom"
TIMEOUT_S = 20
MOUNTS = (
    'mount -t tmpfs -o size=64k tmpfs "$FULL" && mount --bind "$RO" "$RO" && '
    'mount -o remount,bind,ro "$RO" && exec "$@"'
)


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def tiled(image: sitk.Image, reps: tuple[int, int, int]) -> sitk.Image:
    """The image repeated along (x, y, z), with its spacing and direction."""
    array = np.tile(sitk.GetArrayFromImage(image), reps[::-1])
    bigger = sitk.GetImageFromArray(array)
    bigger.SetSpacing(image.GetSpacing())
    bigger.SetDirection(image.GetDirection())
    bigger.SetOrigin(image.GetOrigin())
    return bigger


@pytest.fixture(scope="module")
def area(demo_study, tmp_path_factory) -> Path:
    """in/study (the demo study plus bad files), out/ (with ro/ and full/)."""
    base = tmp_path_factory.mktemp("bad")
    study = base / "in" / "study"
    shutil.copytree(demo_study, study)
    t2 = sitk.ReadImage(str(study / "T2" / "T2.nii.gz"))
    data = (study / "T2" / "T2.nii.gz").read_bytes()
    (study / "truncated").mkdir()
    (study / "truncated" / "T2.nii.gz").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    (study / "corrupt").mkdir()
    (study / "corrupt" / "T2.nii.gz").write_bytes(bytes(corrupt))
    (study / "text").mkdir()
    (study / "text" / "T2.nii.gz").write_bytes(gzip.compress(b"not an image"))
    os.mkfifo(study / "fifo")
    (study / "two").mkdir()
    shutil.copy(study / "T2" / "T2.nii.gz", study / "two" / "a.nii.gz")
    shutil.copy(study / "T2" / "T2.nii.gz", study / "two" / "b.nii.gz")
    rgb = sitk.Compose([t2[:, :, 0]] * 3)
    write(sitk.Cast(rgb, sitk.sitkVectorUInt8), study / "rgb" / "image.nrrd")
    write(sitk.JoinSeries([t2, t2]), study / "four_d" / "ADC.nii.gz")
    write(sitk.Cast(t2[:, :, 5] > 100, sitk.sitkUInt8), study / "mask2d.nii.gz")
    write(sitk.JoinSeries([sitk.Cast(t2 > 100, sitk.sitkUInt8)] * 2), study / "mask4d.nii.gz")
    write(sitk.Compose([sitk.Cast(t2 > 100, sitk.sitkUInt8)] * 2), study / "mask_vector.nrrd")
    empty = sitk.Image(t2.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(t2)
    write(empty, study / "empty_mask.nii.gz")
    write(tiled(t2, (3, 3, 2)), study / "huge" / "T2.nii.gz")
    write(tiled(t2, (2, 2, 1)), study / "slow" / "T2.nii.gz")
    shutil.copytree(DICOM / "ct" / "CT", study / "dicom_bad_iop")
    for path in (study / "dicom_bad_iop").iterdir():
        dataset = pydicom.dcmread(path)
        dataset.ImageOrientationPatient = [1, 0, 0]
        dataset.save_as(path)
    (study / "no_dicom").mkdir()
    (study / "no_dicom" / "readme.txt").write_text("no images here")
    for folder in ("ro", "full", "results"):
        (base / "out" / folder).mkdir(parents=True)
    return base


@pytest.fixture(scope="module")
def served(imported_models, area, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-serve")
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        "NNUNET_BENTO_INPUT_ROOTS": str(area / "in"),
        "NNUNET_BENTO_OUTPUT_ROOT": str(area / "out"),
        "NNUNET_BENTO_MAX_VOXELS": "300000",
        "NNUNET_BENTO_MAX_PROBABILITY_MB": "0.3",
        "NNUNET_BENTO_MAX_PIPELINES": "1",
        "NNUNET_BENTO_MAX_QUEUE": "1",
        "NNUNET_BENTO_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "NNUNET_BENTO_WORK_DIR": str(folder / "work"),
        "FULL": str(area / "out" / "full"),
        "RO": str(area / "out" / "ro"),
    }
    serve = [
        *("unshare", "-m", "--propagation", "private", "sh", "-c", MOUNTS, "sh"),
        *(os.sys.executable, "-m", "bentoml", "serve", "service:SegmentationService"),
        *("--host", "127.0.0.1"),
    ]
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log", command=serve, env=env) as s:
        yield s


def body(area: Path, out: str = "results/x", **fields) -> dict:
    return {
        "nnunet_id": "organ2d",
        "study_path": str(area / "in" / "study"),
        "series_folders": ["T2"],
        "output_dir": str(area / "out" / out),
        "tta": False,
        **fields,
    }


def slow_body(area: Path, out: str, stages: int) -> dict:
    """A cascade of ``stages`` mirrored two-fold organ runs on a 4x larger image: seconds of
    work per stage on any machine."""
    return body(
        area,
        out,
        nnunet_id=["organ"] * stages,
        series_folders=[["slow"]] * stages,
        use_folds=[0, 1],
        tta=True,
    )


def post(served, payload: dict | str, timeout: float = 120) -> httpx.Response:
    if isinstance(payload, str):
        return httpx.post(
            f"{served.url}/infer",
            content=payload,
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
    return httpx.post(f"{served.url}/infer", json=payload, timeout=timeout)


def assert_serves(served, area: Path) -> None:
    """A valid request right after succeeds."""
    name = f"results/ok-{time.monotonic_ns()}"
    response = post(served, body(area, name))
    assert response.status_code == 200, response.text
    assert (area / "out" / name / "stage_0" / "prediction.nii.gz").is_file()


CASES = {
    "unknown model": ({"nnunet_id": "nope"}, 400, "unknown nnunet_id 'nope'"),
    "no model": ({"nnunet_id": []}, 400, "nnunet_id"),
    "empty model name": ({"nnunet_id": ""}, 400, "nnunet_id"),
    "folds of the wrong type": ({"use_folds": {"a": 1}}, 400, "use_folds"),
    "negative crop_padding": ({"crop_padding": [-1, 0, 0]}, 400, "crop_padding"),
    "suffix with NUL": ({"suffix": "a\u0000b"}, 400, "suffix must be a plain name"),
    "suffix of 300 characters": ({"suffix": "s" * 300}, 400, "suffix must be a plain name"),
    "suffix with a path": ({"suffix": "../x"}, 400, "suffix must be a plain name"),
    "threshold above 1": ({"proba_threshold": 1.5}, 400, "proba_threshold"),
    "proba map without threshold": ({"save_proba_map": True}, 400, "needs proba_threshold"),
    "unknown label": ({"class_idx": [7]}, 400, "class_idx [7] not among"),
    "channel count": ({"nnunet_id": "lesion"}, 400, "takes 2 series"),
    "flat series for a cascade": (
        {"nnunet_id": ["organ2d", "organ2d"]},
        400,
        "series_folders must be a list of 2 lists",
    ),
    "cascade_mode count": (
        {"nnunet_id": ["organ2d", "organ2d", "organ2d"], "series_folders": [["T2"]] * 3}
        | {"cascade_mode": ["crop", "crop", "crop"]},
        400,
        "cascade_mode has 3 values for 2 transition",
    ),
    "missing checkpoint": (
        {"checkpoint_name": "checkpoint_best.pth"},
        400,
        "has no fold_0/checkpoint_best.pth; available: fold_0/checkpoint_final.pth",
    ),
    "missing fold": ({"use_folds": [7]}, 400, "has no fold_7/checkpoint_final.pth"),
    "missing study": ({"study_path": "{in}/nowhere"}, 404, "study_path {in}/nowhere does not"),
    "missing series": ({"series_folders": ["T9"]}, 404, "input series T9 does not exist"),
    "two images in a series": ({"series_folders": ["two"]}, 400, "found a.nii.gz, b.nii.gz"),
    "series is a FIFO": ({"series_folders": ["fifo"]}, 400, "neither a regular file nor"),
    "truncated gzip": ({"series_folders": ["truncated"]}, 400, "truncated/T2.nii.gz is trunc"),
    "corrupt gzip": ({"series_folders": ["corrupt"]}, 400, "corrupt/T2.nii.gz is truncated or"),
    "not an image": ({"series_folders": ["text"]}, 400, "cannot read image text/T2.nii.gz"),
    "2D RGB image": ({"series_folders": ["rgb"]}, 400, "3 components per voxel"),
    "4D second channel": (
        {"nnunet_id": "lesion", "series_folders": ["T2", "four_d"]},
        400,
        "four_d/ADC.nii.gz is 4D; expected 2D or 3D",
    ),
    "2D mask": ({"intersect_with": "mask2d.nii.gz"}, 400, "mask2d.nii.gz is 2D; expected 3D"),
    "4D mask": ({"crop_from": "mask4d.nii.gz"}, 400, "mask4d.nii.gz is 4D; expected 3D"),
    "vector mask": ({"intersect_with": "mask_vector.nrrd"}, 400, "2 components per voxel"),
    "empty crop mask": ({"crop_from": "empty_mask.nii.gz"}, 400, "is empty: there is nothing"),
    "later stage named": ({"crop_from": "stage_3"}, 400, "names a stage that has not run"),
    "RT Struct without DICOM": ({"save_rt_struct_output": True}, 400, "needs is_dicom"),
    "compression of a binary SEG": (
        {"is_dicom": True, "series_folders": ["dicom_bad_iop"], "lossless_compression": True},
        400,
        "lossless_compression needs segmentation_type labelmap",
    ),
    "malformed orientation": (
        {"is_dicom": True, "series_folders": ["dicom_bad_iop"]},
        400,
        "malformed ImageOrientationPatient: expected 6 numbers",
    ),
    "folder without DICOM": (
        {"is_dicom": True, "series_folders": ["no_dicom"]},
        400,
        "no DICOM image in no_dicom: looked at 1 files",
    ),
    "too many voxels": ({"series_folders": ["huge"]}, 413, "NNUNET_BENTO_MAX_VOXELS (300000)"),
    "probabilities past the bound": (
        {"save_proba_map": True, "proba_threshold": 0.5},
        413,
        "NNUNET_BENTO_MAX_PROBABILITY_MB (0.3)",
    ),
    "output outside the root": ({"output_dir": "/tmp/elsewhere"}, 403, "output_dir: path is"),
}


@pytest.mark.parametrize(("fields", "status", "message"), CASES.values(), ids=CASES.keys())
def test_a_bad_request_gets_its_status_and_names_the_problem(served, area, fields, status, message):
    out = f"results/{status}-{time.monotonic_ns()}"
    payload = body(area, out)
    for key, value in fields.items():
        payload[key] = json.loads(json.dumps(value).replace("{in}", str(area / "in" / "study")))
    response = post(served, payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message.replace("{in}", str(area / "in" / "study")) in error
    assert not (area / "out" / out).exists(), "a failed request creates no output_dir"
    assert_serves(served, area)


def test_a_body_that_is_not_json_is_400(served, area):
    response = post(served, "{not json")
    assert response.status_code == 400
    assert response.json()["status"] == "failed"
    assert_serves(served, area)


def test_a_dicom_slice_without_pixel_data_is_400(served, area):
    folder = area / "in" / "study" / "no_pixels"
    shutil.copytree(DICOM / "ct" / "CT", folder)
    dataset = pydicom.dcmread(folder / "IM0010.dcm")
    del dataset.PixelData
    dataset.save_as(folder / "IM0010.dcm")
    response = post(served, body(area, is_dicom=True, series_folders=["no_pixels"]))
    assert response.status_code == 400
    assert "slices in no_pixels are missing or unevenly spaced" in response.json()["error"]
    assert_serves(served, area)


def test_results_are_refused_unless_overwrite_and_then_replaced_as_a_whole(served, area):
    out = area / "out" / "results" / "again"
    first = post(
        served, body(area, "results/again", save_proba_map=True, proba_threshold=0.5, class_idx=[1])
    )
    assert first.status_code == 200, first.text
    assert (out / "stage_0" / "proba.nii.gz").is_file()
    refused = post(served, body(area, "results/again"))
    assert refused.status_code == 409
    assert "results/again (under the output root) already holds results" in refused.json()["error"]
    assert str(area) not in refused.text
    replaced = post(served, body(area, "results/again", overwrite=True))
    assert replaced.status_code == 200
    assert not (out / "stage_0" / "proba.nii.gz").exists(), "no file of the old run survives"
    assert sorted(p.name for p in out.iterdir()) == [".nnunet-bento-results.json", "stage_0"]


def test_two_requests_on_one_output_dir_do_not_interleave(served, area):
    slow = slow_body(area, "results/shared", stages=4)
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(post(served, slow)))
    first.start()
    time.sleep(1.0)
    second = post(served, body(area, "results/shared", overwrite=True))
    first.join()
    assert second.status_code in (409, 503), second.text
    if second.status_code == 409:
        assert "another request is writing to results/shared" in second.json()["error"]
    assert_serves(served, area)


def test_a_read_only_output_dir_is_500_naming_the_folder(served, area):
    response = post(served, body(area, "ro/case"))
    assert response.status_code == 500
    error = response.json()["error"]
    assert (
        error == "cannot write the outputs into ro/case (under the output root): Read-only "
        "file system"
    )
    assert_serves(served, area)


def test_a_full_disk_is_507_and_leaves_nothing(served, area):
    response = post(served, body(area, "full/case", save_nifti_inputs=True))
    assert response.status_code == 507, response.text
    assert "the disk of full/case (under the output root) is full" in response.json()["error"]
    assert_serves(served, area)


def test_past_the_queue_a_request_gets_503_with_retry_after(served, area):
    slow = slow_body(area, "results/queue", stages=4)
    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda i=i: answers.append(
                post(served, slow | {"output_dir": str(area / "out" / "results" / f"queue-{i}")})
            )
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    refused = post(served, body(area, "results/queue-3"))
    for thread in threads:
        thread.join()
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "10"
    assert "NNUNET_BENTO_MAX_PIPELINES + NNUNET_BENTO_MAX_QUEUE" in refused.json()["error"]
    assert_serves(served, area)


def test_a_timed_out_request_commits_nothing(served, area):
    response = post(served, slow_body(area, "results/late", stages=16))
    assert response.status_code == 504, response.text
    time.sleep(TIMEOUT_S)
    assert not (area / "out" / "results" / "late").exists()
    assert_serves(served, area)


def test_model_info_and_readyz_answer_within_a_second_during_an_inference(served, area):
    thread = threading.Thread(target=post, args=(served, slow_body(area, "results/busy", 2)))
    thread.start()
    time.sleep(0.5)
    for route in ("/readyz", "/model_info"):
        started = time.monotonic()
        assert httpx.get(f"{served.url}{route}", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0, route
    thread.join()


def test_a_runner_killed_mid_request_is_503_and_the_next_request_works(served, area):
    """The runner is killed once it has spent a second of CPU on the request's network."""
    server = psutil.Process(served.process.pid)
    (runner,) = [p for p in server.children(recursive=True) if "ModelRunner" in p.cmdline()]
    slow = slow_body(area, "results/killed", stages=4)
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(post(served, slow)))
    thread.start()
    busy_since = runner.cpu_times().user
    while runner.cpu_times().user - busy_since < 1.0:
        time.sleep(0.05)
    runner.kill()
    thread.join()
    (response,) = answers
    assert response.status_code == 503, response.text
    assert "the model runner stopped or is restarting" in response.json()["error"]
    assert not (area / "out" / "results" / "killed").exists()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if post(served, body(area, f"results/revived-{time.monotonic_ns()}")).status_code == 200:
            break
        time.sleep(2)
    else:
        pytest.fail("the runner did not come back")
