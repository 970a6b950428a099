"""The RequestPlan: each field resolved and checked once, before any work, on the demo models."""

import shutil
from pathlib import Path

import pytest

from nnunet_bento.catalog.registry import build_registry
from nnunet_bento.catalog.spec import ModelEntry, ServeSpec
from nnunet_bento.errors import ForbiddenPathError, InputNotFoundError, RequestError
from nnunet_bento.io.path_roots import PathRoots
from nnunet_bento.pacs.nodes import DimseNode
from nnunet_bento.plan import CLI_LAYOUT, TMP_DIR_WARNING, Reference, RequestPlanner
from nnunet_bento.request import InferenceRequest

METADATA = {"algorithm_name": "demo", "segment_names": {1: "prostate", 2: "bladder"}}
NODES = {"pacs": DimseNode(name="pacs", host="127.0.0.1", port=11112, ae_title="PACS")}


@pytest.fixture(scope="module")
def base(demo_model_dirs, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("plan")
    shutil.copytree(demo_model_dirs["organ"].parents[1] / "study", base / "in" / "study")
    (base / "out").mkdir()
    return base


@pytest.fixture(scope="module")
def planner(demo_model_dirs, base) -> RequestPlanner:
    spec = ServeSpec(
        model_folder=demo_model_dirs["organ"].parent,
        models=[
            ModelEntry(id="organ", rel_path="organ", metadata=METADATA),
            ModelEntry(
                id="lesion",
                rel_path="lesion",
                metadata={"algorithm_name": "demo", "segment_names": {1: "lesion"}},
            ),
        ],
    )
    roots = PathRoots.from_settings(str(base / "in"), str(base / "out"))
    return RequestPlanner(build_registry(spec), roots, NODES)


def request(base: Path, **fields) -> InferenceRequest:
    study = {} if "dicom_source" in fields else {"study_path": str(base / "in" / "study")}
    defaults = {
        "nnunet_id": "organ",
        "series_folders": ["T2"],
        "output_dir": str(base / "out" / "o"),
    }
    return InferenceRequest(**{**defaults, **study, **fields})


def test_cascade_mode_supplies_the_previous_stage_as_the_reference_it_names(planner, base):
    plan = planner.plan(
        request(
            base,
            nnunet_id=["organ", "organ", "organ"],
            series_folders=[["T2"]] * 3,
            cascade_mode=["crop", "intersect"],
        )
    )
    first, second, third = plan.stages
    assert first.crop_from is None and first.intersect_with is None
    assert second.crop_from == Reference("crop_from", "stage_0", stage=0, explicit=False)
    assert second.intersect_with is None
    assert third.intersect_with == Reference("intersect_with", "stage_1", stage=1, explicit=False)
    assert third.crop_from is None


def test_a_stage_s_own_reference_wins_and_a_mask_file_is_resolved_in_the_study(planner, base):
    plan = planner.plan(
        request(
            base,
            nnunet_id=["organ", "organ"],
            series_folders=[["T2"], ["T2"]],
            cascade_mode="crop",
            crop_from=[None, "labels/organ.nii.gz"],
            intersect_with=[None, "stage_0"],
        )
    )
    second = plan.stages[1]
    study = (base / "in" / "study").resolve()
    assert second.crop_from == Reference(
        "crop_from", "labels/organ.nii.gz", file=study / "labels" / "organ.nii.gz"
    )
    assert second.intersect_with == Reference("intersect_with", "stage_0", stage=0)


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"intersect_with": "stage_0"}, RequestError, "has not run before it"),
        ({"crop_from": "../../secret.nii.gz"}, ForbiddenPathError, "crop_from: path leaves"),
        ({"series_folders": ["/etc"]}, ForbiddenPathError, "series_folders[0]: path leaves"),
        ({"use_folds": [0, 0]}, RequestError, "use_folds: each fold may be named once"),
        ({"use_folds": [0, 1, 2]}, RequestError, "use_folds: model 'organ' has 2 fold(s)"),
        ({"use_folds": ["0", 0]}, RequestError, "use_folds: each fold may be named once"),
        ({"checkpoint_name": "nope.pth"}, RequestError, "has no fold_0/nope.pth"),
        ({"class_idx": [7]}, RequestError, "class_idx [7] not among"),
        ({"series_folders": ["T2", "ADC"]}, RequestError, "takes 1 series"),
        ({"save_rt_struct_output": True}, RequestError, "needs is_dicom"),
        ({"save_dicom_sr": True}, RequestError, "save_dicom_sr needs is_dicom"),
        ({"push_to": ["pacs"]}, RequestError, "push_to needs DICOM outputs"),
        ({"push_to": ["elsewhere"], "is_dicom": True}, RequestError, "push_to[0]: unknown"),
        ({"is_dicom": True, "lossless_compression": True}, RequestError, "needs segmentation_type"),
    ],
)
def test_every_refusal_names_its_field_before_any_work(planner, base, fields, error, words):
    with pytest.raises(error) as refused:
        planner.plan(request(base, **fields))
    assert words in str(refused.value)
    assert str(base) not in str(refused.value)


