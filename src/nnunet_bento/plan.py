"""A request resolved and checked once, before any work: the RequestPlan.

``plan_request`` takes the request, the registry, the path roots, the DICOM nodes and the
output layout, and answers a RequestPlan or raises the error that names the field (400 for
a bad value, 403 for a path outside its root, 404 for a missing study). For every stage
the plan holds, already resolved and checked:

- the model and its settings (the request, then the model's default_args, then the server's);
- the input series, resolved inside the study (for a pulled study, once it is pulled);
- the references that limit it (``intersect_with``, ``crop_from``): a checked file or an
  earlier stage, with the transition's ``cascade_mode`` applied;
- the weights (folds and checkpoint);
- the outputs to write, with their final names, and the DICOM options.

For the request it holds the output folder, the DICOM nodes to pull from and push to, and
the warnings for the response; the webhooks that ``notify`` names are checked too (a job
calls them when it ends). The steps (read, predict, postprocess, export, push) read the plan
and decide nothing again.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import __version__
from .catalog.registry import RegisteredModel, Registry
from .errors import InputNotFoundError, RequestError
from .io.dicom_source import AlgorithmIdentity
from .io.path_roots import STUDY_FIELD, PathRoots
from .pacs.nodes import DicomNode, resolve_node
from .request import (
    OUTPUT_KINDS,
    PER_MODEL_FIELDS,
    PER_MODEL_LIST_FIELDS,
    REFERENCE_FIELDS,
    CascadeMode,
    FoldId,
    InferenceRequest,
    OutputKind,
    StageSettings,
    format_validation_error,
)
from .webhooks import WEBHOOKS_ENV, Webhook

STAGE_REFERENCE = re.compile(r"^stage_(\d+)$")
TMP_DIR_WARNING = (
    "tmp_dir is accepted for compatibility with nnunet_serve and not used: outputs are staged "
    "inside output_dir, so that the final move is atomic"
)


class OutputLayout(Enum):
    """Where a request's files go: /infer's folder per stage, or the CLI's flat folder."""

    API = "api_name"
    CLI = "cli_name"

    def name(self, kind: OutputKind, stage: int, suffix: str | None, channel: int = 0) -> str:
        """The file name of ``kind`` relative to output_dir."""
        template: str = getattr(kind, self.value)
        return template.format(stage=stage, suffix=f"_{suffix}" if suffix else "", channel=channel)


API_LAYOUT = OutputLayout.API
CLI_LAYOUT = OutputLayout.CLI


@dataclass(frozen=True)
class Reference:
    """The mask that limits a stage for one field: an earlier stage's mask, or a mask file."""

    field: str
    name: str
    stage: int | None = None
    file: Path | None = None
    explicit: bool = True


@dataclass(frozen=True)
class Weights:
    """The folds to ensemble and the checkpoint file in each fold folder."""

    folds: tuple[FoldId, ...]
    checkpoint_name: str


@dataclass(frozen=True)
class StagePlan:
    """One model of a request, resolved: everything its steps need, checked."""

    index: int
    model: RegisteredModel
    settings: StageSettings
    series_entries: tuple[str, ...]
    series_fields: tuple[str, ...]
    series: tuple[Path, ...]
    intersect_with: Reference | None
    crop_from: Reference | None
    weights: Weights
    outputs: dict[str, tuple[str, ...]]
    is_dicom: bool

    @property
    def labels(self) -> tuple[int, ...]:
        """The model's foreground label values; probabilities are indexed like this."""
        return tuple(self.model.description.foreground_labels.values())

    @property
    def kept_labels(self) -> tuple[int, ...]:
        """The labels the request keeps (class_idx), in the model's order; all by default."""
        kept = self.settings.class_idx
        return (
            self.labels if kept is None else tuple(label for label in self.labels if label in kept)
        )

    @property
    def needs_probabilities(self) -> bool:
        """Whether post-processing or export uses the probabilities of the kept labels."""
        settings = self.settings
        return (
            settings.save_proba_map
            or settings.min_confidence is not None
            or (settings.class_idx is not None and settings.proba_threshold is not None)
        )

    def wants(self, kind: str) -> bool:
        return kind in self.outputs

    @property
    def needs_measurements(self) -> bool:
        """Whether a file or the response takes the measurements of the stage's mask."""
        return any(self.wants(kind) for kind in ("statistics", "dicom_sr", "preview"))

    def output(self, kind: str, channel: int = 0) -> str:
        """The file name of an output kind the plan writes, relative to output_dir."""
        return self.outputs[kind][channel]

    @cached_property
    def identity(self) -> AlgorithmIdentity:
        """The algorithm as DICOM outputs name it: model tag and checkpoint hash."""
        return AlgorithmIdentity(
            name=self.model.entry.name or self.model.id,
            version=f"nnunet-bento {__version__}",
            model_tag=self.model.source,
            checkpoint_sha256=self.model.checkpoint_sha256(
                self.weights.folds, self.weights.checkpoint_name
            ),
        )


