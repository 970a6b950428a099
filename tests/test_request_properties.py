"""Property: any JSON body either runs or is refused with a 4xx, never a 500.

Bodies mix valid and hostile values in every field of the request model; each one that the
request model accepts is run by the real pipeline on the demo models, in-process.
"""

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nnunet_bento.catalog.registry import build_registry
from nnunet_bento.catalog.spec import ModelEntry, ServeSpec
from nnunet_bento.errors import NnunetBentoError
from nnunet_bento.io.path_roots import PathRoots
from nnunet_bento.pipeline import SegmentationPipeline
from nnunet_bento.request import InferenceRequest
from nnunet_bento.runners.device import DeviceSelector
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet
from nnunet_bento.settings import ServeSettings

MODELS = ("organ2d", "lesion")
WORDS = (
    *("T2", "ADC", "stage_0", "stage_5", "../T2", "/etc", "a\x00b", "x" * 300, "", "binary"),
    *("labelmap", "crop", "intersect", "checkpoint_final.pth", "labels/organ.nii.gz"),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=12),
    st.floats(min_value=-2, max_value=2, allow_nan=False),
    st.sampled_from(WORDS),
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.lists(st.lists(scalars, max_size=3), max_size=3)
)
FIELDS = [
    name for name in InferenceRequest.model_fields if name not in ("study_path", "output_dir")
]
bodies = st.fixed_dictionaries(
    {
        "nnunet_id": st.one_of(
            st.sampled_from(MODELS), st.lists(st.sampled_from(MODELS), max_size=3), values
        ),
        "series_folders": st.one_of(
            st.sampled_from([["T2"], ["T2", "ADC"], [["T2"], ["T2", "ADC"]]]), values
        ),
    },
    optional={
        name: values
        for name in FIELDS
        if name not in ("nnunet_id", "series_folders", "dicom_source", "push_to")
    },
)


@pytest.fixture(scope="module")
def pipeline(demo_model_dirs, tmp_path_factory) -> tuple[SegmentationPipeline, Path]:
    base = tmp_path_factory.mktemp("properties")
    shutil.copytree(demo_model_dirs["organ2d"].parents[1] / "study", base / "in" / "study")
    spec = ServeSpec(
        model_folder=demo_model_dirs["organ2d"].parent,
        models=[ModelEntry(id=name, rel_path=name) for name in MODELS],
    )
    registry = build_registry(spec)
    runners = RunnerSet(
        {m.id: RunnerModel(m.folder) for m in registry.models.values()}, DeviceSelector(None, 0), 2
    )
    roots = PathRoots.from_settings(str(base / "in"), str(base / "out"))
    settings = ServeSettings(nnunet_bento_work_dir=base / "work")
    return SegmentationPipeline(registry, runners, roots=roots, settings=settings), base


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
def test_any_body_runs_or_gets_a_4xx(pipeline, body):
    runner, base = pipeline
    body = {
        **body,
        "study_path": str(base / "in" / "study"),
        "output_dir": str(base / "out" / "case"),
        "overwrite": True,
    }
    try:
        request = InferenceRequest.model_validate(body)
    except ValidationError:
        return
    try:
        response = runner.run(request)
    except NnunetBentoError as error:
        assert 400 <= error.status_code < 500, f"{error.status_code}: {error} for {body}"
        return
    assert Path(response.nifti_prediction[0]).is_file()
