"""Clinical-size cases: warm /infer against nnU-Net in one process, side by side in one run.

The case is the demo T2 tiled to 384x384x48 (7.1 M voxels at the model's spacing); the
queued run adds three more with the content rolled. The floor is a warm worker process
running read + nnUNetPredictor.predict_single_npy_array + write; /infer goes through a
`bentoml serve` that this script starts. Figures:

1. latency: warm /infer over the floor, interleaved pairs;
2. memory: PSS summed over every process (the floor worker; all processes of the server),
   sampled at --hz, growth from idle to the peak of the case, /infer over the floor; also
   the sum of each process's own growth, the ratio of absolute peaks, and each service's
   peak growth in bytes per input voxel (also with the probabilities of all labels kept);
3. the runner's busy time per request (ModelRunner's access log) over the sliding window
   alone (predict_logits_from_preprocessed_data, timed in the floor);
4. throughput: 4 different cases queued at once on /infer against
   predict_from_files with 2 preprocessing and 2 export workers, with the GPU's busy
   share on CUDA.

`--write` puts the section into docs/benchmarks.md.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Clinical-size cases"
HOT_ROLES = ("floor", "SegmentationService", "ModelRunner")
RUNNER_LINE = re.compile(r"path=/run_network,.*\) ([0-9.]+)ms")


def make_case(source: Path, target: Path, tile: tuple[int, int, int], shift: int) -> int:
    """The demo T2 tiled ``tile`` (z, y, x) times, content rolled by ``shift``; returns its
    voxels."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    array = np.tile(sitk.GetArrayFromImage(image), tile)
    array = np.roll(array, (shift, 3 * shift), axis=(1, 2))
    tiled = sitk.GetImageFromArray(array)
    tiled.SetSpacing(image.GetSpacing())
    tiled.SetOrigin(image.GetOrigin())
    tiled.SetDirection(image.GetDirection())
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(tiled, str(target))
    return int(array.size)


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (shared pages counted once over all)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as stream:
            for line in stream:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass
class Memory:
    """One run's memory: idle and peak PSS, summed and per role, in bytes."""

    idle: float
    peak: float
    own_growth: dict[str, float]
    hz: float

    @property
    def growth(self) -> float:
        return self.peak - self.idle


class Sampler:
    """Samples the PSS of every process of a tree, each in its own thread: the workers at
    ``hz``, the others (the arbiter, the resource tracker: flat) once a second. Reading
    smaps_rollup waits for the process's memory map lock, so one slow read must not hold
    up the others; the threads ask for a higher priority where they may."""

    def __init__(
        self, root: int, hz: float, role: Callable[[list[str]], str], gpu: object = None
    ) -> None:
        self.root, self.hz, self.role, self.gpu = root, hz, role, gpu
        self.series: dict[int, list[tuple[float, int]]] = {}
        self.roles: dict[int, str] = {}
        self.gpu_busy: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._discover, daemon=True)]
        self._threads[0].start()

    def _discover(self) -> None:
        import psutil

        while not self._stop.is_set():
            root = psutil.Process(self.root)
            for process in [root, *root.children(recursive=True)]:
                if process.pid in self.roles:
                    continue
                try:
                    self.roles[process.pid] = self.role(process.cmdline())
                except psutil.Error:
                    continue
                self.series[process.pid] = []
                thread = threading.Thread(target=self._sample, args=(process.pid,), daemon=True)
                self._threads.append(thread)
                thread.start()
            if self.gpu is not None:
                import pynvml

                busy = pynvml.nvmlDeviceGetUtilizationRates(self.gpu).gpu
                self.gpu_busy.append((time.monotonic(), busy))
            self._stop.wait(0.1)

    def _sample(self, pid: int) -> None:
        with suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        period = 1 / self.hz if self.roles[pid] in HOT_ROLES else 1.0
        while not self._stop.is_set():
            now = time.monotonic()
            self.series[pid].append((now, pss_kib(pid) * 1024))
            if not os.path.exists(f"/proc/{pid}"):
                return
            self._stop.wait(max(0.0, period - (time.monotonic() - now)))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def totals(self, start: float, end: float) -> tuple[list[float], dict[int, list[int]]]:
        """The summed PSS at each sample time in [start, end] (every process at its latest
        reading), and each process's readings there."""
        series = {pid: list(values) for pid, values in self.series.items()}
        events = sorted(
            (t, pid, v) for pid, values in series.items() for t, v in values if t <= end
        )
        latest: dict[int, int] = {}
        totals = []
        for moment, pid, value in events:
            latest[pid] = value
            if moment >= start:
                totals.append(float(sum(latest.values())))
        own = {pid: [v for t, v in values if start <= t <= end] for pid, values in series.items()}
        return totals, own

    @contextmanager
    def measure(self, idle_s: float = 1.5) -> Iterator[list[Memory]]:
        """Idle for ``idle_s``, then the body; yields a list that holds the Memory after."""
        out: list[Memory] = []
        time.sleep(idle_s)
        marked = time.monotonic()
        yield out
        ended = time.monotonic()
        idle_totals, idle_own = self.totals(marked - idle_s, marked)
        run_totals, run_own = self.totals(marked, ended)
        own: dict[str, float] = {}
        for pid, values in run_own.items():
            if values and idle_own.get(pid):
                role = self.roles[pid]
                own[role] = own.get(role, 0.0) + max(values) - statistics.median(idle_own[pid])
        hot = [len(v) for pid, v in run_own.items() if self.roles[pid] in HOT_ROLES and v]
        out.append(
            Memory(
                idle=statistics.median(idle_totals),
                peak=max(run_totals),
                own_growth=own,
                hz=min(hot) / (ended - marked),
            )
        )

    def gpu_busy_share(self, started: float, ended: float) -> float | None:
        readings = [busy for t, busy in self.gpu_busy if started <= t <= ended]
        return statistics.mean(readings) / 100 if readings else None


