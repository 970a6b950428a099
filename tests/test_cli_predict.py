"""`nnunet-bento predict`: nnunet_serve's flags, its output names, exit codes and job status."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import SimpleITK as sitk
from conftest import REPO, cli_predict
from status_server import recording_server

MODELS = REPO / "examples" / "models"


def organ2d(series: str, output_dir: str, *flags: str) -> subprocess.CompletedProcess:
    """`predict` with the organ2d demo model on one series."""
    return cli_predict("-i", series, "-m", str(MODELS / "organ2d"), "-o", output_dir, *flags)


def test_success_writes_nnunet_serve_s_names_and_posts_success(demo_study, tmp_path):
    with recording_server() as (url, received):
        done = organ2d(
            str(demo_study / "T2"),
            str(tmp_path / "out"),
            "-p",
            "--proba_threshold",
            "0.2",
            "-S",
            "--suffix",
            "v1",
            "--job_id",
            "job-1",
            "--update_url",
            url,
            "--success_message",
            "segmented",
            "--tmp_dir",
            str(tmp_path / "unused"),
        )
    assert done.returncode == 0, done.stderr
    assert "tmp_dir is accepted for compatibility with nnunet_serve and not used" in done.stderr
    assert not (tmp_path / "unused").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".nnunet-bento-results.json",
        "prediction_v1.nii.gz",
        "probabilities_v1.nii.gz",
        "statistics_v1.json",
        "volume_0000_v1.nii.gz",
    ]
    running, body = received
    assert running["status"] == "running", "the CLI says it started"
    assert (
        body["job_id"] == "job-1" and body["status"] == "segmented" and body["output_error"] == ""
    )
    assert "prediction_v1.nii.gz" in body["output_log"]
    assert "organ2d: predict" in done.stderr, "plain log lines when not on a terminal"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "prediction_v1.nii.gz")))
    assert set(np.unique(labels)) == {0, 1, 2}


def test_failure_prints_one_line_exits_1_and_reports_it(demo_study, tmp_path):
    log = tmp_path / "job.json"
    log.write_text(json.dumps({"job_id": "kept"}))
    with recording_server() as (url, received):
        failed = organ2d(
            str(demo_study / "absent"),
            str(tmp_path / "out"),
            "--job_id",
            "j2",
            "--update_url",
            url,
            "--log_file",
            str(log),
        )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("nnunet-bento predict: error: ")
    assert "Traceback" not in failed.stderr
    assert [body["status"] for body in received] == ["running", "failure"]
    assert "absent" in received[-1]["output_error"]
    assert json.loads(log.read_text())["job_id"] == "kept"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_dicom_source_with_url_is_refused_before_any_connection(tmp_path):
    refused = cli_predict(
        *("-i", "T2 axial", "-m", "organ", "-o", str(tmp_path / "out")),
        *("--dicom_source", "pacs", "--study_uid", "1.2.3", "--url", "http://127.0.0.1:9"),
    )
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("nnunet-bento predict: error: --dicom_source pulls on the machine")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(demo_study, tmp_path):
    failed = organ2d(
        str(demo_study / "absent"),
        str(tmp_path),
        "--debug",
    )
    assert failed.returncode != 0 and "Traceback" in failed.stderr


def test_an_unreachable_status_server_does_not_fail_the_job(demo_study, tmp_path):
    done = organ2d(
        str(demo_study / "T2"),
        str(tmp_path),
        "--update_url",
        "http://127.0.0.1:9/status",
    )
    assert done.returncode == 0, done.stderr
    assert "job status POST to http://127.0.0.1:9/status failed" in done.stderr


def test_model_path_takes_a_spec_id_or_a_bento_tag(demo_study, tmp_path, imported_models):
    env_spec = {"MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml")}
    by_id = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnunet_bento.cli",
            "predict",
            "-i",
            str(demo_study / "T2"),
            "-m",
            "prostate_whole_gland",
            "-o",
            str(tmp_path / "id"),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env_spec},
    )
    assert by_id.returncode == 0, by_id.stderr
    assert "organ on cpu" in by_id.stderr, "the alias resolved to the spec's organ model"
    by_tag = cli_predict(
        "-i", str(demo_study / "T2"), "-m", imported_models["organ2d"], "-o", str(tmp_path / "tag")
    )
    assert by_tag.returncode == 0, by_tag.stderr
    labels = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "prediction.nii.gz")))
        for d in ("id", "tag")
    ]
    assert all(set(np.unique(a)) == {0, 1, 2} for a in labels)


def test_validate_metadata_reports_each_bad_key_on_one_line(tmp_path):
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnunet_bento.cli",
            "validate-metadata",
            str(REPO / "model-serve-spec.yaml"),
            str(REPO / "examples" / "metadata" / "organ.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0 and "valid DCMQI segmentation metadata" in good.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"segmentAttributes": [[{"labelID": 1, "SegmentLabel": "x"}]]}))
    failed = subprocess.run(
        [sys.executable, "-m", "nnunet_bento.cli", "validate-metadata", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()
    assert "segmentAttributes[0][0].SegmentedPropertyTypeCodeSequence: missing" in line


def test_sigterm_reports_failed_exits_non_zero_and_writes_nothing(demo_study, tmp_path):
    """The status server holds the `running` POST until the signal is sent, so the command is
    still at work when SIGTERM arrives, however busy the machine."""
    release = threading.Event()
    with recording_server(hold_running=release) as (url, received):
        process = subprocess.Popen(
            [
                *(
                    sys.executable,
                    "-m",
                    "nnunet_bento.cli",
                    "predict",
                    "-i",
                    str(demo_study / "T2"),
                ),
                *("-m", str(MODELS / "organ"), "-o", str(tmp_path / "out"), "-f", "0", "1", "-t"),
                *("--update_url", url, "--job_id", "j-term"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received and received[0]["status"] == "running"
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=120)
        finally:
            release.set()
    assert process.returncode == 1
    assert "terminated by SIGTERM" in stderr
    assert received[-1]["status"] == "failure"
    assert "SIGTERM" in received[-1]["output_error"]
    assert not (tmp_path / "out").exists(), "nothing committed, no folder created"
