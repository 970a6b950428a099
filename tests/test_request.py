"""Merging per-model values and default_args into stage settings."""

import pytest

from nnunet_bento.errors import RequestError
from nnunet_bento.plan import cascade_modes, merge_stage_settings
from nnunet_bento.request import InferenceRequest


def request(**fields) -> InferenceRequest:
    base = {"nnunet_id": "organ", "study_path": "/s", "output_dir": "/o", "series_folders": ["T2"]}
    return InferenceRequest(**{**base, **fields})


def test_server_defaults_apply_when_nothing_is_given():
    (stage,) = merge_stage_settings(request(), [{}])
    assert (stage.use_folds, stage.tta, stage.checkpoint_name) == (
        [0],
        True,
        "checkpoint_final.pth",
    )
    assert stage.crop_padding == (10, 10, 10) and stage.min_intersection == 0.1


def test_flat_use_folds_on_one_model_is_that_models_folds():
    (stage,) = merge_stage_settings(request(use_folds=[0, 1, 2, 3, 4]), [{}])
    assert stage.use_folds == [0, 1, 2, 3, 4]


def test_request_value_wins_over_default_args_and_default_args_over_server_default():
    defaults = {"use_folds": [0, 1], "tta": False, "proba_threshold": 0.3}
    (stage,) = merge_stage_settings(request(tta=True), [defaults])
    assert stage.tta is True
    assert stage.use_folds == [0, 1]
    assert stage.proba_threshold == 0.3


def test_per_model_lists_pick_each_models_value_and_fill_gaps_from_defaults():
    req = request(
        nnunet_id=["organ", "lesion"],
        series_folders=[["T2"], ["T2", "ADC"]],
        use_folds=[[0, 1], None],
        tta=[False, True],
        class_idx=2,
    )
    first, second = merge_stage_settings(req, [{}, {"use_folds": [3]}])
    assert (first.series_folders, second.series_folders) == (["T2"], ["T2", "ADC"])
    assert (first.use_folds, second.use_folds) == ([0, 1], [3])
    assert (first.tta, second.tta) == (False, True)
    assert first.class_idx == second.class_idx == [2]


def test_flat_list_of_a_list_valued_parameter_applies_to_every_model():
    req = request(nnunet_id=["a", "b"], series_folders=[["x"], ["y"]], crop_padding=[1, 2, 3])
    assert [s.crop_padding for s in merge_stage_settings(req, [{}, {}])] == [(1, 2, 3)] * 2


def test_series_folders_from_default_args():
    req = InferenceRequest(nnunet_id="organ", study_path="/s", output_dir="/o")
    (stage,) = merge_stage_settings(req, [{"series_folders": ["inputs/T2"]}])
    assert stage.series_folders == ["inputs/T2"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"nnunet_id": ["a", "b"], "series_folders": ["T2", "ADC"]},
            "list of 2 lists, one per model",
        ),
        ({"nnunet_id": ["a", "b"], "series_folders": [["T2"]]}, "series_folders has 1 per-model"),
        ({"tta": [True, False]}, "tta has 2 per-model values but the request names 1"),
        ({"save_proba_map": True}, "save_proba_map needs proba_threshold"),
        ({"series_folders": None}, "series_folders is missing"),
        ({"proba_threshold": 1.5}, "proba_threshold"),
    ],
)
def test_shape_and_value_errors_are_request_errors(fields, message):
    n_models = (
        len(fields.get("nnunet_id", ["organ"])) if isinstance(fields.get("nnunet_id"), list) else 1
    )
    with pytest.raises(RequestError, match=message):
        merge_stage_settings(request(**fields), [{}] * n_models)


def test_cascade_mode_per_transition():
    req = request(nnunet_id=["a", "b", "c"], cascade_mode=["crop", "intersect"])
    assert cascade_modes(req) == ["crop", "intersect"]
    assert cascade_modes(request(nnunet_id=["a", "b", "c"], cascade_mode="crop")) == [
        "crop",
        "crop",
    ]
    with pytest.raises(RequestError, match="cascade_mode has 3 values for 2"):
        cascade_modes(request(nnunet_id=["a", "b", "c"], cascade_mode=["crop"] * 3))


def test_suffix_cannot_escape_the_output_folder():
    with pytest.raises(ValueError, match="suffix must be a plain name"):
        request(suffix="../x")
