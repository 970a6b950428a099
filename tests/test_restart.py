"""A server killed while a job runs comes back clean: the running job is failed ("interrupted
by a restart") and its upload removed, while a queued job keeps its input folder."""

import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from conftest import REPO, bentoml_serve

from nnunet_bento.client import pack_study
from nnunet_bento.job_store import JobStore

pytestmark = pytest.mark.slow

WAIT_S = 120
SLOW = {
    "nnunet_id": ["organ"] * 8,
    "series_folders": [["T2"]] * 8,
    "use_folds": [0, 1],
}
QUICK = {"nnunet_id": "organ2d", "series_folders": ["T2"]}


def submit_upload(server, archive: Path, fields: dict) -> str:
    response = httpx.post(
        f"{server.url}/jobs/upload",
        files={"archive": ("study.zip", archive.read_bytes(), "application/zip")},
        data={"request": json.dumps(fields)},
        timeout=WAIT_S,
    )
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def status(server, job_id: str) -> dict:
    return httpx.get(f"{server.url}/jobs/{job_id}", timeout=WAIT_S).json()


def kill_now(process: psutil.Process) -> None:
    """SIGKILL the server and every process it started (BentoML's workers lead process groups
    of their own), as a node does to a pod's container; wait until each is gone (or a zombie,
    which holds no file or port)."""
    members = [process, *process.children(recursive=True)]
    for member in members:
        member.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    for member in members[1:]:
        while member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"process {member.pid} outlived SIGKILL"
            time.sleep(0.05)


def test_a_restart_fails_the_running_job_sweeps_its_upload_and_keeps_the_queued_one(
    imported_models, demo_study, tmp_path
):
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    work = tmp_path / "work"
    env = {
        "NNUNET_BENTO_WORK_DIR": str(work),
        "NNUNET_BENTO_INPUT_ROOTS": str(demo_study.parent),
        "NNUNET_BENTO_OUTPUT_ROOT": str(tmp_path / "out"),
        "NNUNET_BENTO_MAX_PIPELINES": "1",
    }
    archive = pack_study(demo_study, tmp_path / "study.zip", ["T2"])
    with bentoml_serve(tmp_path / "spec.yaml", tmp_path / "first.log", env=env) as first:
        running = submit_upload(first, archive, SLOW)
        queued = submit_upload(first, archive, QUICK)
        deadline = time.monotonic() + WAIT_S
        while status(first, running)["status"] == "queued":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)
        assert status(first, running)["status"] == "running"
        assert status(first, queued)["status"] == "queued"
        kill_now(psutil.Process(first.process.pid))
    jobs = JobStore(work / "jobs.sqlite", 3600)
    running_input = Path(jobs.get(running).input_folder)
    queued_input = Path(jobs.get(queued).input_folder)
    assert running_input.is_dir() and queued_input.is_dir(), "the kill left both uploads"

    with bentoml_serve(tmp_path / "spec.yaml", tmp_path / "second.log", env=env) as second:
        interrupted = status(second, running)
        assert interrupted["status"] == "failed"
        assert "interrupted by a restart" in interrupted["error"]
        assert status(second, queued)["status"] == "queued"
        assert not running_input.exists()
        assert queued_input.is_dir()
        assert sorted((work / "uploads").iterdir()) == [queued_input]
        log = (tmp_path / "second.log").read_text()
        assert f"job {running} was running when the server stopped" in log
        assert f"removed {running_input}" in log
