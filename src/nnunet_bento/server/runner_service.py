"""The GPU service: ModelRunner keeps warm nnU-Net predictors and runs prediction jobs; the
API service reaches it through RemotePredictor."""

import re
from typing import Any

import bentoml

from ..catalog.registry import Registry
from ..errors import error_for_status
from ..runners.device import DeviceSelector
from ..runners.nnunet_runner import RunnerModel, RunnerSet
from ..runners.protocol import PredictionJob, PredictionResult, RunnerFailure, from_wire, to_wire
from ..settings import ServeSettings, load_settings


def bento_model_attributes(registry: Registry) -> dict[str, bentoml.models.BentoModel]:
    """One BentoModel class attribute per stored model, so that `bentoml build` packs it."""
    return {
        f"model_{re.sub(r'[^0-9a-zA-Z_]', '_', model.id)}": bentoml.models.BentoModel(model.source)
        for model in registry.models.values()
        if model.entry.tag
    }


def runner_config(settings: ServeSettings) -> dict[str, Any]:
    return {
        "name": "ModelRunner",
        "resources": {"gpu": 1},
        "workers": 1,
        "traffic": {"timeout": settings.nnunet_bento_request_timeout_s},
    }


class ModelRunnerBase:
    """Holds a warm runner per model; one worker, so GPU work runs one job at a time."""

    registry: Registry

    def __init__(self) -> None:
        settings = load_settings()
        models = {
            model.id: RunnerModel(model.folder, model.entry.min_mem)
            for model in self.registry.models.values()
        }
        self.runners = RunnerSet(
            models,
            DeviceSelector.for_this_machine(settings.nnunet_bento_gpu_wait_s),
            settings.nnunet_bento_predictor_cache_size,
        )

    @bentoml.api
    def predict(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one PredictionJob (as to_wire made it); returns a result or a failure."""
        return to_wire(self.runners.predict_or_failure(from_wire(job)))

    @bentoml.api
    def device_info(self) -> dict[str, Any]:
        return self.runners.selector.describe()


class RemotePredictor:
    """The pipeline's Predictor backed by the ModelRunner service."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def predict(self, job: PredictionJob) -> PredictionResult:
        outcome = from_wire(self.runner.predict(job=to_wire(job)))
        if isinstance(outcome, RunnerFailure):
            raise error_for_status(outcome.status_code, outcome.message)
        return outcome
