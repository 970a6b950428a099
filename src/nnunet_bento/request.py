"""The /infer request: the one declaration of every field, its default and its description.

Per-model fields are declared once, in ``StageSettings``, with the server's default.
``InferenceRequest`` derives from them its per-model form (one value for every model, or a
list with one value per model), and the CLI derives its flags' help from them too.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

FoldId = int | str
Voxels = Annotated[int, Field(ge=0, le=10_000)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]
SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
CascadeMode = Literal["intersect", "crop"]
SegmentationType = Literal["binary", "labelmap"]

#: The steps of one stage, in order: progress reports, job statuses and timings name them.
STEPS = ("read", "predict", "postprocess", "measure", "export", "preview")
#: Fields that the server sets itself for an uploaded study: an upload may not give them.
SERVER_SET_FIELDS = ("study_path", "output_dir", "dicom_source", "overwrite")
#: The reference fields of a stage, and the cascade_mode that supplies each from the stage before.
REFERENCE_FIELDS: dict[str, CascadeMode] = {"intersect_with": "intersect", "crop_from": "crop"}


@dataclass(frozen=True)
class OutputKind:
    """One kind of output file: its response field, its file names and what it holds.

    File names are templates of {stage}, {suffix} (``_<suffix>`` or nothing) and, for
    per-channel kinds, {channel}: ``api_name`` under output_dir for /infer (a folder per
    stage), ``cli_name`` for `nnunet-bento predict` (one model, files directly in -o).
    A stage writes a kind when the request field ``asked_by`` is true (always when None) and,
    for a DICOM kind, the request is DICOM.
    """

    name: str
    field: str
    api_name: str
    cli_name: str
    description: str
    asked_by: str | None = None
    dicom: bool = False
    per_channel: bool = False


OUTPUT_KINDS = (
    OutputKind(
        "prediction",
        "nifti_prediction",
        "stage_{stage}/prediction{suffix}.nii.gz",
        "prediction{suffix}.nii.gz",
        "The mask (NIfTI), one per stage.",
    ),
    OutputKind(
        "proba",
        "nifti_proba",
        "stage_{stage}/proba{suffix}.nii.gz",
        "probabilities{suffix}.nii.gz",
        "The kept labels' probability map (NIfTI; save_proba_map).",
        asked_by="save_proba_map",
    ),
    OutputKind(
        "input",
        "nifti_inputs",
        "stage_{stage}/volume_{channel:04d}{suffix}.nii.gz",
        "volume_{channel:04d}{suffix}.nii.gz",
        "The input volumes as NIfTI, one per channel (save_nifti_inputs).",
        asked_by="save_nifti_inputs",
        per_channel=True,
    ),
    OutputKind(
        "segmentation",
        "dicom_segmentation",
        "stage_{stage}/prediction{suffix}.dcm",
        "prediction{suffix}.dcm",
        "The mask as DICOM-SEG (is_dicom); none for an empty stage.",
        dicom=True,
    ),
    OutputKind(
        "fractional_segmentation",
        "dicom_fractional_segmentation",
        "stage_{stage}/proba{suffix}.dcm",
        "proba{suffix}.dcm",
        "The probability map as DICOM-SEG (is_dicom and save_proba_map).",
        asked_by="save_proba_map",
        dicom=True,
    ),
    OutputKind(
        "struct",
        "dicom_struct",
        "stage_{stage}/struct{suffix}.dcm",
        "struct{suffix}.dcm",
        "The mask as RT Struct (save_rt_struct_output); none for an empty stage.",
        asked_by="save_rt_struct_output",
        dicom=True,
    ),
    OutputKind(
        "statistics",
        "statistics_json",
        "stage_{stage}/statistics{suffix}.json",
        "statistics{suffix}.json",
        "Per-label measurements of the stage's mask: exactly stages[N].statistics.",
        asked_by="save_statistics",
    ),
    OutputKind(
        "dicom_sr",
        "dicom_sr",
        "stage_{stage}/measurements{suffix}.dcm",
        "measurements{suffix}.dcm",
        "The measurements as a DICOM SR (TID 1500) referencing the SEG (save_dicom_sr); none "
        "for an empty stage.",
        asked_by="save_dicom_sr",
        dicom=True,
    ),
    OutputKind(
        "preview",
        "preview",
        "stage_{stage}/preview{suffix}.png",
        "preview{suffix}.png",
        "Three slices through the mask with each label's outline (save_preview).",
        asked_by="save_preview",
    ),
)
OUTPUT_FIELDS = tuple(kind.field for kind in OUTPUT_KINDS)
DICOM_OUTPUT_FIELDS = tuple(kind.field for kind in OUTPUT_KINDS if kind.dicom)


class StageSettings(BaseModel):
    """The settings of one model of a request, after defaults are merged in.

    The defaults here are the server's: they apply where neither the request nor the model's
    default_args give a value. A list-valued field also takes a single value as a list of one
    (crop_padding: the same padding on every axis).
    """

    model_config = ConfigDict(extra="forbid")

    series_folders: list[str] = Field(
        min_length=1,
        description="Series under study_path: a folder holding one image or DICOM series, or "
        "an image file. A model with several channels takes one series per channel; the first "
        "series sets the grid and the others are resampled onto it.",
    )
    checkpoint_name: str = Field(
        "checkpoint_final.pth", description="Checkpoint file in each fold folder."
    )
    tta: bool = Field(True, description="Test-time mirroring.")
    use_folds: list[FoldId] = Field(
        default_factory=lambda: [0], min_length=1, description="Folds to ensemble."
    )
    class_idx: list[int] | None = Field(
        None, description="Labels to keep in the mask and the probability map (default: all)."
    )
    proba_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Probabilities below this are 0 in the saved map; with class_idx, each "
        "kept label's mask is p >= proba_threshold.",
    )
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="Remove components whose maximum probability is below this."
    )
    intersect_with: str | None = Field(
        None,
        description="Mask under study_path (or stage_N, an earlier stage's mask) that candidate "
        "components must overlap (see min_intersection).",
    )
    min_intersection: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Least fraction of a component's voxels inside intersect_with to keep it.",
    )
    crop_from: str | None = Field(
        None,
        description="Mask under study_path (or stage_N) whose bounding box, plus crop_padding, "
        "crops the inputs.",
    )
    crop_padding: tuple[Voxels, Voxels, Voxels] = Field(
        (10, 10, 10), description="Voxels added around the crop box (z, y, x)."
    )
    save_proba_map: bool = Field(
        False, description="Export the probability map; needs proba_threshold."
    )
    segmentation_type: SegmentationType = Field(
        "binary",
        description="DICOM-SEG of the mask: binary (one frame per segment and slice) or "
        "labelmap (the Label Map Segmentation SOP class).",
    )
    lossless_compression: bool = Field(
        False, description="Compress the DICOM-SEG losslessly (RLE; needs labelmap)."
    )
    fractional_as_segments: bool = Field(
        False,
        description="Write the probability map as a categorical SEG of probability bins (one "
        "segment per bin of the fractional template) instead of a FRACTIONAL SEG.",
    )

    @field_validator("series_folders", "use_folds", "class_idx", mode="before")
    @classmethod
    def _single_value_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int | str) else value

    @field_validator("crop_padding", mode="before")
    @classmethod
    def _padding_on_every_axis(cls, value: Any) -> Any:
        return (value, value, value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _proba_map_needs_threshold(self) -> "StageSettings":
        if self.save_proba_map and self.proba_threshold is None:
            raise ValueError("save_proba_map needs proba_threshold")
        return self


PER_MODEL_FIELDS = tuple(StageSettings.model_fields)


def _is_list_valued(annotation: Any) -> bool:
    """True for list[...] and tuple[...] fields, optional or not."""
    options = get_args(annotation) if get_origin(annotation) is not list else (annotation,)
    return any(get_origin(option) in (list, tuple) for option in (annotation, *options))


PER_MODEL_LIST_FIELDS = tuple(
    name for name, info in StageSettings.model_fields.items() if _is_list_valued(info.annotation)
)


def default_text(name: str) -> str:
    """' Default: X.' for a per-model field with a server default, else ''."""
    info = StageSettings.model_fields[name]
    if info.is_required():
        return ""
    default = info.get_default(call_default_factory=True)
    return "" if default is None else f" Default: {default}."


def field_help(name: str) -> str:
    """A per-model field's description with its server default, for the CLI's help."""
    return f"{StageSettings.model_fields[name].description}{default_text(name)}"


def _per_model_field(name: str, info: FieldInfo) -> tuple[Any, Any]:
    """The request form of a per-model field: shared, or one value per model; null = not given."""
    annotation = info.annotation
    if name in PER_MODEL_LIST_FIELDS:
        (item,) = {
            get_args(option)[0]
            for option in (annotation, *get_args(annotation))
            if get_origin(option) in (list, tuple)
        }
        request_type = item | list[item] | list[list[item] | None] | None
    else:
        request_type = annotation | list[annotation | None] | None
    return request_type, Field(None, description=field_help(name))


#: The schema of the study's two sources: one is given (not null), the other absent or null.
STUDY_CHOICE = [
    {
        "required": ["study_path"],
        "properties": {"study_path": {"type": "string"}, "dicom_source": {"type": "null"}},
    },
    {
        "required": ["dicom_source"],
        "properties": {"dicom_source": {"type": "object"}, "study_path": {"type": "null"}},
    },
]


class DicomSourceRef(BaseModel):
    """A study on a DICOM node of the server's configuration."""

    model_config = ConfigDict(extra="forbid")

    node: str = Field(
        min_length=1, max_length=64, description="Node name from NNUNET_BENTO_DICOM_NODES."
    )
    study_uid: str = Field(pattern=UID_PATTERN, max_length=64, description="StudyInstanceUID.")


