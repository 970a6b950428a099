"""The in-process runner: predictors as nnU-Net sets them up, trainer variants and external
trainers, the warm predictor cache, the network step."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_bento.io.images import image_file_in, read_image, to_nnunet_input
from nnunet_bento.runners.device import DeviceSelector
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet, load_predictor
from nnunet_bento.runners.protocol import NetworkJob, PredictionJob
from nnunet_bento.runners.trainer_lookup import find_trainer_class

EXTERNAL_TRAINERS = Path(__file__).parent / "external_trainers"
CHECKPOINT = "checkpoint_final.pth"


@pytest.fixture(scope="module")
def t2_input(demo_study):
    return to_nnunet_input([read_image(image_file_in(demo_study / "T2"))])


def runner_set(demo_model_dirs, cache_size=4) -> RunnerSet:
    models = {name: RunnerModel(folder) for name, folder in demo_model_dirs.items()}
    return RunnerSet(models, DeviceSelector(None, wait_s=0), cache_size)


def job(model_id, image, **settings) -> PredictionJob:
    values = {"folds": (0,), "checkpoint_name": "checkpoint_final.pth", "tta": False, **settings}
    return PredictionJob(model_id, image.array, image.properties, **values)


def logits(predictor, seed: int = 0) -> np.ndarray:
    """The predictor's logits for a random preprocessed array of its model's channels."""
    channels = len(predictor.dataset_json["channel_names"])
    data = np.random.default_rng(seed).normal(size=(channels, 20, 40, 40)).astype(np.float32)
    return predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).numpy()


@pytest.mark.parametrize("model, folds", [("organ", (0, 1)), ("organ2d", (0,)), ("lesion", (0,))])
def test_predictor_is_set_up_as_nnunet_sets_it_up(demo_model_dirs, model, folds):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ours = load_predictor(demo_model_dirs[model], folds, CHECKPOINT, True, "cpu")
    nnunet = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    nnunet.initialize_from_trained_model_folder(str(demo_model_dirs[model]), folds, CHECKPOINT)
    assert ours.trainer_name == nnunet.trainer_name
    assert ours.allowed_mirroring_axes == nnunet.allowed_mirroring_axes
    np.testing.assert_array_equal(logits(ours), logits(nnunet))


@pytest.mark.parametrize("trainer", ["nnUNetTrainerElsewhere", "nnUNetTrainerOldSignature"])
def test_a_trainer_from_nnunet_exttrainer_builds_the_network(
    demo_model_dirs, tmp_path, monkeypatch, trainer
):
    organ = demo_model_dirs["organ"]
    model = tmp_path / "organ"
    (model / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(organ / name, model / name)
    checkpoint = torch.load(organ / "fold_0" / CHECKPOINT, map_location="cpu", weights_only=False)
    torch.save(checkpoint | {"trainer_name": trainer}, model / "fold_0" / CHECKPOINT)
    monkeypatch.setenv("nnUNet_extTrainer", str(EXTERNAL_TRAINERS))
    monkeypatch.setattr(sys, "path", list(sys.path))
    external = load_predictor(model, (0,), CHECKPOINT, False, "cpu")
    assert external.trainer_name == trainer
    np.testing.assert_array_equal(
        logits(external), logits(load_predictor(organ, (0,), CHECKPOINT, False, "cpu"))
    )


def test_trainer_variant_is_found_without_importing_other_trainer_modules():
    code = (
        "import sys\n"
        "from nnunet_bento.runners.trainer_lookup import find_trainer_class\n"
        "cls = find_trainer_class('nnUNetTrainerNoMirroring')\n"
        "assert cls.__name__ == 'nnUNetTrainerNoMirroring'\n"
        "assert 'torchvision' not in sys.modules\n"
        "assert not any('primus' in m.lower() for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_trainer_names_where_it_looked():
    with pytest.raises(LookupError, match=r"nnUNetTrainerDoesNotExist.*nnUNet_extTrainer"):
        find_trainer_class("nnUNetTrainerDoesNotExist")


def test_model_trained_by_a_variant_predicts(demo_model_dirs, t2_input):
    result = runner_set(demo_model_dirs).predict(job("organ_nomirror", t2_input))
    assert set(np.unique(result.segmentation)) == {0, 1, 2}
    assert result.device == "cpu" and result.gpu is None


def test_predictors_stay_warm_and_the_cache_is_bounded(demo_model_dirs, t2_input):
    runners = runner_set(demo_model_dirs, cache_size=2)
    first, mirrored = job("organ2d", t2_input), job("organ2d", t2_input, tta=True)
    runners.predict(first)
    warm = runners.predictor(first, "cpu")
    runners.predict(first)
    assert runners.predictor(first, "cpu") is warm
    runners.predict(mirrored)
    warm_mirrored = runners.predictor(mirrored, "cpu")
    runners.predict(job("organ", t2_input, folds=(0, 1)))
    assert runners.predictor(mirrored, "cpu") is warm_mirrored
    assert runners.predictor(first, "cpu") is not warm, "the least recently used one is gone"
    assert runners.predictor(mirrored, "cpu") is warm_mirrored, "the two folds made way"


def test_probabilities_come_back_as_float16_for_the_asked_labels(demo_model_dirs, t2_input):
    result = runner_set(demo_model_dirs).predict(job("organ2d", t2_input, probability_labels=(2,)))
    assert result.probabilities.dtype == np.float16
    assert result.probabilities.shape == (1, *t2_input.array.shape[1:])


def test_the_network_step_returns_logits_in_nnunets_dtype(demo_model_dirs, t2_input):
    data = np.random.default_rng(0).normal(size=(1, 24, 48, 48)).astype(np.float32)
    network_job = NetworkJob("organ", (0,), "checkpoint_final.pth", False, data)
    result = runner_set(demo_model_dirs).run_network(network_job)
    assert result.logits.dtype == np.float16 and result.logits.shape == (3, 24, 48, 48)
    assert result.device == "cpu" and result.seconds > 0


def test_the_api_never_renews_its_connections_to_the_runner():
    """BentoML closes a renewed connection pool with the calls in flight on it: with a short
    max_age, a request's network step died when another request called the runner."""
    from nnunet_bento.server.runner_service import runner_config
    from nnunet_bento.settings import load_settings

    settings = load_settings()
    connection = runner_config(settings)["runner_connection"]
    assert connection["max_age"] > 1000 * settings.nnunet_bento_request_timeout_s
    assert connection["max_requests"] > 2**40
