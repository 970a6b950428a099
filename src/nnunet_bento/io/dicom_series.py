"""Read a folder of single-frame DICOM image slices as one SimpleITK volume.

Slices are sorted by their position along the slice normal (PS3.3 C.7.6.2.1.1), never by
file name or Instance Number, and the volume keeps the series' origin and orientation, as
SimpleITK's ImageSeriesReader (GDCM) does.

Guarantees, so that a DICOM bomb is refused instead of decoded:

- Headers before pixels. Every file's elements before its pixel data are read first
  (elements over ``DEFER_SIZE`` bytes stay on disk until used). Each file, then the series,
  is refused (413, naming NNUNET_BENTO_MAX_VOXELS) past ``max_voxels`` voxels (Rows ×
  Columns × NumberOfFrames × SamplesPerPixel), or past ``BYTES_PER_VOXEL`` bytes of pixel
  data (voxels × BitsAllocated / 8) per voxel allowed, before any pixel data is decoded.
  A file that holds more than one grayscale frame is refused (400) from its header too.
- A deflated file (Deflated Explicit VR Little Endian) is inflated by ``dicom_inflate``,
  never by pydicom at once: its header within what is left of ``HEADER_BYTES`` for the
  series (413 past it), then the whole file within what its header declares: the header,
  its pixel data and ``TRAILER_BYTES`` after them (400 past it).
- A file that cannot be read or decoded is a 400 that names it relative to the series
  folder, never by its path on the server.
- Every file of the series resolves (links followed) inside ``inside`` (the study), else
  a 403 naming the request field; each file is opened without following a link, and the
  file whose pixels are read must be the file whose header was read.
- The datasets returned hold the headers only: the pixels are in the volume.
"""

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import pixel_array

from ..errors import ForbiddenPathError, InputNotFoundError, RequestError, TooLargeError
from .dicom_inflate import (
    DicomHeader,
    FileChangedError,
    InflateLimitError,
    read_header,
    read_whole,
)
from .dicom_source import DicomSource
from .images import check_voxel_count
from .input_files import FileIdentity, resolved_inside

SLICE_GAP_TOLERANCE = 0.01  # relative to the expected slice spacing
SHEAR_TOLERANCE = 0.1  # relative to the smallest pixel spacing
MIN_SLICE_SPACING = 1e-3  # mm
MAX_LISTED = 5
DEFER_SIZE = 4096  # bytes: a larger element of a header is read from disk when used
HEADER_BYTES = 256 << 20  # what the headers of a series' deflated files may inflate to
TRAILER_BYTES = 1 << 20  # what a deflated file may hold after its pixel data
PIXEL_ELEMENT_HEADER = 12  # bytes of the pixel data element's tag, VR and length
BYTES_PER_VOXEL = 4  # pixel data bytes allowed per voxel of NNUNET_BENTO_MAX_VOXELS
#: The attributes that size the pixel data (PS3.3 C.7.6.3, C.7.6.6), each with its value
#: when absent (0: required).
SIZE_ATTRIBUTES = {
    "Rows": 0,
    "Columns": 0,
    "BitsAllocated": 0,
    "NumberOfFrames": 1,
    "SamplesPerPixel": 1,
}
#: What pydicom, zlib and the file system raise on a malformed or unreadable file.
DECODE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    OverflowError,
    struct.error,
    zlib.error,
    InvalidDicomError,
    BytesLengthException,
)


@dataclass(frozen=True)
class _Image:
    """One image file: its header, the voxels and bytes of its pixel data, and the bytes
    that the whole file may inflate to."""

    path: Path
    dataset: pydicom.Dataset
    voxels: int
    pixel_bytes: int
    inflate_limit: int
    identity: FileIdentity
    field: str


