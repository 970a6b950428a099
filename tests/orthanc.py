"""A real Orthanc (Debian's package, DICOMweb plugin) on free loopback ports, for the PACS tests.

Installed by scripts/install-orthanc. Authentication is off, remote access refused, storage
in a temporary folder, and our AE (NNUNET_BENTO on 127.0.0.1) is a known modality, so C-FIND
and C-GET from it are allowed.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"
OUR_AE_TITLE = "NNUNET_BENTO"
START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_orthanc() -> None:
    """Skip without Orthanc and its DICOMweb plugin; under CI (CI set), fail instead."""
    if shutil.which(ORTHANC) and DICOMWEB_PLUGIN.is_file():
        return
    message = "Orthanc with its DICOMweb plugin is not installed: run scripts/install-orthanc"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Orthanc:
    """A running Orthanc: its ports, its REST API and its process."""

    http_port: int
    dicom_port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def upload(self, files: list[Path] | list[bytes]) -> None:
        """Store DICOM files (paths or bytes) through the REST API."""
        with self.rest() as client:
            for item in files:
                body = item if isinstance(item, bytes) else Path(item).read_bytes()
                client.post("/instances", content=body).raise_for_status()

    def study_instances(self, study_uid: str) -> list[dict]:
        """Orthanc's /studies/{id}/instances for a StudyInstanceUID."""
        with self.rest() as client:
            found = client.post("/tools/lookup", content=study_uid).raise_for_status().json()
            (study,) = [item["ID"] for item in found if item["Type"] == "Study"]
            return client.get(f"/studies/{study}/instances").raise_for_status().json()

    def instance_count(self) -> int:
        with self.rest() as client:
            return client.get("/statistics").raise_for_status().json()["CountInstances"]

    def stop(self) -> None:
        """SIGKILL: Orthanc gone at once, as in a crash."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def config(storage: Path, http_port: int, dicom_port: int) -> dict:
    """Orthanc's configuration for the tests."""
    return {
        "Name": "nnunet-bento-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "DicomModalities": {
            "nnunet_bento": {"AET": OUR_AE_TITLE, "Host": "127.0.0.1", "Port": free_port()}
        },
        "DicomScpTimeout": 10,
        "SaveJobs": False,
        "SyncStorageArea": False,
        "StableAge": 1,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "LuaScripts": [],
    }


@contextmanager
def orthanc(folder: Path) -> Iterator[Orthanc]:
    """Start Orthanc with its storage and log in ``folder``; stop it on exit."""
    require_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    (folder / "orthanc.json").write_text(
        json.dumps(config(folder / "storage", http_port, dicom_port), indent=2)
    )
    log = folder / "orthanc.log"
    with open(log, "wb") as log_stream:
        process = subprocess.Popen(
            [ORTHANC, str(folder / "orthanc.json")],
            stdout=log_stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    server = Orthanc(http_port, dicom_port, process, log)
    try:
        _wait_until_up(server)
        yield server
    finally:
        server.stop()


def _wait_until_up(server: Orthanc) -> None:
    """Wait until the REST API answers and the DICOM port accepts connections."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited at start-up:\n{server.log.read_text()[-3000:]}")
        try:
            httpx.get(f"{server.url}/system", timeout=1).raise_for_status()
            socket.create_connection(("127.0.0.1", server.dicom_port), timeout=1).close()
            return
        except (httpx.HTTPError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s")
