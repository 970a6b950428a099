"""Uploads cannot stall the server or fill its disk, against a real server: a request is
admitted before its body is read, every byte of a body is counted as it streams in, the work
folder keeps to NNUNET_BENTO_MAX_WORK_MB, and /livez answers while a 1 GiB archive unpacks."""

import json
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, bentoml_serve

pytestmark = pytest.mark.slow

MB = 2**20
MAX_WORK_MB = 1100
ZEROS_BYTES = 1024 * MB
BOUNDARY = "upload-test-boundary"
MISSING_SERIES = {"nnunet_id": "organ2d", "series_folders": ["T9"]}
LIVEZ_POLL_S = 0.05
WAIT_S = 120


@pytest.fixture(scope="module")
def served(imported_models, demo_study, tmp_path_factory):
    """One pipeline slot and no queue, a 2 MB upload bound, a 4 GB unpacked bound and a work
    folder bound that a 1 GiB archive fits."""
    folder = tmp_path_factory.mktemp("uploads-serve")
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        "NNUNET_BENTO_INPUT_ROOTS": str(demo_study.parent),
        "NNUNET_BENTO_OUTPUT_ROOT": str(folder / "out"),
        "NNUNET_BENTO_WORK_DIR": str(folder / "work"),
        "NNUNET_BENTO_MAX_UPLOAD_MB": "2",
        "NNUNET_BENTO_MAX_UNPACKED_MB": "4096",
        "NNUNET_BENTO_MAX_WORK_MB": str(MAX_WORK_MB),
        "NNUNET_BENTO_MAX_PIPELINES": "1",
        "NNUNET_BENTO_MAX_QUEUE": "0",
    }
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log", env=env) as server:
        server.work = folder / "work"
        yield server


