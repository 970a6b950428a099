"""Outputs appear complete or not at all, replace earlier results as a whole, one writer at a
time, and a crashed request's staging folder is cleaned at the next start."""

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from nnunet_bento.errors import (
    ConflictError,
    ForbiddenPathError,
    InsufficientStorageError,
    NnunetBentoError,
)
from nnunet_bento.io import staging as staging_module
from nnunet_bento.io.staging import MANIFEST, OutputStaging, remove_stale_staging


def staged(output: Path, work: Path, files: dict[str, str], overwrite: bool = False) -> None:
    with OutputStaging(output, work, overwrite=overwrite) as staging:
        for name, text in files.items():
            staging.path(name).write_text(text)


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_files_appear_only_on_commit_with_a_manifest(tmp_path):
    output, work = tmp_path / "out", tmp_path / "work"
    with OutputStaging(output, work, overwrite=False) as staging:
        staging.path("stage_0/prediction.nii.gz").write_text("mask")
        assert not (output / "stage_0").exists()
    assert listing(output) == [MANIFEST, "stage_0/prediction.nii.gz"]
    assert json.loads((output / MANIFEST).read_text()) == {"files": ["stage_0/prediction.nii.gz"]}
    assert list((work / "staging").iterdir()) == [], "the staging record is gone"


def test_a_failure_leaves_no_folder_it_created(tmp_path):
    output = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), OutputStaging(output, tmp_path / "w", overwrite=False) as s:
        s.path("stage_0/prediction.nii.gz").write_text("half")
        raise RuntimeError("writer failed")
    assert not (tmp_path / "new").exists()


def test_nothing_is_created_before_the_first_file(tmp_path):
    with (
        pytest.raises(RuntimeError),
        OutputStaging(tmp_path / "out", tmp_path / "w", overwrite=False),
    ):
        raise RuntimeError("reading the inputs failed")
    assert not (tmp_path / "out").exists()


def test_earlier_results_are_refused_without_overwrite(tmp_path):
    output, work = tmp_path / "out", tmp_path / "work"
    staged(output, work, {"stage_0/prediction.dcm": "first"})
    with pytest.raises(ConflictError, match="already holds results; set overwrite"):
        staged(output, work, {"stage_0/prediction.nii.gz": "second"})
    assert listing(output) == [MANIFEST, "stage_0/prediction.dcm"]


def test_overwrite_replaces_the_earlier_results_as_a_whole(tmp_path):
    output, work = tmp_path / "out", tmp_path / "work"
    staged(output, work, {"stage_0/prediction.dcm": "seg", "stage_1/proba.nii.gz": "p"})
    (output / "notes.txt").write_text("the user's own file")
    staged(output, work, {"stage_0/prediction.nii.gz": "empty"}, overwrite=True)
    assert listing(output) == [MANIFEST, "notes.txt", "stage_0/prediction.nii.gz"]
    assert not (output / "stage_1").exists(), "an emptied folder of the old results is removed"


@pytest.mark.parametrize("link", ["stage_0", "stage_0/prediction.nii.gz", "stage_1", MANIFEST])
def test_a_link_inside_output_dir_is_refused_and_nothing_outside_is_touched(tmp_path, link):
    """Earlier results in out/, then one of their folders or files, or the manifest, made a
    link to outside/: an overwrite touches nothing there and leaves out/ as it was."""
    output, work, outside = tmp_path / "out", tmp_path / "work", tmp_path / "outside"
    staged(output, work, {"stage_0/prediction.nii.gz": "old", "stage_1/proba.nii.gz": "p"})
    outside.mkdir()
    (outside / "prediction.nii.gz").write_text("the other user's file")
    (outside / "proba.nii.gz").write_text("kept")
    (outside / MANIFEST).write_text(json.dumps({"files": ["proba.nii.gz"]}))
    target = output / link
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(outside / Path(link).name if "/" in link or link == MANIFEST else outside)
    before = {p.name: p.read_text() for p in outside.iterdir()}
    with pytest.raises(ForbiddenPathError, match=r"^output_dir: .* inside it is a link"):
        staged(output, work, {"stage_0/prediction.nii.gz": "new"}, overwrite=True)
    assert {p.name: p.read_text() for p in outside.iterdir()} == before
    assert target.is_symlink()


def test_no_lock_file_outlives_its_request(tmp_path):
    work = tmp_path / "work"
    for index in range(5):
        staged(tmp_path / f"out{index}", work, {"stage_0/prediction.nii.gz": "mask"})
    with pytest.raises(RuntimeError), OutputStaging(tmp_path / "failed", work, overwrite=False):
        raise RuntimeError("the request failed")
    assert list((work / "locks").iterdir()) == []


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path):
    output, work = tmp_path / "out", tmp_path / "work"
    with OutputStaging(output, work, overwrite=True) as first:
        first.path("a.nii.gz").write_text("first")
        with pytest.raises(ConflictError, match="another request is writing"):
            OutputStaging(output / ".." / "out", work, overwrite=True)
    assert listing(output) == [MANIFEST, "a.nii.gz"]
    staged(output, work, {"b.nii.gz": "later"}, overwrite=True)


def test_a_failure_in_the_middle_of_the_commit_restores_the_earlier_results(tmp_path, monkeypatch):
    output, work = tmp_path / "out", tmp_path / "work"
    staged(output, work, {"stage_0/prediction.dcm": "old"})
    real_replace = os.replace
    calls = []

    def fail_on_the_second_new_file(source, target):
        calls.append(target)
        if ".staging-" in str(source) and len([c for c in calls if ".staging-" not in str(c)]) > 2:
            raise OSError(errno.EIO, "I/O error")
        real_replace(source, target)

    monkeypatch.setattr(staging_module.os, "replace", fail_on_the_second_new_file)
    new = {"stage_0/a.nii.gz": "1", "stage_0/b.nii.gz": "2", "stage_0/c.nii.gz": "3"}
    with pytest.raises(NnunetBentoError, match="cannot write the outputs into output_dir"):
        staged(output, work, new, overwrite=True)
    monkeypatch.setattr(staging_module.os, "replace", real_replace)
    assert listing(output) == [MANIFEST, "stage_0/prediction.dcm"]
    assert (output / "stage_0" / "prediction.dcm").read_text() == "old"


def test_write_errors_name_the_folder_not_the_path(tmp_path):
    staging = OutputStaging(tmp_path / "out", tmp_path / "w", overwrite=False, shown="case7")
    full = staging.write_error(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, InsufficientStorageError) and full.status_code == 507
    assert str(full) == "the disk of case7 is full; free space there and retry"
    read_only = staging.write_error(OSError(errno.EROFS, "Read-only file system"))
    assert read_only.status_code == 500
    assert str(read_only) == "cannot write the outputs into case7: Read-only file system"
    staging.close()


def test_stale_staging_folders_are_removed_at_start(tmp_path):
    output, work = tmp_path / "out", tmp_path / "work"
    crashed = OutputStaging(output, work, overwrite=False)
    crashed.path("stage_0/prediction.nii.gz").write_text("half")
    assert remove_stale_staging(work, older_than_s=3600) == []
    old = time.time() - 7200
    for record in (work / "staging").iterdir():
        os.utime(record, (old, old))
    assert remove_stale_staging(work, older_than_s=3600) == [crashed.staging_dir]
    assert not crashed.staging_dir.exists()
    assert list((work / "staging").iterdir()) == []
    crashed.close()
