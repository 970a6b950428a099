"""The /infer request and response, and the merge of per-model defaults into stages."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RequestError

FoldId = int | str
CascadeMode = Literal["intersect", "crop"]
SegmentationType = Literal["binary", "labelmap"]


class InferenceRequest(BaseModel):
    """Body of POST /infer: the seed's request, unchanged.

    Parameters that can vary per model take one value for every model, or a list with one
    value per model. Parameters whose value is itself a list (series_folders, use_folds,
    crop_padding, class_idx) take a flat list for every model, or a list of lists.
    """

    model_config = ConfigDict(extra="forbid")

    nnunet_id: str | list[str] = Field(
        description="Model id, name or alias; a list runs the models as a cascade."
    )
    study_path: str = Field(description="Root folder of the study; series_folders are under it.")
    series_folders: list[str] | list[list[str]] | None = Field(
        None,
        description="Series under study_path, one list per model: a folder holding one image "
        "or DICOM series, or an image file. The first series sets the grid; others are "
        "resampled onto it. May come from the model's default_args.",
    )
    output_dir: str = Field(description="Folder for the outputs; stage_N/ folders go in it.")
    class_idx: int | list[int | list[int] | None] | None = Field(
        None, description="Labels to keep in the mask and the probability map. Default: all."
    )
    checkpoint_name: str | list[str | None] | None = Field(
        None, description="Checkpoint file in each fold folder. Default: checkpoint_final.pth."
    )
    tmp_dir: str = Field(
        ".tmp",
        description="Accepted for compatibility; outputs are staged inside output_dir so that "
        "the final move is atomic.",
    )
    is_dicom: bool = Field(False, description="Inputs are DICOM series; also export DICOM.")
    tta: bool | list[bool | None] | None = Field(
        None, description="Test-time mirroring. Default: true."
    )
    use_folds: list[FoldId] | list[list[FoldId] | None] | None = Field(
        None, description="Folds to ensemble. Default: [0]."
    )
    proba_threshold: float | list[float | None] | None = Field(
        None, description="Probabilities below this are set to 0 in the saved map."
    )
    min_confidence: float | list[float | None] | None = Field(
        None, description="Remove components whose maximum probability is below this."
    )
    intersect_with: str | list[str | None] | None = Field(
        None, description="Mask that candidate components must overlap (see min_intersection)."
    )
    min_intersection: float | list[float | None] | None = Field(
        None,
        description="Least fraction of a component's voxels inside intersect_with. Default: 0.1.",
    )
    crop_from: str | list[str | None] | None = Field(
        None, description="Mask whose bounding box (plus crop_padding) crops the inputs."
    )
    crop_padding: list[int] | list[list[int] | None] | None = Field(
        None, description="Voxels added around the crop box (z, y, x). Default: [10, 10, 10]."
    )
    cascade_mode: CascadeMode | list[CascadeMode] = Field(
        "intersect", description="How stage i's mask limits stage i+1, per transition."
    )
    save_proba_map: bool | list[bool | None] | None = Field(
        None, description="Export probability maps; needs proba_threshold. Default: false."
    )
    segmentation_type: SegmentationType | list[SegmentationType | None] | None = Field(
        None,
        description="DICOM-SEG of the mask: binary (one frame per segment and slice) or "
        "labelmap (the Label Map Segmentation SOP class). Default: binary.",
    )
    lossless_compression: bool | list[bool | None] | None = Field(
        None, description="Compress the DICOM-SEG losslessly. Default: false."
    )
    fractional_as_segments: bool | list[bool | None] | None = Field(
        None,
        description="Write the probability map as a categorical SEG of probability bins (one "
        "segment per bin of the fractional template) instead of a FRACTIONAL SEG. "
        "Default: false.",
    )
    save_nifti_inputs: bool = Field(False, description="Export the input volumes as NIfTI.")
    save_rt_struct_output: bool = Field(False, description="Also export an RT Struct (DICOM).")
    suffix: str | None = Field(None, description="Appended to output names: prediction_<suffix>.")

    @field_validator("suffix")
    @classmethod
    def _suffix_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or "\\" in value or ".." in value):
            raise ValueError("suffix must be a plain name without path separators")
        return value

    @property
    def model_ids(self) -> list[str]:
        return [self.nnunet_id] if isinstance(self.nnunet_id, str) else list(self.nnunet_id)


class StageSettings(BaseModel):
    """The settings of one model of a request, after defaults are merged in.

    The defaults here are the server's: they apply where neither the request nor the model's
    default_args give a value.
    """

    model_config = ConfigDict(extra="forbid")

    series_folders: list[str] = Field(min_length=1)
    checkpoint_name: str = "checkpoint_final.pth"
    tta: bool = True
    use_folds: list[FoldId] = Field(default_factory=lambda: [0], min_length=1)
    class_idx: list[int] | None = None
    proba_threshold: float | None = Field(None, ge=0, le=1)
    min_confidence: float | None = Field(None, ge=0, le=1)
    intersect_with: str | None = None
    min_intersection: float = Field(0.1, ge=0, le=1)
    crop_from: str | None = None
    crop_padding: tuple[int, int, int] = (10, 10, 10)
    save_proba_map: bool = False
    segmentation_type: SegmentationType = "binary"
    lossless_compression: bool = False
    fractional_as_segments: bool = False

    @field_validator("class_idx", mode="before")
    @classmethod
    def _class_idx_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @model_validator(mode="after")
    def _proba_map_needs_threshold(self) -> "StageSettings":
        if self.save_proba_map and self.proba_threshold is None:
            raise ValueError("save_proba_map needs proba_threshold")
        return self


PER_MODEL_LIST_FIELDS = ("series_folders", "use_folds", "crop_padding", "class_idx")
PER_MODEL_FIELDS = tuple(StageSettings.model_fields)


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


def format_validation_error(error: ValidationError) -> str:
    """'field: message; field: message' from a pydantic error."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'request'}: {problem['msg']}"
        for problem in error.errors()
    )


class StageOutputs(BaseModel):
    """The files one stage wrote, relative names resolved under output_dir."""

    stage: int
    nnunet_id: str
    is_empty: bool
    nifti_prediction: str
    nifti_proba: str | None = None
    nifti_inputs: list[str] = Field(default_factory=list)
    dicom_segmentation: str | None = None
    dicom_fractional_segmentation: str | None = None
    dicom_struct: str | None = None


class InferenceResponse(BaseModel):
    """Body of a successful /infer: the seed's fields plus timings and per-stage detail."""

    status: Literal["done"] = "done"
    time_elapsed: float = Field(description="Seconds for the whole request.")
    timings: dict[str, float] = Field(description="Seconds per step: read, predict, export.")
    gpu: int | None = Field(description="CUDA device index used, or null on the CPU.")
    device: str = Field(description="Device that ran the model, e.g. cuda:0 or cpu.")
    nnunet_path: str | list[str] = Field(description="Model(s) used: Bento tag or rel_path.")
    metadata: dict[str, Any] | list[dict[str, Any] | None] | None = None
    request: dict[str, Any]
    nifti_prediction: list[str]
    nifti_proba: list[str]
    nifti_inputs: list[str]
    dicom_segmentation: list[str] = Field(
        default_factory=list, description="DICOM-SEG per stage; none for an empty stage."
    )
    dicom_fractional_segmentation: list[str] = Field(
        default_factory=list, description="Probability maps as DICOM-SEG (save_proba_map)."
    )
    dicom_struct: list[str] = Field(
        default_factory=list, description="RT Struct per stage (save_rt_struct_output)."
    )
    stages: list[StageOutputs]
