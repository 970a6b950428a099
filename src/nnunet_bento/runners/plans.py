"""What nnU-Net's CPU steps need of a model: its plans, configuration, labels and
preprocessor, read from the result folder as nnUNetPredictor reads them."""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelPlans:
    """One model configuration's PlansManager, ConfigurationManager, LabelManager,
    dataset.json and preprocessor: everything but the network."""

    plans_manager: Any
    configuration_manager: Any
    label_manager: Any
    dataset_json: dict[str, Any]
    preprocessor: Any


@lru_cache(maxsize=64)
def checkpoint_configuration(checkpoint: Path) -> str:
    """The configuration a checkpoint was trained with, where nnUNetPredictor reads it; the
    weights are mapped, not read."""
    import torch

    payload = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return payload["init_args"]["configuration"]


@lru_cache(maxsize=64)
def configuration_plans(folder: Path, configuration: str) -> ModelPlans:
    """The plans of ``configuration`` in the result folder ``folder``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    configuration_manager = plans_manager.get_configuration(configuration)
    return ModelPlans(
        plans_manager,
        configuration_manager,
        plans_manager.get_label_manager(dataset_json),
        dataset_json,
        configuration_manager.preprocessor_class(verbose=False),
    )


def model_plans(folder: Path, fold: int | str, checkpoint_name: str) -> ModelPlans:
    """The plans of the configuration that ``fold``'s checkpoint was trained with."""
    configuration = checkpoint_configuration(Path(folder) / f"fold_{fold}" / checkpoint_name)
    return configuration_plans(Path(folder), configuration)
