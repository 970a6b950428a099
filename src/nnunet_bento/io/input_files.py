"""Input image files opened as checked, for SimpleITK.

Guarantees:

- The image file resolves (links followed) inside the folder it must stay in (its study);
  else a ForbiddenPathError (403) that names the request field, never the path.
- A detached header's data files (MetaImage ``ElementDataFile``, NRRD ``data file``: a
  name, a ``LIST``, a printf pattern with min, max and step, a relative or an absolute
  path) resolve inside the header's own folder. They are checked before SimpleITK opens
  anything.
- Each file is opened by its resolved path without following links, and ``fstat`` after the
  open must show the device and inode that were checked. SimpleITK then reads the open
  descriptors, through links in a private folder that keep the files' names (readers pick
  their format by extension). So a file swapped after the check is not the file read. A
  data file named with a folder part is read by its checked path instead.
"""

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import ForbiddenPathError, RequestError

FileIdentity = tuple[int, int]

MAX_HEADER_BYTES = 1 << 20
MAX_DATA_FILES = 100_000
PROCESS_FDS = Path("/proc/self/fd")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
NRRD_DATA_FILE = re.compile(r"^data ?file\s*:\s*(.*)$", re.IGNORECASE)


def expand_pattern(value: str) -> list[str] | None:
    """The names of a printf pattern ``fmt min max step [subdim]``; None for a plain name."""
    parts = value.split()
    if len(parts) not in (4, 5) or "%" not in parts[0]:
        return None
    try:
        first, last, step = (int(part) for part in parts[1:4])
    except ValueError:
        return None
    numbers = range(first, last + (1 if step > 0 else -1), step) if step else range(0)
    if not numbers or len(numbers) > MAX_DATA_FILES:
        raise RequestError(f"the data file pattern {value!r} names no or too many files")
    try:
        return [parts[0] % number for number in numbers]
    except (TypeError, ValueError):
        raise RequestError(f"the data file pattern {value!r} cannot be expanded") from None


def _named_files(value: str, following: list[str]) -> list[str]:
    """The files a data-file field names: none for LOCAL, the lines after it for LIST, a
    pattern's names, or the one name."""
    if value.upper() == "LOCAL":
        return []
    if value.upper().split(" ")[0] == "LIST":
        return [line.strip() for line in following if line.strip()][:MAX_DATA_FILES]
    return expand_pattern(value) or [value]


def data_file_names(image_name: str, header: bytes) -> list[str]:
    """The detached data files that an image header names (none for NIfTI or attached data)."""
    name = image_name.lower()
    lines = header.decode("latin-1").splitlines()
    if name.endswith(METAIMAGE_SUFFIXES):
        for index, line in enumerate(lines):
            key, equals, value = line.partition("=")
            if equals and key.strip() == "ElementDataFile":
                return _named_files(value.strip(), lines[index + 1 :])
    if name.endswith(NRRD_SUFFIXES):
        for index, line in enumerate(lines):
            if not line.strip():
                break
            match = NRRD_DATA_FILE.match(line)
            if match:
                return _named_files(match.group(1).strip(), lines[index + 1 :])
    return []


def resolved_inside(path: Path, folder: Path, field: str, what: str) -> Path:
    """``path`` with its links followed; a 403 naming ``field`` when it leaves ``folder``."""
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise RequestError(f"{field}: {what} does not exist") from None
    except (OSError, RuntimeError):
        raise ForbiddenPathError(f"{field}: {what} cannot be resolved") from None
    if not resolved.is_relative_to(folder.resolve()):
        raise ForbiddenPathError(f"{field}: {what} leaves its folder")
    return resolved


def open_unlinked(path: Path) -> tuple[BinaryIO, FileIdentity]:
    """``path`` opened for reading without following a link at its end, and the identity
    (device, inode) of the file that was opened."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(descriptor)
    return os.fdopen(descriptor, "rb"), (info.st_dev, info.st_ino)


@contextmanager
def checked_descriptor(resolved: Path, field: str) -> Iterator[int]:
    """An open descriptor of ``resolved``; the opened file must be the file that was checked."""
    checked = os.stat(resolved)
    try:
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise ForbiddenPathError(
            f"{field}: an input file cannot be opened ({error.strerror})"
        ) from None
    try:
        opened = os.fstat(descriptor)
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            raise ForbiddenPathError(f"{field}: an input file changed while it was opened")
        yield descriptor
    finally:
        os.close(descriptor)


@contextmanager
def opened_image(image: Path, inside: Path, field: str) -> Iterator[Path]:
    """Check ``image`` and its detached data files, open them, and yield the path that
    SimpleITK reads them by (a private folder of links to the open descriptors)."""
    resolved = resolved_inside(image, inside, field, "the image file")
    with ExitStack() as stack:
        descriptor = stack.enter_context(checked_descriptor(resolved, field))
        header = os.pread(descriptor, MAX_HEADER_BYTES, 0)
        names = data_file_names(resolved.name, header)
        folder = resolved.parent
        data = {
            name: resolved_inside(folder / name, folder, field, "a detached data file")
            for name in dict.fromkeys(names)
        }
        plain = all(Path(name).name == name and name != resolved.name for name in data)
        if not PROCESS_FDS.is_dir() or not plain:
            yield resolved
            return
        links = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet-bento-")))
        (links / resolved.name).symlink_to(PROCESS_FDS / str(descriptor))
        for name, path in data.items():
            data_descriptor = stack.enter_context(checked_descriptor(path, field))
            (links / name).symlink_to(PROCESS_FDS / str(data_descriptor))
        yield links / resolved.name
