"""Download a TotalSegmentator task's weights, checked, into the weights folder.

The URL is the one the installed ``totalsegmentator`` package downloads: the task id's release
and folder name come from its ``map_tasks_config.TASK_ID_WEIGHTS_CONFIGS``; the base URL and the
``f"{url}/{version}/{filename}.zip"`` template are local to ``libs.download_pretrained_weights``
and are read from that function's source (``inspect`` + ``ast``). Checked against
totalsegmentator 2.17.0 and 2.18.0 (2.17.0 introduced that table; ``totalseg.py`` needs it too);
another layout fails with an error naming the installed version.

The package's own download is not used: it extracts unchecked into the live weights folder.
Here the archive goes to a temporary folder inside the weights folder, every entry is checked
before anything is extracted, and the task's ``Dataset<id>_*`` folder is moved into place in one
rename. A failure leaves nothing behind.
"""

import ast
import fnmatch
import importlib.metadata
import inspect
import io
import itertools
import logging
import os
import re
import stat
import tempfile
import textwrap
import zipfile
import zlib
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from ..errors import ModelFolderError
from .totalseg import TotalsegTask, task_folder

logger = logging.getLogger("nnunet_bento")

MAX_BYTES = 20 * 2**30
MAX_ENTRIES = 100_000
CHUNK_BYTES = 2**20
PROGRESS_INTERVAL_S = 10.0
CHECKED_VERSIONS = "2.17.0 and 2.18.0"
REQUIRED_FILES = frozenset({"dataset.json", "plans.json"})
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Refused(Exception):
    """A download or archive problem, in words for the operator."""


_FAILURES = (_Refused, httpx.HTTPError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


def download_task_weights(
    task: TotalsegTask,
    weights: Path,
    url_base: str | None = None,
    *,
    timeout_s: float = 60.0,
    max_bytes: int = MAX_BYTES,
    max_entries: int = MAX_ENTRIES,
) -> Path:
    """Download, check and move the task's weights into ``weights``; returns its task folder."""
    try:
        url = _url(task, url_base)
    except _Refused as exc:
        raise _failure(task, weights, f"no download URL: {exc}") from None
    created = _missing_folders(weights)
    try:
        weights.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=weights) as temp:
            logger.info("TotalSegmentator task %r: downloading %s into %s", task.name, url, weights)
            _install(task, url, Path(temp), weights, timeout_s, max_bytes, max_entries)
    except _FAILURES as exc:
        raise _failure(task, weights, f"download from {url} failed: {_reason(exc)}") from exc
    finally:
        _remove_empty(created)
    folder = task_folder(task, weights)
    logger.info("TotalSegmentator task %r: weights installed at %s", task.name, folder)
    return folder


def _failure(task: TotalsegTask, weights: Path, what: str) -> ModelFolderError:
    """The one-line error: what failed, and where the weights are missing."""
    return ModelFolderError(
        f"TotalSegmentator task {task.name!r}: {what}; no weights at "
        f"{weights / task.folder_pattern}; copy TotalSegmentator's weights there or set "
        "TOTALSEG_WEIGHTS_PATH"
    )


def _reason(exc: BaseException) -> str:
    """An exception as one line."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, _Refused) else f"{type(exc).__name__}: {text}"


def _url(task: TotalsegTask, url_base: str | None) -> str:
    """The package's URL for the task over HTTPS, or its file name under ``url_base`` (whose
    scheme, http included, is the operator's choice)."""
    url = _package_url(task.task_id)
    if url_base:
        return f"{url_base.rstrip('/')}/{url.rsplit('/', 1)[1]}"
    return "https://" + url.removeprefix("http://").removeprefix("https://")


def _package_version() -> str:
    """The installed totalsegmentator version."""
    try:
        return importlib.metadata.version("totalsegmentator")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _structure_error(detail: str) -> _Refused:
    """The package's download code is not laid out as this module expects."""
    return _Refused(
        f"cannot read the weights URL from totalsegmentator {_package_version()} ({detail}); "
        f"this reads the layout of totalsegmentator {CHECKED_VERSIONS}"
    )


