"""One request, top to bottom: plan -> read -> predict -> export. No BentoML here."""

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .cascade import bounding_box, check_stage_reference, paste, reference_mask
from .dicom_export import export_dicom
from .errors import InputNotFoundError, RequestError
from .io.dicom_series import read_dicom_series
from .io.dicom_source import DicomSource
from .io.images import (
    NnunetInput,
    crop_input,
    image_file_in,
    image_like,
    read_image,
    segmentation_dtype,
    to_nnunet_input,
)
from .io.staging import OutputStaging
from .postprocess import PostprocessSettings, postprocess
from .registry import RegisteredModel, Registry
from .request import (
    CascadeMode,
    InferenceRequest,
    InferenceResponse,
    StageOutputs,
    StageSettings,
    cascade_modes,
    merge_stage_settings,
)
from .runners.protocol import PredictionJob, PredictionResult, Predictor


@dataclass(frozen=True)
class Stage:
    """One model of a request with its merged settings."""

    index: int
    model: RegisteredModel
    settings: StageSettings
    cascade_mode: CascadeMode | None = None

    def reference(self, field: str) -> str | None:
        """The mask that limits this stage for ``field`` (intersect_with or crop_from).

        The stage's own setting wins; else the previous stage's mask when the transition's
        cascade_mode is the one the field stands for.
        """
        own = getattr(self.settings, field)
        mode = {"intersect_with": "intersect", "crop_from": "crop"}[field]
        if own is None and self.index > 0 and self.cascade_mode == mode:
            return f"stage_{self.index - 1}"
        return own

    @property
    def labels(self) -> tuple[int, ...]:
        """The model's foreground label values; probabilities are indexed like this."""
        return tuple(self.model.description.foreground_labels.values())


@dataclass(frozen=True)
class StageInput:
    """What a stage read: the image stack for nnU-Net, and the DICOM series it came from."""

    image: NnunetInput
    dicom_source: DicomSource | None


@dataclass(frozen=True)
class StageMasks:
    """A stage's mask after post-processing, and the probability map to save (if asked)."""

    segmentation: np.ndarray
    probabilities: np.ndarray | None
    labels: tuple[int, ...]


@dataclass(frozen=True)
class OutputLayout:
    """Output file names by kind, relative to output_dir: templates of {stage}, {suffix}
    (``_<suffix>`` or nothing) and, for inputs, {channel}."""

    templates: dict[str, str]

    def path(self, kind: str, stage: int, suffix: str | None, channel: int = 0) -> str:
        return self.templates[kind].format(
            stage=stage, suffix=f"_{suffix}" if suffix else "", channel=channel
        )


#: /infer: one folder per stage, the seed API's names.
API_LAYOUT = OutputLayout(
    {
        "prediction": "stage_{stage}/prediction{suffix}.nii.gz",
        "proba": "stage_{stage}/proba{suffix}.nii.gz",
        "input": "stage_{stage}/volume_{channel:04d}{suffix}.nii.gz",
        "segmentation": "stage_{stage}/prediction{suffix}.dcm",
        "fractional_segmentation": "stage_{stage}/proba{suffix}.dcm",
        "struct": "stage_{stage}/struct{suffix}.dcm",
    }
)
#: The seed's command line: one model, files directly in output_dir, its names.
CLI_LAYOUT = OutputLayout(
    {
        "prediction": "prediction{suffix}.nii.gz",
        "proba": "probabilities{suffix}.nii.gz",
        "input": "volume_{channel:04d}{suffix}.nii.gz",
        "segmentation": "prediction{suffix}.dcm",
        "fractional_segmentation": "proba{suffix}.dcm",
        "struct": "struct{suffix}.dcm",
    }
)
DICOM_KINDS = ("segmentation", "fractional_segmentation", "struct")
StepCallback = Callable[[int, str], None]
STEPS = ("read", "predict", "postprocess", "export")


