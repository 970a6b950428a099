"""Whole outputs: a request's files are staged in a hidden folder inside output_dir and
replace the previous results as a whole when the request succeeds.

- A manifest (``.nnunet-bento-results.json``) lists the files of the results in a folder. A
  folder with a manifest is refused (409) unless the request says ``overwrite``; then every
  file of the old results is removed as the new ones move in, so none of them survives.
- One request at a time per folder: a lock file in the work folder, keyed by the resolved
  output_dir, is held from the start of the request to its end; a second request gets a 409.
  The lock file goes when its lock is released.
- Nothing is created before the first file is written, and a failure removes the staging
  folder and every folder this request created: output_dir is left as it was found.
- A link inside output_dir where the commit would move, replace or remove a file (a
  ``stage_N`` folder, an output file, the manifest) is refused (403) before anything moves:
  nothing outside the output root is moved, replaced or deleted.
- Each staging folder is recorded in the work folder while it lives, so that the folders of
  a crashed server are removed at the next start (``remove_stale_staging``).
"""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ..errors import (
    ConflictError,
    ForbiddenPathError,
    InsufficientStorageError,
    NnunetBentoError,
)

MANIFEST = ".nnunet-bento-results.json"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 1 << 20


class OutputStaging:
    """Stages one request's files and commits them into ``output_dir`` as a whole."""

    def __init__(
        self, output_dir: Path, work_dir: Path, *, overwrite: bool, shown: str = "output_dir"
    ):
        self.output_dir = Path(output_dir)
        self.work_dir = work_dir
        self.shown = shown
        self.token = uuid.uuid4().hex
        self.staging_dir = self.output_dir / f".staging-{self.token}"
        self.record = work_dir / "staging" / self.token
        self.relative_paths: list[Path] = []
        self.created: list[Path] = []
        self._lock = self._acquire_lock()
        if (self.output_dir / MANIFEST).is_file() and not overwrite:
            self._release_lock()
            raise ConflictError(
                f"{shown} already holds results; set overwrite to replace them, or choose "
                "another output_dir"
            )

    def _acquire_lock(self) -> int:
        """An exclusive lock on the resolved output_dir; 409 when another request holds it.

        The lock file is removed when the lock is released, so a lock taken on a file that
        its holder has just removed is let go and taken again on the new file."""
        locks = self.work_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(str(self.output_dir.resolve()).encode()).hexdigest()[:32]
        self._lock_path = locks / f"{key}.lock"
        while True:
            descriptor = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise ConflictError(
                    f"another request is writing to {self.shown}; wait for it to finish"
                ) from None
            if _same_file(descriptor, self._lock_path):
                return descriptor
            os.close(descriptor)

    def _release_lock(self) -> None:
        """Remove the lock file while the lock is held, then let the lock go."""
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock)

    def _create_staging(self) -> None:
        """Create output_dir (remembering which folders were new) and the staging folder."""
        missing = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            self.created.append(folder)
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.record.write_text(str(self.staging_dir))
        self.staging_dir.mkdir()

    def path(self, relative: str | Path) -> Path:
        """Where to write the file that will end up at ``output_dir/relative``."""
        if not self.staging_dir.exists():
            self.guard(self._create_staging)
        relative = Path(relative)
        if relative not in self.relative_paths:
            self.relative_paths.append(relative)
        target = self.staging_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def final_path(self, relative: str | Path) -> Path:
        return self.output_dir / relative

    def guard(self, write: Callable[[], object]) -> None:
        """Run ``write``; an OSError becomes an error that names the folder, not the path."""
        try:
            write()
        except OSError as error:
            raise self.write_error(error) from error

    def write_error(self, error: BaseException) -> NnunetBentoError:
        """The error to answer when writing into output_dir failed."""
        full = getattr(error, "errno", None) in FULL_DISK or "No space left" in str(error)
        if full or _free_bytes(self.output_dir) < LOW_SPACE_BYTES:
            return InsufficientStorageError(
                f"the disk of {self.shown} is full; free space there and retry"
            )
        reason = os.strerror(error.errno) if getattr(error, "errno", None) else type(error).__name__
        return NnunetBentoError(f"cannot write the outputs into {self.shown}: {reason}")

    def written(self) -> list[Path]:
        """The relative paths of the files this request wrote."""
        return [p for p in self.relative_paths if (self.staging_dir / p).is_file()]

    def commit(self) -> None:
        """Replace the previous results with this request's files, all or nothing."""
        if not self.staging_dir.exists():
            return
        new = self.written()
        self._refuse_links([Path(MANIFEST)])
        previous = self._previous_results()
        self._refuse_links([*new, *previous])
        trash = self.output_dir / f".replaced-{self.token}"
        moved_out: list[Path] = []
        moved_in: list[Path] = []
        try:
            for relative in previous:
                _move(self.output_dir / relative, trash / relative)
                moved_out.append(relative)
            for relative in new:
                _move(self.staging_dir / relative, self.output_dir / relative)
                moved_in.append(relative)
            self._write_manifest(new)
        except OSError as error:
            for relative in moved_in:
                _move(self.output_dir / relative, self.staging_dir / relative)
            for relative in moved_out:
                _move(trash / relative, self.output_dir / relative)
            raise self.write_error(error) from error
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        _remove_empty_folders(self.output_dir, [p for p in previous if p not in new])

    def _refuse_links(self, relatives: list[Path]) -> None:
        """A 403 when a file or folder that the commit would move or replace inside
        output_dir is a link: nothing outside the output root is ever touched."""
        for relative in relatives:
            for depth in range(1, len(relative.parts) + 1):
                if (self.output_dir / Path(*relative.parts[:depth])).is_symlink():
                    raise ForbiddenPathError(
                        f"output_dir: {Path(*relative.parts[:depth])} inside it is a link; "
                        "remove it, or write into another folder"
                    )

    def _previous_results(self) -> list[Path]:
        """The files the manifest of the earlier results lists (that still exist)."""
        manifest = self.output_dir / MANIFEST
        if not manifest.is_file():
            return []
        try:
            listed = json.loads(manifest.read_text()).get("files", [])
        except (ValueError, AttributeError):
            listed = []
        files = [Path(name) for name in listed if isinstance(name, str)]
        safe = [p for p in files if not p.is_absolute() and ".." not in p.parts]
        return [p for p in safe if (self.output_dir / p).is_file()]

    def _write_manifest(self, files: list[Path]) -> None:
        temporary = self.staging_dir / MANIFEST
        temporary.write_text(json.dumps({"files": sorted(p.as_posix() for p in files)}, indent=2))
        os.replace(temporary, self.output_dir / MANIFEST)

    def discard(self) -> None:
        """Remove the staging folder, and the folders this request created if they are empty."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break

    def close(self) -> None:
        """Forget the staging record and release the lock."""
        self.record.unlink(missing_ok=True)
        self._release_lock()

    def __enter__(self) -> "OutputStaging":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()
            self.close()


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _free_bytes(folder: Path) -> int:
    """Free bytes on the disk of ``folder`` (or of its nearest existing parent)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return LOW_SPACE_BYTES


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def _remove_empty_folders(root: Path, files: list[Path]) -> None:
    """Remove the folders of replaced files that the new results left empty."""
    for folder in sorted({root / p.parent for p in files if p.parent != Path(".")}, reverse=True):
        try:
            folder.rmdir()
        except OSError:
            continue


def remove_stale_staging(work_dir: Path, older_than_s: float) -> list[Path]:
    """Remove staging folders recorded longer ago than ``older_than_s`` (a crashed server's)."""
    removed = []
    records = work_dir / "staging"
    if not records.is_dir():
        return removed
    for record in records.iterdir():
        if time.time() - record.stat().st_mtime < older_than_s:
            continue
        staging = Path(record.read_text().strip())
        if staging.name.startswith(".staging-"):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
        record.unlink(missing_ok=True)
    return removed
