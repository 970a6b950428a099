"""nnU-Net's export of the network's logits to the input grid, on the CPU."""

from typing import Any

import numpy as np

from .plans import ModelPlans


def export_logits(
    plans: ModelPlans,
    logits: np.ndarray,
    properties: dict[str, Any],
    probability_labels: tuple[int, ...] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The segmentation in the input's grid by convert_predicted_logits_to_segmentation_
    with_correct_shape, and float16 probabilities of ``probability_labels`` only."""
    import torch
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape as convert,
    )

    output = convert(
        torch.from_numpy(logits),
        plans.plans_manager,
        plans.configuration_manager,
        plans.label_manager,
        properties,
        return_probabilities=probability_labels is not None,
    )
    if probability_labels is None:
        return np.asarray(output), None
    segmentation, probabilities = output
    channels = [plans.label_manager.all_labels.index(label) for label in probability_labels]
    kept = np.empty((len(channels), *probabilities.shape[1:]), dtype=np.float16)
    for row, channel in enumerate(channels):
        kept[row] = probabilities[channel]
    return segmentation, kept