def read_dicom_series(
    folder: Path,
    max_voxels: int | None = None,
    *,
    inside: Path | None = None,
    field: str = "series_folders",
) -> DicomSource:
    """Read the one DICOM image series in ``folder`` as a volume sorted along the slice normal
    (at most ``max_voxels`` voxels, checked from the headers before any pixel is decoded).
    Its files must lie in ``inside`` (default: the folder); a refusal names ``field``."""
    folder = Path(folder)
    images = _image_headers(folder, max_voxels, inside or folder, field)
    _check_one_series(folder, [image.dataset for image in images])
    _check_size(
        f"DICOM series {folder}",
        sum(image.voxels for image in images),
        sum(image.pixel_bytes for image in images),
        max_voxels,
    )
    _check_same_geometry(folder, [image.dataset for image in images])
    normal = _slice_normal(images[0].dataset)
    images.sort(key=lambda image: float(_position(image.dataset) @ normal))
    datasets = [image.dataset for image in images]
    slice_spacing = _slice_spacing(folder, datasets, normal)
    image = sitk.GetImageFromArray(_voxels(images))
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    image.SetSpacing((column_spacing, row_spacing, slice_spacing))
    image.SetOrigin(tuple(_position(datasets[0])))
    row, column = _orientation(datasets[0])
    image.SetDirection(tuple(np.column_stack([row, column, normal]).ravel()))
    return DicomSource(image, datasets, folder)


def _image_headers(folder: Path, max_voxels: int | None, inside: Path, field: str) -> list[_Image]:
    """The header of every DICOM file in ``folder`` that holds pixel data, each within the
    bounds; other files are ignored."""
    if not folder.exists():
        raise InputNotFoundError(f"DICOM series folder {folder} does not exist")
    if not folder.is_dir():
        raise RequestError(f"DICOM series {folder} is not a folder")
    try:
        files = sorted(path for path in folder.iterdir() if path.is_file())
    except OSError as error:
        raise RequestError(f"cannot list DICOM series folder {folder}: {error.strerror}") from None
    images: list[_Image] = []
    n_dicom = 0
    header_budget = HEADER_BYTES
    for path in files:
        resolved = resolved_inside(path, inside, field, "a file of the series")
        header = _read_header(resolved, header_budget)
        if header is None:
            continue
        n_dicom += 1
        header_budget -= header.inflated
        if header.has_pixels:
            images.append(_image(resolved, header, max_voxels, field))
    if not images:
        raise RequestError(
            f"no DICOM image in {folder}: looked at {len(files)} files, "
            f"{len(files) - n_dicom} not DICOM, {n_dicom} DICOM without pixel data"
        )
    return images


def _read_header(path: Path, inflate_limit: int) -> DicomHeader | None:
    """The header of ``path``, its elements converted (those left on disk aside), or None
    when it is not a DICOM file."""
    try:
        header = read_header(path, DEFER_SIZE, inflate_limit)
        _convert(header.dataset)
        return header
    except InvalidDicomError:
        return None
    except InflateLimitError:
        raise TooLargeError(
            f"DICOM file {path.name}: the headers (the elements before the pixel data) of "
            f"the deflated files of this series inflate past {HEADER_BYTES} bytes"
        ) from None
    except DECODE_ERRORS as error:
        raise _unreadable(path, "cannot read the header of DICOM file", error) from None


