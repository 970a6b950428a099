"""Downloading TotalSegmentator weights from a local HTTP server: checked, all or nothing."""

import logging
import socket
import stat
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

from nnunet_bento.catalog.registry import WeightsSource, build_registry
from nnunet_bento.catalog.spec import ModelEntry, ServeSpec
from nnunet_bento.catalog.totalseg import parse_task, task_folder
from nnunet_bento.catalog.weights_download import download_task_weights
from nnunet_bento.errors import ModelFolderError

DEMO = Path(__file__).resolve().parents[1] / "examples" / "models" / "organ"
TASK = parse_task("total_fastest")
RUN = f"{TASK.trainer}__{TASK.plans}__{TASK.configuration}"
DATASET = f"Dataset{TASK.task_id:03d}_demo"
ZIP_NAME = f"{TASK_ID_WEIGHTS_CONFIGS[TASK.task_id]['foldername']}.zip"


class Handler(BaseHTTPRequestHandler):
    """``/files/NAME`` serves the root's file; ``/missing``, ``/drop``, ``/html`` and
    ``/redirect`` answer 404, cut the body short, send an HTML page, or redirect to it."""

    def do_GET(self) -> None:
        mode, _, name = self.path.lstrip("/").partition("/")
        path = self.server.root / name
        if mode == "missing" or not path.is_file():
            self.send_error(404)
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/files/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"<html><body>rate limited</body></html>" if mode == "html" else path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if mode == "html" else "application/zip")
        self.send_header("Content-Length", str(len(body) * 2 if mode == "drop" else len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "drop" else body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Server:
    url: str
    root: Path

    def serve(self, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> None:
        """Serve a zip of these entries under the package's file name for the task."""
        with zipfile.ZipFile(self.root / ZIP_NAME, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in entries:
                archive.writestr(name, data)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.root = root
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_port}", root)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def demo_entries(dataset: str = DATASET, skip: str = "") -> list[tuple[str, bytes]]:
    """The demo model's files as a TotalSegmentator weights zip lays them out."""
    return [
        (f"{dataset}/{RUN}/{path.relative_to(DEMO).as_posix()}", path.read_bytes())
        for path in sorted(DEMO.rglob("*"))
        if path.is_file() and path.name != skip
    ]


def listing(folder: Path) -> list[str] | None:
    """Everything under the folder, or None if it does not exist."""
    if not folder.exists():
        return None
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """An existing weights folder with another model in it."""
    folder = tmp_path / "weights"
    (folder / "Dataset291_other").mkdir(parents=True)
    (folder / "Dataset291_other" / "keep.txt").write_text("keep")
    return folder


def refused(url_base: str | None, weights: Path, **limits: int) -> str:
    """Download, expecting ModelFolderError; returns its message."""
    with pytest.raises(ModelFolderError) as error:
        download_task_weights(TASK, weights, url_base, timeout_s=5, **limits)
    message = str(error.value)
    assert "\n" not in message
    assert str(weights / TASK.folder_pattern) in message, "names the missing path"
    return message


def test_download_installs_the_task_folder_byte_identical(server, tmp_path, caplog):
    server.serve(demo_entries())
    weights = tmp_path / "new" / "weights"
    with caplog.at_level(logging.INFO, logger="nnunet_bento"):
        folder = download_task_weights(TASK, weights, f"{server.url}/redirect/", timeout_s=5)
    assert folder == weights / DATASET / RUN == task_folder(TASK, weights)
    for name, data in demo_entries():
        assert (weights / name).read_bytes() == data
    assert listing(weights) == [
        DATASET,
        f"{DATASET}/{RUN}",
        *sorted(f"{DATASET}/{RUN}/{p.relative_to(DEMO).as_posix()}" for p in DEMO.rglob("*")),
    ], "no temporary folder or zip left behind"
    url = f"{server.url}/redirect/{ZIP_NAME}"
    assert any(url in m and str(weights) in m for m in caplog.messages), "a start line"


def test_the_download_url_is_what_the_installed_package_downloads(monkeypatch, tmp_path):
    from totalsegmentator import libs

    requested = []

    class Captured(Exception):
        pass

    def capture(url: str, folder: Path) -> None:
        requested.append(url)
        raise Captured

    monkeypatch.setattr(libs, "get_weights_dir", lambda: tmp_path)
    monkeypatch.setattr(libs, "download_url_and_unpack", capture)
    monkeypatch.setattr(libs, "requests", None)  # never the network
    with pytest.raises(Captured):
        libs.download_pretrained_weights(TASK.task_id)
    [url] = requested
    assert url.startswith("https://") and url.endswith(f"/{ZIP_NAME}")
    # through a proxy that refuses connections, so never the network
    with socket.socket() as proxy:  # bound, not listening
        proxy.bind(("127.0.0.1", 0))
        for name in ("https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        message = refused(None, tmp_path / "weights", max_bytes=1)
    assert f"download from {url} failed" in message


def test_http_404_names_the_url_and_removes_the_weights_folder_it_created(server, tmp_path):
    server.serve(demo_entries())
    weights = tmp_path / "new" / "weights"
    message = refused(f"{server.url}/missing", weights)
    assert f"{server.url}/missing/{ZIP_NAME}" in message and "HTTP 404" in message
    assert not (tmp_path / "new").exists()


def test_dropped_connection_leaves_the_weights_folder_as_it_was(server, weights):
    server.serve(demo_entries())
    before = listing(weights)
    message = refused(f"{server.url}/drop", weights)
    assert f"{server.url}/drop/{ZIP_NAME}" in message
    assert listing(weights) == before


def test_a_non_zip_body_is_refused(server, weights):
    server.serve(demo_entries())
    before = listing(weights)
    assert "the response is not a zip archive" in refused(f"{server.url}/html", weights)
    assert listing(weights) == before


def symlink_entry() -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(f"{DATASET}/{RUN}/fold_0/link")
    entry.create_system = 3
    entry.external_attr = (stat.S_IFLNK | 0o777) << 16
    return entry


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("../../../evil", "'..' path component"),
        ("{tmp}/evil", "absolute"),
        (f"{DATASET}\\..\\..\\evil", "non-portable"),
        ("C:evil", "non-portable"),
        (symlink_entry(), "symbolic link"),
    ],
    ids=["parent", "absolute", "backslash", "drive", "symlink"],
)
def test_an_unsafe_entry_refuses_the_whole_archive(server, weights, tmp_path, entry, reason):
    if isinstance(entry, str):
        entry = entry.format(tmp=tmp_path)
    server.serve([*demo_entries(), (entry, b"evil")])
    before = listing(weights)
    assert reason in refused(f"{server.url}/files", weights)
    assert listing(weights) == before
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    "entries",
    [demo_entries(dataset="Dataset297_demo"), demo_entries(skip="plans.json")],
    ids=["other-task", "no-plans"],
)
def test_an_archive_without_the_task_folder_is_refused(server, weights, entries):
    server.serve(entries)
    before = listing(weights)
    message = refused(f"{server.url}/files", weights)
    assert f"holds 0 folders {TASK.folder_pattern}/ with dataset.json and plans.json" in message
    assert listing(weights) == before


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"max_entries": 2}, "the archive has 5 entries, more than 2"),
        ({"max_bytes": 2**20}, f"more than {2**20} bytes"),
        ({"max_bytes": 1000}, "the download is larger than 1000 bytes"),
    ],
    ids=["entries", "unpacked-bytes", "downloaded-bytes"],
)
def test_an_archive_past_the_limits_is_refused(server, weights, limits, reason):
    server.serve([*demo_entries(), ("zeros", bytes(2**20))])
    before = listing(weights)
    assert reason in refused(f"{server.url}/files", weights, **limits)
    assert listing(weights) == before


