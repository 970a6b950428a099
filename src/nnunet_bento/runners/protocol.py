"""What the pipeline hands a Predictor, and what crosses between the API and the
ModelRunner (pickled between processes): plain data."""

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Protocol

import numpy as np

from .shared_arrays import SharedArrayRef


@dataclass(frozen=True)
class PredictionJob:
    """One model run on one image stack, with the settings nnU-Net takes.

    ``probability_labels``: the foreground labels whose probabilities the request keeps, in
    the model's label order; None when no probabilities are needed.
    """

    model_id: str
    image: np.ndarray
    properties: dict[str, Any]
    folds: tuple[int | str, ...]
    checkpoint_name: str
    tta: bool
    probability_labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PredictionResult:
    """nnU-Net's segmentation in the input's grid, and float16 probabilities of the job's
    ``probability_labels`` (in that order)."""

    segmentation: np.ndarray
    probabilities: np.ndarray | None
    device: str
    seconds: float

    @property
    def gpu(self) -> int | None:
        return int(self.device.split(":")[1]) if self.device.startswith("cuda:") else None


@dataclass(frozen=True)
class NetworkJob:
    """The network step of a PredictionJob: the preprocessed array (inline, or a shared
    memory segment on one host), and where to write the logits on one host."""

    model_id: str
    folds: tuple[int | str, ...]
    checkpoint_name: str
    tta: bool
    data: np.ndarray | SharedArrayRef
    logits_out: SharedArrayRef | None = None


@dataclass(frozen=True)
class NetworkResult:
    """The sliding window's logits in nnU-Net's dtype: inline, or None when they were
    written to the job's ``logits_out``; ``seconds`` of the sliding window."""

    logits: np.ndarray | None
    device: str
    seconds: float


@dataclass(frozen=True)
class RunnerFailure:
    """An error raised in the runner process, carried back as data with its HTTP status."""

    status_code: int
    message: str


@dataclass(frozen=True)
class NotShared:
    """The runner cannot open the job's shared memory: it runs on another host."""

    message: str


class Predictor(Protocol):
    """The thing the pipeline hands jobs to: a local runner set, or the ModelRunner service."""

    def predict(self, job: PredictionJob) -> PredictionResult: ...


Message = NetworkJob | NetworkResult | RunnerFailure | NotShared
WIRE_TYPES = {
    cls.__name__: cls
    for cls in (NetworkJob, NetworkResult, RunnerFailure, NotShared, SharedArrayRef)
}


def to_wire(message: Message | SharedArrayRef) -> dict[str, Any]:
    """Nested plain dicts (arrays untouched): BentoML's transport keeps them as they are,
    while it would turn dataclasses into dicts without their type."""
    values = {f.name: getattr(message, f.name) for f in fields(message)}
    return {
        "kind": type(message).__name__,
        **{name: to_wire(v) if is_dataclass(v) else v for name, v in values.items()},
    }


def from_wire(payload: dict[str, Any]) -> Any:
    """Rebuild a message from to_wire's dict."""
    values = {
        name: from_wire(value) if isinstance(value, dict) and "kind" in value else value
        for name, value in payload.items()
        if name != "kind"
    }
    return WIRE_TYPES[payload["kind"]](**values)
