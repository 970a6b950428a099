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
"""

import fcntl
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import WorkFolderError

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
