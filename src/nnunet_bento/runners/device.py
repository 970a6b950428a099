"""Device choice: the GPU with the most free memory (read with NVML), or the CPU."""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import DeviceUnavailableError

logger = logging.getLogger(__name__)
MIB = 1 << 20


@dataclass(frozen=True)
class GpuReading:
    """Free and total memory of one GPU, indexed as CUDA sees it in this process."""

    index: int
    name: str
    free_mib: int
    total_mib: int


class GpuMemoryReader(Protocol):
    def read(self) -> list[GpuReading]: ...


class NvmlReader:
    """Reads GPU memory through NVML (the ``pynvml`` module of nvidia-ml-py).

    NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES (set by BentoML for a ``gpu: 1``
    service) renumbers them, so the visible list is mapped back to NVML handles.
    """

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()

    def _handles(self) -> list[object]:
        nvml = self._nvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for device in filter(None, (part.strip() for part in visible.split(","))):
            if device.isdigit():
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(device)))
            else:
                handles.append(nvml.nvmlDeviceGetHandleByUUID(device))
        return handles

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        readings = []
        for index, handle in enumerate(self._handles()):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            readings.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    free_mib=int(memory.free) // MIB,
                    total_mib=int(memory.total) // MIB,
                )
            )
        return readings


class DeviceSelector:
    """Picks a device per request, waiting up to ``wait_s`` for ``min_mem`` MiB to be free."""

    def __init__(
        self,
        reader: GpuMemoryReader | None,
        wait_s: float,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.reader = reader
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def for_this_machine(cls, wait_s: float) -> "DeviceSelector":
        """NVML when CUDA is usable; the CPU otherwise (logged once)."""
        import torch

        if not torch.cuda.is_available():
            logger.warning("CUDA is not available: models run on the CPU")
            return cls(None, wait_s)
        try:
            return cls(NvmlReader(), wait_s)
        except Exception as error:  # NVML missing or broken: CUDA still works
            logger.warning("NVML cannot be read (%s): using cuda:0 without a memory check", error)
            return cls(_FirstGpuOnly(), wait_s)

    def describe(self) -> dict[str, object]:
        """For /model_info: which kind of device runs the models, and the GPUs' memory."""
        if self.reader is None:
            return {"device": "cpu", "gpus": []}
        return {"device": "cuda", "gpus": [reading.__dict__ for reading in self.reader.read()]}

    def acquire(self, min_mem_mib: int) -> str:
        """``cpu``, or ``cuda:N`` for the visible GPU with the most free memory >= min_mem."""
        if self.reader is None:
            return "cpu"
        deadline = self._clock() + self.wait_s
        while True:
            readings = self.reader.read()
            fitting = [r for r in readings if r.free_mib >= min_mem_mib]
            if fitting:
                return f"cuda:{max(fitting, key=lambda r: r.free_mib).index}"
            if self._clock() >= deadline:
                free = ", ".join(f"cuda:{r.index} {r.free_mib} MiB" for r in readings)
                raise DeviceUnavailableError(
                    f"no GPU had {min_mem_mib} MiB free within {self.wait_s:.0f} s "
                    f"(free now: {free or 'no GPU visible'}); retry later or lower min_mem"
                )
            self._sleep(self.poll_s)


class _FirstGpuOnly:
    """Stand-in reader when NVML is unreadable: cuda:0, memory unknown (treated as enough)."""

    def read(self) -> list[GpuReading]:
        return [GpuReading(0, "unknown", free_mib=1 << 40, total_mib=0)]