def _package_url(task_id: int) -> str:
    """The URL that ``totalsegmentator.libs.download_pretrained_weights`` downloads for the id."""
    try:
        from totalsegmentator import libs
        from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
        from totalsegmentator.map_to_binary import commercial_models
    except ImportError as exc:
        raise _structure_error(str(exc)) from None
    info = TASK_ID_WEIGHTS_CONFIGS.get(task_id)
    if info is None:
        raise _Refused(
            f"totalsegmentator {_package_version()} has no weights for task id {task_id}"
        )
    if info.get("commercial") or task_id in commercial_models.values():
        raise _Refused(
            f"task id {task_id} is a licensed model, served by TotalSegmentator's "
            "license server only"
        )
    try:
        source = textwrap.dedent(inspect.getsource(libs.download_pretrained_weights))
    except (OSError, TypeError) as exc:
        raise _structure_error(f"no source: {exc}") from None
    function = ast.parse(source)
    names = _local_strings(function, info)
    url = "".join(_render(part, names, task_id) for part in _zip_template(function).values)
    if not url.startswith(("https://", "http://")):
        raise _structure_error(f"{url!r} is not an http(s) URL")
    return url


def _local_strings(function: ast.AST, info: dict[str, Any]) -> dict[str, list[Any]]:
    """Each local name's assigned values: string literals and keys of the task's table entry."""
    entries = {
        node.targets[0].id
        for node in _name_assignments(function)
        if isinstance(node.value, ast.Subscript)
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "TASK_ID_WEIGHTS_CONFIGS"
    }
    values: dict[str, list[Any]] = {}
    for node in _name_assignments(function):
        value = node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            values.setdefault(node.targets[0].id, []).append(value.value)
        elif (key := _entry_key(value, entries)) is not None:
            values.setdefault(node.targets[0].id, []).append(info.get(key))
    return values


def _name_assignments(function: ast.AST) -> list[ast.Assign]:
    """The assignments of one value to one plain name."""
    return [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    ]


def _entry_key(value: ast.expr, entries: set[str]) -> str | None:
    """``key`` for ``entry.get("key")`` or ``entry["key"]`` on a table entry, else None."""
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "get"
        and len(value.args) == 1
    ):
        target, key = value.func.value, value.args[0]
    elif isinstance(value, ast.Subscript):
        target, key = value.value, value.slice
    else:
        return None
    is_entry = isinstance(target, ast.Name) and target.id in entries
    is_key = isinstance(key, ast.Constant) and isinstance(key.value, str)
    return key.value if is_entry and is_key else None


def _zip_template(function: ast.AST) -> ast.JoinedStr:
    """The one f-string in the function that ends with ``.zip``."""
    templates = [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.JoinedStr)
        and isinstance(node.values[-1], ast.Constant)
        and str(node.values[-1].value).endswith(".zip")
    ]
    if len(templates) != 1:
        raise _structure_error(f"{len(templates)} f-strings ending in .zip, expected 1")
    return templates[0]


def _render(part: ast.expr, names: dict[str, list[Any]], task_id: int) -> str:
    """One part of the URL template, filled in for the task."""
    if isinstance(part, ast.Constant):
        return str(part.value)
    if not (
        isinstance(part, ast.FormattedValue)
        and isinstance(part.value, ast.Name)
        and part.conversion == -1
        and part.format_spec is None
    ):
        raise _structure_error(f"unexpected URL template part {ast.unparse(part)!r}")
    name = part.value.id
    values = names.get(name, [])
    if len(values) != 1:
        raise _structure_error(f"{len(values)} string assignments to {name!r}, expected 1")
    if not isinstance(values[0], str) or values[0] in ("", "TODO"):
        raise _Refused(
            f"totalsegmentator {_package_version()} has no download for task id {task_id} "
            f"({name} is {values[0]!r})"
        )
    return values[0]


