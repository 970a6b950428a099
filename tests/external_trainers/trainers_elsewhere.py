"""Trainer classes outside nnU-Net, found through ``nnUNet_extTrainer``: one that inherits
nnUNetTrainer's network, and one with the older ``build_network_architecture`` signature."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn


class nnUNetTrainerElsewhere(nnUNetTrainer):
    """nnUNetTrainer under another name."""


class nnUNetTrainerOldSignature(nnUNetTrainer):
    """nnUNetTrainer's network, built from the architecture's class name and arguments."""

    @staticmethod
    def build_network_architecture(
        architecture_class_name: str,
        arch_init_kwargs: dict,
        arch_init_kwargs_req_import: list[str],
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        return get_network_from_plans(
            architecture_class_name,
            arch_init_kwargs,
            arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            deep_supervision=enable_deep_supervision,
        )
