"""Outputs appear complete or not at all."""

import pytest

from nnunet_bento.io.staging import OutputStaging


def test_files_appear_only_on_commit(tmp_path):
    with OutputStaging(tmp_path) as staging:
        staging.path("stage_0/prediction.nii.gz").write_text("mask")
        assert not (tmp_path / "stage_0").exists()
    assert (tmp_path / "stage_0" / "prediction.nii.gz").read_text() == "mask"
    assert [p.name for p in tmp_path.iterdir()] == ["stage_0"]


def test_a_failure_leaves_nothing_and_keeps_earlier_outputs(tmp_path):
    (tmp_path / "stage_0").mkdir()
    (tmp_path / "stage_0" / "prediction.nii.gz").write_text("earlier")
    with pytest.raises(RuntimeError), OutputStaging(tmp_path) as staging:
        staging.path("stage_0/prediction.nii.gz").write_text("half")
        raise RuntimeError("writer failed")
    assert (tmp_path / "stage_0" / "prediction.nii.gz").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_0"]
