"""/infer, /model_info and /request-params through a real `bentoml serve`."""

import shutil
import threading
from pathlib import Path

import httpx
import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from bentoml.exceptions import BentoMLException
from conftest import REPO, bentoml_serve, cli_predict
from preview_pixels import voxel_at

from nnunet_bento.preview import write_preview
from nnunet_bento.request import InferenceRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(imported_models, demo_model_dirs, tmp_path_factory):
    """The repository's spec plus one model whose checkpoint is corrupt (for HTTP 500)."""
    folder = tmp_path_factory.mktemp("serve")
    broken = folder / "models" / "broken"
    shutil.copytree(demo_model_dirs["organ2d"], broken)
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    spec["model_folder"] = str(folder / "models")
    spec["models"].append({"id": "broken", "rel_path": "broken"})
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def study(demo_study, tmp_path_factory) -> Path:
    """The demo study plus an ADC resampled onto the T2 grid (nnU-Net's own reader needs it)."""
    folder = tmp_path_factory.mktemp("study")
    shutil.copytree(demo_study, folder, dirs_exist_ok=True)
    t2 = sitk.ReadImage(str(folder / "T2" / "T2.nii.gz"))
    adc = sitk.ReadImage(str(folder / "ADC" / "ADC.nii.gz"))
    aligned = sitk.Resample(adc, t2, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    (folder / "ADC_on_T2").mkdir()
    sitk.WriteImage(aligned, str(folder / "ADC_on_T2" / "ADC.nii.gz"))
    return folder


def nnunet_reference(
    model_dir: Path, files: list[Path], folds, out: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities from nnUNetPredictor.predict_from_files on the same input."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        use_mirroring=True,
        device=torch.device("cpu"),
        perform_everything_on_device=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), folds, "checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(
        [[str(f) for f in files]],
        [str(out / "case")],
        save_probabilities=True,
        num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
    return labels, np.load(out / "case.npz")["probabilities"]


@pytest.mark.parametrize(
    ("model", "series", "reference_series", "folds"),
    [
        ("organ", ["T2"], ["T2/T2.nii.gz"], [0, 1]),
        ("organ2d", ["T2"], ["T2/T2.nii.gz"], [0]),
        ("lesion", ["T2", "ADC"], ["T2/T2.nii.gz", "ADC_on_T2/ADC.nii.gz"], [0]),
    ],
)
def test_infer_equals_nnunet_predict_from_files(
    served, study, demo_model_dirs, tmp_path, model, series, reference_series, folds
):
    response = served.client.infer(
        nnunet_id=model,
        study_path=str(study),
        series_folders=series,
        output_dir=str(tmp_path / "out"),
        use_folds=folds,
        tta=True,
        save_proba_map=True,
        proba_threshold=0.0,
    )
    assert response["status"] == "done" and response["device"] == "cpu" and response["gpu"] is None
    assert set(response["timings"]) >= {"read", "predict", "export"}
    labels, probabilities = nnunet_reference(
        demo_model_dirs[model], [study / s for s in reference_series], folds, tmp_path / "reference"
    )
    served_labels = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][0]))
    np.testing.assert_array_equal(served_labels, labels)
    assert labels.any()
    served_proba = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_proba"][0]))
    foreground = probabilities[1:]
    if served_proba.ndim == 3:
        served_proba = served_proba[None]
    np.testing.assert_allclose(served_proba, foreground, atol=1e-3)
    prediction = sitk.ReadImage(response["nifti_prediction"][0])
    t2 = sitk.ReadImage(str(study / "T2" / "T2.nii.gz"))
    assert prediction.GetOrigin() == t2.GetOrigin() and prediction.GetSpacing() == t2.GetSpacing()


def post(served, body: dict) -> httpx.Response:
    return httpx.post(f"{served.url}/infer", json=body, timeout=300)


