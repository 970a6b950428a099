"""Device choice from NVML readings (injected: there is no GPU here)."""

import sys
import types
from types import SimpleNamespace

import pytest

from nnunet_bento.errors import DeviceUnavailableError
from nnunet_bento.runners.device import DeviceSelector, GpuReading, NvmlReader


class FakeReader:
    """Returns one list of readings per call, then repeats the last."""

    def __init__(self, *rounds: list[GpuReading]):
        self.rounds = list(rounds)
        self.calls = 0

    def read(self) -> list[GpuReading]:
        self.calls += 1
        return self.rounds[min(self.calls, len(self.rounds)) - 1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def gpu(index: int, free: int) -> GpuReading:
    return GpuReading(index, f"Fake GPU {index}", free_mib=free, total_mib=80_000)


def selector(reader: FakeReader, wait_s: float = 10.0) -> DeviceSelector:
    clock = FakeClock()
    return DeviceSelector(reader, wait_s=wait_s, poll_s=1.0, clock=clock, sleep=clock.sleep)


def test_without_cuda_the_cpu_is_used():
    assert DeviceSelector(None, wait_s=1).acquire(10_000) == "cpu"
    assert DeviceSelector(None, wait_s=1).describe() == {"device": "cpu", "gpus": []}


def test_the_gpu_with_most_free_memory_that_fits_is_chosen():
    assert (
        selector(FakeReader([gpu(0, 3000), gpu(1, 9000), gpu(2, 5000)])).acquire(4000) == "cuda:1"
    )


def test_a_request_waits_until_min_mem_is_free():
    reader = FakeReader([gpu(0, 100)], [gpu(0, 200)], [gpu(0, 6000)])
    assert selector(reader).acquire(5000) == "cuda:0"
    assert reader.calls == 3


def test_waiting_past_the_timeout_raises_503_with_the_readings():
    with pytest.raises(
        DeviceUnavailableError, match=r"no GPU had 5000 MiB free within 10 s .*cuda:0 100 MiB"
    ):
        selector(FakeReader([gpu(0, 100)]), wait_s=10).acquire(5000)
    assert DeviceUnavailableError.status_code == 503


def fake_pynvml(free_by_index: dict[int, int]) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: len(free_by_index)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetHandleByUUID = lambda uuid: int(uuid.rsplit("-", 1)[1])
    module.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        free=free_by_index[h] << 20, total=80_000 << 20
    )
    module.nvmlDeviceGetName = lambda h: f"Fake H{h}".encode()
    return module


def test_nvml_reader_maps_cuda_visible_devices_to_physical_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 1000, 1: 2000, 2: 3000}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-fake-1")
    readings = NvmlReader().read()
    assert [(r.index, r.name, r.free_mib) for r in readings] == [
        (0, "Fake H2", 3000),
        (1, "Fake H1", 2000),
    ]


def test_nvml_reader_sees_every_gpu_without_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 1000, 1: 2000}))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert DeviceSelector(NvmlReader(), wait_s=0).acquire(1500) == "cuda:1"
