"""TotalSegmentator tasks: TotalSegmentator's layout, its class map, disabled without weights."""

import logging
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from totalsegmentator.map_to_binary import class_map

from nnunet_bento.catalog.registry import WeightsSource, build_registry
from nnunet_bento.catalog.spec import parse_spec
from nnunet_bento.errors import SpecError
from nnunet_bento.pipeline import SegmentationPipeline
from nnunet_bento.request import InferenceRequest
from nnunet_bento.runners.device import DeviceSelector
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet

FASTEST = "Dataset298_TotalSegmentator_total_6mm_1559subj"
FASTEST_RUN = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"


@pytest.fixture
def weights(tmp_path, demo_model_dirs):
    """The demo organ model copied where TotalSegmentator keeps total_fastest's weights."""
    folder = tmp_path / "totalseg"
    shutil.copytree(demo_model_dirs["organ"], folder / FASTEST / FASTEST_RUN)
    return folder


def spec(tmp_path, *entries):
    models = [*entries, {"id": "organ", "rel_path": "organ"}]
    return parse_spec({"model_folder": str(tmp_path / "models"), "models": models}, "spec")


@pytest.fixture
def models_folder(tmp_path, demo_model_dirs):
    (tmp_path / "models").mkdir()
    shutil.copytree(demo_model_dirs["organ"], tmp_path / "models" / "organ")
    return tmp_path / "models"


def test_task_resolves_in_totalsegmentators_layout_with_its_class_names(
    tmp_path, weights, models_folder
):
    registry = build_registry(
        spec(tmp_path, {"id": "total", "totalseg_task": "total_fastest"}), WeightsSource(weights)
    )
    model = registry.get("total")
    assert model.folder == weights / FASTEST / FASTEST_RUN
    assert model.source == "totalseg:total_fastest"
    segments = {s.label_id: s for s in model.seg_metadata.segments}
    assert {label: s.label for label, s in segments.items()} == class_map["total"]
    assert segments[1].property_type.value == "78961009", (
        "spleen, from TotalSegmentator's SNOMED map"
    )


def test_default_weights_folder_is_model_folder_totalseg(tmp_path, weights, models_folder):
    shutil.move(weights, models_folder / "totalseg")
    registry = build_registry(spec(tmp_path, {"id": "total", "totalseg_task": "total_fastest"}))
    assert registry.get("total").folder.parent.name == FASTEST


def test_missing_weights_disable_the_model_with_one_warning(tmp_path, models_folder, caplog):
    with caplog.at_level(logging.WARNING):
        registry = build_registry(spec(tmp_path, {"id": "total", "totalseg_task": "total_fastest"}))
    expected = str(models_folder / "totalseg" / "Dataset298_*" / FASTEST_RUN)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "model 'total' is disabled" in warning and expected in warning
    assert str(models_folder) not in registry.disabled["total"], "clients see no server path"
    assert "TOTALSEG_WEIGHTS_PATH/Dataset298_*" in registry.disabled["total"]
    assert registry.get("organ").id == "organ", "the other models still serve"
    with pytest.raises(Exception, match="model 'total' is disabled"):
        registry.get("total")


def test_without_the_package_the_model_is_disabled_with_the_install_hint(
    tmp_path, models_folder, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "totalsegmentator.map_tasks_config", None)
    registry = build_registry(spec(tmp_path, {"id": "total", "totalseg_task": "total_fastest"}))
    assert "pip install 'nnunet-bento[totalseg]'" in registry.disabled["total"]


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("total_fastes", "unknown TotalSegmentator task 'total_fastes'; close: "),
        ("total", "combines 5 models"),
    ],
)
def test_bad_task_names_stop_start_up(tmp_path, models_folder, task, message):
    with pytest.raises(SpecError, match=f"model 'total', field 'totalseg_task': .*{message}"):
        build_registry(spec(tmp_path, {"id": "total", "totalseg_task": task}))


def test_task_model_predicts_and_names_its_dicom_segments(
    tmp_path, weights, models_folder, demo_study
):
    registry = build_registry(
        spec(tmp_path, {"id": "total", "totalseg_task": "total_fastest"}), WeightsSource(weights)
    )
    runners = RunnerSet(
        {m.id: RunnerModel(m.folder) for m in registry.models.values()},
        DeviceSelector(None, wait_s=0),
        2,
    )
    response = SegmentationPipeline(registry, runners).run(
        InferenceRequest(
            nnunet_id="total",
            study_path=str(demo_study),
            series_folders=["T2"],
            output_dir=str(tmp_path / "out"),
            tta=False,
        )
    )
    labels = sitk.GetArrayFromImage(sitk.ReadImage(response.nifti_prediction[0]))
    assert set(np.unique(labels)) == {0, 1, 2}
    assert response.nnunet_path == "totalseg:total_fastest"