def server_role(cmdline: list[str]) -> str:
    if "--service-name" in cmdline:
        return cmdline[cmdline.index("--service-name") + 1]
    return "bentoml serve" if "serve" in cmdline else "other"


class FloorWorker:
    """nnU-Net alone in its own warm process: the floor, timed, and predict_from_files."""

    def __init__(self, args: argparse.Namespace) -> None:
        command = [
            sys.executable,
            __file__,
            "--floor-worker",
            "--model",
            args.model,
            "--device",
            args.device,
            "--folds",
            *map(str, args.folds),
            *(["--tta"] if args.tta else []),
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def call(self, **request: object) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        self.process.wait(timeout=60)


def floor_worker(args: argparse.Namespace) -> None:
    """Serve FloorWorker's requests on stdin; nnU-Net's prints go to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        use_mirroring=args.tta,
        device=torch.device(args.device),
        perform_everything_on_device=args.device == "cuda",
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(REPO / "examples" / "models" / args.model), args.folds, "checkpoint_final.pth"
    )
    network = predictor.predict_logits_from_preprocessed_data
    network_seconds: list[float] = []

    def timed_network(data):
        started = time.perf_counter()
        logits = network(data)
        network_seconds.append(time.perf_counter() - started)
        return logits

    predictor.predict_logits_from_preprocessed_data = timed_network
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        if request["op"] == "floor":
            data, properties = SimpleITKIO().read_images([request["image"]])
            output = predictor.predict_single_npy_array(
                data, properties, None, None, request["probabilities"]
            )
            segmentation = output[0] if request["probabilities"] else output
            SimpleITKIO().write_seg(segmentation, request["out"], properties)
            del data, output, segmentation
        else:
            predictor.predict_from_files(
                [[image] for image in request["images"]],
                request["outs"],
                num_processes_preprocessing=2,
                num_processes_segmentation_export=2,
            )
        seconds = time.perf_counter() - started
        network_s = network_seconds[-1] if network_seconds else 0.0
        replies.write(json.dumps({"seconds": seconds, "network_seconds": network_s}) + "\n")
        replies.flush()


@dataclass
class Pair:
    """One interleaved pair: seconds and memory of the floor and of /infer."""

    floor_s: float
    infer_s: float
    network_s: float
    runner_s: float
    floor_memory: Memory
    infer_memory: Memory


def runner_seconds(log: Path, before: int) -> list[float]:
    """The ModelRunner's busy seconds of each /run_network call logged after line ``before``."""
    lines = log.read_text(errors="replace").splitlines()[before:]
    return [float(m.group(1)) / 1000 for line in lines if (m := RUNNER_LINE.search(line))]


def log_lines(log: Path) -> int:
    return len(log.read_text(errors="replace").splitlines())


def ratio_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="organ")
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--tta", action="store_true", help="mirroring (off by default)")
    parser.add_argument("--tile", type=int, nargs=3, default=(2, 8, 8), help="z y x tiles")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved pairs")
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--skip-queued", action="store_true")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--floor-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_worker:
        floor_worker(args)
        return
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-store-"))
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import bentoml_serve

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    t2 = REPO / "examples" / "study" / "T2" / "T2.nii.gz"
    voxels = [
        make_case(t2, work / f"case{k}" / "T2" / "T2.nii.gz", args.tile, 5 * k) for k in range(4)
    ]
    spec = work / "spec.yaml"
    spec.write_text(
        f"model_folder: {REPO / 'examples' / 'models'}\n"
        f"models:\n  - id: {args.model}\n    rel_path: {args.model}\n"
    )
    gpu = _gpu_handle() if args.device == "cuda" else None
    floor = FloorWorker(args)
    floor_sampler = Sampler(floor.process.pid, args.hz, lambda cmdline: "floor")
    with bentoml_serve(spec, work / "serve.log") as served:
        server_sampler = Sampler(served.process.pid, args.hz, server_role, gpu)
        counter = iter(range(10**6))

        def infer(case: int = 0, probabilities: bool = False) -> float:
            extra = {"save_proba_map": True, "proba_threshold": 0.0} if probabilities else {}
            client = type(served.client)(served.url, server_ready_timeout=60, timeout=3600)
            started = time.perf_counter()
            client.infer(
                nnunet_id=args.model,
                study_path=str(work / f"case{case}"),
                series_folders=["T2"],
                output_dir=str(work / "infer" / str(next(counter))),
                use_folds=args.folds,
                tta=args.tta,
                **extra,
            )
            return time.perf_counter() - started

        def floor_run(probabilities: bool = False) -> dict:
            return floor.call(
                op="floor",
                image=str(work / "case0/T2/T2.nii.gz"),
                out=str(work / f"floor{next(counter)}.nii.gz"),
                probabilities=probabilities,
            )

        floor_run(), infer()  # warm both: predictors, thread pools, imports
        pairs: list[Pair] = []
        for repeat in range(args.repeats):
            order = ("floor", "infer") if repeat % 2 == 0 else ("infer", "floor")
            values: dict[str, object] = {}
            for side in order:
                if side == "floor":
                    with floor_sampler.measure() as memory:
                        values["floor"] = floor_run()
                    values["floor_memory"] = memory[0]
                else:
                    before = log_lines(served.log)
                    with server_sampler.measure() as memory:
                        values["infer_s"] = infer()
                    values["infer_memory"] = memory[0]
                    values["runner_s"] = runner_seconds(served.log, before)[-1]
            reply = values["floor"]
            pairs.append(
                Pair(
                    reply["seconds"],
                    values["infer_s"],
                    reply["network_seconds"],
                    values["runner_s"],
                    values["floor_memory"],
                    values["infer_memory"],
                )
            )
            print(pairs[-1], flush=True)
        with floor_sampler.measure() as floor_proba:
            floor_run(probabilities=True)
        with server_sampler.measure() as infer_proba:
            infer(probabilities=True)
        queued = None
        if not args.skip_queued:
            started = time.monotonic()
            threads = [threading.Thread(target=infer, args=(k,)) for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            infer_queued_s = time.monotonic() - started
            busy = server_sampler.gpu_busy_share(started, time.monotonic())
            images = [str(work / f"case{k}/T2/T2.nii.gz") for k in range(4)]
            outs = [str(work / "files" / f"case{k}") for k in range(4)]
            files_s = floor.call(op="files", images=images, outs=outs)["seconds"]
            queued = (infer_queued_s, files_s, busy)
        server_sampler.stop()
    floor_sampler.stop()
    floor.close()
    section = report(args, voxels[0], pairs, floor_proba[0], infer_proba[0], queued)
    print(section)
    if args.write:
        write_section(REPO / "docs" / "benchmarks.md", section)


def report(
    args: argparse.Namespace,
    voxels: int,
    pairs: list[Pair],
    floor_proba: Memory,
    infer_proba: Memory,
    queued: tuple[float, float, float | None] | None,
) -> str:
    """The docs/benchmarks.md section for one run."""
    name = _device_name(args.device)
    mib = 2**20
    latency = [p.infer_s / p.floor_s for p in pairs]
    growth = [p.infer_memory.growth / p.floor_memory.growth for p in pairs]
    own = [sum(p.infer_memory.own_growth.values()) / p.floor_memory.growth for p in pairs]
    peak = [p.infer_memory.peak / p.floor_memory.peak for p in pairs]
    busy = [p.runner_s / p.network_s for p in pairs]
    hz = min(min(p.infer_memory.hz, p.floor_memory.hz) for p in pairs)
    roles = sorted(pairs[0].infer_memory.own_growth)

    def per_voxel(memory: Memory, role: str) -> str:
        return f"{max(memory.own_growth.get(role, 0.0), 0.0) / voxels:.1f}"

    rows = "\n".join(
        f"| {i + 1} | {p.floor_s:.1f} s | {p.infer_s:.1f} s | {p.network_s:.1f} s | "
        f"{p.runner_s:.1f} s | {p.floor_memory.growth / mib:.0f} MiB | "
        f"{p.infer_memory.growth / mib:.0f} MiB |"
        for i, p in enumerate(pairs)
    )
    memory_rows = "\n".join(
        f"| {role} | {statistics.median(float(per_voxel(p.infer_memory, role)) for p in pairs):.1f}"
        f" | {per_voxel(infer_proba, role)} |"
        for role in roles
    )
    floor_row = (
        f"| floor (nnU-Net alone) | "
        f"{statistics.median(p.floor_memory.growth / voxels for p in pairs):.1f} | "
        f"{floor_proba.growth / voxels:.1f} |"
    )
    lines = [
        SECTION + " (`scripts/bench/scale.py`)",
        "",
        f"`{args.model}` model, folds {args.folds}, mirroring {'on' if args.tta else 'off'}, "
        f"the demo T2 tiled {'x'.join(map(str, args.tile))} (z, y, x) ({voxels / 1e6:.2f} M "
        f"voxels at the model's "
        f"spacing), {name}, {time.strftime('%Y-%m-%d')}. Command: "
        f"`.venv/bin/python scripts/bench/scale.py{' --write' if args.write else ''}`. "
        f"Floor: a warm process running read + `predict_single_npy_array` + write; pairs "
        f"interleaved; memory is PSS summed over all processes, sampled at {hz:.0f} Hz or more.",
        "",
        "| pair | floor | warm `/infer` | sliding window (floor) | runner busy "
        "| floor memory growth | `/infer` memory growth |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        rows,
        "",
        f"- Latency: `/infer` / floor = **{ratio_range(latency)}** (goal <= 1.05).",
        f"- Memory growth, idle to peak, all processes of the server / the floor process = "
        f"**{ratio_range(growth)}** (goal <= 1.0); the sum of each process's own growth = "
        f"{ratio_range(own)}; absolute peaks = {ratio_range(peak)}.",
        f"- Runner busy time / sliding window alone = **{ratio_range(busy)}** (goal <= 1.15).",
    ]
    if queued is not None:
        infer_queued_s, files_s, gpu_busy = queued
        gpu_text = "" if gpu_busy is None else f"; GPU busy {gpu_busy:.0%} of the queued run"
        lines.append(
            f"- Throughput, 4 cases queued at once: `/infer` {infer_queued_s:.1f} s, "
            f"`predict_from_files` (2 preprocessing + 2 export workers) {files_s:.1f} s: "
            f"**{files_s / infer_queued_s:.2f}** (goal >= 1.0){gpu_text}."
        )
    lines += [
        "",
        "Peak memory growth per input voxel, in bytes (idle to peak of each process's PSS; "
        "the second column with `save_proba_map` for all labels):",
        "",
        "| process | labels only | with probabilities |",
        "| --- | --- | --- |",
        memory_rows,
        floor_row,
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the section in ``path`` (up to the next ``## ``), or append it."""
    text = path.read_text()
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end == -1 else text[end:])
    path.write_text(text)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_handle() -> object:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(0)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
