"""Study uploads: safe extraction of a zip or tar(.gz) archive, and results packed into a zip.

``extract_study`` checks every entry before it writes anything: a name must stay inside the
target (not absolute, no drive letter, no backslash, no '..'), an entry must be a regular file
or a folder (no links, devices or FIFOs), and the entry count and the declared sizes must fit
the limits; a zip's entry count and directory size are read from its end record before
zipfile parses the directory. The declared sizes must also fit the room that the caller has
left (``Room``: the work folder's bound). It then streams each file and counts the bytes it
really writes, against the limit and the room, so an archive whose headers understate its
sizes is still stopped. A failure removes what it wrote. Refusals name the entry as the
archive gives it, never a server path.

The archive kind is read from its first bytes, not its name: zip, gzip-compressed tar or
plain POSIX/GNU tar. Zip entries must be stored or deflated (bzip2 and LZMA decompress without
an output bound). ``__MACOSX/`` (macOS resource forks) is checked like any entry but not
extracted.
"""

import copy
import errno
import gzip
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from nnunet_bento.errors import InsufficientStorageError, RequestError, TooLargeError

NOT_AN_ARCHIVE = "not a zip or tar.gz archive"
RESPONSE_NAME = "response.json"
CHUNK_BYTES = 2**20
MAX_NAME_PART_BYTES = 255
MAX_TAR_RECORD_BYTES = 16 * 2**20
TAR_BYTES_PER_ENTRY = 4096
IGNORED_TOP = "__MACOSX"
STORED_SUFFIXES = (".gz", ".zip", ".png")
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_OFFSET = 257
_TAR_MAGIC = b"ustar"
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_ZIP_END, _ZIP_END_SIZE = b"PK\x05\x06", 22
_ZIP64_LOCATOR, _ZIP64_LOCATOR_SIZE = b"PK\x06\x07", 20
_ZIP64_END, _ZIP64_END_SIZE = b"PK\x06\x06", 56
_ZIP_TAIL_BYTES = _ZIP_END_SIZE + 0xFFFF + _ZIP64_LOCATOR_SIZE
ZIP_DIRECTORY_BYTES_PER_ENTRY = 4096
_ZIP_ENCRYPTED = 0x1
_TAR_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_TAR_REFUSED = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a device",
    tarfile.BLKTYPE: "a device",
    tarfile.FIFOTYPE: "a FIFO",
}
_UNREADABLE = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on an upload: its file size, what it unpacks to, and its number of entries."""

    max_upload_bytes: int
    max_unpacked_bytes: int
    max_entries: int


@dataclass(frozen=True)
class _Member:
    """An archive entry as the archive states it, with what its reader needs to open it."""

    name: str
    is_dir: bool
    size: int
    source: Any


@dataclass(frozen=True)
class _Checked:
    """A checked entry: its path parts under the target."""

    member: _Member
    parts: tuple[str, ...]


class Room(Protocol):
    """Where extraction writes, when it is bounded: each refusal raises an error of its own."""

    def require(self, size: int, what: str) -> None:
        """Refuse ``what`` of ``size`` bytes that does not fit."""

    def charge(self, size: int) -> None:
        """Count ``size`` bytes about to be written; refuse them past the bound."""


class _Unbounded:
    """No room bound beyond the archive limits."""

    def require(self, size: int, what: str) -> None:
        """Everything fits."""

    def charge(self, size: int) -> None:
        """Nothing is counted."""


UNBOUNDED: Room = _Unbounded()


class _Reader(Protocol):
    """One archive format: its entries, type-checked, and a stream of each file's bytes."""

    def members(self) -> Iterator[_Member]: ...

    def open(self, member: _Member) -> IO[bytes]: ...


def extract_study(
    archive: Path, target: Path, limits: ArchiveLimits, room: Room = UNBOUNDED
) -> Path:
    """Check every entry of ``archive``, extract it into ``target`` within ``room``; returns
    the study root."""
    _check_upload_size(archive, limits)
    _require_empty(target)
    created = not target.exists()
    try:
        with _open_archive(archive, limits) as reader:
            entries = _check_all(reader.members(), limits)
            declared = sum(entry.member.size for entry in entries)
            room.require(declared, "the archive's unpacked size")
            _write_all(reader, entries, target, limits, room)
    except BaseException:
        _remove_written(target, created)
        raise
    return _study_root(entries, target)


