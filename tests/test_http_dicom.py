"""DICOM in, DICOM out through a real `bentoml serve`, checked by readers we did not write."""

import json
import shutil
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, bentoml_serve
from dicom_checks import dciodvfy_errors, dcmqi_labels, dice, highdicom_labels, rtstruct_masks
from sr_checks import dcmqi_report

from nnunet_bento.io.dicom_series import read_dicom_series

pytestmark = pytest.mark.slow
DICOM = REPO / "examples" / "dicom"
ORGAN_LABELS = {"prostate": 1, "bladder": 2}
LABEL_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


@pytest.fixture(scope="module")
def served(imported_models, demo_model_dirs, tmp_path_factory):
    """The repository's spec, plus a model with an empty-SEG template and one without metadata."""
    folder = tmp_path_factory.mktemp("serve-dicom")
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    spec["model_folder"] = str(demo_model_dirs["organ"].parent)
    organ_metadata = spec["models"][0]["metadata"]
    spec["models"] += [
        {
            "id": "organ_with_empty_template",
            "rel_path": "organ",
            "metadata": organ_metadata,
            "empty_segment_metadata": {**organ_metadata, "series_description": "No findings"},
        },
        {"id": "organ_without_metadata", "rel_path": "organ2d"},
    ]
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log") as server:
        yield server


def infer(served, tmp_path: Path, **fields) -> dict:
    defaults = {
        "is_dicom": True,
        "output_dir": str(tmp_path / "out"),
        "use_folds": [0],
        "tta": False,
    }
    return served.client.infer(**{**defaults, **fields})


def labels_of(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def assert_rt_struct_matches(path: str, source, expected: np.ndarray) -> None:
    """One ROI per organ label, each rasterised back by rt-utils with a Dice of 0.9 or more."""
    masks = rtstruct_masks(Path(path), source)
    assert set(masks) == set(ORGAN_LABELS)
    for name, label in ORGAN_LABELS.items():
        assert dice(masks[name], expected == label) >= 0.9, name


def infer_ct(served, tmp_path: Path, **fields) -> dict:
    """The organ model on the CT demo series."""
    ct = {"nnunet_id": "organ", "study_path": str(DICOM / "ct"), "series_folders": ["CT"]}
    return infer(served, tmp_path, **{**ct, **fields})


def assert_valid(*paths: str) -> None:
    for path in paths:
        assert dciodvfy_errors(Path(path)) == [], path


def test_ct_seg_fractional_and_rt_struct_are_valid_and_read_back(served, tmp_path):
    response = infer_ct(
        served,
        tmp_path,
        save_proba_map=True,
        proba_threshold=0.1,
        save_rt_struct_output=True,
    )
    (seg_path,), (fractional_path,), (struct_path,) = (
        response["dicom_segmentation"],
        response["dicom_fractional_segmentation"],
        response["dicom_struct"],
    )
    assert_valid(seg_path, fractional_path, struct_path)
    source = read_dicom_series(DICOM / "ct" / "CT")
    expected = labels_of(response["nifti_prediction"][0])
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_array_equal(highdicom_labels(Path(seg_path), source, ORGAN_LABELS), expected)
    np.testing.assert_array_equal(
        dcmqi_labels(Path(seg_path), source, tmp_path / "dcmqi", ORGAN_LABELS), expected
    )
    fractional = hd.seg.segread(fractional_path)
    assert fractional.SegmentationType == "FRACTIONAL"
    read = fractional.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source.datasets], rescale_fractional=True, dtype=np.float64
    )
    proba = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_proba"][0]))
    np.testing.assert_allclose(np.moveaxis(read, -1, 0), proba, atol=0.5 / 255 + 1e-6)
    assert_rt_struct_matches(struct_path, source, expected)


