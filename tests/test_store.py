"""import-model: what the Bento model records, idempotence, refusals."""

import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import pytest

from nnunet_bento.catalog.registry import build_registry
from nnunet_bento.catalog.spec import ModelEntry, ServeSpec
from nnunet_bento.catalog.store import import_model
from nnunet_bento.errors import ModelFolderError, SpecError


def test_metadata_records_what_the_folder_says(demo_model_dirs):
    result = import_model(demo_model_dirs["lesion"], "lesion-meta-check", name="Lesion")
    metadata = bentoml.models.get(result.tag).info.metadata
    assert metadata["trainer"] == "nnUNetTrainer"
    assert metadata["configuration"] == "3d_fullres"
    assert metadata["plans_name"] == "nnUNetPlans"
    assert metadata["folds"] == ["0"]
    assert metadata["checkpoints"] == {"0": ["checkpoint_final.pth"]}
    assert metadata["channel_names"] == {"0": "T2", "1": "ADC"}
    assert metadata["labels"] == {"background": 0, "lesion": 1}
    assert metadata["file_ending"] == ".nii.gz"
    assert metadata["spacing"]["3d_fullres"] == [2.5, 1.25, 1.25]
    assert len(metadata["checkpoint_sha256"]["fold_0/checkpoint_final.pth"]) == 64


def test_importing_twice_is_idempotent_and_a_change_makes_a_new_version(demo_model_dirs, tmp_path):
    folder = tmp_path / "organ"
    shutil.copytree(demo_model_dirs["organ"], folder)
    first = import_model(folder, "organ-idempotence")
    again = import_model(folder, "organ-idempotence")
    assert first.created and not again.created and first.tag == again.tag
    plans = folder / "plans.json"
    plans.write_text(plans.read_text().replace("nnUNetPlans", "nnUNetPlans", 1) + "\n")
    changed = import_model(folder, "organ-idempotence")
    assert changed.created and changed.tag != first.tag
    assert len(bentoml.models.list("organ-idempotence")) == 2


@pytest.mark.parametrize("missing", ["dataset.json", "plans.json"])
def test_a_folder_without_an_nnunet_file_is_refused_by_name(demo_model_dirs, tmp_path, missing):
    folder = tmp_path / "model"
    shutil.copytree(demo_model_dirs["organ2d"], folder)
    (folder / missing).unlink()
    with pytest.raises(
        ModelFolderError, match=f"not an nnU-Net result folder: {missing} is missing"
    ):
        import_model(folder, "broken")


def test_a_folder_without_checkpoints_is_refused(demo_model_dirs, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(demo_model_dirs["organ2d"], folder)
    shutil.rmtree(folder / "fold_0")
    with pytest.raises(ModelFolderError, match=r"no fold_\*/checkpoint_\*.pth"):
        import_model(folder, "broken")


def test_cli_prints_one_error_line_and_exits_non_zero(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "nnunet_bento.cli", "import-model", str(tmp_path), "--id", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"nnunet-bento import-model: error: {tmp_path} is not an nnU-Net result folder: "
        "dataset.json is missing"
    ]


def test_cli_reports_the_tag(demo_model_dirs):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnunet_bento.cli",
            "import-model",
            str(demo_model_dirs["organ2d"]),
            "--id",
            "organ2d-cli",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        "imported as organ2d-cli:" in completed.stdout
        or "already in the model store" in completed.stdout
    )
    assert bentoml.models.get("organ2d-cli:latest")


def test_a_checkpoint_changed_in_the_store_is_refused_at_start_up(demo_model_dirs, tmp_path):
    tag = import_model(demo_model_dirs["organ2d"], "organ2d-tampered").tag
    spec = ServeSpec(models=[ModelEntry(id="tampered", tag=tag)])
    assert build_registry(spec).get("tampered").source.startswith("organ2d-tampered:")
    checkpoint = Path(bentoml.models.get(tag).path) / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(SpecError, match=r"checkpoint fold_0/checkpoint_final\.pth of .* changed"):
        build_registry(spec)
