"""One request, top to bottom: plan -> read -> predict -> export. No BentoML here."""

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from .cascade import check_stage_reference, predict_in_box, reference_mask, stage_reference
from .catalog.registry import Registry
from .dicom_exchange import DicomExchange
from .errors import InputNotFoundError, NnunetBentoError, RequestError, TooLargeError
from .export import API_LAYOUT, OutputLayout, export_preview, export_stage
from .io.dicom_series import read_dicom_series
from .io.images import NnunetInput, image_file_in, image_like, read_image, to_nnunet_input
from .io.path_roots import PathRoots
from .io.staging import OutputStaging
from .pacs.nodes import DicomNode
from .postprocess import postprocess
from .request import (
    InferenceRequest,
    InferenceResponse,
    StageOutputs,
    cascade_modes,
    merge_stage_settings,
)
from .request_paths import RequestPaths, check_request_paths
from .runners.protocol import PredictionJob, PredictionResult, Predictor
from .settings import ServeSettings, load_settings
from .stage import Stage, StageInput, StageMasks

StepCallback = Callable[[int, str], None]
STEPS = ("read", "predict", "postprocess", "export", "preview")
UNRESTRICTED = PathRoots(input_roots=None, output_root=None)


class Timings:
    """Seconds spent per named step, summed over stages; ``on_step`` hears each step start,
    and ``check`` runs at each step boundary (it raises to stop the request there)."""

    def __init__(
        self, on_step: StepCallback | None = None, check: Callable[[], None] | None = None
    ) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on_step = on_step
        self.check = check or (lambda: None)

    @contextmanager
    def step(self, name: str, stage: int) -> Iterator[None]:
        self.check()
        if self.on_step is not None:
            self.on_step(stage, name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


@contextmanager
def writing_into(staging: OutputStaging) -> Iterator[None]:
    """Writer failures (a read-only or full disk) become errors that name the folder."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        raise staging.write_error(error) from error


@dataclass(frozen=True)
class Plan:
    """A request's stages and its checked paths."""

    stages: list[Stage]
    paths: RequestPaths


class SegmentationPipeline:
    """Runs /infer requests against a registry, handing model runs to a Predictor."""

    def __init__(
        self,
        registry: Registry,
        predictor: Predictor,
        layout: OutputLayout = API_LAYOUT,
        roots: PathRoots = UNRESTRICTED,
        settings: ServeSettings | None = None,
        dicom_nodes: dict[str, DicomNode] | None = None,
    ):
        self.registry = registry
        self.predictor = predictor
        self.layout = layout
        self.roots = roots
        self.settings = settings or load_settings()
        self.exchange = DicomExchange(dicom_nodes or {}, self.settings.nnunet_bento_work_dir)

    def plan(self, request: InferenceRequest) -> Plan:
        """Resolve the models, merge their default_args into per-stage settings, and check
        every path against the roots before anything on the disk is looked at."""
        models = [self.registry.get(model_id) for model_id in request.model_ids]
        settings = merge_stage_settings(request, [m.entry.default_args for m in models])
        modes = [None, *cascade_modes(request)]
        stages = [
            Stage(i, m, s, mode)
            for i, (m, s, mode) in enumerate(zip(models, settings, modes, strict=True))
        ]
        paths = check_request_paths(self.roots, request.study_path, request.output_dir, stages)
        if not paths.study.is_dir():
            raise InputNotFoundError(f"study_path {request.study_path} does not exist")
        if request.save_rt_struct_output and not request.is_dicom:
            raise RequestError("save_rt_struct_output needs is_dicom: RT Struct refers to DICOM")
        for stage in stages:
            for field in ("intersect_with", "crop_from"):
                check_stage_reference(field, getattr(stage.settings, field), stage.index)
            self._check_dicom_export(request, stage)
            stage.model.description.check_checkpoints(
                stage.model.id, stage.settings.use_folds, stage.settings.checkpoint_name
            )
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
        return Plan(stages, paths)

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

    def read(self, request: InferenceRequest, folders: tuple[Path, ...]) -> StageInput:
        """The stage's series on the first series' grid, with the DICOM source if any."""
        max_voxels = self.settings.nnunet_bento_max_voxels
        if request.is_dicom:
            sources = [read_dicom_series(folder, max_voxels) for folder in folders]
            return StageInput(to_nnunet_input([s.image for s in sources]), sources[0])
        images = [read_image(image_file_in(f), max_voxels=max_voxels) for f in folders]
        return StageInput(to_nnunet_input(images), None)

    def predict(
        self, paths: RequestPaths, stage: Stage, image: NnunetInput, masks: list[sitk.Image]
    ) -> PredictionResult:
        """Run the model; with a crop reference, on the padded box around it, pasted back."""
        settings = stage.settings
        crop_from = stage_reference(
            "crop_from", settings.crop_from, stage.index, stage.cascade_mode
        )
        if crop_from is None:
            return self._predict(stage, image)
        crop_file = paths.masks[stage.index].get("crop_from")
        crop_mask = reference_mask(
            crop_from, crop_file, masks, image.reference, self.settings.nnunet_bento_max_voxels
        )
        return predict_in_box(
            lambda cropped: self._predict(stage, cropped),
            image,
            crop_mask,
            settings.crop_padding,
            stage.kept_labels,
            explicit=settings.crop_from,
        )

    def _predict(self, stage: Stage, image: NnunetInput) -> PredictionResult:
        kept = stage.kept_labels if stage.needs_probabilities else None
        if kept is not None:
            self._check_probability_memory(stage, image, len(kept))
        job = PredictionJob(
            model_id=stage.model.id,
            image=image.array,
            properties=image.properties,
            folds=tuple(stage.settings.use_folds),
            checkpoint_name=stage.settings.checkpoint_name,
            tta=stage.settings.tta,
            probability_labels=kept,
        )
        return self.predictor.predict(job)

    def postprocess(
        self,
        paths: RequestPaths,
        stage: Stage,
        image: NnunetInput,
        result: PredictionResult,
        masks: list[sitk.Image],
    ) -> StageMasks:
        settings = stage.settings
        intersect_with = stage_reference(
            "intersect_with", settings.intersect_with, stage.index, stage.cascade_mode
        )
        reference = (
            None
            if intersect_with is None
            else reference_mask(
                intersect_with,
                paths.masks[stage.index].get("intersect_with"),
                masks,
                image.reference,
                self.settings.nnunet_bento_max_voxels,
            )
        )
        segmentation, probabilities, labels = postprocess(
            result.segmentation,
            result.probabilities,
            stage.kept_labels,
            settings,
            reference,
        )
        return StageMasks(segmentation, probabilities if settings.save_proba_map else None, labels)

    def _check_probability_memory(self, stage: Stage, image: NnunetInput, labels: int) -> None:
        """413 when the kept labels' float32 probabilities would pass the configured bound."""
        needed_mb = image.array[0].size * labels * 4 / 2**20
        bound = self.settings.nnunet_bento_max_probability_mb
        if needed_mb > bound:
            raise TooLargeError(
                f"model {stage.model.id!r}: the probabilities of {labels} label(s) need "
                f"{needed_mb:.0f} MB, more than NNUNET_BENTO_MAX_PROBABILITY_MB ({bound}); keep "
                "fewer labels with class_idx, or drop save_proba_map and min_confidence"
            )

    def _run_stages(
        self, request: InferenceRequest, plan: Plan, timings: Timings
    ) -> tuple[list[PredictionResult], list[StageOutputs]]:
        """Read, predict, postprocess and export each stage into staging; commit at the end."""
        results: list[PredictionResult] = []
        stage_outputs: list[StageOutputs] = []
        stage_masks: list[sitk.Image] = []
        with OutputStaging(
            plan.paths.output_dir,
            self.settings.nnunet_bento_work_dir,
            overwrite=request.overwrite,
            shown=plan.paths.output_shown,
        ) as staging:
            for stage in plan.stages:
                with timings.step("read", stage.index):
                    stage_input = self.read(request, plan.paths.series[stage.index])
                image = stage_input.image
                with timings.step("predict", stage.index):
                    results.append(self.predict(plan.paths, stage, image, stage_masks))
                with timings.step("postprocess", stage.index):
                    masks = self.postprocess(plan.paths, stage, image, results[-1], stage_masks)
                stage_masks.append(image_like(masks.segmentation, image.reference))
                with timings.step("export", stage.index), writing_into(staging):
                    outputs = export_stage(request, stage, stage_input, masks, staging, self.layout)
                if request.save_preview:
                    with timings.step("preview", stage.index), writing_into(staging):
                        outputs.preview = export_preview(
                            request, stage, stage_input, masks, staging, self.layout
                        )
                stage_outputs.append(outputs)
            timings.check()
        return results, stage_outputs

    def run(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse:
        """Plan, then read, predict and export every stage; outputs appear only on success.

        ``on_step(stage, step)`` is called as each step starts (for progress displays).
        ``check()`` is called at each step boundary and before the commit: what it raises
        (a timeout, a cancellation) stops the request there, and nothing is committed.
        """
        self.exchange.check(request)
        if request.dicom_source is None:
            response = self._run(request, on_step, check)
        else:
            with self.exchange.pulled(request, self._stage_series(request)) as (study, series):
                local = request.model_copy(
                    update={"study_path": str(study), "series_folders": series}
                )
                response = self._run(local, on_step, check)
            response.request = request.model_dump()
        if request.push_to:
            response.push = self.exchange.push(request, response)
        return response

    def _stage_series(self, request: InferenceRequest) -> list[list[str]]:
        """Each model's series_folders, after default_args are merged in."""
        models = [self.registry.get(model_id) for model_id in request.model_ids]
        stages = merge_stage_settings(request, [m.entry.default_args for m in models])
        return [stage.series_folders for stage in stages]

    def _run(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None,
        check: Callable[[], None] | None,
    ) -> InferenceResponse:
        """The run of a request whose study is a folder."""
        started = time.perf_counter()
        timings = Timings(on_step, check)
        plan = self.plan(request)
        try:
            results, stage_outputs = self._run_stages(request, plan, timings)
        except NnunetBentoError as error:
            raise type(error)(plan.paths.shown(str(error))) from error
        stages = plan.stages
        sources = [stage.model.source for stage in stages]
        metadata = [stage.model.metadata_record for stage in stages]
        return InferenceResponse(
            time_elapsed=time.perf_counter() - started,
            timings=dict(timings.seconds),
            gpu=results[0].gpu,
            device=results[0].device,
            nnunet_path=sources[0] if isinstance(request.nnunet_id, str) else sources,
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
            preview=[o.preview for o in stage_outputs if o.preview],
            stages=stage_outputs,
        )