class RequestFields(BaseModel):
    """The fields of a request that apply to all of its models.

    The study comes from exactly one of study_path and dicom_source; the other is absent or
    null. The JSON schema says so with ``oneOf`` (STUDY_CHOICE).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": STUDY_CHOICE})

    nnunet_id: ModelName | Annotated[list[ModelName], Field(min_length=1, max_length=16)] = Field(
        description="Model id, name or alias; a list runs the models as a cascade."
    )
    study_path: str | None = Field(
        None,
        description="Root folder of the study; series_folders are under it. Required unless "
        "dicom_source is given.",
    )
    dicom_source: DicomSourceRef | None = Field(
        None,
        description="Pull the study from a DICOM node instead of study_path; series_folders "
        "then name series by SeriesInstanceUID or SeriesDescription. Implies is_dicom.",
    )
    push_to: Annotated[list[str], Field(max_length=8)] | None = Field(
        None,
        description="DICOM nodes to send the DICOM outputs to once they are written; a failed "
        "push is reported in `push` and keeps the outputs.",
    )
    notify: Annotated[list[str], Field(max_length=8)] | None = Field(
        None,
        description="Webhooks of NNUNET_BENTO_WEBHOOKS to tell when a job ends (a signed POST "
        "of job.done or job.failed); background jobs only.",
    )
    output_dir: str = Field(description="Folder for the outputs; stage_N/ folders go in it.")
    tmp_dir: str = Field(
        ".tmp",
        description="Accepted for compatibility; outputs are staged inside output_dir so that "
        "the final move is atomic.",
    )
    is_dicom: bool = Field(False, description="Inputs are DICOM series; also export DICOM.")
    cascade_mode: CascadeMode | list[CascadeMode] = Field(
        "intersect", description="How stage i's mask limits stage i+1, per transition."
    )
    save_nifti_inputs: bool = Field(False, description="Export the input volumes as NIfTI.")
    save_rt_struct_output: bool = Field(False, description="Also export an RT Struct (DICOM).")
    save_statistics: bool = Field(
        True,
        description="Measure each label of each stage's mask (volume, components, centroid, "
        "bounding box, intensity, mean probability): stages[N].statistics and "
        "stage_N/statistics.json.",
    )
    save_dicom_sr: bool = Field(
        False,
        description="Also write the measurements as a DICOM SR (TID 1500 Measurement Report) "
        "that references the SEG's segments: stage_N/measurements.dcm (needs is_dicom).",
    )
    save_preview: bool = Field(
        False,
        description="Draw stage_N/preview.png: three slices through the mask with each "
        "label's outline, volume (ml) and component count.",
    )
    suffix: str | None = Field(
        None,
        json_schema_extra={"pattern": SUFFIX_PATTERN},
        description="Appended to output names: prediction_<suffix>. Letters, digits, '.', '_' "
        "and '-', at most 64.",
    )

    @field_validator("suffix")
    @classmethod
    def _suffix_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(SUFFIX_PATTERN, value):
            raise ValueError(
                "suffix must be a plain name: 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    overwrite: bool = Field(
        False,
        description="Replace the results of an earlier request in output_dir as a whole; "
        "without it, an output_dir that holds results is refused (409).",
    )

    @model_validator(mode="after")
    def _one_study(self) -> "RequestFields":
        if (self.study_path is None) == (self.dicom_source is None):
            raise ValueError("give either study_path or dicom_source")
        if self.dicom_source is not None:
            self.is_dicom = True
        return self

    @property
    def model_ids(self) -> list[str]:
        return [self.nnunet_id] if isinstance(self.nnunet_id, str) else list(self.nnunet_id)


InferenceRequest = create_model(
    "InferenceRequest",
    __base__=RequestFields,
    __doc__="Body of POST /infer: the nnunet_serve-compatible request. Per-model fields take "
    "one value for every model, or a list with one value per model; list-valued ones "
    "(series_folders, use_folds, crop_padding, class_idx) take a flat list for every model, or "
    "a list of lists. A value not given (null) comes from the model's default_args, else the "
    "server default.",
    **{name: _per_model_field(name, info) for name, info in StageSettings.model_fields.items()},
)


def format_problems(problems: Iterable[Mapping[str, Any]]) -> str:
    """'field: message; field: message' from pydantic's error records ({loc, msg, ...})."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem.get('loc', ())) or 'request'}: "
        f"{problem.get('msg')}"
        for problem in problems
    )


