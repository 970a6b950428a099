"""Load: 8 /infer requests at once against the same 8 one at a time, on a served instance.

Each request writes its own output folder; the concurrent outputs must equal the sequential
ones voxel for voxel. While the concurrent run goes on, /readyz and /model_info are timed,
and the resident memory of each service (the API worker and the ModelRunner worker) is
sampled. Prints throughput against sequential and the peak RSS of each service.

    .venv/bin/python scripts/bench/concurrency.py [--requests 8]
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
CASES = [
    ("organ2d", ["T2"]),
    ("organ", ["T2"]),
    ("lesion", ["T2", "ADC"]),
    ("organ_nomirror", ["T2"]),
]


def bodies(count: int, output: Path) -> list[dict]:
    study = REPO / "examples" / "study"
    return [
        {
            "nnunet_id": CASES[i % len(CASES)][0],
            "study_path": str(study),
            "series_folders": CASES[i % len(CASES)][1],
            "output_dir": str(output / f"case{i}"),
        }
        for i in range(count)
    ]


def infer(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/infer", json=body, timeout=600)
    response.raise_for_status()
    return response.json()


class Sampler(threading.Thread):
    """Peak RSS (MiB) per service process, and probe latencies, while the run goes on."""

    def __init__(self, url: str, server: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.url = url
        workers = server.children(recursive=True)
        self.services = {
            name: next(p for p in workers if name in " ".join(p.cmdline()))
            for name in ("ModelRunner", "--service-name SegmentationService")
        }
        self.peaks = dict.fromkeys(self.services, 0.0)
        self.probes: dict[str, list[float]] = {"/readyz": [], "/model_info": []}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for name, process in self.services.items():
                self.peaks[name] = max(self.peaks[name], process.memory_info().rss / 2**20)
            for route, seconds in self.probes.items():
                started = time.perf_counter()
                httpx.get(f"{self.url}{route}", timeout=30).raise_for_status()
                seconds.append(time.perf_counter() - started)
            time.sleep(0.1)


def labels(response: dict) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-store-"))
    from conftest import bentoml_serve

    from nnunet_bento.catalog.store import import_model

    for name in {case[0] for case in CASES}:
        import_model(REPO / "examples" / "models" / name, name)
    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    with bentoml_serve(REPO / "model-serve-spec.yaml", work / "serve.log") as served:
        for body in bodies(len(CASES), work / "warm"):
            infer(served.url, body)
        started = time.perf_counter()
        sequential = [infer(served.url, b) for b in bodies(args.requests, work / "one")]
        sequential_s = time.perf_counter() - started
        sampler = Sampler(served.url, psutil.Process(served.process.pid))
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            concurrent = list(
                pool.map(lambda b: infer(served.url, b), bodies(args.requests, work / "many"))
            )
        concurrent_s = time.perf_counter() - started
        sampler.stopping.set()
        sampler.join()
    for one, many in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(labels(one), labels(many))
    print(f"{args.requests} requests: all succeeded, outputs identical to one at a time")
    print(f"sequential {sequential_s:.2f} s, concurrent {concurrent_s:.2f} s")
    print(f"throughput concurrent / sequential: {sequential_s / concurrent_s:.2f}x")
    for route, seconds in sampler.probes.items():
        print(
            f"{route} during the run: median {statistics.median(seconds) * 1000:.0f} ms, "
            f"max {max(seconds) * 1000:.0f} ms ({len(seconds)} probes)"
        )
    for name, peak in sampler.peaks.items():
        print(f"peak RSS {name.split()[-1]}: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
