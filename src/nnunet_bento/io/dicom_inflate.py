"""Read one DICOM file with pydicom, never inflating a deflated dataset past a bound.

Guarantees:

- pydicom never inflates a file itself (its own reader inflates the whole dataset at once,
  whatever it holds). For Deflated Explicit VR Little Endian (PS3.5 A.5) the file meta
  group is read as stored, and the raw deflate stream after it is inflated here, in steps
  of at most ``STEP`` bytes (zlib's ``max_length``), only as far as pydicom reads it.
- At most ``inflate_limit`` bytes of a dataset are ever inflated: one more and
  ``InflateLimitError`` is raised, so memory grows by the limit plus one step at most.
- A deflate stream that is corrupt, or ends before its last block, raises ``zlib.error``:
  a truncated file never reads as a shorter dataset.
- Otherwise the dataset is the one ``pydicom.dcmread`` gives: the same elements, preamble,
  file meta and ``filename``, the file's path.
- Other transfer syntaxes are read by pydicom from the file, with ``defer_size``.
- The file is opened without following a link at its end, and its identity (device, inode)
  is answered with the header; reading the whole file later with that identity raises
  ``FileChangedError`` when the path now names another file.
"""

import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_partial, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .input_files import FileIdentity, open_unlinked

STEP = 1 << 20  # bytes inflated by one zlib call
RAW_READ = 1 << 16  # compressed bytes read from the file at a time
PIXEL_TAGS = frozenset(Tag(k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


class InflateLimitError(ValueError):
    """A deflated dataset inflates past the bytes it was allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the deflated dataset inflates past {limit} bytes")
        self.limit = limit


class FileChangedError(OSError):
    """The path names another file than the one whose header was read."""


class _InflatingReader:
    """The inflated dataset as a seekable binary stream, inflated lazily up to a limit."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._data = bytearray()
        self._position = 0

    @property
    def inflated(self) -> int:
        return len(self._data)

    def _inflate_to(self, end: int) -> None:
        """Inflate until ``end`` bytes are out or the stream ends; never past the limit."""
        while len(self._data) < end and not self._inflater.eof:
            room = self._limit + 1 - len(self._data)
            if room <= 0:
                raise InflateLimitError(self._limit)
            compressed = self._inflater.unconsumed_tail or self._raw.read(RAW_READ)
            if not compressed:
                raise zlib.error("the deflate stream ends before its last block")
            self._data += self._inflater.decompress(compressed, min(room, STEP))
        if len(self._data) > self._limit:
            raise InflateLimitError(self._limit)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes from the position (all that is left when negative)."""
        end = self._limit + 1 if size < 0 else self._position + size
        self._inflate_to(end)
        data = bytes(memoryview(self._data)[self._position : end])
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position; bytes ahead are inflated when they are read."""
        if whence == io.SEEK_END:
            self._inflate_to(self._limit + 1)
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position


@dataclass
class _PixelWatch:
    """A pydicom ``stop_when`` that stops at the pixel data and remembers that it did."""

    seen: bool = False

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        self.seen = tag in PIXEL_TAGS
        return self.seen


@dataclass(frozen=True)
class DicomHeader:
    """A file's elements before its pixel data, whether pixel data follows, and the bytes
    inflated to read them (0 when the file is not deflated)."""

    dataset: FileDataset
    has_pixels: bool
    inflated: int
    identity: FileIdentity


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 2


def _read(
    path: Path,
    stop_when: _PixelWatch | None,
    defer_size: int | None,
    inflate_limit: int,
    expected: FileIdentity | None = None,
) -> tuple[FileDataset, int, FileIdentity]:
    """The dataset in ``path`` as ``dcmread`` reads it (no ``force``), the bytes inflated and
    the identity of the file read (which must be ``expected`` when given)."""
    raw, identity = open_unlinked(path)
    with raw:
        if expected is not None and identity != expected:
            raise FileChangedError(f"{path.name} changed after its header was read")
        preamble = read_preamble(raw, force=False)
        meta = FileMetaDataset(read_dataset(raw, False, True, stop_when=_past_file_meta))
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            raw.seek(0)
            dataset = read_partial(raw, stop_when, defer_size=defer_size, force=False)
            dataset.filename = str(path)
            return dataset, 0, identity
        stream = _InflatingReader(raw, inflate_limit)
        body = read_dataset(cast(BinaryIO, stream), False, True, stop_when=stop_when)
    return FileDataset(str(path), body, preamble, meta, False, True), stream.inflated, identity


def read_header(path: Path, defer_size: int, inflate_limit: int) -> DicomHeader:
    """The elements of ``path`` before its pixel data; elements over ``defer_size`` bytes
    are read when used (not in a deflated file, where the limit bounds them all).

    Raises InvalidDicomError when the file is not DICOM, InflateLimitError past the limit,
    and pydicom's or zlib's errors when it is malformed.
    """
    watch = _PixelWatch()
    dataset, inflated, identity = _read(path, watch, defer_size, inflate_limit)
    return DicomHeader(dataset, watch.seen, inflated, identity)


def read_whole(path: Path, inflate_limit: int, identity: FileIdentity) -> FileDataset:
    """Every element of the file whose header was read, pixel data included; raises as
    ``read_header`` does, and FileChangedError when ``path`` names another file now."""
    return _read(path, None, None, inflate_limit, identity)[0]
