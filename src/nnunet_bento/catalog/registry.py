"""The spec resolved against the model store and the file system, checked at start-up."""

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ModelFolderError, RequestError, SpecError
from ..io.seg_metadata import MetadataError, SegmentationMetadata, load_metadata
from ..request import PER_MODEL_FIELDS, InferenceRequest, StageSettings, format_validation_error
from ..settings import ServeSettings
from .model_folder import ModelDescription, describe_model_folder, file_sha256
from .spec import MetadataPath, ModelEntry, ServeSpec
from .store import stored_model
from .totalseg import TotalsegTask, parse_task, task_folder, task_metadata
from .weights_download import download_task_weights

logger = logging.getLogger(__name__)


@cache
def cached_file_sha256(path: Path) -> str:
    return file_sha256(path)


@dataclass(frozen=True)
class RegisteredModel:
    """A spec entry with the folder it resolved to and what that folder says."""

    entry: ModelEntry
    folder: Path
    source: str
    description: ModelDescription
    store_metadata: dict[str, Any] = field(default_factory=dict)
    dicom_metadata: dict[str, SegmentationMetadata | None] = field(default_factory=dict)

    @property
    def seg_metadata(self) -> SegmentationMetadata | None:
        return self.dicom_metadata.get("metadata")

    @property
    def fractional_metadata(self) -> SegmentationMetadata | None:
        return self.dicom_metadata.get("fractional_metadata") or self.seg_metadata

    @property
    def empty_metadata(self) -> SegmentationMetadata | None:
        return self.dicom_metadata.get("empty_segment_metadata")

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def metadata_record(self) -> dict[str, Any] | None:
        """The DICOM metadata as given inline, else as the (validated) template says it."""
        if isinstance(self.entry.metadata, dict):
            return self.entry.metadata
        return self.seg_metadata.to_dcmqi() if self.seg_metadata else None

    def checkpoint_sha256(self, folds: Sequence[int | str], checkpoint_name: str) -> str:
        """SHA-256 of the checkpoint used; with several folds, of their hashes in fold order.
        The hashes recorded at import are used; a model folder's files are hashed once."""
        recorded = self.store_metadata.get("checkpoint_sha256", {})
        hashes = []
        for fold in folds:
            relative = f"fold_{fold}/{checkpoint_name}"
            hashes.append(recorded.get(relative) or cached_file_sha256(self.folder / relative))
        if len(hashes) == 1:
            return hashes[0]
        return hashlib.sha256("".join(hashes).encode()).hexdigest()

    def info(self) -> dict[str, Any]:
        """The /model_info record: nnunet_serve's fields, with no absolute server path."""
        return {
            "id": self.entry.id,
            "name": self.entry.name,
            "aliases": self.entry.aliases,
            "path": self.source,
            "rel_path": self.entry.rel_path,
            "tag": self.entry.tag and self.source,
            "metadata": self.metadata_record,
            "min_mem": self.entry.min_mem,
            "default_args": self.entry.default_args,
            "n_classes": len(self.description.labels),
            "model_information": {
                key: value
                for key, value in self.description.dataset_json.items()
                if key != "dataset"
            },
            "trainer": self.store_metadata.get("trainer"),
            "configuration": self.store_metadata.get("configuration"),
            "folds": self.description.folds,
            "is_totalseg": self.entry.totalseg_task is not None,
        }


def load_dicom_metadata(
    entry: ModelEntry, description: ModelDescription, default: dict[str, Any] | None = None
) -> dict[str, SegmentationMetadata | None]:
    """Validate the entry's DICOM metadata now; a problem is a SpecError naming the field.

    ``default`` stands in for an absent ``metadata`` (a TotalSegmentator task's own).
    """
    loaded: dict[str, SegmentationMetadata | None] = {}
    fields = entry.metadata_fields()
    fields["metadata"] = fields["metadata"] or default
    for name, value in fields.items():
        if value is None:
            loaded[name] = None
            continue
        source = value.path if isinstance(value, MetadataPath) else value
        if isinstance(source, Path) and not source.is_file():
            raise SpecError(f"model {entry.id!r}, field '{name}.path': {source} does not exist")
        try:
            loaded[name] = load_metadata(source)
        except MetadataError as error:
            raise SpecError(f"model {entry.id!r}, field {name!r}: {error}") from None
    metadata = loaded["metadata"]
    if metadata is not None:
        missing = set(description.foreground_labels.values()) - set(metadata.label_ids)
        if missing:
            raise SpecError(
                f"model {entry.id!r}, field 'metadata': no segment for label(s) "
                f"{sorted(missing)} of the model's {description.foreground_labels}"
            )
    return loaded


def find_rel_path(model_folder: Path, rel_path: str) -> Path:
    """The one result folder under model_folder whose path is, or contains, rel_path."""
    direct = model_folder / rel_path
    if (direct / "dataset.json").is_file():
        return direct
    matches = sorted(
        p.parent
        for p in model_folder.rglob("dataset.json")
        if rel_path in p.parent.relative_to(model_folder).as_posix()
        and any(p.parent.glob("fold_*"))
    )
    if len(matches) != 1:
        found = ", ".join(str(m.relative_to(model_folder)) for m in matches) or "none"
        raise ModelFolderError(
            f"rel_path {rel_path!r} must match one result folder under {model_folder}; "
            f"found {found}"
        )
    return matches[0]