def test_errors_have_status_and_message_and_the_server_keeps_serving(served, study, tmp_path):
    base = {"study_path": str(study), "output_dir": str(tmp_path / "out")}
    cases = [
        ({"nnunet_id": "nope", "series_folders": ["T2"]}, 400, "unknown nnunet_id 'nope'"),
        (
            {"nnunet_id": ["organ", "lesion"], "series_folders": ["T2", "ADC"]},
            400,
            "series_folders must be a list of 2 lists",
        ),
        (
            {"nnunet_id": "organ", "series_folders": ["T2", "ADC"]},
            400,
            "model 'organ' takes 1 series (T2); series_folders gives 2",
        ),
        ({"nnunet_id": "organ", "series_folders": ["missing"]}, 404, "missing does not exist"),
        (
            {"nnunet_id": "organ", "series_folders": ["T2"], "study_path": "/no/such/study"},
            404,
            "study_path /no/such/study does not exist",
        ),
        ({"nnunet_id": "organ", "series_folders": ["T2"], "tta": "maybe"}, 400, "tta"),
        ({"nnunet_id": "broken", "series_folders": ["T2"]}, 500, "inference failed"),
    ]
    for fields, status, message in cases:
        response = post(served, {**base, **fields})
        assert response.status_code == status, (fields, response.text)
        assert response.json()["status"] == "failed"
        assert message in response.json()["error"], response.json()
    assert not (tmp_path / "out" / "stage_0").exists()
    with pytest.raises(BentoMLException) as raised:
        served.client.infer(nnunet_id="nope", series_folders=["T2"], **base)
    assert raised.value.error_code == 400 and "unknown nnunet_id" in str(raised.value)
    after = served.client.infer(nnunet_id="organ2d", series_folders=["T2"], **base)
    assert Path(after["nifti_prediction"][0]).is_file()


def strings_in(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def test_get_model_info_is_the_registry_without_server_paths(served):
    info = httpx.get(f"{served.url}/model_info").json()
    assert {"organ", "organ2d", "lesion", "organ_nomirror", "broken"} <= set(info)
    organ = info["organ"]
    assert organ["aliases"] == ["prostate_whole_gland"]
    assert organ["n_classes"] == 3 and organ["device"] == "cpu"
    assert organ["model_information"]["channel_names"] == {"0": "T2"}
    assert organ["path"].startswith("organ:") and organ["default_args"] == {"use_folds": [0, 1]}
    assert not [s for s in strings_in(info) if s.startswith("/")]
    assert served.client.model_info() == info


def test_get_request_params_is_the_request_schema(served):
    schema = httpx.get(f"{served.url}/request-params").json()
    assert schema == InferenceRequest.model_json_schema()
    assert set(schema["required"]) == {"nnunet_id", "output_dir"}
    assert {"study_path", "dicom_source", "push_to", "overwrite"} <= set(schema["properties"])


def test_seed_curl_example_body_works_unchanged(served, study, tmp_path):
    body = {
        "nnunet_id": "prostate_whole_gland",
        "study_path": str(study),
        "series_folders": ["T2"],
        "output_dir": str(tmp_path / "out"),
        "use_folds": [0, 1],
        "tta": True,
        "save_proba_map": True,
        "proba_threshold": 0.1,
        "min_confidence": 0.5,
    }
    response = post(served, body)
    assert response.status_code == 200, response.text
    assert response.json()["nifti_proba"] == [str(tmp_path / "out" / "stage_0" / "proba.nii.gz")]
    proba = sitk.GetArrayFromImage(sitk.ReadImage(response.json()["nifti_proba"][0]))
    assert proba.max() > 0.5 and not ((proba > 0) & (proba < 0.1)).any()


def test_suffix_and_nifti_inputs_name_the_outputs(served, study, tmp_path):
    response = served.client.infer(
        nnunet_id="lesion",
        study_path=str(study),
        series_folders=["T2", "ADC"],
        output_dir=str(tmp_path),
        suffix="v2",
        save_nifti_inputs=True,
    )
    stage = tmp_path / "stage_0"
    assert response["nifti_prediction"] == [str(stage / "prediction_v2.nii.gz")]
    assert response["nifti_inputs"] == [
        str(stage / "volume_0000_v2.nii.gz"),
        str(stage / "volume_0001_v2.nii.gz"),
    ]
    adc = sitk.ReadImage(response["nifti_inputs"][1])
    assert adc.GetSize() == sitk.ReadImage(str(study / "T2" / "T2.nii.gz")).GetSize()


def test_trainer_variant_model_serves(served, study, tmp_path):
    response = served.client.infer(
        nnunet_id="organ_nomirror",
        study_path=str(study),
        series_folders=["T2"],
        output_dir=str(tmp_path),
    )
    assert set(
        np.unique(sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][0])))
    ) == {0, 1, 2}


def test_readyz_and_model_info_answer_while_an_inference_runs(served, study, tmp_path):
    t2 = sitk.ReadImage(str(study / "T2" / "T2.nii.gz"))
    big = sitk.Expand(t2, [3, 3, 3], sitk.sitkLinear)
    (tmp_path / "big").mkdir()
    sitk.WriteImage(big, str(tmp_path / "big" / "T2.nii.gz"))
    body = {
        "nnunet_id": "organ",
        "study_path": str(tmp_path),
        "series_folders": ["big"],
        "output_dir": str(tmp_path / "out"),
        "use_folds": [0, 1],
        "tta": True,
    }
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("response", post(served, body)))
    worker.start()
    answered = 0
    while worker.is_alive() and answered < 3:
        ready = httpx.get(f"{served.url}/readyz", timeout=30)
        info = httpx.get(f"{served.url}/model_info", timeout=30)
        assert ready.status_code == 200 and info.status_code == 200
        answered += worker.is_alive()
    worker.join()
    assert answered >= 1, "the inference finished before /readyz and /model_info were asked"
    assert done["response"].status_code == 200


