"""The Predictor that runs nnU-Net's CPU steps here and hands the network step on.

predict_single_npy_array in three parts: preprocessing here, the sliding window by
``network`` (in this process, or in the ModelRunner), the export here. With ``shared``,
the preprocessed array goes out and the logits come back through shared memory segments
that this side creates and always unlinks; what /dev/shm has no room for travels inline.
"""

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .labels import export_logits
from .memory import return_freed_memory
from .plans import ModelPlans, model_plans
from .preprocess import preprocess
from .protocol import NetworkJob, NetworkResult, PredictionJob, PredictionResult
from .shared_arrays import (
    SharedArrayRef,
    SharedMemoryFull,
    attach,
    shared_copy,
    shared_empty,
)

logger = logging.getLogger(__name__)
NetworkCall = Callable[[NetworkJob], NetworkResult]
LOGITS_DTYPE = np.float16  # what nnU-Net's sliding window accumulates and returns


class SplitPredictor:
    """Preprocess, hand the network step to ``network``, export; per job. The job comes from
    a checked plan: its model, folds, checkpoint and channels are not checked again."""

    def __init__(self, folders: dict[str, Path], network: NetworkCall, shared: bool) -> None:
        self.folders = folders
        self.network = network
        self.shared = shared
        self._lock = threading.Lock()

    def plans(self, job: PredictionJob) -> ModelPlans:
        """The plans of the configuration the job's first fold was trained with (cached)."""
        with self._lock:
            return model_plans(self.folders[job.model_id], job.folds[0], job.checkpoint_name)

    def predict(self, job: PredictionJob) -> PredictionResult:
        """nnU-Net's segmentation (and kept probabilities) of one image stack."""
        started = time.perf_counter()
        plans = self.plans(job)
        with ExitStack() as buffers:
            result, properties, logits_out = self._run_network(job, plans, buffers)
            logits = result.logits if result.logits is not None else attach(logits_out)
            segmentation, probabilities = export_logits(
                plans, logits, properties, job.probability_labels
            )
            device = result.device
            del logits, result
        return_freed_memory()
        return PredictionResult(segmentation, probabilities, device, time.perf_counter() - started)

    def _run_network(
        self, job: PredictionJob, plans: ModelPlans, buffers: ExitStack
    ) -> tuple[NetworkResult, dict[str, Any], SharedArrayRef | None]:
        """Preprocess and run the network; the preprocessed array is gone on return."""
        data, properties = preprocess(plans, job.image, job.properties)
        logits_shape = (plans.label_manager.num_segmentation_heads, *data.shape[1:])
        segments = self._segments(data, logits_shape, buffers)
        payload, logits_out = segments if segments else (data, None)
        del data
        result = self.network(
            NetworkJob(job.model_id, job.folds, job.checkpoint_name, job.tta, payload, logits_out)
        )
        return result, properties, logits_out

    def _segments(
        self, data: np.ndarray, logits_shape: tuple[int, ...], buffers: ExitStack
    ) -> tuple[SharedArrayRef, SharedArrayRef] | None:
        """The input's and the logits' segments, held until the job ends; None when not
        shared or when /dev/shm has no room for the input (the runner reserves the logits'
        pages, and returns them inline if they do not fit)."""
        if not self.shared:
            return None
        with ExitStack() as segments:
            try:
                logits_out = segments.enter_context(shared_empty(logits_shape, LOGITS_DTYPE))
                shared_data = segments.enter_context(shared_copy(data))
            except SharedMemoryFull as error:
                logger.warning("%s: this request's arrays cross the socket", error)
                return None
            buffers.enter_context(segments.pop_all())
            return shared_data, logits_out
