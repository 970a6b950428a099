"""TotalSegmentator tasks served as nnU-Net models.

A spec entry's ``totalseg_task`` (``total_fastest``, ``body_fast``, ``lung_vessels``, ...)
resolves, through the ``totalsegmentator`` package (the ``totalseg`` extra), to the task's
nnU-Net result folder laid out as TotalSegmentator lays out its weights:
``<weights>/Dataset<id>_*/<trainer>__<plans>__<configuration>``. Segment names come from its
class map and their codes from its SNOMED CT mapping; nothing of either is copied here.
A missing folder disables the model, unless NNUNET_BENTO_DOWNLOAD_WEIGHTS=1 downloads it
(weights_download.py).
"""

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError, SpecError

SUB_MODES = ("fastest", "fast")
#: Category and type of a class that TotalSegmentator's SNOMED mapping does not list.
UNMAPPED_CATEGORY = {
    "CodeValue": "123037004",
    "CodingSchemeDesignator": "SCT",
    "CodeMeaning": "Anatomical Structure",
}
UNMAPPED_TYPE = {
    "CodeValue": "91723000",
    "CodingSchemeDesignator": "SCT",
    "CodeMeaning": "Anatomical structure",
}


@dataclass(frozen=True)
class TotalsegTask:
    """One TotalSegmentator model: where its folder is and what it segments."""

    name: str
    task: str
    task_id: int
    trainer: str
    plans: str
    configuration: str

    @property
    def folder_pattern(self) -> str:
        return f"Dataset{self.task_id:03d}_*/{self.trainer}__{self.plans}__{self.configuration}"


def _package() -> tuple[dict[str, Any], dict[str, dict[int, str]]]:
    try:
        from totalsegmentator.map_tasks_config import TASK_CONFIGS
        from totalsegmentator.map_to_binary import class_map
    except ImportError:
        raise ModelFolderError(
            "TotalSegmentator tasks need the totalsegmentator package: "
            "pip install 'nnunet-bento[totalseg]'"
        ) from None
    return TASK_CONFIGS, class_map


def parse_task(name: str) -> TotalsegTask:
    """``total_fastest`` -> task ``total`` in its ``fastest`` sub-mode; a bad name: SpecError."""
    configs, _ = _package()
    task, mode = name, None
    for sub_mode in SUB_MODES:
        base = name.removesuffix(f"_{sub_mode}")
        if base != name and "sub_modes" in configs.get(base, {}):
            task, mode = base, sub_mode
    if task not in configs:
        close = difflib.get_close_matches(name, list(configs), n=3)
        raise SpecError(
            f"unknown TotalSegmentator task {name!r}"
            + (f"; close: {', '.join(close)}" if close else "")
        )
    config = configs[task]
    if "sub_modes" in config:
        config = config["sub_modes"][mode or "default"]
    task_id = config["task_id"]
    if isinstance(task_id, list):
        raise SpecError(
            f"TotalSegmentator task {name!r} combines {len(task_id)} models, which one nnU-Net "
            f"model cannot serve; use {name}_fast or {name}_fastest"
        )
    return TotalsegTask(
        name=name,
        task=task,
        task_id=task_id,
        trainer=config.get("trainer", "nnUNetTrainer"),
        plans=config.get("plans") or "nnUNetPlans",
        configuration=config.get("model", "3d_fullres"),
    )


def task_folder(task: TotalsegTask, weights: Path) -> Path:
    """The task's result folder under the weights folder; missing: ModelFolderError."""
    matches = sorted(weights.glob(task.folder_pattern))
    if not matches:
        raise ModelFolderError(
            f"TotalSegmentator task {task.name!r}: no weights at {weights / task.folder_pattern} "
            "(copy TotalSegmentator's weights folder there, set TOTALSEG_WEIGHTS_PATH, or set "
            "NNUNET_BENTO_DOWNLOAD_WEIGHTS=1 to download them at start-up)"
        )
    return matches[0]


def _code(mapping: dict[str, str]) -> dict[str, str]:
    return {
        "CodeValue": mapping["value"],
        "CodingSchemeDesignator": mapping["scheme"],
        "CodeMeaning": mapping["meaning"],
    }


def task_metadata(task: TotalsegTask) -> dict[str, Any]:
    """A DCMQI template of the task's classes, coded with TotalSegmentator's SNOMED mapping."""
    from totalsegmentator.dicom_utils import load_snomed_mapping

    _, class_map = _package()
    snomed = load_snomed_mapping()
    segments = []
    for label, name in sorted(class_map[task.task].items()):
        codes = snomed.get(name)
        segment = {
            "labelID": label,
            "SegmentLabel": name,
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": f"TotalSegmentator {task.name}",
            "SegmentedPropertyCategoryCodeSequence": _code(codes["property_category"])
            if codes
            else UNMAPPED_CATEGORY,
            "SegmentedPropertyTypeCodeSequence": _code(codes["property_type"])
            if codes
            else UNMAPPED_TYPE,
        }
        if codes and codes.get("property_modifier"):
            segment["SegmentedPropertyTypeModifierCodeSequence"] = _code(codes["property_modifier"])
        segments.append(segment)
    return {
        "SeriesDescription": f"TotalSegmentator {task.name}"[:64],
        "segmentAttributes": [segments],
    }