class Timings:
    """Seconds spent per named step, summed over stages; ``on_step`` hears each step start."""

    def __init__(self, on_step: StepCallback | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on_step = on_step

    @contextmanager
    def step(self, name: str, stage: int) -> Iterator[None]:
        if self.on_step is not None:
            self.on_step(stage, name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


class SegmentationPipeline:
    """Runs /infer requests against a registry, handing model runs to a Predictor."""

    def __init__(self, registry: Registry, predictor: Predictor, layout: OutputLayout = API_LAYOUT):
        self.registry = registry
        self.predictor = predictor
        self.layout = layout

    def plan(self, request: InferenceRequest) -> list[Stage]:
        """Resolve the models and merge their default_args into per-stage settings."""
        models = [self.registry.get(model_id) for model_id in request.model_ids]
        settings = merge_stage_settings(request, [m.entry.default_args for m in models])
        modes = [None, *cascade_modes(request)]
        stages = [
            Stage(i, m, s, mode)
            for i, (m, s, mode) in enumerate(zip(models, settings, modes, strict=True))
        ]
        if not Path(request.study_path).is_dir():
            raise InputNotFoundError(f"study_path {request.study_path} does not exist")
        if request.save_rt_struct_output and not request.is_dicom:
            raise RequestError("save_rt_struct_output needs is_dicom: RT Struct refers to DICOM")
        for stage in stages:
            for field in ("intersect_with", "crop_from"):
                check_stage_reference(field, getattr(stage.settings, field), stage.index)
            self._check_dicom_export(request, stage)
            unknown = set(stage.settings.class_idx or ()) - set(stage.labels)
            if unknown:
                raise RequestError(
                    f"class_idx {sorted(unknown)} not among model {stage.model.id!r}'s labels "
                    f"{stage.model.description.foreground_labels}"
                )
            expected = stage.model.description.num_channels
            given = len(stage.settings.series_folders)
            if given != expected:
                channels = ", ".join(stage.model.description.channel_names.values())
                raise RequestError(
                    f"model {stage.model.id!r} takes {expected} series ({channels}); "
                    f"series_folders gives {given}"
                )
        return stages

    @staticmethod
    def _check_dicom_export(request: InferenceRequest, stage: Stage) -> None:
        if not request.is_dicom:
            return
        if stage.model.seg_metadata is None:
            raise RequestError(
                f"model {stage.model.id!r} has no DICOM metadata: give a DCMQI template "
                "(--metadata_path, or metadata in its spec entry) to export DICOM"
            )
        settings = stage.settings
        if settings.lossless_compression and settings.segmentation_type == "binary":
            raise RequestError(
                "lossless_compression needs segmentation_type labelmap: highdicom compresses "
                "BINARY SEG only with JPEG 2000, which is not available"
            )
        kept = settings.class_idx or stage.labels
        if settings.save_proba_map and settings.fractional_as_segments and len(kept) != 1:
            raise RequestError(
                f"fractional_as_segments bins one probability map; model {stage.model.id!r} "
                f"gives {len(kept)} labels {list(kept)}: select one with class_idx"
            )

    def read(self, request: InferenceRequest, stage: Stage) -> StageInput:
        """The stage's series on the first series' grid, with the DICOM source if any."""
        study = Path(request.study_path)
        folders = [study / series for series in stage.settings.series_folders]
        if request.is_dicom:
            sources = [read_dicom_series(folder) for folder in folders]
            return StageInput(to_nnunet_input([s.image for s in sources]), sources[0])
        images = [read_image(image_file_in(folder)) for folder in folders]
        return StageInput(to_nnunet_input(images), None)

    def predict(
        self, request: InferenceRequest, stage: Stage, image: NnunetInput, masks: list[sitk.Image]
    ) -> PredictionResult:
        """Run the model; with a crop reference, on the padded box around it, pasted back."""
        crop_from = stage.reference("crop_from")
        if crop_from is None:
            return self._predict(stage, image)
        crop_mask = reference_mask(crop_from, Path(request.study_path), masks, image.reference)
        box = bounding_box(crop_mask, stage.settings.crop_padding)
        if box is None:
            if stage.settings.crop_from is not None:
                raise RequestError(
                    f"crop_from mask {crop_from!r} of stage {stage.index} is empty: there is "
                    "nothing to crop to"
                )
            return self._nothing_to_predict(stage, image)
        cropped = self._predict(stage, crop_input(image, box))
        shape = image.array.shape[1:]
        return replace(
            cropped,
            segmentation=paste(cropped.segmentation, box, shape),
            probabilities=None
            if cropped.probabilities is None
            else paste(cropped.probabilities, box, shape),
        )

    def _nothing_to_predict(self, stage: Stage, image: NnunetInput) -> PredictionResult:
        """The result of a cascade stage whose crop reference (the previous mask) is empty."""
        shape = image.array.shape[1:]
        return PredictionResult(
            segmentation=np.zeros(shape, np.uint8),
            probabilities=np.zeros((len(stage.labels), *shape), np.float16),
            device="none",
            seconds=0.0,
        )

    def _predict(self, stage: Stage, image: NnunetInput) -> PredictionResult:
        settings = stage.settings
        needs_probabilities = (
            settings.save_proba_map
            or settings.min_confidence is not None
            or (settings.class_idx is not None and settings.proba_threshold is not None)
        )
        job = PredictionJob(
            model_id=stage.model.id,
            image=image.array,
            properties=image.properties,
            folds=tuple(stage.settings.use_folds),
            checkpoint_name=stage.settings.checkpoint_name,
            tta=stage.settings.tta,
            probability_labels=stage.labels if needs_probabilities else None,
        )
        return self.predictor.predict(job)

    def postprocess(
        self,
        request: InferenceRequest,
        stage: Stage,
        image: NnunetInput,
        result: PredictionResult,
        masks: list[sitk.Image],
    ) -> StageMasks:
        settings = stage.settings
        intersect_with = stage.reference("intersect_with")
        reference = (
            None
            if intersect_with is None
            else reference_mask(intersect_with, Path(request.study_path), masks, image.reference)
        )
        segmentation, probabilities, labels = postprocess(
            result.segmentation,
            result.probabilities,
            stage.labels,
            PostprocessSettings(
                class_idx=tuple(settings.class_idx) if settings.class_idx else None,
                proba_threshold=settings.proba_threshold,
                min_confidence=settings.min_confidence,
                min_intersection=settings.min_intersection,
            ),
            reference,
        )
        return StageMasks(segmentation, probabilities if settings.save_proba_map else None, labels)

    def export(
        self,
        request: InferenceRequest,
        stage: Stage,
        stage_input: StageInput,
        masks: StageMasks,
        staging: OutputStaging,
    ) -> StageOutputs:
        suffix = request.suffix
        image = stage_input.image
        segmentation = masks.segmentation.astype(segmentation_dtype(masks.segmentation))
        prediction = self.layout.path("prediction", stage.index, suffix)
        write_image(image_like(segmentation, image.reference), staging.path(prediction))
        outputs = StageOutputs(
            stage=stage.index,
            nnunet_id=stage.model.id,
            is_empty=not segmentation.any(),
            nifti_prediction=str(staging.final_path(prediction)),
        )
        if masks.probabilities is not None:
            proba = self.layout.path("proba", stage.index, suffix)
            write_image(probability_image(masks.probabilities, image), staging.path(proba))
            outputs.nifti_proba = str(staging.final_path(proba))
        if request.save_nifti_inputs:
            for channel in range(image.array.shape[0]):
                name = self.layout.path("input", stage.index, suffix, channel)
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
                {kind: self.layout.path(kind, stage.index, suffix) for kind in DICOM_KINDS},
                rt_struct=request.save_rt_struct_output,
            )
            outputs.dicom_segmentation = dicom.segmentation
            outputs.dicom_fractional_segmentation = dicom.fractional_segmentation
            outputs.dicom_struct = dicom.struct
        return outputs

    def run(
        self, request: InferenceRequest, on_step: StepCallback | None = None
    ) -> InferenceResponse:
        """Plan, then read, predict and export every stage; outputs appear only on success.

        ``on_step(stage, step)`` is called as each of read, predict, postprocess and export
        starts (for progress displays).
        """
        started = time.perf_counter()
        timings = Timings(on_step)
        stages = self.plan(request)
        results: list[PredictionResult] = []
        stage_outputs: list[StageOutputs] = []
        stage_masks: list[sitk.Image] = []
        with OutputStaging(Path(request.output_dir)) as staging:
            for stage in stages:
                with timings.step("read", stage.index):
                    stage_input = self.read(request, stage)
                image = stage_input.image
                with timings.step("predict", stage.index):
                    results.append(self.predict(request, stage, image, stage_masks))
                with timings.step("postprocess", stage.index):
                    masks = self.postprocess(request, stage, image, results[-1], stage_masks)
                stage_masks.append(image_like(masks.segmentation, image.reference))
                with timings.step("export", stage.index):
                    stage_outputs.append(self.export(request, stage, stage_input, masks, staging))
        paths = [stage.model.source for stage in stages]
        metadata = [stage.model.metadata_record for stage in stages]
        return InferenceResponse(
            time_elapsed=time.perf_counter() - started,
            timings=dict(timings.seconds),
            gpu=results[0].gpu,
            device=results[0].device,
            nnunet_path=paths[0] if isinstance(request.nnunet_id, str) else paths,
            metadata=metadata[0] if isinstance(request.nnunet_id, str) else metadata,
            request=request.model_dump(),
            nifti_prediction=[o.nifti_prediction for o in stage_outputs],
            nifti_proba=[o.nifti_proba for o in stage_outputs if o.nifti_proba],
            nifti_inputs=[path for o in stage_outputs for path in o.nifti_inputs],
            dicom_segmentation=[
                o.dicom_segmentation for o in stage_outputs if o.dicom_segmentation
            ],
            dicom_fractional_segmentation=[
                o.dicom_fractional_segmentation
                for o in stage_outputs
                if o.dicom_fractional_segmentation
            ],
            dicom_struct=[o.dicom_struct for o in stage_outputs if o.dicom_struct],
            stages=stage_outputs,
        )


def probability_image(probabilities: np.ndarray, image: NnunetInput) -> sitk.Image:
    """One label: a 3D float32 image; several: 4D, the labels along the last axis."""
    volumes = [image_like(volume.astype(np.float32), image.reference) for volume in probabilities]
    return volumes[0] if len(volumes) == 1 else sitk.JoinSeries(volumes)


def write_image(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)