def _convert(ds: pydicom.Dataset) -> None:
    """Convert each element read from its bytes, so that a malformed value is refused here
    and not where it is used; elements left on disk stay there."""
    for tag in list(ds.keys()):
        element = ds.get_item(tag, keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is not None:
            ds[tag]  # pydicom converts the element and keeps it converted


def _unreadable(path: Path, what: str, error: Exception) -> RequestError:
    """A 400 naming ``path`` relative to its series folder, in the error's words too."""
    detail = str(error).replace(f"{path.parent}{os.sep}", "") or type(error).__name__
    return RequestError(f"{what} {path.name}: {detail}")


def _image(path: Path, header: DicomHeader, max_voxels: int | None, field: str) -> _Image:
    """An image file's size from its header, refused past the bounds or with more than
    one grayscale frame."""
    size = {keyword: _size_attribute(path, header.dataset, keyword) for keyword in SIZE_ATTRIBUTES}
    voxels = size["Rows"] * size["Columns"] * size["NumberOfFrames"] * size["SamplesPerPixel"]
    pixel_bytes = (voxels * size["BitsAllocated"] + 7) // 8
    _check_size(f"DICOM file {path.name}", voxels, pixel_bytes, max_voxels)
    if size["NumberOfFrames"] != 1 or size["SamplesPerPixel"] != 1:
        raise RequestError(
            f"DICOM file {path.name} holds {size['NumberOfFrames']} frame(s) of "
            f"{size['SamplesPerPixel']} sample(s) per pixel; expected one grayscale frame per file"
        )
    limit = header.inflated + PIXEL_ELEMENT_HEADER + pixel_bytes + TRAILER_BYTES
    return _Image(path, header.dataset, voxels, pixel_bytes, limit, header.identity, field)


def _size_attribute(path: Path, ds: pydicom.Dataset, keyword: str) -> int:
    """A positive integer that sizes the pixel data; a 400 when it is absent or malformed."""
    try:
        value = ds.get(keyword)
        number = SIZE_ATTRIBUTES[keyword] if value in (None, "") else int(value)
    except DECODE_ERRORS:
        number = 0
    if number < 1:
        raise RequestError(f"DICOM file {path.name} has pixel data but no valid {keyword}")
    return number


def _check_size(what: str, voxels: int, pixel_bytes: int, max_voxels: int | None) -> None:
    """413 past ``max_voxels`` voxels or ``BYTES_PER_VOXEL`` bytes per allowed voxel."""
    check_voxel_count(what, voxels, max_voxels)
    if max_voxels is not None and pixel_bytes > BYTES_PER_VOXEL * max_voxels:
        raise TooLargeError(
            f"{what} has {pixel_bytes} bytes of pixel data, more than {BYTES_PER_VOXEL} bytes "
            f"per voxel of NNUNET_BENTO_MAX_VOXELS ({max_voxels})"
        )


def _name(ds: pydicom.Dataset) -> str:
    return Path(ds.filename).name


def _check_one_series(folder: Path, datasets: list[pydicom.Dataset]) -> None:
    """Refuse a folder whose images belong to more than one series, listing each series."""
    series: dict[str, list[pydicom.Dataset]] = {}
    for ds in datasets:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid or '(no SeriesInstanceUID)'} '{members[0].get('SeriesDescription', '')}' "
            f"({len(members)} slices)"
            for uid, members in series.items()
        )
        raise RequestError(
            f"DICOM folder {folder} holds {len(series)} series, expected one: {listing}"
        )


REQUIRED_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}


def _required(ds: pydicom.Dataset, keyword: str) -> list[float]:
    """A numeric multi-valued attribute that the volume geometry needs."""
    if keyword not in ds:
        raise RequestError(f"DICOM slice {_name(ds)} has no {keyword}")
    value = ds[keyword].value
    expected = REQUIRED_COUNTS[keyword]
    try:
        numbers = [float(v) for v in (value if isinstance(value, Sequence) else [value])]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != expected or not np.all(np.isfinite(numbers)):
        raise RequestError(
            f"DICOM slice {_name(ds)} has a malformed {keyword}: expected {expected} numbers"
        )
    return numbers