@dataclass(frozen=True)
class PullPlan:
    """A study to pull from a DICOM node: every series the stages name, once."""

    node: DicomNode
    study_uid: str
    entries: tuple[str, ...]


@dataclass(frozen=True)
class RequestPlan:
    """A request resolved and checked: its stages, folders, nodes and warnings."""

    request: InferenceRequest
    stages: tuple[StagePlan, ...]
    study: Path | None
    output_dir: Path
    output_shown: str
    pull: PullPlan | None = None
    push_to: tuple[DicomNode, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def shown(self, message: str) -> str:
        """``message`` with server paths named by their fields: relative to study_path, or
        as output_dir."""
        if self.study is not None:
            message = message.replace(f"{self.study}/", "").replace(str(self.study), STUDY_FIELD)
        return message.replace(str(self.output_dir), "output_dir")

    def with_pulled_study(
        self, roots: PathRoots, study: Path, folders: dict[str, Path]
    ) -> "RequestPlan":
        """The plan of a pulled study: each stage's series are the folders its entries were
        pulled into, checked like the series of a study on disk."""
        study = study.resolve()
        stages = tuple(
            replace(
                stage,
                series=tuple(
                    roots.in_study(name, study, folders[entry].relative_to(study).as_posix())
                    for name, entry in zip(stage.series_fields, stage.series_entries, strict=True)
                ),
            )
            for stage in self.stages
        )
        return replace(self, stages=stages, study=study)


def field_name(name: str, stage: int, n_stages: int, item: int | None = None) -> str:
    """How an error names a per-model field: ``series_folders[1]``, ``crop_from[0]``, ..."""
    named = name if n_stages == 1 else f"{name}[{stage}]"
    return named if item is None else f"{named}[{item}]"


def _is_per_model_list(value: Any) -> bool:
    """True for a list of lists (None allowed as one model's value)."""
    return isinstance(value, list) and any(isinstance(item, list) for item in value)


def value_for_model(name: str, value: Any, index: int, n_models: int) -> Any:
    """Pick model ``index``'s value from a request value that is shared or given per model."""
    if name in PER_MODEL_LIST_FIELDS:
        per_model = _is_per_model_list(value)
        if name == "series_folders" and n_models > 1 and not per_model:
            raise RequestError(
                f"series_folders must be a list of {n_models} lists, one per model, "
                f"for {n_models} models"
            )
    else:
        per_model = isinstance(value, list)
    if not per_model:
        return value
    if len(value) != n_models:
        raise RequestError(
            f"{name} has {len(value)} per-model values but the request names {n_models} "
            f"model(s); give one value for all or one per model"
        )
    return value[index]


def resolve_webhooks(
    names: list[str] | None, webhooks: Mapping[str, Webhook]
) -> tuple[Webhook, ...]:
    """The configured webhooks that ``notify`` names; RequestError (400) naming notify[i]."""
    resolved = []
    for index, name in enumerate(names or []):
        if name not in webhooks:
            known = (
                f"known webhooks: {', '.join(webhooks)}"
                if webhooks
                else f"no webhook is configured in {WEBHOOKS_ENV}"
            )
            raise RequestError(f"notify[{index}]: unknown webhook {name!r} ({known})")
        resolved.append(webhooks[name])
    return tuple(resolved)


def merge_stage_settings(
    request: InferenceRequest, default_args: list[dict[str, Any]]
) -> list[StageSettings]:
    """One StageSettings per model: a value the request gives (not null) wins; else the
    model's default_args (a list-valued default fills that model's slot); else the server
    default in StageSettings."""
    n_models = len(default_args)
    if request.series_folders is None and not all("series_folders" in d for d in default_args):
        raise RequestError("series_folders is missing and no model gives it in default_args")
    stages = []
    for index, defaults in enumerate(default_args):
        values = {name: value for name, value in defaults.items() if name in PER_MODEL_FIELDS}
        for name in PER_MODEL_FIELDS:
            given = getattr(request, name)
            if given is not None:
                picked = value_for_model(name, given, index, n_models)
                if picked is not None:
                    values[name] = picked
        try:
            stages.append(StageSettings.model_validate(values))
        except ValidationError as error:
            raise RequestError(
                f"model {request.model_ids[index]!r}: {format_validation_error(error)}"
            ) from None
    return stages


def cascade_modes(request: InferenceRequest) -> list[CascadeMode]:
    """One mode per transition between consecutive models."""
    transitions = len(request.model_ids) - 1
    modes = request.cascade_mode
    if isinstance(modes, str):
        return [modes] * transitions
    if len(modes) not in (1, transitions):
        raise RequestError(
            f"cascade_mode has {len(modes)} values for {transitions} transition(s) between models"
        )
    return list(modes) * transitions if len(modes) == 1 else list(modes)


class RequestPlanner:
    """Makes RequestPlans against one registry, path roots, DICOM nodes, output layout and
    webhooks."""

    def __init__(
        self,
        registry: Registry,
        roots: PathRoots,
        nodes: dict[str, DicomNode],
        layout: OutputLayout = API_LAYOUT,
        webhooks: Mapping[str, Webhook] | None = None,
    ) -> None:
        self.registry = registry
        self.roots = roots
        self.nodes = nodes
        self.layout = layout
        self.webhooks = webhooks or {}

    def plan(self, request: InferenceRequest) -> RequestPlan:
        """Resolve and check the whole request; nothing is read but the study folder's
        existence."""
        push_to = self._push_nodes(request)
        resolve_webhooks(request.notify, self.webhooks)
        pull = self._pull(request)
        models = [self.registry.get(model_id) for model_id in request.model_ids]
        settings = merge_stage_settings(request, [m.entry.default_args for m in models])
        modes: list[CascadeMode | None] = [None, *cascade_modes(request)]
        study = None if pull else self.roots.input_path(STUDY_FIELD, str(request.study_path))
        output = self.roots.output_path("output_dir", request.output_dir)
        if study is not None and not study.is_dir():
            raise InputNotFoundError(f"study_path {request.study_path} does not exist")
        n = len(models)
        stages = tuple(
            self._stage(request, index, model, stage_settings, modes[index], study, n)
            for index, (model, stage_settings) in enumerate(zip(models, settings, strict=True))
        )
        if pull is not None:
            entries = sorted({entry for stage in stages for entry in stage.series_entries})
            pull = replace(pull, entries=tuple(entries))
        return RequestPlan(
            request=request,
            stages=stages,
            study=study,
            output_dir=output,
            output_shown=self.roots.output_shown(output, request.output_dir),
            pull=pull,
            push_to=push_to,
            warnings=(TMP_DIR_WARNING,) if "tmp_dir" in request.model_fields_set else (),
        )

    def _push_nodes(self, request: InferenceRequest) -> tuple[DicomNode, ...]:
        names = request.push_to or []
        nodes = tuple(
            resolve_node(f"push_to[{index}]", name, self.nodes) for index, name in enumerate(names)
        )
        if nodes and not request.is_dicom:
            raise RequestError("push_to needs DICOM outputs: set is_dicom or dicom_source")
        return nodes

    def _pull(self, request: InferenceRequest) -> PullPlan | None:
        source = request.dicom_source
        if source is None:
            return None
        node = resolve_node("dicom_source.node", source.node, self.nodes)
        return PullPlan(node, source.study_uid, ())

    def _stage(
        self,
        request: InferenceRequest,
        index: int,
        model: RegisteredModel,
        settings: StageSettings,
        mode: CascadeMode | None,
        study: Path | None,
        n_stages: int,
    ) -> StagePlan:
        entries = tuple(settings.series_folders)
        fields = tuple(
            field_name("series_folders", index, n_stages, i) for i in range(len(entries))
        )
        self._check_channels(model, len(entries))
        self._check_labels(model, settings)
        if request.is_dicom:
            self._check_dicom_export(model, settings)
        elif request.save_rt_struct_output or request.save_dicom_sr:
            field = "save_rt_struct_output" if request.save_rt_struct_output else "save_dicom_sr"
            raise RequestError(f"{field} needs is_dicom: it writes DICOM that refers to DICOM")
        series = (
            ()
            if study is None
            else tuple(
                self.roots.in_study(name, study, entry)
                for name, entry in zip(fields, entries, strict=True)
            )
        )
        references = {
            name: self._reference(name, settings, index, mode, study, n_stages)
            for name in REFERENCE_FIELDS
        }
        return StagePlan(
            index=index,
            model=model,
            settings=settings,
            series_entries=entries,
            series_fields=fields,
            series=series,
            intersect_with=references["intersect_with"],
            crop_from=references["crop_from"],
            weights=self._weights(model, settings, index, n_stages),
            outputs=self._outputs(request, settings, index, len(entries)),
            is_dicom=request.is_dicom,
        )

    @staticmethod
    def _check_channels(model: RegisteredModel, given: int) -> None:
        expected = model.description.num_channels
        if given != expected:
            channels = ", ".join(model.description.channel_names.values())
            raise RequestError(
                f"model {model.id!r} takes {expected} series ({channels}); "
                f"series_folders gives {given}"
            )

    @staticmethod
    def _check_labels(model: RegisteredModel, settings: StageSettings) -> None:
        labels = set(model.description.foreground_labels.values())
        unknown = set(settings.class_idx or ()) - labels
        if unknown:
            raise RequestError(
                f"class_idx {sorted(unknown)} not among model {model.id!r}'s labels "
                f"{model.description.foreground_labels}"
            )

    @staticmethod
    def _check_dicom_export(model: RegisteredModel, settings: StageSettings) -> None:
        if model.seg_metadata is None:
            raise RequestError(
                f"model {model.id!r} has no DICOM metadata: give a DCMQI template "
                "(--metadata_path, or metadata in its spec entry) to export DICOM"
            )
        if settings.lossless_compression and settings.segmentation_type == "binary":
            raise RequestError(
                "lossless_compression needs segmentation_type labelmap: highdicom compresses "
                "BINARY SEG only with JPEG 2000, which is not available"
            )
        labels = tuple(model.description.foreground_labels.values())
        kept = settings.class_idx or labels
        if settings.save_proba_map and settings.fractional_as_segments and len(kept) != 1:
            raise RequestError(
                f"fractional_as_segments bins one probability map; model {model.id!r} "
                f"gives {len(kept)} labels {list(kept)}: select one with class_idx"
            )

    def _reference(
        self,
        name: str,
        settings: StageSettings,
        index: int,
        mode: CascadeMode | None,
        study: Path | None,
        n_stages: int,
    ) -> Reference | None:
        """The stage's own reference; else the previous stage's mask when the transition's
        cascade_mode is the one this field stands for."""
        own = getattr(settings, name)
        if own is None:
            if index > 0 and mode == REFERENCE_FIELDS[name]:
                return Reference(name, f"stage_{index - 1}", stage=index - 1, explicit=False)
            return None
        match = STAGE_REFERENCE.match(own)
        if match:
            referenced = int(match.group(1))
            if referenced >= index:
                raise RequestError(
                    f"{name} {own!r} of stage {index} names a stage that has not run before it"
                )
            return Reference(name, own, stage=referenced)
        if study is None:
            raise RequestError(
                f"{name} {own!r} names a file, but a study pulled from dicom_source has only "
                "its series: name an earlier stage (stage_N)"
            )
        return Reference(
            name, own, file=self.roots.in_study(field_name(name, index, n_stages), study, own)
        )

    @staticmethod
    def _weights(
        model: RegisteredModel, settings: StageSettings, index: int, n_stages: int
    ) -> Weights:
        folds = tuple(settings.use_folds)
        name = field_name("use_folds", index, n_stages)
        if len({str(fold) for fold in folds}) != len(folds):
            raise RequestError(f"{name}: each fold may be named once; got {list(folds)}")
        available = model.description.folds
        if len(folds) > len(available):
            raise RequestError(
                f"{name}: model {model.id!r} has {len(available)} fold(s); got {len(folds)}"
            )
        model.description.check_checkpoints(model.id, folds, settings.checkpoint_name)
        return Weights(folds, settings.checkpoint_name)

    def _outputs(
        self, request: InferenceRequest, settings: StageSettings, index: int, channels: int
    ) -> dict[str, tuple[str, ...]]:
        """The final names of every output kind the request asks of this stage."""

        def asked(kind: OutputKind) -> bool:
            if kind.dicom and not request.is_dicom:
                return False
            if kind.asked_by is None:
                return True
            values = settings if kind.asked_by in PER_MODEL_FIELDS else request
            return bool(getattr(values, kind.asked_by))

        return {
            kind.name: tuple(
                self.layout.name(kind, index, request.suffix, channel)
                for channel in range(channels if kind.per_channel else 1)
            )
            for kind in OUTPUT_KINDS
            if asked(kind)
        }
