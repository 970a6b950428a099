"""Warm nnUNetPredictor instances per (model, folds, checkpoint, mirroring, device), and
the network step they run: the sliding window over preprocessed data."""

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NnunetBentoError
from .device import DeviceSelector
from .memory import return_freed_memory
from .plans import configuration_plans
from .protocol import (
    NetworkJob,
    NetworkResult,
    NotShared,
    PredictionJob,
    PredictionResult,
    RunnerFailure,
)
from .shared_arrays import (
    SharedArrayMissing,
    SharedArrayRef,
    SharedMemoryFull,
    attach,
    release,
    reserve,
)
from .split import SplitPredictor
from .trainer_lookup import build_network, find_trainer_class

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

logger = logging.getLogger(__name__)

PredictorKey = tuple[str, tuple[int | str, ...], str, bool, str]


@dataclass(frozen=True)
class RunnerModel:
    """A model a runner can load: its result folder and the GPU memory it needs."""

    folder: Path
    min_mem_mib: int = 0


def load_predictor(
    folder: Path, folds: tuple[int | str, ...], checkpoint: str, tta: bool, device: str
) -> "nnUNetPredictor":
    """An nnUNetPredictor set up as nnU-Net's ``initialize_from_trained_model_folder`` sets
    one up, with the trainer class from our trainer lookup."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    paths = [folder / f"fold_{fold}" / checkpoint for fold in folds]
    first = torch.load(paths[0], map_location="cpu", weights_only=False)
    parameters = [first["network_weights"]]
    parameters += [
        torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
        for path in paths[1:]
    ]
    plans = configuration_plans(folder, first["init_args"]["configuration"])
    network = build_network(find_trainer_class(first["trainer_name"]), plans)
    network.load_state_dict(parameters[0])
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=device.startswith("cuda"),
        device=torch.device(device),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans.plans_manager,
        plans.configuration_manager,
        parameters,
        plans.dataset_json,
        first["trainer_name"],
        first.get("inference_allowed_mirroring_axes"),
    )
    return predictor


def received(data: np.ndarray | SharedArrayRef) -> np.ndarray:
    """The job's preprocessed array: inline, or mapped from its shared memory segment."""
    return data if isinstance(data, np.ndarray) else attach(data)


def delivered(logits: np.ndarray, out: SharedArrayRef | None) -> np.ndarray | None:
    """None once ``logits`` are written to ``out``; the logits themselves when they must
    travel inline (no segment, one of another shape or dtype, no room in /dev/shm)."""
    if out is None or (tuple(out.shape), out.dtype) != (logits.shape, logits.dtype.str):
        return logits
    try:
        reserve(out)
    except SharedMemoryFull as error:
        logger.warning("%s: the logits cross the socket", error)
        return logits
    np.copyto(attach(out, "r+"), logits)
    return None


class RunnerSet:
    """All models of a server, each run by a warm nnUNetPredictor from a bounded LRU cache.

    ``run_network`` is the GPU step; ``predict`` (the in-process Predictor) adds nnU-Net's
    preprocessing and export around it, in this process.
    """

    def __init__(self, models: dict[str, RunnerModel], selector: DeviceSelector, cache_size: int):
        self.models = models
        self.selector = selector
        self.cache_size = cache_size
        self._predictors: OrderedDict[PredictorKey, object] = OrderedDict()
        self._split = SplitPredictor(
            {model_id: model.folder for model_id, model in models.items()},
            self.run_network,
            shared=False,
        )

    def predictor(self, job: PredictionJob | NetworkJob, device: str):
        """The warm predictor for a job, loading it (and evicting the oldest) when absent."""
        key: PredictorKey = (job.model_id, tuple(job.folds), job.checkpoint_name, job.tta, device)
        if key in self._predictors:
            self._predictors.move_to_end(key)
            return self._predictors[key]
        logger.info("loading predictor %s", key)
        predictor = load_predictor(self.models[job.model_id].folder, *key[1:])
        self._predictors[key] = predictor
        while len(self._predictors) > self.cache_size:
            evicted, _ = self._predictors.popitem(last=False)
            logger.info("evicted predictor %s", evicted)
        return predictor

    def predict(self, job: PredictionJob) -> PredictionResult:
        """Run nnU-Net on one image stack in this process; the result is in the input's grid."""
        return self._split.predict(job)

    def run_network(self, job: NetworkJob) -> NetworkResult:
        """The sliding window of the job's folds over its preprocessed array, as
        predict_logits_from_preprocessed_data runs it; a shared input's pages are freed
        before the logits are written."""
        import torch

        data = torch.from_numpy(received(job.data))
        device = self.selector.acquire(self.models[job.model_id].min_mem_mib)
        predictor = self.predictor(job, device)
        started = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu().numpy()
        seconds = time.perf_counter() - started
        del data
        if isinstance(job.data, SharedArrayRef):
            release(job.data)
        result = NetworkResult(delivered(logits, job.logits_out), device, seconds)
        del logits
        return_freed_memory()
        return result

    def run_network_or_failure(self, job: NetworkJob) -> NetworkResult | RunnerFailure | NotShared:
        """run_network(), with our errors returned as data so that they can cross processes."""
        try:
            return self.run_network(job)
        except SharedArrayMissing as error:
            return NotShared(str(error))
        except NnunetBentoError as error:
            return RunnerFailure(int(error.status_code), str(error))
