"""Every output of a stage: the NIfTI mask, probability map and inputs, the preview PNG, and
for DICOM input the DICOM-SEG of the mask, the probability map as SEG and the RT Struct.

The plan names every file; they are written into an OutputStaging, which moves them into
place when the request ends. Each function answers the names it wrote, by output kind.
"""

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .catalog.registry import RegisteredModel
from .io.dicom_seg import (
    write_binned_segmentation,
    write_fractional_segmentation,
    write_label_segmentation,
)
from .io.dicom_source import DicomSource
from .io.dicom_sr import write_measurement_report
from .io.images import NnunetInput, image_like, segmentation_dtype
from .io.rtstruct import write_rtstruct
from .io.staging import OutputStaging
from .measure import LabelMeasurement
from .plan import StagePlan
from .preview import write_preview
from .stage import StageInput, StageMasks


def segment_names(model: RegisteredModel) -> dict[int, str]:
    """ROI names: the segment labels of the metadata, else dataset.json's label names."""
    names = {value: name for name, value in model.description.foreground_labels.items()}
    if model.seg_metadata is not None:
        names.update({s.label_id: s.label for s in model.seg_metadata.segments})
    return names


def export_dicom(
    stage: StagePlan,
    source: DicomSource,
    masks: StageMasks,
    measurements: dict[str, LabelMeasurement],
    staging: OutputStaging,
) -> dict[str, str]:
    """Write the stage's DICOM files into staging; answers the final path of each written
    kind (an empty mask writes no SEG and no RT Struct)."""
    model, settings = stage.model, stage.settings
    metadata = model.seg_metadata
    assert metadata is not None, "the plan refuses DICOM export without metadata"
    segmentation = masks.segmentation
    written: dict[str, str] = {}
    if write_label_segmentation(
        segmentation,
        source,
        metadata,
        stage.identity,
        staging.path(stage.output("segmentation")),
        segmentation_type=settings.segmentation_type,
        compress=settings.lossless_compression,
        empty_metadata=model.empty_metadata,
    ):
        written["segmentation"] = stage.output("segmentation")
    if stage.wants("fractional_segmentation") and write_probability_segmentation(
        stage, source, masks, staging
    ):
        written["fractional_segmentation"] = stage.output("fractional_segmentation")
    if (
        "segmentation" in written
        and stage.wants("dicom_sr")
        and write_measurement_report(
            measurements,
            staging.path(stage.output("segmentation")),
            source,
            stage.identity,
            staging.path(stage.output("dicom_sr")),
        )
    ):
        written["dicom_sr"] = stage.output("dicom_sr")
    if stage.wants("struct") and write_rtstruct(
        segmentation,
        source,
        segment_names(model),
        stage.identity,
        staging.path(stage.output("struct")),
    ):
        written["struct"] = stage.output("struct")
    return written


def write_probability_segmentation(
    stage: StagePlan, source: DicomSource, masks: StageMasks, staging: OutputStaging
) -> bool:
    """The probability map as a FRACTIONAL SEG, or as bins (fractional_as_segments)."""
    fractional = stage.model.fractional_metadata
    assert fractional is not None, "the plan refuses DICOM export without metadata"
    assert masks.probabilities is not None, "save_proba_map keeps the probabilities"
    binned = stage.settings.fractional_as_segments
    what = "probability bins" if binned else "probability map"
    description = f"{fractional.series_description or stage.identity.name} {what}"[:64]
    path = staging.path(stage.output("fractional_segmentation"))
    if binned:
        return write_binned_segmentation(
            masks.probabilities[0].astype(np.float32),
            source,
            fractional,
            stage.identity,
            path,
            series_description=description,
        )
    return write_fractional_segmentation(
        masks.probabilities.astype(np.float32),
        list(masks.labels),
        source,
        fractional,
        stage.identity,
        path,
        compress=stage.settings.lossless_compression,
        series_description=description,
    )


def probability_image(probabilities: np.ndarray, image: NnunetInput) -> sitk.Image:
    """One label: a 3D float32 image; several: 4D, the labels along the last axis."""
    volumes = [image_like(volume.astype(np.float32), image.reference) for volume in probabilities]
    return volumes[0] if len(volumes) == 1 else sitk.JoinSeries(volumes)


def write_image(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)


def statistics_json(measurements: dict[str, LabelMeasurement]) -> dict[str, dict[str, Any]]:
    """The measurements as statistics.json and stages[N].statistics hold them."""
    return {name: measurement.to_json() for name, measurement in measurements.items()}


def export_stage(
    stage: StagePlan,
    stage_input: StageInput,
    masks: StageMasks,
    measurements: dict[str, LabelMeasurement],
    staging: OutputStaging,
) -> dict[str, list[str]]:
    """Write every file the plan names for this stage but the preview into ``staging``;
    answers the names written, by output kind."""
    image = stage_input.image
    segmentation = masks.segmentation.astype(segmentation_dtype(masks.segmentation))
    written: dict[str, list[str]] = {}
    write_image(image_like(segmentation, image.reference), staging.path(stage.output("prediction")))
    written["prediction"] = [stage.output("prediction")]
    if stage.wants("proba") and masks.probabilities is not None:
        write_image(
            probability_image(masks.probabilities, image), staging.path(stage.output("proba"))
        )
        written["proba"] = [stage.output("proba")]
    if stage.wants("input"):
        for channel in range(image.array.shape[0]):
            name = stage.output("input", channel)
            write_image(image_like(image.array[channel], image.reference), staging.path(name))
        written["input"] = list(stage.outputs["input"])
    if stage.wants("statistics"):
        name = stage.output("statistics")
        staging.path(name).write_text(json.dumps(statistics_json(measurements), indent=2))
        written["statistics"] = [name]
    if stage.is_dicom and stage_input.dicom_source is not None:
        dicom = export_dicom(
            stage,
            stage_input.dicom_source,
            replace(masks, segmentation=segmentation),
            measurements,
            staging,
        )
        written.update({kind: [name] for kind, name in dicom.items()})
    return written


def first_channel_volume(image: NnunetInput) -> sitk.Image:
    """The first input channel as a 3D image on the input's grid (a 2D input as one slice)."""
    reference = image.reference
    if reference.GetDimension() == 2:
        reference = sitk.JoinSeries(reference)
    volume = sitk.GetImageFromArray(image.array[0])
    volume.CopyInformation(reference)
    return volume


def input_modality(stage: StagePlan, stage_input: StageInput) -> str | None:
    """The DICOM Modality of the input, else CT when the model's first channel is CT."""
    if stage_input.dicom_source is not None:
        return stage_input.dicom_source.datasets[0].get("Modality")
    first = next(iter(stage.model.description.channel_names.values()))
    return "CT" if first.upper() == "CT" else None


def export_preview(
    stage: StagePlan,
    stage_input: StageInput,
    masks: StageMasks,
    measurements: dict[str, LabelMeasurement],
    staging: OutputStaging,
) -> dict[str, list[str]]:
    """Draw the stage's preview PNG into ``staging``, its legend from the measurements;
    answers its name."""
    name = stage.output("preview")
    write_preview(
        first_channel_volume(stage_input.image),
        masks.segmentation,
        {label: segment_names(stage.model)[label] for label in masks.labels},
        measurements={m.label: m for m in measurements.values()},
        model_id=stage.model.id,
        folds=stage.weights.folds,
        path=staging.path(name),
        modality=input_modality(stage, stage_input),
    )
    return {"preview": [name]}
