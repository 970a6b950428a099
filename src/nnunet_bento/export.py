"""Every output of a stage: the NIfTI mask, probability map and inputs, the preview PNG, and
for DICOM input the DICOM-SEG of the mask, the probability map as SEG and the RT Struct.

Files are written into an OutputStaging, which moves them into place when the request ends.
"""

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .catalog.model_folder import file_sha256
from .catalog.registry import RegisteredModel
from .io.dicom_seg import (
    write_binned_segmentation,
    write_fractional_segmentation,
    write_label_segmentation,
)
from .io.dicom_source import AlgorithmIdentity, DicomSource
from .io.images import NnunetInput, image_like, segmentation_dtype
from .io.rtstruct import write_rtstruct
from .io.staging import OutputStaging
from .preview import write_preview
from .request import InferenceRequest, StageOutputs, StageSettings
from .stage import Stage, StageInput, StageMasks


@dataclass(frozen=True)
class OutputLayout:
    """Output file names by kind, relative to output_dir: templates of {stage}, {suffix}
    (``_<suffix>`` or nothing) and, for inputs, {channel}."""

    templates: dict[str, str]

    def path(self, kind: str, stage: int, suffix: str | None, channel: int = 0) -> str:
        return self.templates[kind].format(
            stage=stage, suffix=f"_{suffix}" if suffix else "", channel=channel
        )


#: /infer: one folder per stage, nnunet_serve's names.
API_LAYOUT = OutputLayout(
    {
        "prediction": "stage_{stage}/prediction{suffix}.nii.gz",
        "proba": "stage_{stage}/proba{suffix}.nii.gz",
        "input": "stage_{stage}/volume_{channel:04d}{suffix}.nii.gz",
        "segmentation": "stage_{stage}/prediction{suffix}.dcm",
        "fractional_segmentation": "stage_{stage}/proba{suffix}.dcm",
        "struct": "stage_{stage}/struct{suffix}.dcm",
        "preview": "stage_{stage}/preview{suffix}.png",
    }
)
#: nnunet_serve's command line: one model, files directly in output_dir, its names.
CLI_LAYOUT = OutputLayout(
    {
        "prediction": "prediction{suffix}.nii.gz",
        "proba": "probabilities{suffix}.nii.gz",
        "input": "volume_{channel:04d}{suffix}.nii.gz",
        "segmentation": "prediction{suffix}.dcm",
        "fractional_segmentation": "proba{suffix}.dcm",
        "struct": "struct{suffix}.dcm",
        "preview": "preview{suffix}.png",
    }
)
DICOM_KINDS = ("segmentation", "fractional_segmentation", "struct")


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


def probability_image(probabilities: np.ndarray, image: NnunetInput) -> sitk.Image:
    """One label: a 3D float32 image; several: 4D, the labels along the last axis."""
    volumes = [image_like(volume.astype(np.float32), image.reference) for volume in probabilities]
    return volumes[0] if len(volumes) == 1 else sitk.JoinSeries(volumes)


def write_image(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)


def export_stage(
    request: InferenceRequest,
    stage: Stage,
    stage_input: StageInput,
    masks: StageMasks,
    staging: OutputStaging,
    layout: OutputLayout,
) -> StageOutputs:
    """Write every output the request asks of this stage into ``staging``."""
    suffix = request.suffix
    image = stage_input.image
    segmentation = masks.segmentation.astype(segmentation_dtype(masks.segmentation))
    prediction = layout.path("prediction", stage.index, suffix)
    write_image(image_like(segmentation, image.reference), staging.path(prediction))
    outputs = StageOutputs(
        stage=stage.index,
        nnunet_id=stage.model.id,
        is_empty=not segmentation.any(),
        nifti_prediction=str(staging.final_path(prediction)),
    )
    if masks.probabilities is not None:
        proba = layout.path("proba", stage.index, suffix)
        write_image(probability_image(masks.probabilities, image), staging.path(proba))
        outputs.nifti_proba = str(staging.final_path(proba))
    if request.save_nifti_inputs:
        for channel in range(image.array.shape[0]):
            name = layout.path("input", stage.index, suffix, channel)
            write_image(image_like(image.array[channel], image.reference), staging.path(name))
            outputs.nifti_inputs.append(str(staging.final_path(name)))
    if stage_input.dicom_source is not None:
        dicom = export_dicom(
            stage.model,
            stage.settings,
            stage_input.dicom_source,
            segmentation,
            masks.probabilities,
            masks.labels,
            staging,
            {kind: layout.path(kind, stage.index, suffix) for kind in DICOM_KINDS},
            rt_struct=request.save_rt_struct_output,
        )
        outputs.dicom_segmentation = dicom.segmentation
        outputs.dicom_fractional_segmentation = dicom.fractional_segmentation
        outputs.dicom_struct = dicom.struct
    return outputs


def first_channel_volume(image: NnunetInput) -> sitk.Image:
    """The first input channel as a 3D image on the input's grid (a 2D input as one slice)."""
    reference = image.reference
    if reference.GetDimension() == 2:
        reference = sitk.JoinSeries(reference)
    volume = sitk.GetImageFromArray(image.array[0])
    volume.CopyInformation(reference)
    return volume


def input_modality(stage: Stage, stage_input: StageInput) -> str | None:
    """The DICOM Modality of the input, else CT when the model's first channel is CT."""
    if stage_input.dicom_source is not None:
        return stage_input.dicom_source.datasets[0].get("Modality")
    first = next(iter(stage.model.description.channel_names.values()))
    return "CT" if first.upper() == "CT" else None


def export_preview(
    request: InferenceRequest,
    stage: Stage,
    stage_input: StageInput,
    masks: StageMasks,
    staging: OutputStaging,
    layout: OutputLayout,
) -> str:
    """Draw the stage's preview PNG into ``staging``; returns its final path."""
    name = layout.path("preview", stage.index, request.suffix)
    write_preview(
        first_channel_volume(stage_input.image),
        masks.segmentation,
        {label: segment_names(stage.model)[label] for label in masks.labels},
        model_id=stage.model.id,
        folds=stage.settings.use_folds,
        path=staging.path(name),
        modality=input_modality(stage, stage_input),
    )
    return str(staging.final_path(name))
