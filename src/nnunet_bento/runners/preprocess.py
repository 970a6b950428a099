"""nnU-Net's preprocessing of one image stack, on the CPU, before the network."""

import copy
from typing import Any

import numpy as np

from .plans import ModelPlans


def preprocess(
    plans: ModelPlans, image: np.ndarray, properties: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Crop, normalise and resample ``image`` as predict_single_npy_array does; returns the
    network's input and the properties that the export needs."""
    data, _, properties = plans.preprocessor.run_case_npy(
        image,
        None,
        copy.deepcopy(properties),
        plans.plans_manager,
        plans.configuration_manager,
        plans.dataset_json,
    )
    return data, properties
