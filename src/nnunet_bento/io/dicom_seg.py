"""Write nnU-Net outputs as DICOM Segmentation instances, with highdicom.

BINARY and FRACTIONAL instances use the Segmentation Storage SOP Class, LABELMAP the Label
Map Segmentation Storage SOP Class (PS3.3 A.51 and C.8.20; PS3.4 B.5). Every instance
references its source series (Referenced Series Sequence, and a Derivation Image item per
frame) and names the model in each segment's Segmentation Algorithm Identification
Sequence. A writer saves to ``path.with_suffix('.partial')`` and renames it to ``path``, so
a failed write never leaves a file at ``path``.
"""

from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from ..errors import RequestError
from .dicom_source import AlgorithmIdentity, DicomSource
from .seg_metadata import SegmentationMetadata, segment_descriptions

MANUFACTURER = "nnunet-bento"
#: Series Number when the metadata gives none (dcmqi's default too).
DEFAULT_SERIES_NUMBER = 300
SegmentationType = Literal["binary", "labelmap"] | hd.seg.SegmentationTypeValues


def _label_type(value: SegmentationType) -> hd.seg.SegmentationTypeValues:
    try:
        kind = hd.seg.SegmentationTypeValues(value.upper() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"segmentation_type: {value!r} is not 'binary' or 'labelmap'") from None
    if kind == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise ValueError(
            "segmentation_type: FRACTIONAL takes probabilities; use write_fractional_segmentation"
        )
    return kind


def _transfer_syntax(kind: hd.seg.SegmentationTypeValues, compress: bool) -> UID:
    """RLE Lossless (PS3.5 Annex G) for LABELMAP and FRACTIONAL; BINARY has none here."""
    if not compress:
        return ExplicitVRLittleEndian
    if kind == hd.seg.SegmentationTypeValues.BINARY:
        raise RequestError(
            "compress: a BINARY SEG can only be compressed with JPEG 2000, which this "
            "server cannot encode; ask for segmentation_type 'labelmap' to compress"
        )
    return RLELossless


def _check_grid(name: str, shape: tuple[int, ...], source: DicomSource) -> None:
    grid = tuple(reversed(source.image.GetSize()))
    if shape != grid:
        raise ValueError(f"{name}: shape {shape} is not the source grid (z, y, x) {grid}")


def _check_probability(name: str, values: np.ndarray) -> None:
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{name}: dtype {values.dtype} is not a floating type")
    if not (np.all(values >= 0) and np.all(values <= 1)):
        raise ValueError(f"{name}: values must lie in [0, 1] (and not be NaN)")


def _present_labels(mask: np.ndarray) -> list[int]:
    """Nonzero labels in ``mask``, counted over its foreground voxels only."""
    counts = np.bincount(mask[mask != 0].astype(np.intp, copy=False))
    return [int(label) for label in np.flatnonzero(counts)]


def _segment_numbers(mask: np.ndarray, labels: list[int]) -> np.ndarray:
    """``mask`` with label ``labels[i]`` as segment number i + 1, in the smallest unsigned type."""
    dtype = np.uint8 if len(labels) < 256 else np.uint16
    if labels == list(range(1, len(labels) + 1)):
        return mask.astype(dtype, copy=False)
    lookup = np.zeros(labels[-1] + 1, dtype)
    lookup[labels] = np.arange(1, len(labels) + 1)
    numbers = np.empty(mask.shape, dtype)
    for z, plane in enumerate(mask):
        numbers[z] = lookup[plane]
    return numbers


def bin_probabilities(probability: np.ndarray, n: int) -> np.ndarray:
    """Bin k (1..n) holds p in [(k-1)/n, k/n), bin n also p == 1; p == 0 is 0, in no bin.

    Edges k/n are taken in the dtype of ``probability``, so a value written as 0.1 opens bin 2
    of 10 whether it is stored as float32 or float64.
    """
    if not 1 <= n < 65536:
        raise ValueError(f"n: {n} bins; give 1 to 65535")
    _check_probability("probability", probability)
    bins = (probability > 0).astype(np.uint8 if n < 256 else np.uint16)
    for edge in (np.arange(1, n) / n).astype(probability.dtype):
        bins += probability >= edge
    return bins


def _series_description(
    explicit: str | None, metadata: SegmentationMetadata, identity: AlgorithmIdentity, what: str
) -> str:
    return explicit or metadata.series_description or f"{identity.name} {what}"[:64]


def _segmentation(
    source_images: Sequence[pydicom.Dataset],
    pixels: np.ndarray,
    kind: hd.seg.SegmentationTypeValues,
    descriptions: list[hd.seg.SegmentDescription],
    metadata: SegmentationMetadata,
    identity: AlgorithmIdentity,
    series_description: str,
    **options: object,
) -> hd.seg.Segmentation:
    """The Segmentation instance, with the template's series and content attributes."""
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(metadata.series_number or DEFAULT_SERIES_NUMBER),
        sop_instance_uid=hd.UID(),
        instance_number=int(metadata.instance_number or 1),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=identity.name[:64],
        software_versions=identity.version,
        device_serial_number=identity.model_tag[:64],
        content_label=metadata.content_label,
        content_description=metadata.content_description,
        content_creator_name=metadata.content_creator_name,
        series_description=series_description,
        **options,
    )
    template_attributes = {
        "BodyPartExamined": metadata.body_part_examined,
        "ClinicalTrialSeriesID": metadata.clinical_trial_series_id,
        "ClinicalTrialTimePointID": metadata.clinical_trial_time_point_id,
        "ClinicalTrialCoordinatingCenterName": metadata.clinical_trial_coordinating_center_name,
    }
    for keyword, value in template_attributes.items():
        if value is not None:
            setattr(seg, keyword, value)
    return seg


