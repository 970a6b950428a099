"""The GPU service: ModelRunner keeps warm nnU-Net predictors and runs the network step of
prediction jobs; the API service reaches it through RunnerServicePredictor, which preprocesses
and exports in the API's own worker threads."""

import logging
import re
from dataclasses import replace
from typing import Any

import bentoml
import numpy as np

from ..catalog.registry import Registry
from ..errors import error_for_status
from ..runners.device import DeviceSelector
from ..runners.nnunet_runner import RunnerModel, RunnerSet
from ..runners.protocol import (
    NetworkJob,
    NetworkResult,
    NotShared,
    PredictionJob,
    PredictionResult,
    RunnerFailure,
    from_wire,
    to_wire,
)
from ..runners.shared_arrays import attach, shared_memory_available
from ..runners.split import SplitPredictor
from ..settings import ServeSettings, load_settings

logger = logging.getLogger(__name__)
NEVER_S = 10.0**9
NEVER_REQUESTS = 2**62


def bento_model_attributes(registry: Registry) -> dict[str, bentoml.models.BentoModel]:
    """One BentoModel class attribute per stored model, so that `bentoml build` packs it."""
    return {
        f"model_{re.sub(r'[^0-9a-zA-Z_]', '_', model.id)}": bentoml.models.BentoModel(model.source)
        for model in registry.models.values()
        if model.entry.tag
    }


def runner_config(settings: ServeSettings) -> dict[str, Any]:
    """The ModelRunner's service config. BentoML's client of a dependency renews its
    connection pool after ``max_age`` seconds or ``max_requests`` calls, and closing the old
    pool drops every call still in flight on it: a long network step of one request died
    when another request called the runner. So the pool is never renewed."""
    return {
        "name": "ModelRunner",
        "resources": {"gpu": 1},
        "workers": 1,
        "traffic": {"timeout": settings.nnunet_bento_request_timeout_s},
        "runner_connection": {"max_age": NEVER_S, "max_requests": NEVER_REQUESTS},
    }


class ModelRunnerBase:
    """Holds a warm predictor per model; one worker and one thread, so network steps run
    one at a time."""

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
    def run_network(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one NetworkJob (as to_wire made it); returns a result or a failure."""
        return to_wire(self.runners.run_network_or_failure(from_wire(job)))

    @bentoml.api
    def device_info(self) -> dict[str, Any]:
        return self.runners.selector.describe()


class RunnerServicePredictor:
    """The pipeline's Predictor: preprocessing and export here, the network step in the
    ModelRunner; arrays through shared memory until the runner cannot open it."""

    def __init__(self, runner: Any, registry: Registry) -> None:
        self.runner = runner
        self.split = SplitPredictor(
            {model.id: model.folder for model in registry.models.values()},
            self.run_network,
            shared=load_settings().nnunet_bento_shared_memory and shared_memory_available(),
        )

    def predict(self, job: PredictionJob) -> PredictionResult:
        return self.split.predict(job)

    def run_network(self, job: NetworkJob) -> NetworkResult:
        """The network step in the ModelRunner; arrays inline from now on when it cannot
        open shared memory (it runs on another host)."""
        outcome = self._call(job)
        if isinstance(outcome, NotShared):
            logger.warning(
                "the ModelRunner cannot open this host's shared memory (%s): arrays cross the "
                "socket from now on",
                outcome.message,
            )
            self.split.shared = False
            outcome = self._call(replace(job, data=np.array(attach(job.data)), logits_out=None))
        if isinstance(outcome, RunnerFailure):
            raise error_for_status(outcome.status_code, outcome.message)
        return outcome

    def _call(self, job: NetworkJob) -> NetworkResult | RunnerFailure | NotShared:
        return from_wire(self.runner.run_network(job=to_wire(job)))
