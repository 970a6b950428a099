"""Webhooks: the webhooks file, the payload, and signed delivery to a real local receiver."""

import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nnunet_bento.errors import SpecError
from nnunet_bento.webhooks import (
    ATTEMPTS,
    SIGNATURE_HEADER,
    Webhook,
    deliver,
    job_payload,
    load_webhooks,
)

SECRET = "s3cret-for-tests"
PAYLOAD = job_payload(
    event="job.done",
    job_id="job-1",
    study_instance_uid="1.2.3",
    series_instance_uids=["1.2.3.4", "1.2.3.5"],
    models=[("lesion", "k3xq2")],
    outputs=[Path("/results/job-1/stage_0/seg.dcm")],
    output_root=Path("/results"),
    push=[{"node": "pacs", "status": "done"}],
)

PAYLOAD_ARGS = {
    "event": "job.failed",
    "job_id": "job-2",
    "study_instance_uid": "1.2.3",
    "series_instance_uids": [],
    "models": [],
    "outputs": [],
    "output_root": Path("/results"),
    "error": "model 'lesion' failed",
}


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """What a receiver does before it parses the body."""
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


@dataclass
class Received:
    """What a receiver got: each POST's body and signature header."""

    bodies: list[bytes] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)


@contextmanager
def receiver(*answers: int, location: str = "") -> Iterator[tuple[str, Received]]:
    """A local HTTP server that answers its POSTs with ``answers`` in turn (the last one
    thereafter), with ``location`` as the Location of a redirect."""
    received = Received()
    lock = threading.Lock()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                received.bodies.append(body)
                received.signatures.append(self.headers.get(SIGNATURE_HEADER, ""))
                status = answers[min(len(received.bodies), len(answers)) - 1]
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    return "HOOK_SECRET"


def hook(url: str, secret_env: str) -> Webhook:
    return Webhook(name="ris", url=url, secret_env=secret_env)


def test_the_signature_verifies_over_the_exact_body(secret):
    with receiver(200) as (url, received):
        result = deliver(hook(url, secret), PAYLOAD)
    assert (result.delivered, result.attempts, result.status, result.error) == (True, 1, 200, None)
    (body,) = received.bodies
    assert verify(SECRET.encode(), body, received.signatures[0])
    assert not verify(b"another secret", body, received.signatures[0])
    assert json.loads(body) == PAYLOAD


def test_a_5xx_is_retried_and_the_body_delivered_once(secret):
    waits: list[float] = []
    with receiver(500, 200) as (url, received):
        result = deliver(hook(url, secret), PAYLOAD, backoff_s=0.25, sleep=waits.append)
    assert (result.delivered, result.attempts, result.status) == (True, 2, 200)
    assert waits == [0.25]
    assert len(received.bodies) == 2 and received.bodies[0] == received.bodies[1]


def test_a_redirect_is_not_followed(secret):
    with (
        receiver(200) as (elsewhere, redirected),
        receiver(302, location=elsewhere) as (url, received),
    ):
        waits: list[float] = []
        result = deliver(hook(url, secret), PAYLOAD, sleep=waits.append)
    assert (result.delivered, result.attempts, result.status, waits) == (False, 1, 302, [])
    assert "redirects are not followed" in result.error
    assert len(received.bodies) == 1 and redirected.bodies == []


def test_an_unreachable_url_gives_a_result_after_bounded_retries(secret):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        waits: list[float] = []
        result = deliver(hook(url, secret), PAYLOAD, backoff_s=1.0, sleep=waits.append)
    assert (result.delivered, result.attempts, result.status) == (False, ATTEMPTS, None)
    assert result.error == "connection refused"
    assert waits == [1.0 * 2**i for i in range(ATTEMPTS - 1)]


def test_a_secret_gone_from_the_environment_gives_a_result(secret, monkeypatch):
    webhook = hook("http://127.0.0.1:9/hook", secret)
    monkeypatch.delenv(secret)
    result = deliver(webhook, PAYLOAD)
    assert (result.delivered, result.attempts) == (False, 0)
    assert "HOOK_SECRET is not set" in result.error


def test_the_payload_names_no_patient_and_outputs_relative_to_the_root():
    assert set(PAYLOAD) == {
        "event",
        "job_id",
        "study_instance_uid",
        "series_instance_uids",
        "models",
        "outputs",
        "push",
        "error",
    }
    assert PAYLOAD["outputs"] == ["job-1/stage_0/seg.dcm"]
    assert PAYLOAD["models"] == [{"id": "lesion", "version": "k3xq2"}]
    with pytest.raises(ValueError, match=r"job\.started"):
        job_payload(**{**PAYLOAD_ARGS, "event": "job.started"})
    with pytest.raises(ValueError, match="subpath"):
        job_payload(**{**PAYLOAD_ARGS, "outputs": [Path("/elsewhere/seg.dcm")]})


def test_the_webhooks_file_loads(tmp_path, secret):
    path = tmp_path / "webhooks.yaml"
    path.write_text(
        "webhooks:\n"
        "  - {name: ris, url: 'http://127.0.0.1:8080/hook', secret_env: HOOK_SECRET}\n"
        "  - {name: hub, url: 'https://hub.example.org/n', secret_env: HOOK_SECRET}\n"
    )
    assert list(load_webhooks(path)) == ["ris", "hub"]
    with pytest.raises(SpecError, match="NNUNET_BENTO_WEBHOOKS"):
        load_webhooks(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{name: ris, url: 'not a url', secret_env: HOOK_SECRET}", "webhook 'ris', field 'url'"),
        ("{name: ris, url: 'ftp://h/x', secret_env: HOOK_SECRET}", "webhook 'ris', field 'url'"),
        (
            "{name: ris, url: 'http://h/x', secret_env: UNSET_VAR}",
            "webhook 'ris', field 'secret_env'",
        ),
        ("{name: ris, url: 'http://h/x'}", "webhook 'ris', field 'secret_env'"),
        (
            "{name: ris, url: 'http://h/x', secret_env: HOOK_SECRET, x: 1}",
            "webhook 'ris', field 'x'",
        ),
        ("{url: 'http://h/x', secret_env: HOOK_SECRET}", "webhook #1, field 'name'"),
        ("{name: 'r i s', url: 'http://h/x', secret_env: HOOK_SECRET}", "field 'name'"),
    ],
)
def test_webhooks_file_errors_name_the_webhook_and_the_field(tmp_path, secret, entry, expected):
    path = tmp_path / "webhooks.yaml"
    path.write_text(f"webhooks:\n  - {entry}\n")
    with pytest.raises(SpecError, match=expected):
        load_webhooks(path)


def test_two_webhooks_with_one_name_are_refused(tmp_path, secret):
    path = tmp_path / "webhooks.yaml"
    path.write_text(
        "webhooks:\n" + "  - {name: ris, url: 'http://h/', secret_env: HOOK_SECRET}\n" * 2
    )
    with pytest.raises(SpecError, match="webhook 'ris', field 'name': used by two webhooks"):
        load_webhooks(path)
