"""The split prediction (preprocess here, network in the runner, export here) equals
nnUNetPredictor, its shared memory segments never outlive a job, and concurrent requests
hold through a real server."""

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, bentoml_serve

from nnunet_bento.errors import DeviceUnavailableError
from nnunet_bento.io.images import image_file_in, read_image, to_nnunet_input
from nnunet_bento.runners import shared_arrays
from nnunet_bento.runners.device import DeviceSelector
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet, delivered, load_predictor
from nnunet_bento.runners.protocol import (
    NetworkJob,
    NetworkResult,
    NotShared,
    PredictionJob,
    RunnerFailure,
    from_wire,
    to_wire,
)
from nnunet_bento.runners.shared_arrays import (
    PREFIX,
    SHM_DIR,
    SharedArrayRef,
    attach,
    shared_copy,
    shared_empty,
)
from nnunet_bento.runners.split import SplitPredictor

CASES = {
    "organ": (("T2",), (0, 1), (1, 2)),
    "organ2d": (("T2",), (0,), (1, 2)),
    "lesion": (("T2", "ADC"), (0,), (1,)),
    "organ_nomirror": (("T2",), (0,), (1, 2)),
}


@pytest.fixture(autouse=True)
def shared_memory_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """This module tests the shared-memory path, which a server turns on by this setting."""
    monkeypatch.setenv("NNUNET_BENTO_SHARED_MEMORY", "1")


@pytest.fixture(scope="module")
def inputs(demo_study):
    """The demo series as the pipeline reads them; ADC lands on T2's grid."""
    return {series: read_image(image_file_in(demo_study / series)) for series in ("T2", "ADC")}


@pytest.fixture(scope="module")
def runners(demo_model_dirs) -> RunnerSet:
    models = {name: RunnerModel(folder) for name, folder in demo_model_dirs.items()}
    return RunnerSet(models, DeviceSelector(None, wait_s=0), cache_size=8)


@pytest.fixture
def no_leaked_segments(monkeypatch):
    """Fails the test when a segment it made outlives it (other processes' are ignored)."""
    made: list[str] = []

    class Recorded(SharedMemory):
        def __init__(self, name: str, create: bool, size: int) -> None:
            super().__init__(name, create, size)
            made.append(self.name)

    monkeypatch.setattr(shared_arrays, "SharedMemory", Recorded)
    yield
    assert made, "the test made no shared memory segment"
    assert [name for name in made if (SHM_DIR / name).exists()] == []


def prediction_job(model, inputs, folds, tta, series, labels=(1, 2)) -> PredictionJob:
    stack = to_nnunet_input([inputs[name] for name in series])
    return PredictionJob(
        model, stack.array, stack.properties, folds, "checkpoint_final.pth", tta, labels
    )


def reference(folder, job: PredictionJob) -> tuple[np.ndarray, np.ndarray]:
    """nnUNetPredictor.predict_single_npy_array on the same stack, with probabilities."""
    predictor = load_predictor(folder, job.folds, job.checkpoint_name, job.tta, "cpu")
    return predictor.predict_single_npy_array(
        job.image.astype(np.float32), dict(job.properties), None, None, True
    )


@pytest.mark.parametrize("model", list(CASES))
def test_split_prediction_equals_predict_single_npy_array(
    model, inputs, runners, demo_model_dirs, no_leaked_segments
):
    series, folds, labels = CASES[model]
    job = prediction_job(model, inputs, folds, True, series, labels)
    segmentation, probabilities = reference(demo_model_dirs[model], job)
    shared = SplitPredictor(
        {model: demo_model_dirs[model]}, runners.run_network, shared=True
    ).predict(job)
    in_process = runners.predict(job)
    for result in (shared, in_process):
        np.testing.assert_array_equal(result.segmentation, segmentation)
        assert result.probabilities.dtype == np.float16
        np.testing.assert_allclose(result.probabilities, probabilities[1:], atol=1e-3)
    assert segmentation.any()


def test_split_prediction_equals_predict_from_files(runners, demo_model_dirs, demo_study, tmp_path):
    folder = demo_model_dirs["organ"]
    predictor = load_predictor(folder, (0, 1), "checkpoint_final.pth", True, "cpu")
    predictor.predict_from_files_sequential(
        [[str(demo_study / "T2" / "T2.nii.gz")]], [str(tmp_path / "case")], save_probabilities=True
    )
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.nii.gz")))
    stack = to_nnunet_input([read_image(demo_study / "T2" / "T2.nii.gz")])
    job = PredictionJob(
        "organ", stack.array, stack.properties, (0, 1), "checkpoint_final.pth", True, (2,)
    )
    result = runners.predict(job)
    np.testing.assert_array_equal(result.segmentation, labels)
    probabilities = np.load(tmp_path / "case.npz")["probabilities"]
    np.testing.assert_allclose(result.probabilities, probabilities[2:3], atol=1e-3)