def check_default_args(entry: ModelEntry) -> None:
    """default_args must name request parameters and hold values of their types."""
    unknown = set(entry.default_args) - set(InferenceRequest.model_fields)
    if unknown:
        raise SpecError(
            f"model {entry.id!r}, field 'default_args': unknown request parameter(s) "
            f"{', '.join(sorted(unknown))}"
        )
    values = {"series_folders": ["placeholder"], **entry.default_args}
    try:
        StageSettings.model_validate({k: v for k, v in values.items() if k in PER_MODEL_FIELDS})
    except ValidationError as error:
        raise SpecError(
            f"model {entry.id!r}, field 'default_args': {format_validation_error(error)}"
        ) from None


def totalseg_weights_folder(spec: ServeSpec, totalseg_weights: Path | None) -> Path:
    """TOTALSEG_WEIGHTS_PATH, else <model_folder>/totalseg."""
    if totalseg_weights is not None:
        return totalseg_weights
    if spec.model_folder is None:
        raise ModelFolderError("TotalSegmentator tasks need TOTALSEG_WEIGHTS_PATH or model_folder")
    return spec.model_folder / "totalseg"


def check_checkpoint_hashes(entry: ModelEntry, folder: Path, metadata: dict[str, Any]) -> None:
    """Each checkpoint must still hash as import-model recorded it: checkpoints are pickles,
    and loading one runs its code, so a changed file is refused."""
    for relative, recorded in metadata.get("checkpoint_sha256", {}).items():
        if file_sha256(folder / relative) != recorded:
            raise SpecError(
                f"model {entry.id!r}: checkpoint {relative} of {entry.tag} changed since it was "
                "imported (its SHA-256 differs); import the model folder again with "
                "`nnunet-bento import-model`"
            )


@dataclass(frozen=True)
class WeightsSource:
    """Where TotalSegmentator weights are, and whether missing ones are downloaded."""

    folder: Path | None = None
    download: bool = False
    url_base: str | None = None


def weights_source(settings: ServeSettings) -> WeightsSource:
    """TOTALSEG_WEIGHTS_PATH, NNUNET_BENTO_DOWNLOAD_WEIGHTS and its URL base."""
    return WeightsSource(
        settings.totalseg_weights_path,
        settings.nnunet_bento_download_weights,
        settings.nnunet_bento_totalseg_url_base,
    )


def totalseg_folder(spec: ServeSpec, task: TotalsegTask, weights: WeightsSource) -> Path:
    """The task's folder; downloaded first when it is missing and downloads are on."""
    folder = totalseg_weights_folder(spec, weights.folder)
    try:
        return task_folder(task, folder)
    except ModelFolderError:
        if not weights.download:
            raise
    return download_task_weights(task, folder, weights.url_base)


def resolve_entry(
    spec: ServeSpec, entry: ModelEntry, weights: WeightsSource = WeightsSource()
) -> RegisteredModel:
    """Find an entry's result folder: in the Bento model store, under model_folder, or in
    TotalSegmentator's weights folder."""
    default_metadata = None
    store_metadata: dict[str, Any] = {}
    if entry.tag:
        folder, store_metadata = stored_model(entry.tag)
        check_checkpoint_hashes(entry, folder, store_metadata)
        source = f"{store_metadata.get('nnunet_id', entry.id)}:{folder.name}"
    elif entry.rel_path:
        assert spec.model_folder is not None
        folder, source = find_rel_path(spec.model_folder, entry.rel_path), entry.rel_path
    else:
        assert entry.totalseg_task is not None
        try:
            task = parse_task(entry.totalseg_task)
        except SpecError as error:
            raise SpecError(f"model {entry.id!r}, field 'totalseg_task': {error}") from None
        folder = totalseg_folder(spec, task, weights)
        source, default_metadata = f"totalseg:{task.name}", task_metadata(task)
    description = describe_model_folder(folder)
    metadata = load_dicom_metadata(entry, description, default_metadata)
    return RegisteredModel(entry, folder, source, description, store_metadata, metadata)


def without_weights_path(message: str, spec: ServeSpec, weights: WeightsSource) -> str:
    """``message`` with the weights folder named by its setting, not its server path."""
    try:
        folder = totalseg_weights_folder(spec, weights.folder)
    except ModelFolderError:
        return message
    return message.replace(str(folder), "TOTALSEG_WEIGHTS_PATH")


class Registry:
    """The models that serve, looked up by id, name or alias."""

    def __init__(self, models: list[RegisteredModel], disabled: dict[str, str] | None = None):
        self.models = {model.id: model for model in models}
        self.disabled = disabled or {}
        self._by_name = {name: model for model in models for name in model.entry.names}

    def get(self, name: str) -> RegisteredModel:
        """The model a request names; a 400 that lists the known names otherwise."""
        if name in self._by_name:
            return self._by_name[name]
        if name in self.disabled:
            raise RequestError(f"model {name!r} is disabled: {self.disabled[name]}")
        raise RequestError(
            f"unknown nnunet_id {name!r}; known ids, names and aliases: "
            f"{', '.join(sorted(self._by_name))}"
        )


def build_registry(spec: ServeSpec, weights: WeightsSource = WeightsSource()) -> Registry:
    """Resolve every entry; a broken entry stops start-up with one message naming it.

    TotalSegmentator entries whose weights are missing are disabled with a warning that names
    the path instead, so that the other models still serve; clients see the reason without it.
    """
    models, disabled = [], {}
    for entry in spec.models:
        check_default_args(entry)
        try:
            models.append(resolve_entry(spec, entry, weights))
        except ModelFolderError as error:
            if entry.totalseg_task:
                logger.warning("model %r is disabled: %s", entry.id, error)
                disabled[entry.id] = without_weights_path(str(error), spec, weights)
                continue
            raise SpecError(f"model {entry.id!r}: {error}") from None
    return Registry(models, disabled)