def format_validation_error(error: ValidationError) -> str:
    """'field: message; field: message' from a pydantic error."""
    return format_problems(error.errors())


def _stage_output_field(kind: OutputKind) -> tuple[Any, Any]:
    """A stage's record of one output kind: its final path(s), or none."""
    if kind.field == "nifti_prediction":
        return str, Field(description=kind.description)
    if kind.per_channel:
        return list[str], Field(default_factory=list, description=kind.description)
    return str | None, Field(None, description=kind.description)


class StageRecord(BaseModel):
    """What one stage was: its index, model, whether its mask is empty, and its measurements."""

    stage: int
    nnunet_id: str
    is_empty: bool
    statistics: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Per label name: label, voxels, volume_ml, components, "
        "largest_component_ml, centroid_mm, bbox_mm, intensity and mean_probability "
        "(save_statistics).",
    )


StageOutputs = create_model(
    "StageOutputs",
    __base__=StageRecord,
    __doc__="The files one stage wrote: final paths under output_dir, one field per kind.",
    **{kind.field: _stage_output_field(kind) for kind in OUTPUT_KINDS},
)


def stage_files(record: StageOutputs, kind: OutputKind) -> list[str]:
    """The files of one kind in a stage's record."""
    value = getattr(record, kind.field)
    return value if kind.per_channel else [value] if value else []