def _missing_folders(folder: Path) -> list[Path]:
    """The folder and those of its parents that do not exist yet, deepest first."""
    return list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a download created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _install(
    task: TotalsegTask,
    url: str,
    temp: Path,
    weights: Path,
    timeout_s: float,
    max_bytes: int,
    max_entries: int,
) -> None:
    """Download into ``temp``, check, extract there, then move the dataset folder to weights."""
    archive_path = temp / "weights.zip"
    _fetch(task, url, archive_path, timeout_s, max_bytes)
    if not zipfile.is_zipfile(archive_path):
        raise _Refused("the response is not a zip archive")
    extracted = temp / "extracted"
    with zipfile.ZipFile(archive_path) as archive:
        dataset = _check_archive(archive, task, max_bytes, max_entries)
        archive.extractall(extracted)
    target = weights / dataset
    if os.path.lexists(target):
        raise _Refused(f"{target} already exists; refusing to merge into it")
    os.replace(extracted / dataset, target)


class _LogStream(io.TextIOBase):
    """A text stream that logs each non-empty line written to it (tqdm's progress)."""

    def write(self, text: str) -> int:
        line = text.strip()
        if line:
            logger.info(line)
        return len(text)


def _fetch(task: TotalsegTask, url: str, path: Path, timeout_s: float, max_bytes: int) -> None:
    """Stream ``url`` into ``path``, logging progress every ``PROGRESS_INTERVAL_S``."""
    with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response:
        hops = [*response.history, response]
        if url.startswith("https://") and any(hop.url.scheme != "https" for hop in hops):
            raise _Refused("a redirect leaves HTTPS")
        if not response.is_success:
            raise _Refused(f"HTTP {response.status_code} {response.reason_phrase}")
        size = int(response.headers.get("Content-Length", 0)) or None
        with (
            path.open("wb") as file,
            tqdm(
                total=size,
                desc=f"TotalSegmentator {task.name}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=_LogStream(),
                mininterval=PROGRESS_INTERVAL_S,
                ascii=True,
            ) as progress,
        ):
            for chunk in response.iter_bytes(CHUNK_BYTES):
                file.write(chunk)
                progress.update(len(chunk))
                if progress.n > max_bytes:
                    raise _Refused(f"the download is larger than {max_bytes} bytes")


def _check_archive(
    archive: zipfile.ZipFile, task: TotalsegTask, max_bytes: int, max_entries: int
) -> str:
    """Check every entry before anything is extracted; returns the task's dataset folder name."""
    entries = archive.infolist()
    if len(entries) > max_entries:
        raise _Refused(f"the archive has {len(entries)} entries, more than {max_entries}")
    size = sum(entry.file_size for entry in entries)
    if size > max_bytes:
        raise _Refused(f"the archive unpacks to {size} bytes, more than {max_bytes} bytes")
    for entry in entries:
        _check_entry(entry)
    return _dataset_folder([entry.filename for entry in entries], task)


def _check_entry(entry: zipfile.ZipInfo) -> None:
    """Refuse an entry that would land outside the folder or is not a plain file or folder."""
    name = entry.filename
    if name.startswith("/") or "\\" in name or _DRIVE.match(name):
        raise _Refused(f"archive entry {name!r} has an absolute or non-portable path")
    if any(part in ("", ".", "..") for part in name.removesuffix("/").split("/")):
        raise _Refused(f"archive entry {name!r} has an empty, '.' or '..' path component")
    kind = stat.S_IFMT(entry.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise _Refused(f"archive entry {name!r} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _Refused(f"archive entry {name!r} is not a regular file or folder")
    if entry.flag_bits & 0x1:
        raise _Refused(f"archive entry {name!r} is encrypted")


def _dataset_folder(names: list[str], task: TotalsegTask) -> str:
    """The one top-level folder holding the task's result folder with its dataset and plans."""
    dataset_pattern, run = task.folder_pattern.split("/")
    files: dict[str, set[str]] = {}
    for name in names:
        top, *rest = name.split("/")
        if fnmatch.fnmatchcase(top, dataset_pattern) and len(rest) == 2 and rest[0] == run:
            files.setdefault(top, set()).add(rest[1])
    complete = sorted(top for top, found in files.items() if found >= REQUIRED_FILES)
    if len(complete) != 1:
        raise _Refused(
            f"the archive holds {len(complete)} folders {task.folder_pattern}/ with "
            f"{' and '.join(sorted(REQUIRED_FILES))}, expected 1"
        )
    return complete[0]
