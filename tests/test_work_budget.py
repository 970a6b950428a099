"""NNUNET_BENTO_MAX_WORK_MB: the work folder's usage, and uploads refused (507) when they do not
fit, by their declared sizes or by the bytes they really write, leaving nothing behind."""

import os
from pathlib import Path

import pytest
from test_archive import declare_size, write_zip

from nnunet_bento.errors import InsufficientStorageError
from nnunet_bento.io.archive import ArchiveLimits, extract_study
from nnunet_bento.io.work_folder import WorkBudget, folder_bytes, prepare_work_folder

MB = 2**20
LIMITS = ArchiveLimits(max_upload_bytes=64 * MB, max_unpacked_bytes=64 * MB, max_entries=100)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return prepare_work_folder(tmp_path / "work")


def test_usage_counts_the_files_under_the_folder_and_no_link_target(work, tmp_path):
    (work / "uploads" / "a" / "deep").mkdir(parents=True)
    (work / "uploads" / "a" / "deep" / "x").write_bytes(bytes(3000))
    (work / "pulls" / "y").write_bytes(bytes(500))
    (tmp_path / "outside").write_bytes(bytes(10_000))
    os.symlink(tmp_path / "outside", work / "uploads" / "link")
    os.symlink(tmp_path, work / "pulls" / "folder_link")
    assert folder_bytes(work) == 3500


def test_what_one_upload_writes_is_charged_to_every_upload_in_flight(work):
    budget = WorkBudget(work, 1)
    first, second = budget.measure(), budget.measure()
    first.charge(MB // 2)
    assert second.left() == MB // 2
    with pytest.raises(InsufficientStorageError, match=r"NNUNET_BENTO_MAX_WORK_MB \(1 MB\)"):
        second.charge(MB // 2 + 1)
    second.charge(MB // 2)
    assert first.left() == 0


def test_the_next_upload_sees_what_is_on_disk(work):
    (work / "uploads" / "kept").write_bytes(bytes(MB // 4))
    room = WorkBudget(work, 1).measure()
    assert room.left() == MB - MB // 4
    with pytest.raises(InsufficientStorageError) as refused:
        room.require(MB, "the archive's unpacked size")
    message = str(refused.value)
    assert f"the archive's unpacked size ({MB} bytes)" in message
    assert f"{MB - MB // 4} bytes are left of NNUNET_BENTO_MAX_WORK_MB (1 MB)" in message
    assert str(work) not in message


def test_an_archive_whose_declared_size_does_not_fit_is_refused_before_it_writes(work, tmp_path):
    archive = write_zip(tmp_path / "a.zip", [("T2/a.nii", bytes(MB)), ("T2/b.nii", bytes(MB))])
    room = WorkBudget(work, 1).measure()
    with pytest.raises(InsufficientStorageError, match="the archive's unpacked size"):
        extract_study(archive, work / "uploads" / "study", LIMITS, room)
    assert list((work / "uploads").iterdir()) == []
    assert room.left() == MB, "nothing was charged"


def test_an_archive_that_understates_its_size_is_stopped_at_the_bound(work, tmp_path):
    archive = write_zip(tmp_path / "a.zip", [("T2/zeros.nii", bytes(8 * MB))])
    declare_size(archive, "T2/zeros.nii", 1000)
    room = WorkBudget(work, 2).measure()
    with pytest.raises(InsufficientStorageError, match="does not fit in the work folder"):
        extract_study(archive, work / "uploads" / "study", LIMITS, room)
    assert list((work / "uploads").iterdir()) == []


def test_an_archive_that_fits_is_charged_what_it_wrote(work, tmp_path):
    archive = write_zip(tmp_path / "a.zip", [("T2/a.nii", bytes(MB // 2))])
    room = WorkBudget(work, 1).measure()
    extract_study(archive, work / "uploads" / "study", LIMITS, room)
    assert room.left() == MB // 2