def _position(ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray(_required(ds, "ImagePositionPatient"))


def _orientation(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The row and column direction cosines of a slice."""
    cosines = np.asarray(_required(ds, "ImageOrientationPatient"))
    return cosines[:3], cosines[3:]


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray:
    normal = np.cross(*_orientation(ds))
    length = np.linalg.norm(normal)
    if length < 1e-3:
        raise RequestError(
            f"DICOM slice {_name(ds)} has a malformed ImageOrientationPatient: its row and "
            "column directions are zero or parallel"
        )
    return normal / length


def _size(ds: pydicom.Dataset) -> list[int]:
    return [ds.get("Rows", 0), ds.get("Columns", 0)]


def _check_same_geometry(folder: Path, datasets: list[pydicom.Dataset]) -> None:
    """Refuse slices that differ in size, orientation (1e-3) or pixel spacing (0.1 %)."""
    checks = [
        ("size (rows, columns)", _size, 0.0, 0.0),
        ("orientation", partial(_required, keyword="ImageOrientationPatient"), 0, 1e-3),
        ("pixel spacing", partial(_required, keyword="PixelSpacing"), 1e-3, 0),
    ]
    for what, value_of, rtol, atol in checks:
        first = value_of(datasets[0])
        odd = [ds for ds in datasets if not np.allclose(value_of(ds), first, rtol, atol)]
        if odd:
            raise RequestError(
                f"slices in {folder} differ in {what}: {first} in {_name(datasets[0])} but "
                f"{value_of(odd[0])} in {_name(odd[0])} ({len(odd)} of {len(datasets)} slices)"
            )


def _slice_spacing(folder: Path, datasets: list[pydicom.Dataset], normal: np.ndarray) -> float:
    """The distance between sorted slices, which must be even and leave no slice out."""
    if len(datasets) == 1:
        return float(datasets[0].get("SliceThickness") or 1.0)
    positions = np.array([_position(ds) for ds in datasets])
    _check_no_shear(folder, datasets, positions, normal)
    along = positions @ normal
    gaps = np.diff(along)
    expected = float(np.median(gaps))
    if expected < MIN_SLICE_SPACING:
        raise RequestError(
            f"slices in {folder} do not advance along the slice normal: "
            f"{len(datasets)} slices at {len(np.unique(along.round(3)))} distinct positions"
        )
    uneven = np.flatnonzero(np.abs(gaps - expected) > SLICE_GAP_TOLERANCE * expected)
    if uneven.size:
        problems = [_describe_gap(datasets, along, i, expected) for i in uneven[:MAX_LISTED]]
        more = f"; and {uneven.size - MAX_LISTED} more" if uneven.size > MAX_LISTED else ""
        raise RequestError(
            f"slices in {folder} are missing or unevenly spaced (expected spacing {expected:g} mm "
            f"along the slice normal): {'; '.join(problems)}{more}"
        )
    return float((along[-1] - along[0]) / (len(datasets) - 1))


def _describe_gap(
    datasets: list[pydicom.Dataset], along: np.ndarray, index: int, expected: float
) -> str:
    """Say what lies between sorted slices ``index`` and ``index + 1``."""
    first, second = _name(datasets[index]), _name(datasets[index + 1])
    gap = along[index + 1] - along[index]
    if gap < SLICE_GAP_TOLERANCE * expected:
        return f"{first} and {second} lie at the same position {along[index]:g} mm"
    where = f"between {first} at {along[index]:g} mm and {second} at {along[index + 1]:g} mm"
    steps = gap / expected
    if round(steps) >= 2 and abs(steps - round(steps)) < SLICE_GAP_TOLERANCE:
        return f"{round(steps) - 1} missing slice(s): gap of {gap:g} mm {where}"
    return f"gap of {gap:g} mm {where}"


def _check_no_shear(
    folder: Path, datasets: list[pydicom.Dataset], positions: np.ndarray, normal: np.ndarray
) -> None:
    """Refuse slices that are offset within their plane, as with a tilted gantry."""
    offsets = positions - positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    worst = int(np.argmax(in_plane))
    if in_plane[worst] > SHEAR_TOLERANCE * min(_required(datasets[0], "PixelSpacing")):
        raise RequestError(
            f"slices in {folder} are not stacked along their normal (tilted gantry or sheared "
            f"series): {_name(datasets[worst])} is offset {in_plane[worst]:g} mm within the "
            f"slice plane from {_name(datasets[0])}"
        )


def _pixels(image: _Image) -> np.ndarray:
    """The stored values of one single-frame grayscale slice, decoded within its bounds."""
    try:
        array = pixel_array(read_whole(image.path, image.inflate_limit, image.identity))
    except FileChangedError:
        raise ForbiddenPathError(
            f"{image.field}: a file of the series changed while it was read"
        ) from None
    except InflateLimitError as error:
        raise RequestError(
            f"DICOM file {image.path.name} inflates past the {error.limit} bytes that its header "
            f"declares (its header, {image.pixel_bytes} bytes of pixel data and "
            f"{TRAILER_BYTES} after them): it is malformed"
        ) from None
    except DECODE_ERRORS as error:
        raise _unreadable(image.path, "cannot decode the pixel data of", error) from None
    declared = (int(image.dataset.Rows), int(image.dataset.Columns))
    if array.shape != declared:
        raise RequestError(
            f"DICOM file {image.path.name} holds pixel data of shape {array.shape}, not the "
            f"one frame of {declared} that its header declared when it was read"
        )
    return array


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    try:
        return float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)
    except DECODE_ERRORS:
        raise RequestError(
            f"DICOM slice {_name(ds)} has a malformed RescaleSlope or RescaleIntercept"
        ) from None


def _voxels(images: list[_Image]) -> np.ndarray:
    """The (z, y, x) voxel values: float32 after rescaling, else the stored integers."""
    rescales = [_rescale(image.dataset) for image in images]
    if all(rescale == (1.0, 0.0) for rescale in rescales):
        return np.stack([_pixels(image) for image in images])
    first = images[0].dataset
    volume = np.empty((len(images), first.Rows, first.Columns), np.float32)
    for k, (image, (slope, intercept)) in enumerate(zip(images, rescales, strict=True)):
        volume[k] = _pixels(image) * slope + intercept
    return volume
