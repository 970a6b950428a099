"""The work folder is private: created 0700, refused when others made it or may write it."""

import os
import stat

import pytest

from nnunet_bento.errors import WorkFolderError
from nnunet_bento.io.work_folder import (
    SUBFOLDERS,
    claim_work_folder,
    prepare_work_folder,
    sweep_work_folder,
)


def mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_it_and_its_subfolders_are_created_private(tmp_path):
    work = prepare_work_folder(tmp_path / "a" / "work")
    assert mode(work) == 0o700
    assert {name: mode(work / name) for name in SUBFOLDERS} == dict.fromkeys(SUBFOLDERS, 0o700)


def test_a_folder_of_ours_that_others_may_read_is_tightened(tmp_path):
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    (work / "uploads").mkdir(mode=0o755)
    prepare_work_folder(work)
    assert mode(work) == 0o700 and mode(work / "uploads") == 0o700


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702])
def test_a_folder_others_may_write_is_refused_in_one_line(tmp_path, bits):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(bits)
    with pytest.raises(WorkFolderError) as refused:
        prepare_work_folder(work)
    assert "may be written by other users" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (work / "uploads").exists()


def test_a_link_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "work").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(WorkFolderError, match="is a link"):
        prepare_work_folder(tmp_path / "work")


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder another user owns needs root")
def test_a_folder_another_user_owns_is_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    os.chown(work, 65534, 65534)
    with pytest.raises(WorkFolderError, match=r"belongs to another user \(uid 65534\)"):
        prepare_work_folder(work)


def test_only_the_first_server_to_claim_the_folder_may_sweep_it(tmp_path):
    work = prepare_work_folder(tmp_path / "work")
    first, alone = claim_work_folder(work)
    assert alone
    second, second_alone = claim_work_folder(work)
    assert not second_alone, "a live server holds a claim"
    os.close(first)
    os.close(second)
    third, third_alone = claim_work_folder(work)
    assert third_alone, "the claims of stopped servers are gone with them"
    os.close(third)


def test_the_sweep_keeps_what_jobs_hold(tmp_path):
    work = prepare_work_folder(tmp_path / "work")
    for folder in ("uploads/queued", "uploads/done", "uploads/orphan", "pulls/old"):
        (work / folder).mkdir()
        (work / folder / "file").write_bytes(b"x")
    removed = sweep_work_folder(work, [work / "uploads" / "queued", work / "uploads" / "done"])
    assert sorted(p.name for p in removed) == ["old", "orphan"]
    assert sorted(p.name for p in (work / "uploads").iterdir()) == ["done", "queued"]
    assert list((work / "pulls").iterdir()) == []
