"""The registry file: validation at start-up, errors that name the model and the field."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from nnunet_bento.catalog.registry import build_registry
from nnunet_bento.catalog.spec import load_spec
from nnunet_bento.errors import SpecError
from nnunet_bento.settings import load_settings


def write_spec(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_rel_path_resolves_under_model_folder(tmp_path, demo_model_dirs):
    spec_path = write_spec(
        tmp_path,
        {
            "model_folder": str(demo_model_dirs["organ"].parent),
            "models": [{"id": "organ", "rel_path": "organ", "aliases": ["gland"]}],
        },
    )
    registry = build_registry(load_spec(spec_path))
    assert registry.get("gland").folder == demo_model_dirs["organ"]
    assert registry.get("organ").description.labels == {
        "background": 0,
        "prostate": 1,
        "bladder": 2,
    }


def test_relative_model_folder_is_taken_from_the_spec_folder(tmp_path, demo_model_dirs):
    (tmp_path / "models").symlink_to(demo_model_dirs["organ"].parent)
    spec_path = write_spec(
        tmp_path, {"model_folder": "models", "models": [{"id": "o", "rel_path": "organ2d"}]}
    )
    assert build_registry(load_spec(spec_path)).get("o").folder.name == "organ2d"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"id": "organ", "tag": "organ:latest", "min_mem": -5}, "model 'organ', field 'min_mem'"),
        ({"id": "organ", "tag": "organ:latest", "colour": "red"}, "model 'organ', field 'colour'"),
        ({"id": "organ"}, "model 'organ': Value error, give exactly one of tag, rel_path"),
        ({"id": "organ", "tag": "a:1", "rel_path": "x"}, "found tag, rel_path"),
    ],
)
def test_spec_errors_name_the_model_and_the_field(tmp_path, entry, expected):
    with pytest.raises(SpecError) as error:
        load_spec(write_spec(tmp_path, {"models": [entry]}))
    assert expected in str(error.value)


def test_duplicate_names_are_refused(tmp_path):
    document = {"models": [{"id": "a", "tag": "a:1"}, {"id": "b", "tag": "b:1", "aliases": ["a"]}]}
    with pytest.raises(SpecError, match="model 'b': name 'a' is already used by model 'a'"):
        load_spec(write_spec(tmp_path, document))


def test_unknown_default_arg_is_a_start_up_error(tmp_path, demo_model_dirs):
    document = {
        "model_folder": str(demo_model_dirs["organ"].parent),
        "models": [{"id": "organ", "rel_path": "organ", "default_args": {"use_fold": [0]}}],
    }
    with pytest.raises(SpecError, match=r"model 'organ', field 'default_args': unknown .*use_fold"):
        build_registry(load_spec(write_spec(tmp_path, document)))


def test_badly_typed_default_arg_is_a_start_up_error(tmp_path, demo_model_dirs):
    document = {
        "model_folder": str(demo_model_dirs["organ"].parent),
        "models": [{"id": "organ", "rel_path": "organ", "default_args": {"tta": "sometimes"}}],
    }
    with pytest.raises(SpecError, match="model 'organ', field 'default_args': tta"):
        build_registry(load_spec(write_spec(tmp_path, document)))


def test_tag_missing_from_the_store_says_how_to_import_it(tmp_path):
    spec_path = write_spec(tmp_path, {"models": [{"id": "ghost", "tag": "ghost-model:latest"}]})
    with pytest.raises(
        SpecError, match=r"model 'ghost': Bento model ghost-model:latest .* import-model"
    ):
        build_registry(load_spec(spec_path))


def test_missing_metadata_template_is_a_start_up_error(tmp_path, demo_model_dirs):
    document = {
        "model_folder": str(demo_model_dirs["organ"].parent),
        "models": [{"id": "organ", "rel_path": "organ", "metadata": {"path": "nope.json"}}],
    }
    with pytest.raises(SpecError, match=r"field 'metadata.path': .*nope.json does not exist"):
        build_registry(load_spec(write_spec(tmp_path, document)))


def test_missing_spec_file_names_the_variable(tmp_path):
    with pytest.raises(SpecError, match="MODEL_SERVE_SPEC"):
        load_spec(tmp_path / "absent.yaml")


def test_model_serve_spec_variable_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_SERVE_SPEC", str(tmp_path / "other.yaml"))
    assert load_settings().model_serve_spec == tmp_path / "other.yaml"


def test_a_spec_error_stops_bentoml_serve_with_one_line(tmp_path):
    spec_path = write_spec(tmp_path, {"models": [{"id": "organ", "tag": "organ:1", "min_mem": -1}]})
    completed = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:SegmentationService", "--port", "1"],
        cwd=REPO,
        env={**os.environ, "MODEL_SERVE_SPEC": str(spec_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1] == (
        f"nnunet-bento cannot start: {spec_path}: model 'organ', field 'min_mem': "
        "Input should be greater than or equal to 0"
    )