def test_an_existing_dataset_folder_is_not_merged_into(server, weights):
    server.serve(demo_entries())
    (weights / DATASET).mkdir()
    before = listing(weights)
    message = refused(f"{server.url}/files", weights)
    assert f"{weights / DATASET} already exists" in message
    assert listing(weights) == before


def test_an_unknown_package_layout_names_the_installed_version(monkeypatch, weights):
    import importlib.metadata

    from totalsegmentator import libs

    def download_pretrained_weights(task_id: int) -> None:
        url = "https://example.invalid/" + str(task_id) + ".zip"  # no f-string template
        print(url)

    monkeypatch.setattr(libs, "download_pretrained_weights", download_pretrained_weights)
    version = importlib.metadata.version("totalsegmentator")
    before = listing(weights)
    message = refused(None, weights)
    assert (
        f"no download URL: cannot read the weights URL from totalsegmentator {version} " in message
    )
    assert "0 f-strings" in message
    assert listing(weights) == before


def test_start_up_downloads_a_missing_task_when_asked(server, tmp_path):
    server.serve(demo_entries())
    spec = ServeSpec(models=[ModelEntry(id="total", totalseg_task="total_fastest")])
    weights = tmp_path / "weights"
    registry = build_registry(
        spec, WeightsSource(weights, download=True, url_base=f"{server.url}/files")
    )
    assert registry.get("total").folder == weights / DATASET / RUN
    assert registry.disabled == {}


def test_start_up_without_download_disables_the_task(server, tmp_path):
    server.serve(demo_entries())
    spec = ServeSpec(models=[ModelEntry(id="total", totalseg_task="total_fastest")])
    registry = build_registry(
        spec, WeightsSource(tmp_path / "weights", url_base=f"{server.url}/files")
    )
    assert "total" in registry.disabled
    assert not (tmp_path / "weights").exists(), "nothing downloaded"
