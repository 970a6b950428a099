"""Find an nnU-Net trainer class by name without importing every trainer module, and build
the network it defines for a model's plans.

nnU-Net's own lookup imports each module under nnunetv2/training/nnUNetTrainer until it finds
the class; some of those modules import optional packages (torchvision, via the Primus
trainers) that may be absent or broken. Here the source files are searched as text first, and
only the module that defines the class is imported.
"""

import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import nnunetv2

from .plans import ModelPlans

if TYPE_CHECKING:
    from torch import nn

TRAINER_PACKAGE = "nnunetv2.training.nnUNetTrainer"
EXTERNAL_TRAINERS_VARIABLE = "nnUNet_extTrainer"


def _defining_files(root: Path, class_name: str) -> list[Path]:
    pattern = re.compile(rf"^class\s+{re.escape(class_name)}\s*[(:]", re.MULTILINE)
    return [p for p in sorted(root.rglob("*.py")) if pattern.search(p.read_text(errors="ignore"))]


def _module_name(root: Path, file: Path, package: str | None) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join([package, *parts] if package else parts)


def find_trainer_class(trainer_name: str) -> type:
    """The trainer class named in a checkpoint, from nnU-Net or from ``nnUNet_extTrainer``."""
    search_roots: list[tuple[Path, str | None]] = [
        (Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer", TRAINER_PACKAGE)
    ]
    external = os.environ.get(EXTERNAL_TRAINERS_VARIABLE, "")
    search_roots += [(Path(p), None) for p in external.split(os.pathsep) if p]
    for root, package in search_roots:
        for file in _defining_files(root, trainer_name):
            if package is None and str(root) not in sys.path:
                sys.path.append(str(root))
            module = importlib.import_module(_module_name(root, file, package))
            trainer = getattr(module, trainer_name, None)
            if isinstance(trainer, type):
                return trainer
    roots = ", ".join(str(root) for root, _ in search_roots)
    raise LookupError(
        f"nnU-Net trainer class {trainer_name!r} was not found under {roots}; install the "
        "package that defines it or point nnUNet_extTrainer at its folder"
    )


def build_network(trainer: type, plans: ModelPlans) -> "nn.Module":
    """The trainer's network for the plans, without deep supervision, as nnU-Net builds it
    for inference; trainers with the older ``build_network_architecture`` signature (the
    architecture's class name and arguments instead of the managers) are built too."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    configuration = plans.configuration_manager
    channels = (
        determine_num_input_channels(plans.plans_manager, configuration, plans.dataset_json),
        plans.label_manager.num_segmentation_heads,
    )
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        return trainer.build_network_architecture(
            plans.plans_manager, configuration, *channels, enable_deep_supervision=False
        )
    return trainer.build_network_architecture(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        *channels,
        enable_deep_supervision=False,
    )
