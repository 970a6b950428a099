"""A DICOM bomb is refused from its header, or while it inflates, and never takes the memory.

The bombs are written here: a small deflated file whose pixel data is 1.5 GB of zeros,
declared by Rows, Columns and NumberOfFrames or hidden behind a small image's header.
Their deflate streams repeat one flushed block of zeros, so no test holds what they hold.
"""

import copy
import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from nnunet_bento.errors import RequestError, TooLargeError
from nnunet_bento.io.dicom_series import read_dicom_series

GB = 10**9
MB = 10**6
BOMB_BYTES = 3 * GB // 2
MAX_GROWTH = 800 * MB
DEFAULT_MAX_VOXELS = 200_000_000  # NNUNET_BENTO_MAX_VOXELS' default
ZERO_BLOCK = 1 << 24
FRAME = 512 * 512 * 2  # bytes of one 512 × 512 frame of 16-bit samples

#: Reads the series named by argv[1] with max_voxels argv[2] and prints what it raised and
#: how much the process's peak resident memory grew while it did.
MEASURE = """
import json, resource, sys
from pathlib import Path
from nnunet_bento.io.dicom_series import read_dicom_series
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_dicom_series(Path(sys.argv[1]), int(sys.argv[2]))
    raised = None
except Exception as error:
    raised = [type(error).__name__, str(error)]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"raised": raised, "growth": (after - before) * 1024}))
"""


@pytest.fixture(scope="module")
def t2(demo_study: Path) -> Path:
    return demo_study.parent / "dicom" / "mr" / "T2"


@pytest.fixture(scope="module")
def template(t2: Path) -> pydicom.FileDataset:
    """A demo slice's header, without its pixel data."""
    ds = pydicom.dcmread(t2 / "IM0000.dcm")
    del ds.PixelData
    return ds


def header(
    template: pydicom.Dataset, rows: int, columns: int, frames: int = 1, bits: int = 16
) -> pydicom.Dataset:
    """A copy of ``template`` that declares ``frames`` frames of ``rows`` × ``columns``."""
    ds = copy.deepcopy(template)
    ds.Rows, ds.Columns, ds.BitsAllocated = rows, columns, bits
    ds.BitsStored, ds.HighBit = bits, bits - 1
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def element(tag: int, vr: str, length: int) -> bytes:
    """The explicit VR little endian header of an OB or OW element of ``length`` bytes."""
    return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def pixel_element(length: int) -> bytes:
    return element(0x7FE00010, "OW", length)


