"""Clinical-size cases: warm /infer against nnU-Net in one process, side by side in one run.

The case is the demo T2 tiled to 384x384x48 (7.1 M voxels at the model's spacing); the
queued run adds three more with the content rolled. The floor is a warm worker process
running read + nnUNetPredictor.predict_single_npy_array + write; /infer goes through a
`bentoml serve` that this script starts. Figures:

1. latency: warm /infer over the floor, interleaved pairs, nothing sampled meanwhile;
2. the runner's busy time per request (ModelRunner's access log) over the sliding window
   alone (predict_logits_from_preprocessed_data, timed in the floor), same pairs;
3. memory, on separate runs: PSS summed over every process (the floor worker; all
   processes of the server; our shared memory segments counted once, mapped or not),
   sampled at --hz, growth from idle to the peak, /infer over the floor; also the sum of
   each process's own growth, the ratio of absolute peaks, and each service's growth per
   input voxel (also with the probabilities of all labels kept);
4. throughput: 4 different cases queued at once on /infer against predict_from_files
   with 2 preprocessing and 2 export workers, with the GPU's busy share on CUDA.

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
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Clinical-size cases"
HOT_ROLES = ("floor", "SegmentationService", "ModelRunner", "shared memory")
SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "nnunet_bento_"
SEGMENTS = -1  # the series of shared_segments
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


def private_pss(pid: int) -> int:
    """Bytes of a process's proportional set size without shared memory segments (those
    count once, in shared_segments, mapped or not); 0 once it has ended."""
    fields = {"Pss": 0, "Pss_Shmem": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as stream:
            for line in stream:
                name, _, value = line.partition(":")
                if name in fields:
                    fields[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields["Pss"] - fields["Pss_Shmem"]


def shared_segments(pid: int) -> int:
    """Bytes held by our shared memory segments on this host (pages written so far)."""
    total = 0
    for name in os.listdir(SHM_DIR):
        if name.startswith(SEGMENT_PREFIX):
            with suppress(FileNotFoundError):
                total += os.stat(SHM_DIR / name).st_blocks * 512
    return total


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
    """Samples the PSS of every process of a tree while ``measure`` runs, each process in
    its own thread: the workers (and with ``shared`` our shared memory segments) at ``hz``,
    the others (the arbiter, the resource tracker: flat) once a second. Reading
    smaps_rollup costs CPU time and waits for the process's memory map lock, so one slow
    read must not hold up the others, the threads ask for a higher priority where they
    may, and nothing is sampled outside ``measure``."""

    def __init__(
        self,
        root: int,
        hz: float,
        role: Callable[[list[str]], str],
        shared: bool = False,
        gpu: object = None,
    ) -> None:
        self.root, self.hz, self.role, self.shared, self.gpu = root, hz, role, shared, gpu
        self.series: dict[int, list[tuple[float, int]]] = {}
        self.roles: dict[int, str] = {}
        self.gpu_busy: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._active = threading.Event()
        self._threads = [threading.Thread(target=self._discover, daemon=True)]
        self._threads[0].start()

    def _discover(self) -> None:
        import psutil

        if self.shared:
            self._start(SEGMENTS, "shared memory")
        while not self._stop.is_set():
            root = psutil.Process(self.root)
            for process in [root, *root.children(recursive=True)]:
                if process.pid in self.roles:
                    continue
                try:
                    self._start(process.pid, self.role(process.cmdline()))
                except psutil.Error:
                    continue
            if self.gpu is not None:
                import pynvml

                busy = pynvml.nvmlDeviceGetUtilizationRates(self.gpu).gpu
                self.gpu_busy.append((time.monotonic(), busy))
            self._stop.wait(0.1 if self._active.is_set() or self.gpu is not None else 1.0)

    def _start(self, pid: int, role: str) -> None:
        self.roles[pid], self.series[pid] = role, []
        thread = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _sample(self, pid: int) -> None:
        with suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        period = 1 / self.hz if self.roles[pid] in HOT_ROLES else 1.0
        read = shared_segments if pid == SEGMENTS else private_pss
        while not self._stop.is_set():
            if not self._active.wait(0.1):
                continue
            now = time.monotonic()
            self.series[pid].append((now, read(pid)))
            if pid != SEGMENTS and not os.path.exists(f"/proc/{pid}"):
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
        self._active.set()
        time.sleep(idle_s)
        marked = time.monotonic()
        try:
            yield out
        finally:
            ended = time.monotonic()
            self._active.clear()
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

    from nnunet_bento.runners.memory import return_freed_memory

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
            return_freed_memory()
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
class Timing:
    """One interleaved pair: seconds of the floor and of /infer, and of their network step."""

    floor_s: float
    infer_s: float
    network_s: float
    runner_s: float


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
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing pairs")
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=1,
        help="pairs sampled for memory (then one more with probabilities)",
    )
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--skip-queued", action="store_true")
    parser.add_argument(
        "--inline", action="store_true", help="arrays cross pickled (no shared memory)"
    )
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
    shared = {"NNUNET_BENTO_SHARED_MEMORY": "0" if args.inline else "1"}
    with bentoml_serve(spec, work / "serve.log", env=shared) as served:
        server_sampler = Sampler(served.process.pid, args.hz, server_role, True, gpu)
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

        def timed_infer() -> tuple[float, float]:
            before = log_lines(served.log)
            seconds = infer()
            return seconds, runner_seconds(served.log, before)[-1]

        floor_run(), infer()  # warm both: predictors, thread pools, imports
        timings: list[Timing] = []
        for repeat in range(args.repeats):
            if repeat % 2 == 0:
                reply, (infer_s, runner_s) = floor_run(), timed_infer()
            else:
                (infer_s, runner_s), reply = timed_infer(), floor_run()
            timings.append(Timing(reply["seconds"], infer_s, reply["network_seconds"], runner_s))
            print(timings[-1], flush=True)
        memory: dict[str, list[Memory]] = {"floor": [], "infer": []}
        for probabilities in [False] * args.memory_repeats + [True]:
            with floor_sampler.measure() as floor_memory:
                floor_run(probabilities)
            with server_sampler.measure() as infer_memory:
                infer(probabilities=probabilities)
            memory["floor"] += floor_memory
            memory["infer"] += infer_memory
            print(floor_memory, infer_memory, flush=True)
        queued = None
        if not args.skip_queued:
            started = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(infer, range(4)))  # raises if a request failed
            infer_queued_s = time.monotonic() - started
            busy = server_sampler.gpu_busy_share(started, time.monotonic())
            images = [str(work / f"case{k}/T2/T2.nii.gz") for k in range(4)]
            outs = [str(work / "files" / f"case{k}") for k in range(4)]
            files_s = floor.call(op="files", images=images, outs=outs)["seconds"]
            queued = (infer_queued_s, files_s, busy)
        server_sampler.stop()
    floor_sampler.stop()
    floor.close()
    section = report(args, voxels[0], timings, memory, queued)
    print(section)
    if args.write:
        write_section(REPO / "docs" / "benchmarks.md", section)


def report(
    args: argparse.Namespace,
    voxels: int,
    timings: list[Timing],
    memory: dict[str, list[Memory]],
    queued: tuple[float, float, float | None] | None,
) -> str:
    """The docs/benchmarks.md section for one run."""
    mib = 2**20
    floor, infer = memory["floor"][:-1], memory["infer"][:-1]
    latency = [t.infer_s / t.floor_s for t in timings]
    busy = [t.runner_s / t.network_s for t in timings]
    outside_infer = [t.infer_s - t.runner_s for t in timings]
    outside_floor = [t.floor_s - t.network_s for t in timings]
    growth = [i.growth / f.growth for f, i in zip(floor, infer, strict=True)]
    own = [sum(i.own_growth.values()) / f.growth for f, i in zip(floor, infer, strict=True)]
    peak = [i.peak / f.peak for f, i in zip(floor, infer, strict=True)]
    hz = min(m.hz for m in memory["floor"] + memory["infer"])
    transport = (
        "the arrays themselves, pickled (`--inline`)"
        if args.inline
        else "the names of two shared memory segments (the preprocessed float32 array, the "
        "float16 logits; the default)"
    )
    timing_rows = [
        f"| {i + 1} | {t.floor_s:.1f} s | {t.infer_s:.1f} s | {t.network_s:.1f} s | "
        f"{t.runner_s:.1f} s |"
        for i, t in enumerate(timings)
    ]

    def per_voxel(runs: list[Memory], role: str) -> str:
        growth = statistics.median(max(m.own_growth.get(role, 0.0), 0.0) for m in runs)
        return f"{growth / voxels:.0f}"

    roles = ("SegmentationService", "ModelRunner", "shared memory")
    memory_rows = [
        f"| {role} | {per_voxel(infer, role)} | {per_voxel(memory['infer'][-1:], role)} |"
        for role in roles
    ]
    memory_rows += [
        f"| both services, PSS summed | {statistics.median(m.growth for m in infer) / voxels:.0f} "
        f"| {memory['infer'][-1].growth / voxels:.0f} |",
        f"| floor (nnU-Net alone) | {statistics.median(m.growth for m in floor) / voxels:.0f} | "
        f"{memory['floor'][-1].growth / voxels:.0f} |",
    ]
    lines = [
        f"{SECTION} (`scripts/bench/scale.py`)",
        "",
        f"`{args.model}` model, folds {args.folds}, mirroring {'on' if args.tta else 'off'}, "
        f"the demo T2 tiled {'x'.join(map(str, args.tile))} (z, y, x): {voxels / 1e6:.2f} M "
        f"voxels at the model's spacing; {_device_name(args.device)}, "
        f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python scripts/bench/scale.py "
        f"--repeats {args.repeats} --memory-repeats {args.memory_repeats}"
        f"{' --inline' if args.inline else ''}`. The floor is a "
        "warm process running read + "
        "`predict_single_npy_array` + write. Timing pairs are interleaved and unsampled; "
        "memory is measured on separate runs, PSS summed over all processes (shared memory "
        f"segments counted once, mapped or not), sampled at "
        f"{hz:.0f} Hz or more, growth from 1.5 s of idle to the peak. The floor worker, "
        "like the ModelRunner and the API, hands the heap memory it freed back to the system "
        "after each case (`malloc_trim`): without it, glibc keeps a previous case's memory, "
        "the idle figure holds part of the next peak and the growth depends on what ran "
        "before.",
        "",
        "| pair | floor | warm `/infer` | sliding window (floor) | runner busy |",
        "| --- | --- | --- | --- | --- |",
        *timing_rows,
        "",
        f"- Latency: `/infer` / floor = **{ratio_range(latency)}** (goal <= 1.05). Outside "
        f"the network step (read, preprocessing, export, writing; for `/infer` also "
        f"post-processing and HTTP): `/infer` {statistics.median(outside_infer):.2f} s, floor "
        f"{statistics.median(outside_floor):.2f} s (medians); the rest is the network step.",
        f"- Runner busy time / sliding window alone = **{ratio_range(busy)}** (goal <= 1.15).",
        f"- Memory growth, all processes of the server / the floor process = "
        f"**{ratio_range(growth)}** (goal <= 1.0; medians "
        f"{statistics.median(m.growth for m in infer) / mib:.0f} MiB against "
        f"{statistics.median(m.growth for m in floor) / mib:.0f} MiB); the sum of each "
        f"process's own growth / the floor = {ratio_range(own)}; absolute peaks = "
        f"{ratio_range(peak)}.",
    ]
    if queued is not None:
        infer_queued_s, files_s, gpu_busy = queued
        gpu_text = "" if gpu_busy is None else f"; GPU busy {gpu_busy:.0%} of the queued run"
        lines.append(
            f"- Throughput, 4 different cases queued at once: `/infer` {infer_queued_s:.1f} s, "
            f"`predict_from_files` (2 preprocessing + 2 export workers) {files_s:.1f} s: "
            f"**{files_s / infer_queued_s:.2f}** (goal >= 1.0){gpu_text}."
        )
    lines += [
        "",
        f"In this run the services exchange {transport}; probabilities are computed in the "
        "API, for the kept labels only.",
        "",
        "Memory growth per input voxel, in bytes (idle to peak PSS; a service's row is its own "
        "peak; with probabilities: `save_proba_map` of all foreground labels):",
        "",
        "| process | labels only | with probabilities |",
        "| --- | --- | --- |",
        *memory_rows,
        "",
    ]
    return "\n".join(wrapped(line) for line in lines)


def wrapped(line: str) -> str:
    """A prose line wrapped at 92 columns as the rest of the file is; tables stay as they are."""
    if line.startswith("|") or not line:
        return line
    indent = "  " if line.startswith("- ") else ""
    return textwrap.fill(line, 92, subsequent_indent=indent, break_on_hyphens=False)


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
