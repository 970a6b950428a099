"""Job status: POSTs with retries that never fail a job, and the log-file rule."""

import json
import socket
import time

import pytest
from status_server import recording_server

from nnunet_bento.cli.status_report import JobReporter, post_status, update_log_file


def test_status_is_posted_as_the_seed_describes(tmp_path):
    with recording_server() as (url, received):
        JobReporter(job_id="j7", update_url=url, success_message="ok").report(
            True, output_log="done"
        )
    assert received == [{"job_id": "j7", "status": "ok", "output_error": "", "output_log": "done"}]


def test_an_unreachable_status_server_is_retried_with_backoff_and_never_raises():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits: list[float] = []
    body = {"job_id": "j", "status": "s", "output_error": "", "output_log": ""}
    assert (
        post_status(
            f"http://127.0.0.1:{port}/",
            body,
            timeout_s=1,
            attempts=3,
            backoff_s=0.5,
            sleep=waits.append,
        )
        is False
    )
    assert waits == [0.5, 1.0]


def test_log_file_updates_status_and_keeps_an_existing_job_id(tmp_path):
    log = tmp_path / "job.json"
    log.write_text(json.dumps({"job_id": "first", "status": "running", "site": "A"}))
    JobReporter(job_id="second", log_file=log).report(False, output_error="bad input")
    assert json.loads(log.read_text()) == {
        "job_id": "first",
        "status": "failure",
        "output_error": "bad input",
        "output_log": "",
        "site": "A",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"], "written atomically, no leftovers"


def test_log_file_gets_the_job_id_when_it_has_none(tmp_path):
    log = tmp_path / "new" / "job.json"
    update_log_file(
        log, {"job_id": "j1", "status": "success", "output_error": "", "output_log": "x"}
    )
    assert json.loads(log.read_text())["job_id"] == "j1"


def test_a_status_server_that_answers_500_is_retried_and_never_fails_the_job():
    waits: list[float] = []
    body = {"job_id": "j", "status": "s", "output_error": "", "output_log": ""}
    with recording_server(status=500) as (url, received):
        assert post_status(url, body, attempts=3, backoff_s=0.1, sleep=waits.append) is False
    assert len(received) == 3 and waits == [0.1, 0.2]


def test_a_status_server_that_never_answers_times_out():
    body = {"job_id": "j", "status": "s", "output_error": "", "output_log": ""}
    with recording_server(delay_s=5) as (url, received):
        started = time.monotonic()
        assert post_status(url, body, timeout_s=0.3, attempts=2, sleep=lambda s: None) is False
        assert time.monotonic() - started < 3
    assert len(received) == 2


@pytest.mark.parametrize("url", ["not a url", "ftp://example/status", "http://", "http://[::1"])
def test_a_malformed_status_url_is_logged_not_raised(url, caplog):
    JobReporter(job_id="j", update_url=url).report(True, output_log="done")
    assert any("job status" in message for message in caplog.messages)


@pytest.mark.parametrize(
    "content",
    [b"[]", b"\xff\xfe not utf-8", b"42", b"{broken"],
    ids=["list", "not-utf8", "number", "not-json"],
)
def test_an_odd_log_file_is_replaced_with_the_status(tmp_path, content):
    log = tmp_path / "job.json"
    log.write_bytes(content)
    JobReporter(job_id="j9", log_file=log).report(True, output_log="done")
    assert json.loads(log.read_text())["status"] == "success"


def test_a_log_file_that_is_a_folder_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "job.json").mkdir()
    JobReporter(job_id="j", log_file=tmp_path / "job.json").report(True)
    assert any("cannot write the log file" in message for message in caplog.messages)
    assert (tmp_path / "job.json").is_dir()
