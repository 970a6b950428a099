"""One model of a request, and what flows through its steps: input, masks, outputs."""

from dataclasses import dataclass

import numpy as np

from .catalog.registry import RegisteredModel
from .io.dicom_source import DicomSource
from .io.images import NnunetInput
from .request import CascadeMode, StageSettings


@dataclass(frozen=True)
class Stage:
    """One model of a request with its merged settings."""

    index: int
    model: RegisteredModel
    settings: StageSettings
    cascade_mode: CascadeMode | None = None

    @property
    def labels(self) -> tuple[int, ...]:
        """The model's foreground label values; probabilities are indexed like this."""
        return tuple(self.model.description.foreground_labels.values())

    @property
    def kept_labels(self) -> tuple[int, ...]:
        """The labels the request keeps (class_idx), in the model's order; all by default."""
        kept = self.settings.class_idx
        return (
            self.labels if kept is None else tuple(label for label in self.labels if label in kept)
        )

    @property
    def needs_probabilities(self) -> bool:
        """Whether post-processing or export uses the probabilities of the kept labels."""
        settings = self.settings
        return (
            settings.save_proba_map
            or settings.min_confidence is not None
            or (settings.class_idx is not None and settings.proba_threshold is not None)
        )


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
