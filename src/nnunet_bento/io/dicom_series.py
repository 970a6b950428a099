"""Read a folder of single-frame DICOM image slices as one SimpleITK volume.

Slices are sorted by their position along the slice normal (PS3.3 C.7.6.2.1.1), never by
file name or Instance Number, and the volume keeps the series' origin and orientation, as
SimpleITK's ImageSeriesReader (GDCM) does.
"""

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from ..errors import InputNotFoundError, RequestError
from .dicom_source import DicomSource
from .images import check_voxel_count

SLICE_GAP_TOLERANCE = 0.01  # relative to the expected slice spacing
SHEAR_TOLERANCE = 0.1  # relative to the smallest pixel spacing
MIN_SLICE_SPACING = 1e-3  # mm
MAX_LISTED = 5


def read_dicom_series(folder: Path, max_voxels: int | None = None) -> DicomSource:
    """Read the one DICOM image series in ``folder`` as a volume sorted along the slice normal
    (at most ``max_voxels`` voxels, checked before the pixels are decoded)."""
    folder = Path(folder)
    datasets = _image_datasets(folder)
    _check_one_series(folder, datasets)
    rows, columns = (int(datasets[0].get(keyword) or 0) for keyword in ("Rows", "Columns"))
    check_voxel_count(f"DICOM series {folder}", rows * columns * len(datasets), max_voxels)
    _check_same_geometry(folder, datasets)
    normal = _slice_normal(datasets[0])
    datasets.sort(key=lambda ds: float(_position(ds) @ normal))
    slice_spacing = _slice_spacing(folder, datasets, normal)
    image = sitk.GetImageFromArray(_voxels(datasets))
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    image.SetSpacing((column_spacing, row_spacing, slice_spacing))
    image.SetOrigin(tuple(_position(datasets[0])))
    row, column = _orientation(datasets[0])
    image.SetDirection(tuple(np.column_stack([row, column, normal]).ravel()))
    return DicomSource(image, datasets, folder)


def _image_datasets(folder: Path) -> list[pydicom.Dataset]:
    """Every DICOM file in ``folder`` that holds pixel data; other files are ignored."""
    if not folder.exists():
        raise InputNotFoundError(f"DICOM series folder {folder} does not exist")
    if not folder.is_dir():
        raise RequestError(f"DICOM series {folder} is not a folder")
    try:
        files = sorted(path for path in folder.iterdir() if path.is_file())
    except OSError as error:
        raise RequestError(f"cannot list DICOM series folder {folder}: {error.strerror}") from None
    dicom = [ds for ds in map(_read_dicom, files) if ds is not None]
    images = [ds for ds in dicom if "PixelData" in ds]
    if not images:
        raise RequestError(
            f"no DICOM image in {folder}: looked at {len(files)} files, "
            f"{len(files) - len(dicom)} not DICOM, {len(dicom)} DICOM without pixel data"
        )
    return images


def _read_dicom(path: Path) -> pydicom.Dataset | None:
    """The dataset in ``path``, or None when it is not a DICOM file."""
    try:
        return pydicom.dcmread(path, force=False)
    except InvalidDicomError:
        return None


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
        raise RequestError(f"DICOM slice {ds.filename} has no {keyword}")
    value = ds[keyword].value
    expected = REQUIRED_COUNTS[keyword]
    try:
        numbers = [float(v) for v in (value if isinstance(value, Sequence) else [value])]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != expected or not np.all(np.isfinite(numbers)):
        raise RequestError(
            f"DICOM slice {ds.filename} has a malformed {keyword}: expected {expected} numbers"
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
            f"DICOM slice {ds.filename} has a malformed ImageOrientationPatient: its row and "
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


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    """The stored values of one single-frame grayscale slice."""
    try:
        array = pixel_array(ds)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise RequestError(f"cannot decode the pixel data of {ds.filename}: {error}") from None
    if array.ndim != 2:
        raise RequestError(
            f"DICOM file {ds.filename} holds pixel data of shape {array.shape}; "
            "expected one grayscale frame per file"
        )
    return array


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    return float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)


def _voxels(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """The (z, y, x) voxel values: float32 after rescaling, else the stored integers."""
    rescales = [_rescale(ds) for ds in datasets]
    if all(rescale == (1.0, 0.0) for rescale in rescales):
        return np.stack([_pixels(ds) for ds in datasets])
    volume = np.empty((len(datasets), datasets[0].Rows, datasets[0].Columns), np.float32)
    for k, (ds, (slope, intercept)) in enumerate(zip(datasets, rescales, strict=True)):
        volume[k] = _pixels(ds) * slope + intercept
    return volume
