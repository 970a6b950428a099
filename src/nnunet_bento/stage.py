"""What flows through a stage's steps: the input it read and its masks after post-processing."""

from dataclasses import dataclass

import numpy as np

from .io.dicom_source import DicomSource
from .io.images import NnunetInput


@dataclass(frozen=True)
class StageInput:
    """What a stage read: the image stack for nnU-Net, and the DICOM series it came from."""

    image: NnunetInput
    dicom_source: DicomSource | None


@dataclass(frozen=True)
class StageMasks:
    """A stage's mask after post-processing, and the probability map to save (if asked)."""

    segmentation: np.ndarray
    probabilities: np.ndarray | None
    labels: tuple[int, ...]
