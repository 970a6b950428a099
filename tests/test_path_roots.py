"""PathRoots: request paths stay inside their roots and studies, checked on real folders."""

from collections.abc import Callable
from pathlib import Path

import pytest

from nnunet_bento.errors import ForbiddenPathError, RequestError
from nnunet_bento.io.path_roots import PathRoots


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A resolved temp folder with input, output, work, outside and prefix-sharing folders."""
    base = tmp_path.resolve()
    for name in ("in", "in-other", "out", "work", "outside", "in/study", "in/other_study"):
        (base / name).mkdir()
    (base / "outside" / "secret.nii.gz").write_bytes(b"x")
    return base


@pytest.fixture
def roots(tmp: Path) -> PathRoots:
    """Roots confined to tmp/in (input), tmp/out (output) and tmp/work (work)."""
    return PathRoots.from_settings(str(tmp / "in"), str(tmp / "out"), [tmp / "work"])


def refused(tmp: Path, check: Callable[..., Path], field: str, *args: object) -> str:
    """Assert check(field, *args) raises ForbiddenPathError naming field only; return it."""
    value = str(args[-1])
    with pytest.raises(ForbiddenPathError) as caught:
        check(field, *args)
    message = str(caught.value)
    assert message.startswith(f"{field}: ")
    assert str(tmp) not in message
    assert value not in message
    return message


def test_inside_input_root_returns_resolved_path(roots: PathRoots, tmp: Path) -> None:
    value = f"{tmp}/in/study/../a.nii.gz"
    assert roots.input_path("image", value) == tmp / "in" / "a.nii.gz"


def test_root_itself_is_inside(roots: PathRoots, tmp: Path) -> None:
    assert roots.input_path("study_path", str(tmp / "in")) == tmp / "in"


def test_absolute_path_outside_is_refused(roots: PathRoots, tmp: Path) -> None:
    value = str(tmp / "outside" / "secret.nii.gz")
    message = refused(tmp, roots.input_path, "series_folders[1]", value)
    assert message == "series_folders[1]: path is outside the allowed input roots"


def test_dotdot_escape_is_refused(roots: PathRoots, tmp: Path) -> None:
    value = f"{tmp}/in/../outside/secret.nii.gz"
    refused(tmp, roots.input_path, "image", value)


def test_sibling_sharing_root_name_prefix_is_refused(roots: PathRoots, tmp: Path) -> None:
    value = str(tmp / "in-other" / "a.nii.gz")
    refused(tmp, roots.input_path, "image", value)


def test_symlinked_file_pointing_out_is_refused(roots: PathRoots, tmp: Path) -> None:
    link = tmp / "in" / "link.nii.gz"
    link.symlink_to(tmp / "outside" / "secret.nii.gz")
    refused(tmp, roots.input_path, "image", str(link))


def test_symlinked_folder_pointing_out_is_refused(roots: PathRoots, tmp: Path) -> None:
    link = tmp / "in" / "linked"
    link.symlink_to(tmp / "outside", target_is_directory=True)
    value = str(link / "secret.nii.gz")
    refused(tmp, roots.input_path, "series_folders[0][1]", value)


def test_symlink_inside_root_resolves_to_its_target(roots: PathRoots, tmp: Path) -> None:
    link = tmp / "in" / "alias"
    link.symlink_to(tmp / "in" / "study", target_is_directory=True)
    assert roots.input_path("study_path", str(link)) == tmp / "in" / "study"


def test_symlink_loop_is_a_request_error(roots: PathRoots, tmp: Path) -> None:
    loop = tmp / "in" / "loop"
    loop.symlink_to(loop)
    with pytest.raises(RequestError, match=r"^image: path cannot be resolved$"):
        roots.input_path("image", str(loop))


def test_several_input_roots_split_on_colon(tmp: Path) -> None:
    roots = PathRoots.from_settings(f"{tmp / 'in'}:{tmp / 'out'}", None)
    assert roots.input_roots == (tmp / "in", tmp / "out")
    assert roots.input_path("image", str(tmp / "out" / "a.nii.gz")) == tmp / "out" / "a.nii.gz"
    value = str(tmp / "outside" / "secret.nii.gz")
    refused(tmp, roots.input_path, "image", value)


def test_from_settings_resolves_symlinked_roots(tmp: Path) -> None:
    (tmp / "in-link").symlink_to(tmp / "in", target_is_directory=True)
    roots = PathRoots.from_settings(str(tmp / "in-link"), None)
    assert roots.input_roots == (tmp / "in",)
    assert roots.input_path("image", str(tmp / "in" / "a.nii.gz")) == tmp / "in" / "a.nii.gz"


def test_from_settings_resolves_symlinked_output_root(tmp: Path) -> None:
    (tmp / "out-link").symlink_to(tmp / "out", target_is_directory=True)
    roots = PathRoots.from_settings(None, str(tmp / "out-link"))
    assert roots.output_root == tmp / "out"
    assert roots.output_path("output_dir", str(tmp / "out" / "seg")) == tmp / "out" / "seg"


def test_output_inside_output_root_returns_resolved_path(roots: PathRoots, tmp: Path) -> None:
    value = f"{tmp}/out/run1/../run2"
    assert roots.output_path("output_dir", value) == tmp / "out" / "run2"


def test_output_outside_output_root_is_refused(roots: PathRoots, tmp: Path) -> None:
    value = str(tmp / "in" / "result")
    message = refused(tmp, roots.output_path, "output_dir", value)
    assert message == "output_dir: path is outside the allowed output root"


def test_output_symlink_pointing_out_is_refused(roots: PathRoots, tmp: Path) -> None:
    link = tmp / "out" / "escape"
    link.symlink_to(tmp / "outside", target_is_directory=True)
    value = str(link / "seg.nii.gz")
    refused(tmp, roots.output_path, "output_dir", value)


def test_work_roots_are_allowed_for_input_and_output(roots: PathRoots, tmp: Path) -> None:
    value = str(tmp / "work" / "upload" / "a.nii.gz")
    assert roots.input_path("image", value) == Path(value)
    assert roots.output_path("output_dir", value) == Path(value)


def test_unrestricted_allows_anything(tmp: Path) -> None:
    roots = PathRoots.from_settings(None, "")
    value = str(tmp / "outside" / "secret.nii.gz")
    assert roots.unrestricted
    assert roots.input_path("image", value) == Path(value)
    assert roots.output_path("output_dir", value) == Path(value)


@pytest.mark.parametrize(("input_roots", "output_root"), [("in", None), (None, "out")])
def test_any_root_makes_roots_restricted(
    tmp: Path, input_roots: str | None, output_root: str | None
) -> None:
    as_path = {None: None, "in": str(tmp / "in"), "out": str(tmp / "out")}
    roots = PathRoots.from_settings(as_path[input_roots], as_path[output_root])
    assert not roots.unrestricted
    assert (roots.input_roots is None) == (input_roots is None)


def test_in_study_returns_resolved_entry(roots: PathRoots, tmp: Path) -> None:
    study = tmp / "in" / "study"
    assert roots.in_study("intersect_with", study, "ct/../mask.nii.gz") == study / "mask.nii.gz"


@pytest.mark.parametrize("entry", ["../other_study/mask.nii.gz", "ct/../../other_study"])
def test_in_study_refuses_dotdot_even_inside_roots(roots: PathRoots, tmp: Path, entry: str) -> None:
    study = tmp / "in" / "study"
    message = refused(tmp, roots.in_study, "intersect_with", study, entry)
    assert message == "intersect_with: path leaves study_path"


def test_in_study_takes_absolute_entries_only_inside_the_study(roots: PathRoots, tmp: Path) -> None:
    study = tmp / "in" / "study"
    inside = str(study / "mask.nii.gz")
    assert roots.in_study("intersect_with", study, inside) == study / "mask.nii.gz"
    refused(tmp, roots.in_study, "intersect_with", study, str(tmp / "in" / "mask.nii.gz"))


def test_in_study_refuses_symlink_out_of_study(roots: PathRoots, tmp: Path) -> None:
    study = tmp / "in" / "study"
    (study / "mask").symlink_to(tmp / "in" / "other_study", target_is_directory=True)
    refused(tmp, roots.in_study, "intersect_with", study, "mask")


@pytest.mark.parametrize(("value", "reason"), [("", "is empty"), ("a\0b", "contains a NUL byte")])
def test_empty_or_nul_value_is_a_request_error(
    roots: PathRoots, tmp: Path, value: str, reason: str
) -> None:
    calls = [
        lambda: roots.input_path("image", value),
        lambda: roots.output_path("image", value),
        lambda: roots.in_study("image", tmp / "in" / "study", value),
    ]
    for call in calls:
        with pytest.raises(RequestError, match=f"^image: path {reason}$"):
            call()