def lesion_labels(served, study, out: Path, **fields) -> np.ndarray:
    """Stage 1 (lesion) labels of an organ -> lesion cascade, or of lesion alone."""
    cascade = {"nnunet_id": ["organ", "lesion"], "series_folders": [["T2"], ["T2", "ADC"]]}
    body = {**cascade, "study_path": str(study), "output_dir": str(out), **fields}
    response = served.client.infer(**body)
    return sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][-1])), response


@pytest.fixture(scope="module")
def lesion_alone(served, study, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("lesion-alone")
    response = served.client.infer(
        nnunet_id="lesion", study_path=str(study), series_folders=["T2", "ADC"], output_dir=str(out)
    )
    labels = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][0]))
    assert labels.any()
    return labels


def test_intersect_cascade_keeps_lesions_inside_the_organ(served, study, tmp_path, lesion_alone):
    labels, response = lesion_labels(served, study, tmp_path / "a", cascade_mode="intersect")
    assert [s["stage"] for s in response["stages"]] == [0, 1]
    assert response["nifti_prediction"] == [
        str(tmp_path / "a" / f"stage_{i}" / "prediction.nii.gz") for i in (0, 1)
    ]
    np.testing.assert_array_equal(labels, lesion_alone)
    outside, _ = lesion_labels(
        served, study, tmp_path / "b", cascade_mode="intersect", class_idx=[[2], None]
    )
    assert not outside.any(), "the lesion lies in the prostate, not in the bladder stage 0 kept"


def test_crop_cascade_predicts_on_the_organ_box(served, study, tmp_path, lesion_alone):
    labels, response = lesion_labels(served, study, tmp_path / "a", cascade_mode="crop")
    changed = np.sum(labels != lesion_alone) / lesion_alone.sum()
    assert changed <= 0.02, f"{changed:.1%} of lesion voxels differ from the full-volume run"
    outside, response = lesion_labels(
        served,
        study,
        tmp_path / "b",
        cascade_mode="crop",
        class_idx=[[2], None],
        crop_padding=[0, 0, 0],
    )
    bladder = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][0]))
    box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(bladder))
    outside_box = np.ones_like(outside, dtype=bool)
    outside_box[box] = False
    assert not outside[outside_box].any(), "stage 1 predicted only inside stage 0's box"
    assert not outside[lesion_alone > 0].any(), "the lesion lies outside the bladder's box"


def test_a_stage_can_name_an_earlier_stage_and_modes_go_per_transition(
    served, study, tmp_path, lesion_alone
):
    body = {
        "nnunet_id": ["organ", "organ2d", "lesion"],
        "series_folders": [["T2"], ["T2"], ["T2", "ADC"]],
        "cascade_mode": ["crop", "intersect"],
        "class_idx": [[1], [2], None],
        "crop_from": [None, None, "stage_0"],
        "crop_padding": [0, 0, 0],
        "study_path": str(study),
        "output_dir": str(tmp_path),
    }
    response = served.client.infer(**body)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in response["nifti_prediction"]]
    box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(labels[0]))
    inside = np.zeros(labels[0].shape, dtype=bool)
    inside[box] = True
    assert not labels[1][~inside].any(), "crop: stage 1 predicts inside stage 0's box only"
    assert lesion_alone[inside].any() and not labels[2].any(), (
        "stage 2 crops to stage_0 (the lesion is inside) but intersects with stage 1's "
        "bladder voxels, which hold no lesion"
    )
    bad = post(served, {**body, "crop_from": [None, "stage_1", None]})
    assert bad.status_code == 400
    assert "crop_from 'stage_1' of stage 1 names a stage that has not run" in bad.json()["error"]