def test_only_the_kept_labels_probabilities_come_back(inputs, runners):
    job = prediction_job("organ2d", inputs, (0,), False, ("T2",), labels=(2,))
    result = runners.predict(job)
    assert result.probabilities.shape == (1, *job.image.shape[1:])
    assert runners.predict(replace(job, probability_labels=None)).probabilities is None


class FakeRunnerService:
    """The ModelRunner's run_network through the wire format, on this host or another."""

    def __init__(self, runners: RunnerSet, other_host: bool = False) -> None:
        self.runners = runners
        self.other_host = other_host
        self.jobs: list[NetworkJob] = []

    def run_network(self, job: dict) -> dict:
        network_job = from_wire(job)
        self.jobs.append(network_job)
        if self.other_host and isinstance(network_job.data, SharedArrayRef):
            return to_wire(NotShared(f"no shared memory segment {network_job.data.name}"))
        return to_wire(self.runners.run_network_or_failure(network_job))


def runner_service_predictor(service: FakeRunnerService, demo_model_dirs):
    from nnunet_bento.server.runner_service import RunnerServicePredictor

    registry = type("Registry", (), {})()
    registry.models = {
        name: type("Model", (), {"id": name, "folder": folder})()
        for name, folder in demo_model_dirs.items()
    }
    return RunnerServicePredictor(service, registry)


def test_arrays_cross_as_shared_memory_on_one_host(
    inputs, runners, demo_model_dirs, no_leaked_segments
):
    service = FakeRunnerService(runners)
    job = prediction_job("organ2d", inputs, (0,), False, ("T2",))
    result = runner_service_predictor(service, demo_model_dirs).predict(job)
    (sent,) = service.jobs
    assert isinstance(sent.data, SharedArrayRef) and isinstance(sent.logits_out, SharedArrayRef)
    np.testing.assert_array_equal(result.segmentation, runners.predict(job).segmentation)


def test_another_host_gets_the_arrays_inline_from_then_on(
    inputs, runners, demo_model_dirs, no_leaked_segments
):
    service = FakeRunnerService(runners, other_host=True)
    predictor = runner_service_predictor(service, demo_model_dirs)
    job = prediction_job("organ2d", inputs, (0,), False, ("T2",))
    first, second = predictor.predict(job), predictor.predict(job)
    assert [type(sent.data) for sent in service.jobs] == [SharedArrayRef, np.ndarray, np.ndarray]
    assert all(sent.logits_out is None for sent in service.jobs[1:])
    expected = runners.predict(job)
    for result in (first, second):
        np.testing.assert_array_equal(result.segmentation, expected.segmentation)
        np.testing.assert_array_equal(result.probabilities, expected.probabilities)


def test_a_runner_failure_leaves_no_segment(inputs, runners, demo_model_dirs, no_leaked_segments):
    def busy(job: dict) -> dict:
        return to_wire(RunnerFailure(503, "no GPU had 4000 MiB free"))

    service = FakeRunnerService(runners)
    service.run_network = busy
    job = prediction_job("organ2d", inputs, (0,), False, ("T2",))
    with pytest.raises(DeviceUnavailableError, match="4000 MiB"):
        runner_service_predictor(service, demo_model_dirs).predict(job)