class ResponseFields(BaseModel):
    """The fields of a successful /infer besides the output lists."""

    status: Literal["done"] = "done"
    time_elapsed: float = Field(description="Seconds for the whole request.")
    timings: dict[str, float] = Field(
        description=f"Seconds per step: {', '.join(STEPS)}, summed over stages."
    )
    gpu: int | None = Field(description="CUDA device index used, or null on the CPU.")
    device: str = Field(description="Device that ran the model, e.g. cuda:0 or cpu.")
    nnunet_path: str | list[str] = Field(description="Model(s) used: Bento tag or rel_path.")
    metadata: dict[str, Any] | list[dict[str, Any] | None] | None = None
    request: dict[str, Any]
    push: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Per push_to node and file: node, file, sop_instance_uid, status (stored "
        "or failed) and the node's reason.",
    )
    warnings: list[str] = Field(
        default_factory=list, description="What the request asked that was not done, and why."
    )
    stages: list[StageOutputs]


InferenceResponse = create_model(
    "InferenceResponse",
    __base__=ResponseFields,
    __doc__="Body of a successful /infer: nnunet_serve's fields plus timings and per-stage "
    "detail. Each output field lists the files of that kind over all stages.",
    **{
        kind.field: (list[str], Field(default_factory=list, description=kind.description))
        for kind in OUTPUT_KINDS
    },
)
