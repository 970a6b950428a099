"""On a CUDA machine: real NVML readings, and GPU predictions equal to the CPU's."""

import numpy as np
import pytest
import torch

from nnunet_bento.io.images import image_file_in, read_image, to_nnunet_input
from nnunet_bento.runners.device import DeviceSelector, NvmlReader
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet
from nnunet_bento.runners.protocol import PredictionJob

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_nvml_reads_the_visible_gpus():
    readings = NvmlReader().read()
    assert len(readings) == torch.cuda.device_count()
    assert all(0 < r.free_mib <= r.total_mib for r in readings)


def test_gpu_labels_equal_cpu_labels(demo_model_dirs, demo_study):
    image = to_nnunet_input([read_image(image_file_in(demo_study / "T2"))])
    job = PredictionJob(
        "organ", image.array, image.properties, (0, 1), "checkpoint_final.pth", True
    )
    models = {"organ": RunnerModel(demo_model_dirs["organ"], min_mem_mib=100)}
    on_gpu = RunnerSet(models, DeviceSelector.for_this_machine(wait_s=10), 1).predict(job)
    on_cpu = RunnerSet(models, DeviceSelector(None, wait_s=0), 1).predict(job)
    assert on_gpu.device.startswith("cuda:")
    mismatch = np.mean(on_gpu.segmentation != on_cpu.segmentation)
    assert mismatch < 1e-3, f"{mismatch:.2%} of voxels differ between GPU and CPU"
