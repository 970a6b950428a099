"""Warm nnUNetPredictor instances per (model, folds, checkpoint, mirroring, device)."""

import copy
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

from ..catalog.model_folder import ModelDescription, describe_model_folder
from ..errors import NnunetBentoError, RequestError
from .device import DeviceSelector
from .protocol import PredictionJob, PredictionResult, RunnerFailure
from .trainer_lookup import find_trainer_class

logger = logging.getLogger(__name__)

PredictorKey = tuple[str, tuple[int | str, ...], str, bool, str]


@dataclass(frozen=True)
class RunnerModel:
    """A model a runner can load: its result folder and the GPU memory it needs."""

    folder: Path
    min_mem_mib: int = 0


def load_predictor(
    folder: Path, folds: tuple[int | str, ...], checkpoint: str, tta: bool, device: str
):
    """An initialised nnUNetPredictor, exactly as nnU-Net builds one, with our trainer lookup."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

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
    with mock.patch(
        "nnunetv2.inference.predict_from_raw_data.recursive_find_trainer_class_by_name",
        find_trainer_class,
    ):
        predictor.initialize_from_trained_model_folder(str(folder), list(folds), checkpoint)
    return predictor


class RunnerSet:
    """All models of a server, each run by a warm nnUNetPredictor from a bounded LRU cache."""

    def __init__(self, models: dict[str, RunnerModel], selector: DeviceSelector, cache_size: int):
        self.models = models
        self.selector = selector
        self.cache_size = cache_size
        self._descriptions: dict[str, ModelDescription] = {
            model_id: describe_model_folder(model.folder) for model_id, model in models.items()
        }
        self._predictors: OrderedDict[PredictorKey, object] = OrderedDict()

    def _check_job(self, job: PredictionJob) -> None:
        if job.model_id not in self.models:
            raise RequestError(f"model {job.model_id!r} is not served by this runner")
        description = self._descriptions[job.model_id]
        for fold in job.folds:
            if job.checkpoint_name not in description.checkpoints.get(str(fold), []):
                available = ", ".join(
                    f"fold_{f}/{name}"
                    for f, names in description.checkpoints.items()
                    for name in names
                )
                raise RequestError(
                    f"model {job.model_id!r} has no fold_{fold}/{job.checkpoint_name}; "
                    f"available: {available}"
                )
        if job.image.shape[0] != description.num_channels:
            raise RequestError(
                f"model {job.model_id!r} takes {description.num_channels} channel(s) "
                f"({', '.join(description.channel_names.values())}); got {job.image.shape[0]}"
            )

    def predictor(self, job: PredictionJob, device: str):
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

    @property
    def cached_keys(self) -> list[PredictorKey]:
        return list(self._predictors)

    def predict(self, job: PredictionJob) -> PredictionResult:
        """Run nnU-Net on one image stack; the result is in the input's grid."""
        self._check_job(job)
        device = self.selector.acquire(self.models[job.model_id].min_mem_mib)
        predictor = self.predictor(job, device)
        started = time.perf_counter()
        image = job.image.astype(np.float32, copy=False)
        properties = copy.deepcopy(job.properties)
        want_probabilities = job.probability_labels is not None
        output = predictor.predict_single_npy_array(
            image, properties, None, None, want_probabilities
        )
        if want_probabilities:
            segmentation, probabilities = output
            probabilities = probabilities[list(job.probability_labels)].astype(np.float16)
        else:
            segmentation, probabilities = output, None
        return PredictionResult(
            segmentation=np.asarray(segmentation),
            probabilities=probabilities,
            device=device,
            seconds=time.perf_counter() - started,
        )

    def predict_or_failure(self, job: PredictionJob) -> PredictionResult | RunnerFailure:
        """predict(), with our errors returned as data so that they can cross processes."""
        try:
            return self.predict(job)
        except NnunetBentoError as error:
            return RunnerFailure(int(error.status_code), str(error))
