"""What crosses between the pipeline and a runner (pickled between processes): plain data."""

from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class PredictionJob:
    """One model run on one image stack, with the settings nnU-Net takes."""

    model_id: str
    image: np.ndarray
    properties: dict[str, Any]
    folds: tuple[int | str, ...]
    checkpoint_name: str
    tta: bool
    probability_labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PredictionResult:
    """nnU-Net's segmentation in the input's grid, and float16 probabilities of asked labels."""

    segmentation: np.ndarray
    probabilities: np.ndarray | None
    device: str
    seconds: float

    @property
    def gpu(self) -> int | None:
        return int(self.device.split(":")[1]) if self.device.startswith("cuda:") else None


@dataclass(frozen=True)
class RunnerFailure:
    """An error raised in the runner process, carried back as data with its HTTP status."""

    status_code: int
    message: str


class Predictor(Protocol):
    """The thing the pipeline hands jobs to: a local runner set, or the ModelRunner service."""

    def predict(self, job: PredictionJob) -> PredictionResult: ...


WIRE_TYPES = {cls.__name__: cls for cls in (PredictionJob, PredictionResult, RunnerFailure)}


def to_wire(message: PredictionJob | PredictionResult | RunnerFailure) -> dict[str, Any]:
    """A shallow dict (arrays untouched) that BentoML's pickle transport keeps as it is."""
    return {
        "kind": type(message).__name__,
        **{f.name: getattr(message, f.name) for f in fields(message)},
    }


def from_wire(payload: dict[str, Any]) -> PredictionJob | PredictionResult | RunnerFailure:
    """Rebuild a message from to_wire's dict."""
    values = dict(payload)
    return WIRE_TYPES[values.pop("kind")](**values)