def test_every_output_references_its_source_and_names_the_model(served, tmp_path):
    response = infer_ct(
        served,
        tmp_path,
        save_rt_struct_output=True,
    )
    series_uid = read_dicom_series(DICOM / "ct" / "CT").series_instance_uid
    tag = httpx.get(f"{served.url}/model_info").json()["organ"]["path"]
    seg = pydicom.dcmread(response["dicom_segmentation"][0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion.startswith("nnunet-bento")
    assert tag in str(algorithm.AlgorithmParameters)
    assert "segmentation" in seg.SeriesDescription
    struct = pydicom.dcmread(response["dicom_struct"][0])
    referenced = struct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert tag in struct.StructureSetDescription
    assert struct.SeriesDescription


def test_mr_labelmap_references_the_first_series_and_reads_back(served, tmp_path):
    response = infer(
        served,
        tmp_path,
        nnunet_id="lesion",
        study_path=str(DICOM / "mr"),
        series_folders=["T2", "ADC"],
        segmentation_type="labelmap",
        lossless_compression=True,
    )
    (seg_path,) = response["dicom_segmentation"]
    assert_valid(seg_path)
    seg = pydicom.dcmread(seg_path)
    t2 = read_dicom_series(DICOM / "mr" / "T2")
    assert seg.SOPClassUID == LABEL_MAP_STORAGE
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t2.series_instance_uid
    expected = labels_of(response["nifti_prediction"][0])
    assert expected.any()
    np.testing.assert_array_equal(highdicom_labels(Path(seg_path), t2, {"lesion": 1}), expected)
    np.testing.assert_array_equal(
        dcmqi_labels(Path(seg_path), t2, tmp_path / "dcmqi", {"lesion": 1}), expected
    )


def test_oblique_series_round_trips_in_its_own_space(served, tmp_path):
    study = DICOM / "oblique"
    response = infer(
        served,
        tmp_path,
        nnunet_id="organ",
        study_path=str(study),
        series_folders=["T2"],
        save_rt_struct_output=True,
    )
    source = read_dicom_series(study / "T2")
    prediction = sitk.ReadImage(response["nifti_prediction"][0])
    np.testing.assert_allclose(prediction.GetDirection(), source.image.GetDirection(), atol=1e-6)
    expected = sitk.GetArrayFromImage(prediction)
    truth = labels_of(str(study / "labels" / "organ.nii.gz"))
    assert dice(expected == 1, truth == 1) >= 0.9, "the model sees the oblique series right"
    seg_path, struct_path = response["dicom_segmentation"][0], response["dicom_struct"][0]
    assert_valid(seg_path, struct_path)
    np.testing.assert_array_equal(
        dcmqi_labels(Path(seg_path), source, tmp_path / "dcmqi", ORGAN_LABELS), expected
    )
    assert_rt_struct_matches(struct_path, source, expected)


def test_fractional_as_segments_bins_the_probability_map(served, tmp_path):
    response = infer_ct(
        served,
        tmp_path,
        class_idx=1,
        save_proba_map=True,
        proba_threshold=0.1,
        fractional_as_segments=True,
    )
    (path,) = response["dicom_fractional_segmentation"]
    assert_valid(path)
    source = read_dicom_series(DICOM / "ct" / "CT")
    proba = sitk.GetArrayFromImage(sitk.ReadImage(response["nifti_proba"][0]))
    n = 2
    expected = np.where(proba > 0, np.minimum(np.floor(proba * n) + 1, n), 0)
    seg = hd.seg.segread(path)
    assert len(seg.SegmentSequence) == n
    read = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source.datasets], combine_segments=True
    )
    np.testing.assert_array_equal(read, expected)


def test_empty_prediction_writes_no_seg_unless_an_empty_template_is_given(served, tmp_path):
    source = read_dicom_series(DICOM / "ct" / "CT")
    nothing = sitk.Image(source.image.GetSize(), sitk.sitkUInt8)
    nothing.CopyInformation(source.image)
    shutil.copytree(DICOM / "ct", tmp_path / "ct")
    sitk.WriteImage(nothing, str(tmp_path / "ct" / "nothing.nii.gz"))
    fields = {
        "study_path": str(tmp_path / "ct"),
        "series_folders": ["CT"],
        "intersect_with": "nothing.nii.gz",
    }
    response = infer(served, tmp_path / "plain", nnunet_id="organ", **fields)
    assert response["stages"][0]["is_empty"] is True
    assert response["dicom_segmentation"] == []
    assert not list((tmp_path / "plain" / "out" / "stage_0").glob("*.dcm"))
    templated = infer(
        served, tmp_path / "template", nnunet_id="organ_with_empty_template", **fields
    )
    (path,) = templated["dicom_segmentation"]
    assert_valid(path)
    assert pydicom.dcmread(path).SeriesDescription == "No findings"


def test_dicom_request_errors(served, tmp_path):
    mixed = tmp_path / "study" / "mixed"
    shutil.copytree(DICOM / "mr" / "T2", mixed)
    for file in (DICOM / "mr" / "ADC").iterdir():
        shutil.copy(file, mixed / f"adc_{file.name}")
    adc_uid = read_dicom_series(DICOM / "mr" / "ADC").series_instance_uid
    base = {
        "is_dicom": True,
        "study_path": str(tmp_path / "study"),
        "output_dir": str(tmp_path / "out"),
    }
    cases = [
        ({"nnunet_id": "organ", "series_folders": ["mixed"]}, 400, adc_uid),
        ({"nnunet_id": "organ", "series_folders": ["absent"]}, 404, "absent"),
        (
            {"nnunet_id": "organ_without_metadata", "series_folders": ["mixed"]},
            400,
            "model 'organ_without_metadata' has no DICOM metadata",
        ),
        (
            {
                "nnunet_id": "organ",
                "series_folders": ["mixed"],
                "is_dicom": False,
                "save_rt_struct_output": True,
            },
            400,
            "save_rt_struct_output needs is_dicom",
        ),
        (
            {
                "nnunet_id": "organ",
                "series_folders": ["mixed"],
                "save_proba_map": True,
                "proba_threshold": 0.1,
                "fractional_as_segments": True,
            },
            400,
            "select one with class_idx",
        ),
    ]
    for fields, status, message in cases:
        response = httpx.post(f"{served.url}/infer", json={**base, **fields}, timeout=300)
        assert response.status_code == status, (fields, response.text)
        assert response.json()["status"] == "failed"
        assert message in response.json()["error"], response.json()
    assert not (tmp_path / "out" / "stage_0").exists()