@pytest.fixture(scope="module")
def zeros_zip(tmp_path_factory) -> Path:
    """A zip of one 1 GiB entry of zeros (about 1 MB), written without 1 GiB in memory."""
    path = tmp_path_factory.mktemp("zeros") / "zeros.zip"
    block = bytes(MB)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("study/zeros.raw", "w") as entry,
    ):
        for _ in range(ZEROS_BYTES // MB):
            entry.write(block)
    return path


def uploads(server) -> list[Path]:
    return sorted((server.work / "uploads").iterdir())


def part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def multipart(archive: bytes, fields: dict) -> bytes:
    """An upload body: the 'request' part, the 'archive' part and the closing boundary."""
    return (
        part("request", json.dumps(fields).encode())
        + part("archive", archive, "study.zip")
        + f"--{BOUNDARY}--\r\n".encode()
    )


def chunked(data: bytes, size: int = MB) -> Iterator[bytes]:
    """``data`` as a body of unknown length: httpx sends it with Transfer-Encoding: chunked."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def post_upload(server, content: bytes | Iterator[bytes], route: str = "/infer_file"):
    return httpx.post(
        f"{server.url}{route}",
        content=content,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=WAIT_S,
    )


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def unpacking(server) -> bool:
    """Whether the zeros entry is being written: present, and short of its size."""
    for path in server.work.glob("uploads/*/study/study/zeros.raw"):
        try:
            return path.stat().st_size < ZEROS_BYTES
        except FileNotFoundError:
            return False
    return False


def test_livez_answers_within_a_second_while_a_1_gib_archive_unpacks(served, zeros_zip):
    """The archive unpacks, then the request fails (its series is not in it): /livez, polled
    every 50 ms from the start of the unpack to the answer, answers within a second."""
    answer: list[httpx.Response] = []
    body = multipart(zeros_zip.read_bytes(), MISSING_SERIES)
    sender = threading.Thread(target=lambda: answer.append(post_upload(served, body)))
    sender.start()
    wait_for(lambda: any(served.work.glob("uploads/*/study")), "the unpack to start")
    latencies, polls_while_unpacking = [], 0
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as client:
        while sender.is_alive():
            polls_while_unpacking += unpacking(served)
            started = time.monotonic()
            assert client.get("/livez").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(LIVEZ_POLL_S)
    sender.join()
    worst = max(latencies)
    print(
        f"/livez worst latency over a 1 GiB unpack: {worst * 1000:.0f} ms "
        f"({len(latencies)} polls, {polls_while_unpacking} while the entry was being written)"
    )
    assert polls_while_unpacking > 0
    assert worst < 1.0
    assert answer[0].status_code == 404, answer[0].text
    assert "input series T9 does not exist" in answer[0].json()["error"]
    assert uploads(served) == []


def unfinished_chunked_post(server, route: str, body: bytes) -> tuple[int, dict]:
    """POST ``body`` in chunks (no Content-Length) and never send its last chunk: only a server
    that counts the bytes as they arrive can answer. Its status and JSON body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as connection:
        connection.sendall(
            f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
        )
        for chunk in chunked(body):
            connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        reader = connection.makefile("rb")
        status = int(reader.readline().split()[1])
        headers = dict(line.decode().split(":", 1) for line in iter(reader.readline, b"\r\n"))
        lengths = [value for name, value in headers.items() if name.lower() == "content-length"]
        return status, json.loads(reader.read(int(lengths[0])))


@pytest.mark.parametrize("route", ["/infer_file", "/jobs/upload"])
def test_a_chunked_upload_over_the_bound_is_413_before_it_ends_and_leaves_nothing(served, route):
    body = multipart(os.urandom(3 * MB), MISSING_SERIES)
    status, answer = unfinished_chunked_post(served, route, body[: -len(f"--{BOUNDARY}--\r\n")])
    assert status == 413, answer
    assert "NNUNET_BENTO_MAX_UPLOAD_MB (2 MB)" in answer["error"]
    assert uploads(served) == []


def test_an_upload_past_admission_is_503_before_its_body_is_read(served):
    """The only place is held by an upload whose body is still on its way; a second upload, of
    a body far past the upload bound, gets the 503 that admission answers, not the 413 that
    reading it would."""
    release = threading.Event()

    def held_body() -> Iterator[bytes]:
        yield part("request", json.dumps(MISSING_SERIES).encode())
        yield part("archive", b"not an archive", "study.zip")
        release.wait(WAIT_S)
        yield f"--{BOUNDARY}--\r\n".encode()

    first: list[httpx.Response] = []
    holder = threading.Thread(target=lambda: first.append(post_upload(served, held_body())))
    holder.start()
    try:
        wait_for(lambda: uploads(served), "the first upload to be admitted")
        for route in ("/infer_file", "/jobs/upload"):
            body = multipart(bytes(64 * MB), MISSING_SERIES)
            response = post_upload(served, chunked(body), route)
            assert response.status_code == 503, response.text
            assert "NNUNET_BENTO_MAX_QUEUE" in response.json()["error"]
            assert response.headers["Retry-After"]
        response = httpx.post(
            f"{served.url}/jobs",
            content=b"{" * (64 * MB),
            timeout=WAIT_S,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 503, response.text
    finally:
        release.set()
        holder.join()
    assert first[0].status_code == 400 and "not a zip" in first[0].json()["error"]
    assert uploads(served) == []


@pytest.mark.parametrize(
    ("filler_mb", "refusal"),
    [
        (MAX_WORK_MB - 0.5, "the upload does not fit in the work folder"),
        (100, "the archive's unpacked size"),
    ],
    ids=["archive", "declared unpacked size"],
)
def test_an_upload_that_does_not_fit_the_work_folder_is_507_and_leaves_nothing(
    served, zeros_zip, filler_mb, refusal
):
    """The work folder holds a (sparse) file of ``filler_mb``: the 1 GiB archive's own bytes,
    or the size its entries declare, do not fit in what is left."""
    filler = served.work / "pulls" / "filler"
    with filler.open("wb") as stream:
        stream.truncate(int(filler_mb * MB))
    try:
        response = post_upload(served, multipart(zeros_zip.read_bytes(), MISSING_SERIES))
    finally:
        filler.unlink()
    assert response.status_code == 507, response.text
    message = response.json()["error"]
    assert refusal in message and f"NNUNET_BENTO_MAX_WORK_MB ({MAX_WORK_MB} MB)" in message
    assert str(served.work) not in message
    assert uploads(served) == []


@pytest.mark.parametrize("sent", ["with its length", "chunked"])
def test_a_job_body_over_the_bound_is_413(served, sent):
    body = json.dumps({"nnunet_id": "organ2d", "padding": "x" * (2 * MB)}).encode()
    response = httpx.post(
        f"{served.url}/jobs",
        content=body if sent == "with its length" else chunked(body),
        headers={"Content-Type": "application/json"},
        timeout=WAIT_S,
    )
    assert response.status_code == 413, response.text
    assert "larger than 1 MiB, the bound on JSON bodies" in response.json()["error"]
