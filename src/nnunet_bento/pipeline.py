"""One request, top to bottom: plan -> (pull) -> read -> predict -> postprocess -> export ->
commit -> (push). The plan decides; each step applies it. No BentoML here."""

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .cascade import predict_in_box, reference_mask
from .catalog.registry import Registry
from .dicom_exchange import pulled_study, push_outputs
from .errors import NnunetBentoError, TooLargeError
from .export import (
    export_preview,
    export_stage,
    input_modality,
    segment_names,
    statistics_json,
)
from .io.dicom_series import read_dicom_series
from .io.images import NnunetInput, image_file_in, image_like, read_image, to_nnunet_input
from .io.path_roots import PathRoots
from .io.staging import OutputStaging
from .measure import LabelMeasurement, intensity_unit, measure_labels
from .pacs.nodes import DicomNode
from .plan import API_LAYOUT, OutputLayout, RequestPlan, RequestPlanner, StagePlan
from .postprocess import postprocess
from .request import (
    DICOM_OUTPUT_FIELDS,
    OUTPUT_KINDS,
    InferenceRequest,
    InferenceResponse,
    StageOutputs,
    stage_files,
)
from .runners.protocol import PredictionJob, PredictionResult, Predictor
from .settings import ServeSettings, load_settings
from .stage import StageInput, StageMasks
from .webhooks import Webhook

StepCallback = Callable[[int, str], None]
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