@pytest.mark.parametrize("mode", ["intersect", "crop"])
def test_dicom_cascade_writes_a_seg_per_stage_referencing_its_own_series(served, tmp_path, mode):
    response = infer(
        served,
        tmp_path,
        nnunet_id=["organ", "lesion"],
        study_path=str(DICOM),
        series_folders=[["mr/T2"], ["shuffled/T2", "mr/ADC"]],
        cascade_mode=mode,
    )
    assert len(response["dicom_segmentation"]) == 2
    read_by_stage = [DICOM / "mr" / "T2", DICOM / "shuffled" / "T2"]
    for stage, path in enumerate(response["dicom_segmentation"]):
        assert Path(path).parent.name == f"stage_{stage}"
        assert_valid(path)
        seg = pydicom.dcmread(path)
        own_series = read_dicom_series(read_by_stage[stage]).series_instance_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == own_series
    labels = {
        item.SegmentLabel
        for path in response["dicom_segmentation"]
        for item in pydicom.dcmread(path).SegmentSequence
    }
    assert labels == {"prostate", "bladder", "lesion"}


def test_statistics_and_the_sr_carry_the_same_numbers_as_the_written_mask(served, tmp_path):
    """CT: statistics.json is stages[0].statistics; volumes are count × voxel volume of the
    written mask, the mean HU equals the source's over the same voxels, and the SR read back
    by dciodvfy, dcmqi and highdicom carries those volumes and references the SEG."""
    response = infer_ct(served, tmp_path, save_dicom_sr=True)
    (stage,) = response["stages"]
    statistics = stage["statistics"]
    (statistics_path,) = response["statistics_json"]
    assert json.loads(Path(statistics_path).read_text()) == statistics
    assert set(statistics) == set(ORGAN_LABELS)
    mask_image = sitk.ReadImage(response["nifti_prediction"][0])
    mask = sitk.GetArrayFromImage(mask_image)
    hu = sitk.GetArrayFromImage(read_dicom_series(DICOM / "ct" / "CT").image).astype(float)
    voxel_ml = float(np.prod(mask_image.GetSpacing())) / 1000
    for name, label in ORGAN_LABELS.items():
        inside = mask == label
        assert statistics[name]["voxels"] == int(inside.sum())
        assert statistics[name]["volume_ml"] == pytest.approx(inside.sum() * voxel_ml)
        assert statistics[name]["intensity"]["unit"] == "HU"
        assert statistics[name]["intensity"]["mean"] == pytest.approx(hu[inside].mean(), abs=0.01)
    assert response["timings"]["measure"] > 0
    (sr_path,), (seg_path,) = response["dicom_sr"], response["dicom_segmentation"]
    assert Path(sr_path).name == "measurements.dcm"
    assert_valid(sr_path)
    report = dcmqi_report(Path(sr_path), tmp_path / "sr.json")
    seg = pydicom.dcmread(seg_path)
    volumes = {}
    for group in report["Measurements"]:
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        segment = seg.SegmentSequence[int(group["ReferencedSegment"]) - 1]
        (volume,) = [i for i in group["measurementItems"] if i["units"]["CodeValue"] == "ml"]
        volumes[segment.SegmentLabel] = float(volume["value"])
    assert volumes == pytest.approx({n: statistics[n]["volume_ml"] for n in volumes}, abs=1e-3)
    assert set(volumes) == set(ORGAN_LABELS)
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(ORGAN_LABELS)


def test_each_stage_of_a_cascade_has_its_own_statistics(served, tmp_path):
    response = infer(
        served,
        tmp_path,
        nnunet_id=["organ", "lesion"],
        study_path=str(DICOM),
        series_folders=[["mr/T2"], ["mr/T2", "mr/ADC"]],
        save_dicom_sr=True,
    )
    first, second = (stage["statistics"] for stage in response["stages"])
    assert set(first) == set(ORGAN_LABELS) and set(second) == {"lesion"}
    assert first["prostate"]["intensity"]["unit"] is None, "MR values have no unit"
    for index, path in enumerate(response["statistics_json"]):
        assert Path(path).parent.name == f"stage_{index}"
        assert json.loads(Path(path).read_text()) == response["stages"][index]["statistics"]
    assert [Path(p).parent.name for p in response["dicom_sr"]] == [
        f"stage_{i}" for i, stage in enumerate(response["stages"]) if not stage["is_empty"]
    ]