def deflated(data: bytes) -> bytes:
    """``data`` as raw deflate blocks that end byte-aligned and refer to nothing before them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


@cache
def deflated_zeros(size: int) -> bytes:
    return deflated(bytes(size))


def zero_blocks(size: int) -> Iterator[bytes]:
    """``size`` zero bytes as deflate blocks, one block of ``ZERO_BLOCK`` zeros repeated."""
    for start in range(0, size, ZERO_BLOCK):
        yield deflated_zeros(min(ZERO_BLOCK, size - start))


def write_deflated(path: Path, ds: pydicom.Dataset, *parts: bytes | int) -> Path:
    """Write ``ds`` deflated (PS3.5 A.5), followed in its deflate stream by ``parts``:
    bytes as they are, an int as that many zero bytes."""
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(bytes(128) + b"DICM")
    write_file_meta_info(head, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.write(head.getvalue())
        for part in (body.getvalue(), *parts):
            blocks = [deflated(part)] if isinstance(part, bytes) else zero_blocks(part)
            file.writelines(blocks)
        file.write(zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush())
    return path


def write_plain(path: Path, ds: pydicom.Dataset, pixel_data: bytes) -> Path:
    """Write ``ds`` uncompressed with ``pixel_data``, whatever its header declares."""
    ds = copy.deepcopy(ds)
    ds.add_new("PixelData", "OW", pixel_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def deflated_copy(source: Path, target: Path) -> Path:
    """Every file of a series folder saved again, deflated."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def measured_read(folder: Path, max_voxels: int) -> tuple[list[str] | None, int]:
    """What reading ``folder`` in a fresh process raised, and its peak memory growth."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(max_voxels)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    return result["raised"], result["growth"]


def assert_names_file(message: str, name: str, folder: Path) -> None:
    assert name in message
    assert str(folder) not in message


def write_bombs(template: pydicom.Dataset, base: Path) -> Path:
    """Three deflated files of ~1.5 MB that inflate to 1.5 GB, one series folder each:
    declared (by Rows × Columns × NumberOfFrames), hidden (behind a small header) and
    in_header (a private element before the pixel data)."""
    frames = -(-BOMB_BYTES // FRAME)
    write_deflated(
        base / "declared" / "IM0000.dcm",
        header(template, 512, 512, frames),
        pixel_element(frames * FRAME),
        frames * FRAME,
    )
    small = header(template, 64, 64)
    write_deflated(base / "hidden" / "IM0000.dcm", small, pixel_element(BOMB_BYTES), BOMB_BYTES)
    write_deflated(
        base / "in_header" / "IM0000.dcm",
        small,
        element(0x00291010, "OB", BOMB_BYTES),
        BOMB_BYTES,
        pixel_element(64 * 64 * 2),
        64 * 64 * 2,
    )
    return base


@pytest.fixture(scope="module")
def bombs(template: pydicom.Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bombs(template, tmp_path_factory.mktemp("bombs"))


@pytest.mark.parametrize(
    ("bomb", "error", "words"),
    [
        ("declared", TooLargeError, "IM0000.dcm has 750256128 voxels, more than "),
        ("hidden", RequestError, "IM0000.dcm inflates past the "),
        ("in_header", TooLargeError, "IM0000.dcm: the headers (the elements before the "),
    ],
)
def test_a_bomb_is_refused_by_name_without_taking_the_memory(bombs, bomb, error, words):
    path = bombs / bomb / "IM0000.dcm"
    assert path.stat().st_size < 3 * MB
    raised, growth = measured_read(path.parent, DEFAULT_MAX_VOXELS)
    assert raised is not None, "the bomb was read"
    name, message = raised
    assert name == error.__name__, message
    assert words in message
    assert_names_file(message, "IM0000.dcm", bombs)
    assert growth < MAX_GROWTH, f"memory grew by {growth / MB:.0f} MB"


def test_a_deflated_series_reads_like_the_same_series_uncompressed(t2: Path, tmp_path: Path):
    folder = deflated_copy(t2, tmp_path / "T2")
    assert (folder / "IM0000.dcm").stat().st_size < (t2 / "IM0000.dcm").stat().st_size
    original, inflated = read_dicom_series(t2), read_dicom_series(folder)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(inflated.image), sitk.GetArrayFromImage(original.image)
    )
    assert inflated.image.GetSpacing() == original.image.GetSpacing()
    assert inflated.image.GetOrigin() == original.image.GetOrigin()
    assert inflated.image.GetDirection() == original.image.GetDirection()
    assert [Path(ds.filename) for ds in inflated.datasets] == [
        folder / Path(ds.filename).name for ds in original.datasets
    ]
    for ours, theirs in zip(inflated.datasets, original.datasets, strict=True):
        assert ours.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert ours == pydicom.dcmread(theirs.filename, stop_before_pixels=True)


def test_a_multi_frame_file_past_max_voxels_is_refused_before_its_pixels(
    template: pydicom.Dataset, tmp_path: Path
):
    write_plain(tmp_path / "MF0000.dcm", header(template, 64, 64, frames=100), b"\0\0")
    with pytest.raises(TooLargeError) as raised:
        read_dicom_series(tmp_path, max_voxels=100_000)
    assert "MF0000.dcm has 409600 voxels, more than NNUNET_BENTO_MAX_VOXELS (100000)" in str(
        raised.value
    )
    assert_names_file(str(raised.value), "MF0000.dcm", tmp_path)


def test_a_multi_frame_file_within_max_voxels_is_refused_before_its_pixels(
    template: pydicom.Dataset, tmp_path: Path
):
    write_plain(tmp_path / "MF0000.dcm", header(template, 64, 64, frames=3), b"\0\0")
    with pytest.raises(RequestError, match=r"MF0000\.dcm holds 3 frame\(s\) of 1 sample"):
        read_dicom_series(tmp_path, max_voxels=100_000)


def test_the_series_is_bounded_by_its_voxels_summed_over_files(t2: Path, tmp_path: Path):
    folder = shutil.copytree(t2, tmp_path / "T2")
    with pytest.raises(TooLargeError) as raised:
        read_dicom_series(folder, max_voxels=48 * 48 * 24 - 1)
    assert "has 55296 voxels, more than NNUNET_BENTO_MAX_VOXELS (55295)" in str(raised.value)
    assert read_dicom_series(folder, max_voxels=48 * 48 * 24).image.GetSize() == (48, 48, 24)


def test_the_pixel_bytes_are_bounded_by_bits_allocated(template: pydicom.Dataset, tmp_path):
    write_plain(tmp_path / "IM0000.dcm", header(template, 100, 100, bits=64), b"\0\0")
    with pytest.raises(TooLargeError) as raised:
        read_dicom_series(tmp_path, max_voxels=15_000)
    assert "IM0000.dcm has 80000 bytes of pixel data, more than 4 bytes per voxel of " in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("where", "words"),
    [
        (slice(400, 1000), "cannot read the header of DICOM file IM0003.dcm: "),
        (slice(-600, None), "cannot decode the pixel data of IM0003.dcm: "),
    ],
)
def test_a_corrupt_deflate_stream_is_a_400_naming_the_file(t2, tmp_path, where, words):
    folder = deflated_copy(t2, tmp_path / "T2")
    corrupt = folder / "IM0003.dcm"
    data = bytearray(corrupt.read_bytes())
    data[where] = bytes(b ^ 0x5A for b in data[where])
    corrupt.write_bytes(data)
    with pytest.raises(RequestError) as raised:
        read_dicom_series(folder)
    assert words in str(raised.value)
    assert_names_file(str(raised.value), "IM0003.dcm", tmp_path)


@pytest.mark.parametrize(
    ("deflate", "words"),
    [(True, "the deflate stream ends before its last block"), (False, "")],
)
def test_a_truncated_file_is_a_400_naming_the_file(t2, tmp_path, deflate, words):
    folder = deflated_copy(t2, tmp_path / "T2") if deflate else shutil.copytree(t2, tmp_path / "T2")
    truncated = folder / "IM0004.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    with pytest.raises(RequestError) as raised:
        read_dicom_series(folder)
    assert str(raised.value).startswith("cannot decode the pixel data of IM0004.dcm: ")
    assert words in str(raised.value)
    assert_names_file(str(raised.value), "IM0004.dcm", tmp_path)


def test_a_malformed_header_value_is_a_400_naming_the_file(t2: Path, tmp_path: Path):
    folder = shutil.copytree(t2, tmp_path / "T2")
    path = folder / "IM0007.dcm"
    data = path.read_bytes()
    rows = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2)  # Rows, 2 bytes long
    at = data.index(rows) + len(rows)
    three_bytes = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 3) + data[at : at + 2] + b"\0"
    path.write_bytes(data[: at - len(rows)] + three_bytes + data[at + 2 :])
    with pytest.raises(RequestError) as raised:
        read_dicom_series(folder)
    message = str(raised.value)
    assert message.startswith("cannot read the header of DICOM file IM0007.dcm: ")
    assert "(0028,0010) according to VR 'US'" in message
    assert_names_file(message, "IM0007.dcm", tmp_path)