def test_an_empty_crop_from_mask_is_a_400(served, study, tmp_path):
    t2 = sitk.ReadImage(str(study / "T2" / "T2.nii.gz"))
    empty = sitk.Image(t2.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(t2)
    sitk.WriteImage(empty, str(study / "empty.nii.gz"))
    response = post(
        served,
        {
            "nnunet_id": "lesion",
            "study_path": str(study),
            "series_folders": ["T2", "ADC"],
            "output_dir": str(tmp_path / "out"),
            "crop_from": "empty.nii.gz",
        },
    )
    assert response.status_code == 400
    assert "is empty: there is nothing to crop to" in response.json()["error"]


def test_cli_predict_equals_infer_on_the_same_input(served, study, tmp_path):
    response = served.client.infer(
        nnunet_id="lesion",
        study_path=str(study),
        series_folders=["T2", "ADC"],
        output_dir=str(tmp_path / "api"),
        tta=True,
        save_proba_map=True,
        proba_threshold=0.05,
    )
    cli = cli_predict(
        *("-i", str(study / "T2"), str(study / "ADC")),
        *("-m", str(REPO / "examples" / "models" / "lesion"), "-o", str(tmp_path / "cli")),
        *("-t", "-p", "--proba_threshold", "0.05"),
    )
    assert cli.returncode == 0, cli.stderr
    pairs = [
        (response["nifti_prediction"][0], "prediction.nii.gz"),
        (response["nifti_proba"][0], "probabilities.nii.gz"),
    ]
    for api_file, cli_name in pairs:
        api_image = sitk.ReadImage(api_file)
        cli_image = sitk.ReadImage(str(tmp_path / "cli" / cli_name))
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(cli_image), sitk.GetArrayFromImage(api_image)
        )
        assert cli_image.GetOrigin() == api_image.GetOrigin()


def test_cli_flags_not_given_leave_the_spec_default_args_in_force(served, study, tmp_path):
    """`predict -m organ -t` runs with the spec's folds (0, 1), as /infer naming no folds."""
    response = served.client.infer(
        nnunet_id="organ",
        study_path=str(study),
        series_folders=["T2"],
        output_dir=str(tmp_path / "api"),
        save_proba_map=True,
        proba_threshold=0.0,
    )
    cli = cli_predict(
        *("-i", str(study / "T2"), "-m", "organ", "-o", str(tmp_path / "cli")),
        *("-t", "-p", "--proba_threshold", "0", "--preview"),
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli" / "preview.png").stat().st_size > 10_000
    api = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_proba"][0]))
    local = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli" / "probabilities.nii.gz")))
    np.testing.assert_allclose(local, api, atol=1e-3)
    one_fold = served.client.infer(
        nnunet_id="organ",
        study_path=str(study),
        series_folders=["T2"],
        output_dir=str(tmp_path / "fold0"),
        use_folds=[0],
        save_proba_map=True,
        proba_threshold=0.0,
    )
    fold0 = sitk.GetArrayFromImage(sitk.ReadImage(one_fold["nifti_proba"][0]))
    assert np.abs(fold0 - local).max() > 1e-2, "the CLI ensembled folds 0 and 1, not fold 0 alone"


def test_a_preview_per_stage_shows_each_stages_mask(served, study, tmp_path):
    response = served.client.infer(
        nnunet_id=["organ", "lesion"],
        study_path=str(study),
        series_folders=[["T2"], ["T2", "ADC"]],
        output_dir=str(tmp_path / "out"),
        save_preview=True,
    )
    assert response["timings"]["preview"] > 0
    assert response["preview"] == [stage["preview"] for stage in response["stages"]]
    t2 = sitk.ReadImage(str(study / "T2" / "T2.nii.gz"))
    expected = [("organ", [0, 1], {1: "prostate", 2: "bladder"}), ("lesion", [0], {1: "lesion"})]
    for index, (model, folds, names) in enumerate(expected):
        served_png = mpimg.imread(response["preview"][index])
        assert 600 <= served_png.shape[1] <= 2000
        mask = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_prediction"][index]))
        local = write_preview(
            t2, mask, names, model_id=model, folds=folds, path=tmp_path / f"local_{index}.png"
        )
        np.testing.assert_array_equal(mpimg.imread(local.path), served_png)
        axial = local.panels[0]
        assert [label.label for label in local.labels] == sorted(set(np.unique(mask)) - {0})
        for label in local.labels:
            colour = (served_png[..., :3] * 255).round().astype(int)
            ys, xs = np.nonzero((colour == label.colour).all(axis=-1))
            inside = [
                (x, y)
                for x, y in zip(xs, ys, strict=True)
                if axial.box[0] <= x < axial.box[2] and axial.box[1] <= y < axial.box[3]
            ]
            assert inside, f"{label.name} is drawn in the axial panel"
            hits = [
                mask[k, j, i] == label.label
                for i, j, k in map(lambda p: voxel_at(axial, *p), inside)
            ]
            assert np.mean(hits) > 0.5, f"{label.name}'s colour lies on its mask"