def test_a_missing_study_is_a_404_and_a_study_outside_the_roots_a_403(planner, base):
    with pytest.raises(InputNotFoundError):
        planner.plan(
            InferenceRequest(
                nnunet_id="organ",
                study_path=str(base / "in" / "absent"),
                series_folders=["T2"],
                output_dir=str(base / "out" / "o"),
            )
        )
    with pytest.raises(ForbiddenPathError):
        planner.plan(
            InferenceRequest(
                nnunet_id="organ",
                study_path=str(base),
                series_folders=["in/study/T2"],
                output_dir=str(base / "out" / "o"),
            )
        )


def test_the_plan_names_exactly_the_outputs_the_request_asks_for(planner, base):
    (plain,) = planner.plan(request(base, save_statistics=False)).stages
    assert plain.outputs == {"prediction": ("stage_0/prediction.nii.gz",)}
    (every,) = planner.plan(
        request(
            base,
            nnunet_id="lesion",
            series_folders=["T2", "ADC"],
            is_dicom=True,
            save_proba_map=True,
            proba_threshold=0.5,
            save_rt_struct_output=True,
            save_nifti_inputs=True,
            save_preview=True,
            save_dicom_sr=True,
            suffix="v1",
        )
    ).stages
    assert every.outputs == {
        "prediction": ("stage_0/prediction_v1.nii.gz",),
        "proba": ("stage_0/proba_v1.nii.gz",),
        "input": ("stage_0/volume_0000_v1.nii.gz", "stage_0/volume_0001_v1.nii.gz"),
        "segmentation": ("stage_0/prediction_v1.dcm",),
        "fractional_segmentation": ("stage_0/proba_v1.dcm",),
        "struct": ("stage_0/struct_v1.dcm",),
        "statistics": ("stage_0/statistics_v1.json",),
        "dicom_sr": ("stage_0/measurements_v1.dcm",),
        "preview": ("stage_0/preview_v1.png",),
    }


def test_the_command_line_layout_writes_flat_names(demo_model_dirs, planner, base):
    cli = RequestPlanner(planner.registry, planner.roots, {}, CLI_LAYOUT)
    (stage,) = cli.plan(request(base, save_proba_map=True, proba_threshold=0.1)).stages
    assert stage.outputs == {
        "prediction": ("prediction.nii.gz",),
        "proba": ("probabilities.nii.gz",),
        "statistics": ("statistics.json",),
    }


def test_weights_and_the_checkpoint_hash_come_from_the_plan(planner, base):
    (stage,) = planner.plan(request(base, use_folds=[1, 0])).stages
    assert stage.weights.folds == (1, 0)
    assert stage.weights.checkpoint_name == "checkpoint_final.pth"
    single = planner.plan(request(base, use_folds=[1])).stages[0].identity.checkpoint_sha256
    assert len(stage.identity.checkpoint_sha256) == 64
    assert stage.identity.checkpoint_sha256 != single


def test_tmp_dir_is_answered_with_a_warning_only_when_given(planner, base):
    assert planner.plan(request(base)).warnings == ()
    assert planner.plan(request(base, tmp_dir="/anywhere")).warnings == (TMP_DIR_WARNING,)


def test_a_pulled_study_is_planned_before_the_pull_and_its_series_checked_after(planner, base):
    plan = planner.plan(
        request(
            base,
            nnunet_id=["organ", "lesion"],
            series_folders=[["T2 axial"], ["T2 axial", "ADC"]],
            dicom_source={"node": "pacs", "study_uid": "1.2.3"},
            push_to=["pacs"],
        )
    )
    assert plan.pull is not None and plan.pull.entries == ("ADC", "T2 axial")
    assert plan.push_to == (NODES["pacs"],) and plan.study is None
    pulled = base / "in" / "pulled"
    folders = {"ADC": pulled / "0", "T2 axial": pulled / "1"}
    local = plan.with_pulled_study(planner.roots, pulled, folders)
    assert local.stages[1].series == (pulled / "1", pulled / "0")
    assert local.study == pulled
    with pytest.raises(RequestError, match="a study pulled from dicom_source has only its series"):
        planner.plan(
            request(
                base,
                dicom_source={"node": "pacs", "study_uid": "1.2.3"},
                intersect_with="labels/organ.nii.gz",
            )
        )
