"""Write a label mask as a DICOM RT Structure Set, made with rt-utils and corrected.

rt-utils 1.2.7 is given the mask as (rows, columns, slices) with its slices in its own order
(ascending along the slice normal), matched to ours by SOP Instance UID. Its output is then
fixed: contour points are recomputed from the pixel indices it traced, because it swaps the
row and column spacing (qurit/rt-utils issue 92), spaces slices evenly and uses float32;
ContourData values are cut to the 16 characters DS allows; the attributes it leaves out
(Frame of Reference, General Study and RT Series Type 1 and 2 attributes) are copied from
the source series; and its "Qurit" branding gives way to the algorithm and model identity.
"""

import datetime
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.valuerep import format_number_as_ds
from rt_utils import RTStruct, RTStructBuilder
from rt_utils.image_helper import get_pixel_to_patient_transformation_matrix

from .dicom_source import AlgorithmIdentity, DicomSource

COPIED_FROM_SOURCE = ("AccessionNumber", "ReferringPhysicianName", "OperatorsName")
LO_LENGTH = 64
SH_LENGTH = 16


def write_rtstruct(
    mask: np.ndarray,
    source: DicomSource,
    roi_names: dict[int, str],
    identity: AlgorithmIdentity,
    path: Path,
    series_description: str | None = None,
) -> bool:
    """Write one ROI per label of ``mask`` (z, y, x) to ``path``; an empty mask: False, no file."""
    _check_mask(mask, source)
    labels = [int(label) for label in np.unique(mask) if label > 0]
    if not labels:
        return False
    unnamed = [label for label in labels if label not in roi_names]
    if unnamed:
        raise ValueError(f"mask labels {unnamed} have no segment name in roi_names")
    with _series_folder(source) as folder:
        rtstruct = RTStructBuilder.create_new(dicom_series_path=str(folder))
    order = _source_order(rtstruct, source)
    for label in labels:
        rtstruct.add_roi(
            mask=np.transpose(mask[order] == label, (1, 2, 0)),
            name=roi_names[label],
            roi_generation_algorithm="AUTOMATIC",
        )
    _fix_contour_data(rtstruct, source)
    _describe(rtstruct, source, identity, series_description)
    rtstruct.ds.save_as(path, enforce_file_format=True)
    return True


def _check_mask(mask: np.ndarray, source: DicomSource) -> None:
    """Refuse a mask that is not on the source grid (slices, rows, columns)."""
    first = source.datasets[0]
    grid = (len(source.datasets), int(first.Rows), int(first.Columns))
    if mask.shape != grid:
        raise ValueError(
            f"mask shape {mask.shape} is not the source series grid (slices, rows, columns) {grid}"
        )


def _slice_file(dataset: pydicom.Dataset) -> Path:
    """The file a source slice was read from; rt-utils reads the series from disk."""
    filename = getattr(dataset, "filename", None)
    if not isinstance(filename, str | os.PathLike):
        raise ValueError(
            f"source slice {dataset.SOPInstanceUID} was not read from a file; "
            "rt-utils needs the series on disk"
        )
    return Path(filename).resolve()


@contextmanager
def _series_folder(source: DicomSource) -> Iterator[Path]:
    """A temporary folder of links to exactly the source's slice files, nothing else."""
    with tempfile.TemporaryDirectory(prefix="rtstruct-series-") as folder:
        for index, dataset in enumerate(source.datasets):
            (Path(folder) / f"{index:05d}.dcm").symlink_to(_slice_file(dataset))
        yield Path(folder)


def _source_order(rtstruct: RTStruct, source: DicomSource) -> list[int]:
    """For each slice in rt-utils' order, its index in ``source.datasets``, by SOP UID."""
    index = {str(dataset.SOPInstanceUID): k for k, dataset in enumerate(source.datasets)}
    loaded = [str(dataset.SOPInstanceUID) for dataset in rtstruct.series_data]
    if sorted(loaded) != sorted(index):
        raise ValueError(
            f"rt-utils loaded {len(loaded)} images of series {source.series_instance_uid}, "
            f"not its {len(index)} slices (unreadable pixel data?)"
        )
    return [index[uid] for uid in loaded]


def _fix_contour_data(rtstruct: RTStruct, source: DicomSource) -> None:
    """Recompute every contour's points in patient space and write them as valid DS."""
    to_pixel = np.linalg.inv(
        get_pixel_to_patient_transformation_matrix(rtstruct.series_data).astype(np.float64)
    )
    slices = {str(dataset.SOPInstanceUID): dataset for dataset in source.datasets}
    for roi_contour in rtstruct.ds.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            points = _patient_points(contour.ContourData, to_pixel, slices[uid])
            contour.ContourData = [format_number_as_ds(float(v)) for v in points.ravel()]
            contour.NumberOfContourPoints = len(points)


def _patient_points(
    contour_data: list[float], to_pixel: np.ndarray, slice_dataset: pydicom.Dataset
) -> np.ndarray:
    """rt-utils' contour points, back to its (column, row) pixel indices, then onto the slice."""
    points = np.reshape(np.asarray(contour_data, dtype=np.float64), (-1, 3))
    pixels = np.rint(points @ to_pixel[:3, :3].T + to_pixel[:3, 3])
    orientation = np.asarray(slice_dataset.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in slice_dataset.PixelSpacing)
    origin = np.asarray(slice_dataset.ImagePositionPatient, dtype=np.float64)
    along_row = np.outer(pixels[:, 0], orientation[:3] * column_spacing)
    along_column = np.outer(pixels[:, 1], orientation[3:] * row_spacing)
    return origin + along_row + along_column


def _describe(
    rtstruct: RTStruct,
    source: DicomSource,
    identity: AlgorithmIdentity,
    series_description: str | None,
) -> None:
    """Fill the attributes rt-utils leaves out and name the algorithm and model that made it."""
    ds = rtstruct.ds
    first = source.datasets[0]
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in COPIED_FROM_SOURCE:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.FrameOfReferenceUID = rtstruct.frame_of_reference_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    if "InstitutionName" in first:
        ds.InstitutionName = first.InstitutionName
    else:
        del ds.InstitutionName
    now = datetime.datetime.now()
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.SeriesDescription = _fit(
        series_description or f"nnU-Net RT Struct: {identity.name}", LO_LENGTH
    )
    ds.Manufacturer = _fit(identity.name, LO_LENGTH)
    ds.ManufacturerModelName = _fit(identity.model_tag, LO_LENGTH)
    ds.SoftwareVersions = _fit(identity.version, LO_LENGTH)
    ds.StructureSetLabel = _fit(identity.name, SH_LENGTH)
    ds.StructureSetName = _fit(f"{identity.name} {identity.version}", LO_LENGTH)
    ds.StructureSetDescription = (
        f"Automatic segmentation by {identity.name} {identity.version}, "
        f"model {identity.model_tag}, checkpoint sha256 {identity.checkpoint_sha256}"
    )
    generation = _fit(f"{identity.model_tag} sha256:{identity.checkpoint_sha256[:12]}", LO_LENGTH)
    for roi in ds.StructureSetROISequence:
        roi.ROIGenerationDescription = generation
    for observation in ds.RTROIObservationsSequence:
        del observation.ROIObservationDescription


def _fit(text: str, length: int) -> str:
    """``text`` cut to the most characters its value representation allows."""
    return text[:length]