def _save(seg: hd.seg.Segmentation, path: Path) -> None:
    """Write ``seg`` as a DICOM file; callers write into OutputStaging, which makes it atomic."""
    seg.save_as(path, enforce_file_format=True)


def _write_empty(
    source: DicomSource,
    template: SegmentationMetadata,
    identity: AlgorithmIdentity,
    path: Path,
    series_description: str,
) -> None:
    """A BINARY SEG whose segments are empty: one empty frame each, on the first slice.

    The other slices are referenced too (further source images), so the SEG still points at
    the whole series.
    """
    labels = template.label_ids
    first = source.datasets[0]
    seg = _segmentation(
        [first],
        np.zeros((1, first.Rows, first.Columns, len(labels)), np.uint8),
        hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions(template, labels, identity),
        template,
        identity,
        series_description,
        omit_empty_frames=False,
        further_source_images=source.datasets[1:],
    )
    _save(seg, path)


def write_label_segmentation(
    mask: np.ndarray,
    source: DicomSource,
    metadata: SegmentationMetadata,
    identity: AlgorithmIdentity,
    path: Path,
    *,
    segmentation_type: SegmentationType = "binary",
    compress: bool = False,
    series_description: str | None = None,
    empty_metadata: SegmentationMetadata | None = None,
    workers: int | Executor = 0,
) -> bool:
    """Write a label mask (z, y, x) on the source grid as a BINARY or LABELMAP SEG.

    One segment per label present, numbered 1..n in label order and described by the
    metadata's segment with that labelID. ``compress`` writes LABELMAP as RLE Lossless,
    encoded by ``workers`` processes (highdicom's argument). An empty mask writes the
    ``empty_metadata`` template as an empty BINARY SEG, or nothing without one. Returns whether
    a file was written.
    """
    kind = _label_type(segmentation_type)
    transfer_syntax = _transfer_syntax(kind, compress)
    _check_grid("mask", mask.shape, source)
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"mask: dtype {mask.dtype} is not an integer type")
    if mask.size and mask.min() < 0:
        raise ValueError("mask: labels must not be negative")
    labels = _present_labels(mask)
    if not labels:
        if empty_metadata is None:
            return False
        description = _series_description(
            series_description, empty_metadata, identity, "segmentation (empty)"
        )
        _write_empty(source, empty_metadata, identity, Path(path), description)
        return True
    seg = _segmentation(
        source.datasets,
        _segment_numbers(mask, labels),
        kind,
        segment_descriptions(metadata, labels, identity),
        metadata,
        identity,
        _series_description(series_description, metadata, identity, "segmentation"),
        transfer_syntax_uid=transfer_syntax,
        workers=workers if transfer_syntax.is_encapsulated else 0,
    )
    _save(seg, Path(path))
    return True


def write_fractional_segmentation(
    probabilities: np.ndarray,
    labels: list[int],
    source: DicomSource,
    metadata: SegmentationMetadata,
    identity: AlgorithmIdentity,
    path: Path,
    *,
    compress: bool = False,
    series_description: str | None = None,
    workers: int | Executor = 0,
) -> bool:
    """Write probabilities (k, z, y, x) of ``labels`` as a FRACTIONAL (PROBABILITY) SEG.

    highdicom stores round(255 p) in 8 bits (Maximum Fractional Value 255), so a value reads
    back within 0.5/255. Frames that round to 0 everywhere are left out; if all do, nothing
    is written and the result is False. ``compress`` writes RLE Lossless.
    """
    if probabilities.ndim != 4 or probabilities.shape[0] != len(labels):
        raise ValueError(
            f"probabilities: shape {probabilities.shape} is not (k, z, y, x) "
            f"with k = len(labels) = {len(labels)}"
        )
    _check_grid("probabilities", probabilities.shape[1:], source)
    _check_probability("probabilities", probabilities)
    if not np.any(probabilities > 0.5 / 255):
        return False
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    transfer_syntax = _transfer_syntax(kind, compress)
    seg = _segmentation(
        source.datasets,
        np.moveaxis(probabilities.astype(np.float32, copy=False), 0, -1),
        kind,
        segment_descriptions(metadata, list(labels), identity),
        metadata,
        identity,
        _series_description(series_description, metadata, identity, "probability map"),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        transfer_syntax_uid=transfer_syntax,
        workers=workers if transfer_syntax.is_encapsulated else 0,
    )
    _save(seg, Path(path))
    return True


def write_binned_segmentation(
    probability: np.ndarray,
    source: DicomSource,
    metadata: SegmentationMetadata,
    identity: AlgorithmIdentity,
    path: Path,
    *,
    series_description: str | None = None,
) -> bool:
    """Write one probability map (z, y, x) as a BINARY SEG of probability bins.

    The n segments of the (fractional) template, in labelID order, are the n bins of
    ``bin_probabilities``: segment k holds p in [(k-1)/n, k/n), segment n also p == 1, and
    p == 0 is in no segment. All n segments are described, present or not. If every voxel is
    0, nothing is written and the result is False.
    """
    _check_grid("probability", probability.shape, source)
    labels = metadata.label_ids
    bins = bin_probabilities(probability, len(labels))
    if not bins.any():
        return False
    seg = _segmentation(
        source.datasets,
        bins,
        hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions(metadata, labels, identity),
        metadata,
        identity,
        _series_description(series_description, metadata, identity, "probability bins"),
    )
    _save(seg, Path(path))
    return True
