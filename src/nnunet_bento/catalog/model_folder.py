"""Read what an nnU-Net v2 result folder says about itself: the user never states it."""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError, RequestError

CHECKPOINT_GLOB = "checkpoint_*.pth"


@dataclass(frozen=True)
class ModelDescription:
    """The parts of dataset.json, plans.json and the fold folders that serving needs."""

    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str
    plans_name: str
    configurations: list[str]
    folds: list[str]
    checkpoints: dict[str, list[str]]
    spacing: dict[str, list[float]] = field(default_factory=dict)
    dataset_json: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Label names to values, without background; region-based labels are skipped."""
        return {
            name: value
            for name, value in self.labels.items()
            if isinstance(value, int) and value != 0
        }

    def check_checkpoints(self, model_id: str, folds: Iterable[int | str], name: str) -> None:
        """Every fold must have checkpoint ``name``; a RequestError lists what there is."""
        for fold in folds:
            if name not in self.checkpoints.get(str(fold), []):
                available = ", ".join(
                    f"fold_{f}/{checkpoint}"
                    for f, names in self.checkpoints.items()
                    for checkpoint in names
                )
                raise RequestError(
                    f"model {model_id!r} has no fold_{fold}/{name}; available: {available}"
                )

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-ready record for the Bento model store and /model_info."""
        record = asdict(self)
        record.pop("dataset_json")
        return record


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(
            f"{path.parent} is not an nnU-Net result folder: {path.name} is missing"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{path} is not valid JSON: {error}") from error


def describe_model_folder(folder: Path) -> ModelDescription:
    """Describe an nnU-Net result folder without loading any checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    checkpoints = {
        fold_dir.name.removeprefix("fold_"): sorted(p.name for p in fold_dir.glob(CHECKPOINT_GLOB))
        for fold_dir in sorted(folder.glob("fold_*"))
        if fold_dir.is_dir()
    }
    checkpoints = {fold: names for fold, names in checkpoints.items() if names}
    if not checkpoints:
        raise ModelFolderError(
            f"{folder} is not an nnU-Net result folder: no fold_*/{CHECKPOINT_GLOB} file"
        )
    channel_names = dataset.get("channel_names") or dataset.get("modality")
    if not channel_names or "labels" not in dataset:
        raise ModelFolderError(f"{folder / 'dataset.json'} lacks channel_names or labels")
    configurations = plans.get("configurations", {})
    return ModelDescription(
        channel_names={str(k): str(v) for k, v in channel_names.items()},
        labels=dict(dataset["labels"]),
        file_ending=dataset.get("file_ending", ".nii.gz"),
        plans_name=plans.get("plans_name", "nnUNetPlans"),
        configurations=sorted(configurations),
        folds=sorted(checkpoints, key=_fold_sort_key),
        checkpoints=checkpoints,
        spacing={name: list(conf.get("spacing", [])) for name, conf in configurations.items()},
        dataset_json=dataset,
    )


def _fold_sort_key(fold: str) -> tuple[int, str]:
    return (int(fold), "") if fold.isdigit() else (1 << 30, fold)


@dataclass(frozen=True)
class CheckpointIdentity:
    """What one checkpoint file says about how it was trained."""

    trainer: str
    configuration: str
    sha256: str


def read_checkpoint_identity(checkpoint: Path) -> CheckpointIdentity:
    """Load a checkpoint on the CPU and read its trainer, configuration and hash."""
    import torch

    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
        trainer = payload["trainer_name"]
        configuration = payload["init_args"]["configuration"]
    except (KeyError, OSError, RuntimeError) as error:
        raise ModelFolderError(f"{checkpoint} is not an nnU-Net checkpoint: {error}") from error
    return CheckpointIdentity(trainer, configuration, file_sha256(checkpoint))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
