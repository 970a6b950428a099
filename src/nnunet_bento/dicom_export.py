"""A stage's DICOM outputs: DICOM-SEG of the mask, the probability map as SEG, RT Struct."""

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from . import __version__
from .io.dicom_seg import (
    write_binned_segmentation,
    write_fractional_segmentation,
    write_label_segmentation,
)
from .io.dicom_source import AlgorithmIdentity, DicomSource
from .io.rtstruct import write_rtstruct
from .io.staging import OutputStaging
from .model_folder import file_sha256
from .registry import RegisteredModel
from .request import StageSettings


@dataclass(frozen=True)
class DicomOutputs:
    """Final paths of the DICOM files a stage wrote (None: not asked for, or empty)."""

    segmentation: str | None = None
    fractional_segmentation: str | None = None
    struct: str | None = None


@cache
def _cached_sha256(path: Path) -> str:
    return file_sha256(path)


def checkpoint_sha256(model: RegisteredModel, settings: StageSettings) -> str:
    """SHA-256 of the checkpoint used; with several folds, of their hashes in fold order."""
    recorded = model.store_metadata.get("checkpoint_sha256", {})
    hashes = []
    for fold in settings.use_folds:
        relative = f"fold_{fold}/{settings.checkpoint_name}"
        hashes.append(recorded.get(relative) or _cached_sha256(model.folder / relative))
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def algorithm_identity(model: RegisteredModel, settings: StageSettings) -> AlgorithmIdentity:
    return AlgorithmIdentity(
        name=model.entry.name or model.id,
        version=f"nnunet-bento {__version__}",
        model_tag=model.source,
        checkpoint_sha256=checkpoint_sha256(model, settings),
    )


def segment_names(model: RegisteredModel) -> dict[int, str]:
    """ROI names: the segment labels of the metadata, else dataset.json's label names."""
    names = {value: name for name, value in model.description.foreground_labels.items()}
    if model.seg_metadata is not None:
        names.update({s.label_id: s.label for s in model.seg_metadata.segments})
    return names


def export_dicom(
    model: RegisteredModel,
    settings: StageSettings,
    source: DicomSource,
    segmentation: np.ndarray,
    probabilities: np.ndarray | None,
    labels: tuple[int, ...],
    staging: OutputStaging,
    names: dict[str, str],
    rt_struct: bool,
) -> DicomOutputs:
    """Write the stage's DICOM files into staging; ``names`` maps output kind to file path."""
    metadata = model.seg_metadata
    assert metadata is not None, "the pipeline refuses DICOM export without metadata"
    identity = algorithm_identity(model, settings)
    written: dict[str, str] = {}
    if write_label_segmentation(
        segmentation,
        source,
        metadata,
        identity,
        staging.path(names["segmentation"]),
        segmentation_type=settings.segmentation_type,
        compress=settings.lossless_compression,
        empty_metadata=model.empty_metadata,
    ):
        written["segmentation"] = str(staging.final_path(names["segmentation"]))
    if probabilities is not None:
        fractional = model.fractional_metadata
        assert fractional is not None
        what = "probability bins" if settings.fractional_as_segments else "probability map"
        description = f"{fractional.series_description or identity.name} {what}"[:64]
        path = staging.path(names["fractional_segmentation"])
        if settings.fractional_as_segments:
            done = write_binned_segmentation(
                probabilities[0].astype(np.float32),
                source,
                fractional,
                identity,
                path,
                series_description=description,
            )
        else:
            done = write_fractional_segmentation(
                probabilities.astype(np.float32),
                list(labels),
                source,
                fractional,
                identity,
                path,
                compress=settings.lossless_compression,
                series_description=description,
            )
        if done:
            written["fractional_segmentation"] = str(
                staging.final_path(names["fractional_segmentation"])
            )
    if rt_struct and write_rtstruct(
        segmentation, source, segment_names(model), identity, staging.path(names["struct"])
    ):
        written["struct"] = str(staging.final_path(names["struct"]))
    return DicomOutputs(**written)
