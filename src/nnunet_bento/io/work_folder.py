"""The work folder (NNUNET_BENTO_WORK_DIR): uploads, pulled series, staging records, output
locks and job records, private to the server's user.

- It is created mode 0700, and so are the folders in it that we create; a folder of ours
  that group or others may read is tightened to 0700. No other local user can reach a file
  inside, whatever the file's own mode.
- At start-up, a folder that is a link, that another user owns, or that group or others may
  write is refused with one line that says what to do: someone else may have made it first.
- Each server holds a shared claim on the folder while it lives. A server that starts while
  no other holds one knows that what is left was left by stopped servers: it sweeps the
  uploads and pulled series that no job holds.
- NNUNET_BENTO_MAX_WORK_MB bounds what it holds (``WorkBudget``): an upload that does not fit
  is refused (HTTP 507) before, and while, it writes.
"""

import fcntl
import os
import shutil
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import InsufficientStorageError, WorkFolderError

SUBFOLDERS = ("uploads", "pulls", "staging", "locks")
PRIVATE = 0o700


def private_folder(path: Path) -> Path:
    """``path`` as a folder of this user's that only this user may use (created if needed)."""
    path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    info = path.lstat()
    what = f"the work folder {path}"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise WorkFolderError(
            f"{what} is a link or not a folder; set NNUNET_BENTO_WORK_DIR to a folder of its own"
        )
    if info.st_uid != os.getuid():
        raise WorkFolderError(
            f"{what} belongs to another user (uid {info.st_uid}); set NNUNET_BENTO_WORK_DIR to "
            "a folder of this user's"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise WorkFolderError(
            f"{what} may be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            "remove it, or set NNUNET_BENTO_WORK_DIR to a private folder"
        )
    if stat.S_IMODE(info.st_mode) != PRIVATE:
        path.chmod(PRIVATE)
    return path


def prepare_work_folder(path: Path) -> Path:
    """The work folder and its subfolders, checked and private; WorkFolderError otherwise."""
    private_folder(path)
    for name in SUBFOLDERS:
        private_folder(path / name)
    return path


def claim_work_folder(path: Path) -> tuple[int, bool]:
    """A shared claim on the work folder, held while the descriptor stays open, and whether
    this process is the only server using the folder (no other live server holds a claim)."""
    descriptor = os.open(path / "servers.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    return descriptor, alone


def sweep_work_folder(path: Path, held: Iterable[Path]) -> list[Path]:
    """Remove the uploads and pulled series that no job holds; answers what was removed.
    Call it only as the one server using the folder (``claim_work_folder``)."""
    kept = {Path(folder).resolve() for folder in held}
    removed = []
    for name in ("uploads", "pulls"):
        for entry in sorted((path / name).iterdir()):
            if entry.resolve() not in kept:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def folder_bytes(path: Path) -> int:
    """The size of the regular files under ``path``, links not followed; files removed while
    it walks count as absent."""
    total = 0
    folders = [path]
    while folders:
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            continue
    return total


class WorkBudget:
    """NNUNET_BENTO_MAX_WORK_MB over the work folder, for the uploads of this process.

    An upload measures the folder once, by a walk (``measure``, in a worker thread), and is
    then charged for each byte that it writes. A walk sees what every writer left, in any
    process; a running total could not, and would drift from the disk. Bytes that other
    uploads of this process write after the walk are charged to it too (one shared counter),
    so concurrent uploads cannot pass the bound together; files removed after the walk are
    not credited until the next one.
    """

    def __init__(self, path: Path, limit_mb: int) -> None:
        self.path = path
        self.limit_mb = limit_mb
        self._written = 0
        self._lock = threading.Lock()

    def measure(self) -> "WorkRoom":
        """The room left for one upload now: walks the folder, so call it in a worker thread."""
        start = self.written()
        used = folder_bytes(self.path)
        return WorkRoom(self, (self.limit_mb << 20) - used, start)

    def written(self) -> int:
        """The bytes that uploads of this process have written so far."""
        with self._lock:
            return self._written

    def add(self, size: int) -> int:
        """Count ``size`` bytes written by an upload (less, when negative); the new total."""
        with self._lock:
            self._written += size
            return self._written


class WorkRoom:
    """What one upload may still write to the work folder (``WorkBudget.measure``); its
    refusals are InsufficientStorageError (HTTP 507) naming NNUNET_BENTO_MAX_WORK_MB."""

    def __init__(self, budget: WorkBudget, free: int, start: int) -> None:
        self.budget = budget
        self.free = free
        self.start = start

    def left(self) -> int:
        """The bytes left now: the room at the walk, less what uploads wrote since."""
        return self.free - (self.budget.written() - self.start)

    def require(self, size: int, what: str) -> None:
        """Refuse ``what`` (e.g. "the archive's unpacked size") of ``size`` bytes when it does
        not fit in what is left."""
        left = self.left()
        if size > left:
            raise InsufficientStorageError(
                f"{what} ({size} bytes) does not fit in the work folder: {max(left, 0)} bytes "
                f"are left of NNUNET_BENTO_MAX_WORK_MB ({self.budget.limit_mb} MB)"
            )

    def charge(self, size: int) -> None:
        """Count ``size`` bytes about to be written; refuse them once the folder would pass
        its bound."""
        if self.budget.add(size) - self.start > self.free:
            self.budget.add(-size)
            raise InsufficientStorageError(
                "the upload does not fit in the work folder: it would hold more than "
                f"NNUNET_BENTO_MAX_WORK_MB ({self.budget.limit_mb} MB)"
            )