def stage_record(
    stage: StagePlan, written: dict[str, list[str]], staging: OutputStaging, is_empty: bool
) -> StageOutputs:
    """A stage's record: the final path of every file it wrote, by output kind."""
    paths = {
        kind: [str(staging.final_path(name)) for name in names] for kind, names in written.items()
    }
    fields: dict[str, Any] = {}
    for kind in OUTPUT_KINDS:
        found = paths.get(kind.name, [])
        fields[kind.field] = found if kind.per_channel else (found[0] if found else None)
    return StageOutputs(stage=stage.index, nnunet_id=stage.model.id, is_empty=is_empty, **fields)


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
        webhooks: Mapping[str, Webhook] | None = None,
    ):
        self.predictor = predictor
        self.roots = roots
        self.settings = settings or load_settings()
        self.planner = RequestPlanner(registry, roots, dicom_nodes or {}, layout, webhooks)

    def plan(self, request: InferenceRequest) -> RequestPlan:
        """The request resolved and checked, before any work."""
        return self.planner.plan(request)

    def read(self, stage: StagePlan, study: Path) -> StageInput:
        """The stage's series on the first series' grid, with the DICOM source if any; every
        file read must lie in the study."""
        max_voxels = self.settings.nnunet_bento_max_voxels
        if stage.is_dicom:
            sources = [
                read_dicom_series(folder, max_voxels, inside=study, field=field)
                for folder, field in zip(stage.series, stage.series_fields, strict=True)
            ]
            return StageInput(to_nnunet_input([s.image for s in sources]), sources[0])
        images = [
            read_image(image_file_in(folder), max_voxels=max_voxels, inside=study, field=field)
            for folder, field in zip(stage.series, stage.series_fields, strict=True)
        ]
        return StageInput(to_nnunet_input(images), None)

    def predict(
        self, stage: StagePlan, study: Path, image: NnunetInput, masks: list[sitk.Image]
    ) -> PredictionResult:
        """Run the model; with a crop reference, on the padded box around it, pasted back."""
        if stage.crop_from is None:
            return self._predict(stage, image)
        crop_mask = reference_mask(
            stage.crop_from, study, masks, image.reference, self.settings.nnunet_bento_max_voxels
        )
        return predict_in_box(
            lambda cropped: self._predict(stage, cropped),
            image,
            crop_mask,
            stage.settings.crop_padding,
            stage.kept_labels,
            stage.crop_from,
        )

    def _predict(self, stage: StagePlan, image: NnunetInput) -> PredictionResult:
        kept = stage.kept_labels if stage.needs_probabilities else None
        if kept is not None:
            self._check_probability_memory(stage, image, len(kept))
        job = PredictionJob(
            model_id=stage.model.id,
            image=image.array,
            properties=image.properties,
            folds=stage.weights.folds,
            checkpoint_name=stage.weights.checkpoint_name,
            tta=stage.settings.tta,
            probability_labels=kept,
        )
        return self.predictor.predict(job)

    def postprocess(
        self,
        stage: StagePlan,
        study: Path,
        image: NnunetInput,
        result: PredictionResult,
        masks: list[sitk.Image],
    ) -> StageMasks:
        reference = (
            None
            if stage.intersect_with is None
            else reference_mask(
                stage.intersect_with,
                study,
                masks,
                image.reference,
                self.settings.nnunet_bento_max_voxels,
            )
        )
        segmentation, probabilities, labels = postprocess(
            result.segmentation, result.probabilities, stage.kept_labels, stage.settings, reference
        )
        return StageMasks(segmentation, probabilities if stage.wants("proba") else None, labels)

    def measure(
        self, stage: StagePlan, stage_input: StageInput, masks: StageMasks
    ) -> dict[str, LabelMeasurement]:
        """Each kept label of the stage's mask, measured on its grid with the first input
        channel's values (HU for CT) and, when kept, its probabilities."""
        image = stage_input.image
        grid = image.reference
        flat = grid.GetDimension() == 2
        probabilities = masks.probabilities
        names = segment_names(stage.model)
        return measure_labels(
            masks.segmentation[0] if flat else masks.segmentation,
            grid,
            {label: names[label] for label in masks.labels},
            intensity=image.array[0][0] if flat else image.array[0],
            unit=intensity_unit(input_modality(stage, stage_input)),
            probabilities=probabilities[:, 0]
            if flat and probabilities is not None
            else probabilities,
            probability_labels=masks.labels,
        )

    def _check_probability_memory(self, stage: StagePlan, image: NnunetInput, labels: int) -> None:
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
        self, plan: RequestPlan, timings: Timings
    ) -> tuple[list[PredictionResult], list[StageOutputs]]:
        """Read, predict, postprocess and export each stage into staging; commit at the end."""
        results: list[PredictionResult] = []
        records: list[StageOutputs] = []
        stage_masks: list[sitk.Image] = []
        with OutputStaging(
            plan.output_dir,
            self.settings.nnunet_bento_work_dir,
            overwrite=plan.request.overwrite,
            shown=plan.output_shown,
        ) as staging:
            for stage in plan.stages:
                with timings.step("read", stage.index):
                    stage_input = self.read(stage, plan.study)
                image = stage_input.image
                with timings.step("predict", stage.index):
                    results.append(self.predict(stage, plan.study, image, stage_masks))
                with timings.step("postprocess", stage.index):
                    masks = self.postprocess(stage, plan.study, image, results[-1], stage_masks)
                stage_masks.append(image_like(masks.segmentation, image.reference))
                measurements = {}
                if stage.needs_measurements:
                    with timings.step("measure", stage.index):
                        measurements = self.measure(stage, stage_input, masks)
                with timings.step("export", stage.index), writing_into(staging):
                    written = export_stage(stage, stage_input, masks, measurements, staging)
                if stage.wants("preview"):
                    with timings.step("preview", stage.index), writing_into(staging):
                        written.update(
                            export_preview(stage, stage_input, masks, measurements, staging)
                        )
                record = stage_record(stage, written, staging, not masks.segmentation.any())
                if stage.wants("statistics"):
                    record.statistics = statistics_json(measurements)
                records.append(record)
            timings.check()
        return results, records

    def run(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse:
        """Plan, then (pull,) read, predict and export every stage, commit, (push); outputs
        appear only on success.

        ``on_step(stage, step)`` is called as each step starts (for progress displays).
        ``check()`` is called at each step boundary and before the commit: what it raises
        (a timeout, a cancellation) stops the request there, and nothing is committed.
        """
        plan = self.planner.plan(request)
        if plan.pull is None:
            response = self._run(plan, on_step, check)
        else:
            with pulled_study(plan.pull, self.settings.nnunet_bento_work_dir) as (study, folders):
                response = self._run(
                    plan.with_pulled_study(self.roots, study, folders), on_step, check
                )
        if plan.push_to:
            files = [
                Path(path) for field in DICOM_OUTPUT_FIELDS for path in getattr(response, field)
            ]
            response.push = push_outputs(plan.push_to, files)
        return response

    def _run(
        self,
        plan: RequestPlan,
        on_step: StepCallback | None,
        check: Callable[[], None] | None,
    ) -> InferenceResponse:
        """The run of a plan whose study is a folder."""
        started = time.perf_counter()
        timings = Timings(on_step, check)
        try:
            results, records = self._run_stages(plan, timings)
        except NnunetBentoError as error:
            raise type(error)(plan.shown(str(error))) from error
        request = plan.request
        single = isinstance(request.nnunet_id, str)
        sources = [stage.model.source for stage in plan.stages]
        metadata = [stage.model.metadata_record for stage in plan.stages]
        return InferenceResponse(
            time_elapsed=time.perf_counter() - started,
            timings=dict(timings.seconds),
            gpu=results[0].gpu,
            device=results[0].device,
            nnunet_path=sources[0] if single else sources,
            metadata=metadata[0] if single else metadata,
            request=request.model_dump(),
            warnings=list(plan.warnings),
            stages=records,
            **{
                kind.field: [path for record in records for path in stage_files(record, kind)]
                for kind in OUTPUT_KINDS
            },
        )
