"""Shared fixtures: a private Bento model store with the demo models, and served instances."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = ("organ", "organ2d", "lesion", "organ_nomirror")
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="nnunet-bento-store-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def demo_model_dirs() -> dict[str, Path]:
    return {name: REPO / "examples" / "models" / name for name in DEMO_MODELS}


@pytest.fixture(scope="session")
def demo_study() -> Path:
    return REPO / "examples" / "study"


def import_demo_models() -> dict[str, str]:
    """The demo models in the current Bento model store (BENTOML_HOME): id -> tag."""
    from nnunet_bento.catalog.store import import_model

    return {
        name: import_model(REPO / "examples" / "models" / name, name).tag for name in DEMO_MODELS
    }


@pytest.fixture(scope="session")
def imported_models() -> dict[str, str]:
    """The demo models in the test session's Bento model store: id -> tag."""
    return import_demo_models()


def cli_predict(*args: str) -> subprocess.CompletedProcess:
    """`nnunet-bento predict ARGS` run from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "nnunet_bento.cli", "predict", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    """A running `bentoml serve` process and a client for it."""

    url: str
    client: object
    process: subprocess.Popen
    log: Path


@contextmanager
def bentoml_serve(
    spec: Path,
    log: Path,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    token: str | None = None,
) -> Iterator[Served]:
    """Start `bentoml serve service:SegmentationService` (or ``command``) from the repository
    root, on a free port that is appended as ``--port``, with ``env`` added to the
    environment; the client sends ``token``."""
    import bentoml

    port = free_port()
    env = {**os.environ, "MODEL_SERVE_SPEC": str(spec), **(env or {})}
    serve = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:SegmentationService",
        "--host",
        "127.0.0.1",
    ]
    command = [*(command or serve), "--port", str(port)]
    with open(log, "wb") as log_stream:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        client = bentoml.SyncHTTPClient(url, server_ready_timeout=180, timeout=600, token=token)
        yield Served(url, client, process, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