def test_an_exception_in_the_network_step_leaves_no_segment(
    inputs, demo_model_dirs, no_leaked_segments
):
    def broken(job: NetworkJob) -> NetworkResult:
        assert attach(job.data).shape[0] == 1
        raise RuntimeError("CUDA out of memory")

    split = SplitPredictor(demo_model_dirs, broken, shared=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        split.predict(prediction_job("organ2d", inputs, (0,), False, ("T2",)))


def test_the_runner_says_when_a_segment_is_not_on_its_host(runners, no_leaked_segments):
    with shared_copy(np.zeros((1, 4, 4, 4), np.float32)) as ref:
        missing = replace(ref, name=f"{PREFIX}{'0' * 16}")
    job = NetworkJob("organ", (0,), "checkpoint_final.pth", False, missing)
    assert isinstance(runners.run_network_or_failure(job), NotShared)


def test_logits_of_another_shape_or_dtype_travel_inline(no_leaked_segments):
    logits = np.ones((3, 4, 4, 4), np.float16)
    with shared_empty((3, 4, 4, 4), np.float16) as out:
        assert delivered(logits, out) is None
        np.testing.assert_array_equal(attach(out), logits)
        assert delivered(logits.astype(np.float32), out) is not None
    assert delivered(logits, None) is logits


def test_only_our_segment_names_are_opened():
    with pytest.raises(ValueError, match="not the name of one of our shared memory segments"):
        attach(SharedArrayRef("../../etc/passwd", (1,), "<f4"))


def test_the_runner_frees_a_shared_input_before_it_writes_the_logits(runners, no_leaked_segments):
    data = np.random.default_rng(0).normal(size=(1, 24, 48, 48)).astype(np.float32)
    job = NetworkJob("organ", (0,), "checkpoint_final.pth", False, data)
    with shared_copy(data) as ref, shared_empty((3, 24, 48, 48), np.float16) as out:
        assert runners.run_network(replace(job, data=ref, logits_out=out)).logits is None
        assert ref.path.stat().st_size == 0
        np.testing.assert_array_equal(attach(out), runners.run_network(job).logits)


@pytest.mark.slow
def test_two_pipelines_hold_past_the_runner_clients_renewal(tmp_path, demo_model_dirs):
    """Two requests at a time through shared memory for more runner calls than BentoML's
    default renewal of its connection pool (100), which dropped the call in flight."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model_folder: {demo_model_dirs['organ'].parent}\nmodels:\n"
        "  - {id: organ, rel_path: organ}\n  - {id: organ2d, rel_path: organ2d}\n"
    )
    env = {"NNUNET_BENTO_SHARED_MEMORY": "1"}
    with bentoml_serve(spec, tmp_path / "serve.log", env=env) as served:

        def infer(name: str, model: str, folds: list[int], tta: bool) -> str:
            client = type(served.client)(served.url, server_ready_timeout=60, timeout=600)
            response = client.infer(
                nnunet_id=model,
                study_path=str(REPO / "examples" / "study"),
                series_folders=["T2"],
                output_dir=str(tmp_path / "out" / name),
                use_folds=folds,
                tta=tta,
            )
            return response["status"]

        stop = threading.Event()

        def long_requests() -> list[str]:
            done = []
            while not stop.is_set():
                done.append(infer(f"long{len(done)}", "organ", [0, 1], True))
            return done

        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(long_requests)
            short = [infer(f"short{i}", "organ2d", [0], False) for i in range(105)]
            stop.set()
            assert set(short) == {"done"} and set(long.result()) == {"done"}
    assert "cannot open" not in (tmp_path / "serve.log").read_text()


FULL_SHM_CHECK = """
import sys
from pathlib import Path

import numpy as np

from nnunet_bento.io.images import read_image, to_nnunet_input
from nnunet_bento.runners.device import DeviceSelector
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet
from nnunet_bento.runners.protocol import PredictionJob
from nnunet_bento.runners.shared_arrays import SHM_DIR, SharedMemoryFull, shared_copy
from nnunet_bento.runners.split import SplitPredictor

folder, image = Path(sys.argv[1]), Path(sys.argv[2])
try:
    with shared_copy(np.ones((1, 1024, 1024), np.float32)):
        raise SystemExit("a 4 MiB segment fit into a small /dev/shm")
except SharedMemoryFull as error:
    print(error)
runners = RunnerSet({"organ2d": RunnerModel(folder)}, DeviceSelector(None, wait_s=0), 1)
sent = []
def network(job):
    result = runners.run_network(job)
    sent.append((type(job.data).__name__, "logits inline" if result.logits is not None else ""))
    return result
stack = to_nnunet_input([read_image(image)])
job = PredictionJob("organ2d", stack.array, stack.properties, (0,), "checkpoint_final.pth",
                    False, (1, 2))
shared = SplitPredictor({"organ2d": folder}, network, shared=True).predict(job)
inline = runners.predict(job)
np.testing.assert_array_equal(shared.segmentation, inline.segmentation)
np.testing.assert_array_equal(shared.probabilities, inline.probabilities)
print("sent", sent, "left", sorted(path.name for path in SHM_DIR.iterdir()))
"""


@pytest.mark.parametrize(
    ("size", "sent", "warning"),
    [
        ("64k", "[('ndarray', 'logits inline')]", "this request's arrays cross the socket"),
        ("256k", "[('SharedArrayRef', 'logits inline')]", "the logits cross the socket"),
    ],
)
def test_a_full_dev_shm_sends_the_arrays_inline(demo_model_dirs, demo_study, size, sent, warning):
    """A container's small /dev/shm (here a tmpfs in a private mount namespace): a segment
    is refused when its writer reserves it, not by a SIGBUS at the first write, and the
    arrays that do not fit (the input, or only the logits) cross inline, same result."""
    mounted = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    command = [
        *("unshare", "-m", "--propagation", "private", "sh", "-c", mounted, "sh"),
        *(sys.executable, "-c", FULL_SHM_CHECK),
        *(str(demo_model_dirs["organ2d"]), str(demo_study / "T2" / "T2.nii.gz")),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "/dev/shm has no room for 4 MiB (No space left on device)" in run.stdout
    assert f"sent {sent} left []" in run.stdout
    assert warning in run.stderr