def pack_outputs(folder: Path, response: dict[str, Any], destination: Path) -> Path:
    """Write the zip ``destination``: ``response.json``, then every file under ``folder``."""
    files = _output_files(folder)
    if RESPONSE_NAME in files:
        raise ValueError(f"{folder} already holds {RESPONSE_NAME}")
    handle, temp_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"
    )
    os.close(handle)
    temp = Path(temp_name)
    try:
        with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as packed:
            packed.writestr(RESPONSE_NAME, json.dumps(response, indent=2) + "\n")
            for name, path in files.items():
                packed.write(path, name, compress_type=_compression(name))
        os.replace(temp, destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return destination


def _output_files(folder: Path) -> dict[str, Path]:
    """The regular files under ``folder`` (no symlinks), keyed by relative path, sorted."""
    files = (path for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
    return dict(sorted((path.relative_to(folder).as_posix(), path) for path in files))


def _compression(name: str) -> int:
    """Store files that are compressed already; deflate the rest."""
    return zipfile.ZIP_STORED if name.lower().endswith(STORED_SUFFIXES) else zipfile.ZIP_DEFLATED


def _check_upload_size(archive: Path, limits: ArchiveLimits) -> None:
    """Refuse an archive file past NNUNET_BENTO_MAX_UPLOAD_MB (HTTP 413)."""
    size = archive.stat().st_size
    if size > limits.max_upload_bytes:
        raise TooLargeError(
            f"the archive is {size} bytes, past NNUNET_BENTO_MAX_UPLOAD_MB "
            f"({limits.max_upload_bytes / 2**20:g} MiB)"
        )


def _require_empty(target: Path) -> None:
    """The target must be a new or an empty folder: a failure may then empty it."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not an empty folder")


def _remove_written(target: Path, created: bool) -> None:
    """Remove what extraction wrote: ``target`` itself if it created it, else its contents."""
    if created:
        shutil.rmtree(target, ignore_errors=True)
        return
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@contextmanager
def _open_archive(archive: Path, limits: ArchiveLimits) -> Iterator[_Reader]:
    """A reader for the archive's kind, read from its first bytes; unreadable data is a 400."""
    try:
        with archive.open("rb") as file, ExitStack() as stack:
            yield _reader(file, limits, stack)
    except _UNREADABLE as exc:
        raise RequestError(f"the archive cannot be read: {exc}") from None
    except NotImplementedError as exc:
        raise RequestError(f"the archive uses an unsupported feature: {exc}") from None


def _reader(file: BinaryIO, limits: ArchiveLimits, stack: ExitStack) -> _Reader:
    """Open the zip, tar.gz or tar that ``file`` holds, by its magic bytes; closed by ``stack``."""
    head = file.read(_TAR_MAGIC_OFFSET + len(_TAR_MAGIC))
    file.seek(0)
    try:
        if head[:4] in _ZIP_MAGIC:
            _check_zip_directory(file, limits)
            return _ZipReader(stack.enter_context(zipfile.ZipFile(file)), limits)
        if head[:2] == _GZIP_MAGIC:
            file = stack.enter_context(gzip.GzipFile(fileobj=file, mode="rb"))
        elif head[_TAR_MAGIC_OFFSET:] != _TAR_MAGIC:
            raise RequestError(NOT_AN_ARCHIVE)
        stream = _BoundedStream(file, limits)
        return _TarReader(stack.enter_context(tarfile.open(fileobj=stream, mode="r:")))
    except (zipfile.BadZipFile, tarfile.ReadError):
        raise RequestError(NOT_AN_ARCHIVE) from None


def _check_zip_directory(file: BinaryIO, limits: ArchiveLimits) -> None:
    """From the end-of-central-directory record, before zipfile reads the directory: at most
    ``max_entries`` entries, and a directory of at most ZIP_DIRECTORY_BYTES_PER_ENTRY per
    entry (zipfile holds the whole directory in memory)."""
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(size - _ZIP_TAIL_BYTES, 0))
    tail = file.read()
    file.seek(0)
    found = tail.rfind(_ZIP_END)
    if found < 0 or len(tail) - found < _ZIP_END_SIZE:
        return
    entries, directory_bytes = struct.unpack_from("<10xHL", tail, found)
    locator = found - _ZIP64_LOCATOR_SIZE
    if entries == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == _ZIP64_LOCATOR:
        (end64,) = struct.unpack_from("<8xQ", tail, locator)
        file.seek(end64)
        record = file.read(_ZIP64_END_SIZE)
        file.seek(0)
        if record[:4] == _ZIP64_END and len(record) == _ZIP64_END_SIZE:
            entries, directory_bytes = struct.unpack_from("<32xQQ", record)
    if entries > limits.max_entries:
        raise TooLargeError(
            f"the archive has more than {limits.max_entries} entries, the entry limit"
        )
    if directory_bytes > ZIP_DIRECTORY_BYTES_PER_ENTRY * (limits.max_entries + 1):
        raise TooLargeError(
            f"the archive's central directory ({directory_bytes} bytes) is larger than "
            f"{limits.max_entries} entries need"
        )


class _ZipReader:
    """A zip's entries; each file is read up to the unpacked limit, whatever its header says."""

    def __init__(self, archive: zipfile.ZipFile, limits: ArchiveLimits) -> None:
        self._zip = archive
        self._read_bound = limits.max_unpacked_bytes + 1

    def members(self) -> Iterator[_Member]:
        """Every entry, refusing links, special files, encryption and other compressions."""
        for info in self._zip.infolist():
            _check_zip_entry(info)
            yield _Member(info.filename, info.is_dir(), info.file_size, info)

    def open(self, member: _Member) -> IO[bytes]:
        """The entry's bytes: zipfile stops at the declared size, so give it our bound instead."""
        unbounded = copy.copy(member.source)
        unbounded.file_size = self._read_bound
        return self._zip.open(unbounded)


def _check_zip_entry(info: zipfile.ZipInfo) -> None:
    """Refuse a zip entry that is not a plain, readable file or folder."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise RequestError(f"archive entry {_shown(info.filename)} is a symbolic link")
    if kind not in (0, stat.S_IFDIR if info.is_dir() else stat.S_IFREG):
        raise RequestError(f"archive entry {_shown(info.filename)} is not a regular file or folder")
    if info.flag_bits & _ZIP_ENCRYPTED:
        raise RequestError(f"archive entry {_shown(info.filename)} is encrypted")
    if info.compress_type not in _ZIP_METHODS:
        raise RequestError(
            f"archive entry {_shown(info.filename)} uses compression method "
            f"{info.compress_type}; only stored and deflated entries are accepted"
        )


class _TarReader:
    """A tar's entries (its stream bounded by ``_BoundedStream``)."""

    def __init__(self, archive: tarfile.TarFile) -> None:
        self._tar = archive

    def members(self) -> Iterator[_Member]:
        """Every entry, refusing links, devices, FIFOs and other special members."""
        for info in self._tar:
            _check_tar_entry(info)
            yield _Member(info.name, info.isdir(), info.size, info)

    def open(self, member: _Member) -> IO[bytes]:
        """The member's bytes."""
        stream = self._tar.extractfile(member.source)
        assert stream is not None, "only regular members are opened"
        return stream


def _check_tar_entry(info: tarfile.TarInfo) -> None:
    """Refuse a tar member that is not a regular file or a folder."""
    if info.type in _TAR_FILE_TYPES or info.type == tarfile.DIRTYPE:
        return
    what = _TAR_REFUSED.get(info.type, "not a regular file or folder")
    raise RequestError(f"archive entry {_shown(info.name)} is {what}")


class _BoundedStream:
    """The uncompressed tar stream; refuses to read or seek past what the limits allow.

    tarfile reads a long-name or pax record whole, in one read of the size its header states,
    so this also bounds each read: a lying header cannot make it buffer gigabytes.
    """

    def __init__(self, stream: BinaryIO, limits: ArchiveLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._bound = limits.max_unpacked_bytes + TAR_BYTES_PER_ENTRY * (limits.max_entries + 1)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, where the record and the stream stay within bounds."""
        if not 0 <= size <= MAX_TAR_RECORD_BYTES:
            raise TooLargeError(f"the archive has a tar record past {MAX_TAR_RECORD_BYTES} bytes")
        self._check_position(self._stream.tell() + size)
        return self._stream.read(size)

    def seek(self, position: int) -> int:
        """Seek to ``position`` from the start (tarfile's only use), within the bound."""
        self._check_position(position)
        return self._stream.seek(position)

    def tell(self) -> int:
        """The position in the uncompressed stream."""
        return self._stream.tell()

    def _check_position(self, position: int) -> None:
        """Refuse a position past the stream bound: the archive unpacks past the limit."""
        if position > self._bound:
            raise TooLargeError(_unpacked_message(self._limits))


def _unpacked_message(limits: ArchiveLimits) -> str:
    """The refusal of an archive that unpacks past the limit."""
    return (
        f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes, "
        "the unpacked size limit"
    )


def _check_all(members: Iterable[_Member], limits: ArchiveLimits) -> list[_Checked]:
    """Check every entry and the limits before anything is written; returns those to extract."""
    entries: list[_Checked] = []
    declared = 0
    for count, member in enumerate(members, start=1):
        if count > limits.max_entries:
            raise TooLargeError(
                f"the archive has more than {limits.max_entries} entries, the entry limit"
            )
        declared += member.size
        if declared > limits.max_unpacked_bytes:
            raise TooLargeError(_unpacked_message(limits))
        parts = _parts(member)
        if parts and parts[0] != IGNORED_TOP:
            entries.append(_Checked(member, parts))
    _check_layout(entries)
    return entries


def _shown(name: str) -> str:
    """An entry name for a message: quoted, escaped and cut short."""
    return repr(name if len(name) <= 200 else f"{name[:200]}...")


def _parts(member: _Member) -> tuple[str, ...]:
    """The entry's path parts under the target; refuses a name that could land elsewhere."""
    name, shown = member.name, _shown(member.name)
    if "\0" in name:
        raise RequestError(f"archive entry {shown} has a NUL byte in its name")
    if name.startswith("/"):
        raise RequestError(f"archive entry {shown} has an absolute path")
    if _DRIVE.match(name):
        raise RequestError(f"archive entry {shown} starts with a drive letter")
    if "\\" in name:
        raise RequestError(f"archive entry {shown} has a backslash in its name")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise RequestError(f"archive entry {shown} has a '..' component")
    if any(len(os.fsencode(part)) > MAX_NAME_PART_BYTES for part in parts):
        raise RequestError(f"archive entry {shown} has a name longer than 255 bytes")
    if not parts and not member.is_dir:
        raise RequestError(f"archive entry {shown} is a file without a name")
    return parts


def _check_layout(entries: list[_Checked]) -> None:
    """Refuse a file named twice or named like a folder; refuse an archive without files."""
    files: dict[tuple[str, ...], str] = {}
    folders: set[tuple[str, ...]] = set()
    for entry in entries:
        folders.update(entry.parts[:end] for end in range(1, len(entry.parts)))
        if entry.member.is_dir:
            folders.add(entry.parts)
        elif entry.parts in files:
            raise RequestError(f"archive entry {_shown(entry.member.name)} appears twice")
        else:
            files[entry.parts] = entry.member.name
    clashes = sorted(files.keys() & folders)
    if clashes:
        raise RequestError(f"archive entry {_shown(files[clashes[0]])} is both a file and a folder")
    if not files:
        raise RequestError("the archive is empty")


def _write_all(
    reader: _Reader, entries: list[_Checked], target: Path, limits: ArchiveLimits, room: Room
) -> None:
    """Create the folders and stream the files into ``target``, counting the bytes written."""
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        for entry in entries:
            path = target.joinpath(*entry.parts)
            if entry.member.is_dir:
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with reader.open(entry.member) as stream:
                written = _write_file(stream, path, entry.member, written, limits, room)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InsufficientStorageError("no space left to unpack the archive") from None
        raise


def _write_file(
    stream: IO[bytes],
    path: Path,
    member: _Member,
    written: int,
    limits: ArchiveLimits,
    room: Room,
) -> int:
    """Copy one entry's bytes, stopping at the unpacked limit or the room's bound; returns the
    new total written."""
    size = 0
    with path.open("xb") as out:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            if written + size > limits.max_unpacked_bytes:
                raise TooLargeError(_unpacked_message(limits))
            room.charge(len(chunk))
            out.write(chunk)
    if size != member.size:
        raise RequestError(
            f"archive entry {_shown(member.name)} holds {size} bytes, "
            f"not the {member.size} its header declares"
        )
    return written + size


def _study_root(entries: list[_Checked], target: Path) -> Path:
    """The archive's one top folder when nothing else lies at its root, else ``target``."""
    tops = {entry.parts[0] for entry in entries}
    if len(tops) != 1:
        return target
    (top,) = tops
    inside = all(len(entry.parts) > 1 or entry.member.is_dir for entry in entries)
    return target / top if inside else target
