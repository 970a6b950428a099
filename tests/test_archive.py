"""Study uploads: every entry checked before anything is written, extraction all or nothing."""

import gzip
import io
import json
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from nnunet_bento.errors import NnunetBentoError, RequestError, TooLargeError
from nnunet_bento.io.archive import ArchiveLimits, extract_study, pack_outputs

MB = 2**20
LIMITS = ArchiveLimits(max_upload_bytes=64 * MB, max_unpacked_bytes=10 * MB, max_entries=100)
_random = random.Random(0)
STUDY = {
    "T2/image.nii.gz": _random.randbytes(40_000),
    "ADC/image.nii.gz": _random.randbytes(30_000),
    "notes.txt": b"two series\n",
}
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + _random.randbytes(200)


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A study folder on disk holding STUDY."""
    root = tmp_path / "study"
    for name, data in STUDY.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The work folder that uploads are extracted under; each test checks what it holds."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under root, keyed by its relative path."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def zip_infos(path: Path) -> list[zipfile.ZipInfo]:
    """The zip's entries, as its central directory states them."""
    with zipfile.ZipFile(path) as archive:
        return archive.infolist()


def tar_names(path: Path) -> list[str]:
    """The tar's member names."""
    with tarfile.open(path) as archive:
        return archive.getnames()


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], **kwargs) -> Path:
    """A zip of these (name or ZipInfo, data) entries, deflated unless kwargs say otherwise."""
    with zipfile.ZipFile(path, "w", kwargs.pop("compression", zipfile.ZIP_DEFLATED)) as archive:
        for name, data in entries:
            archive.writestr(name, data, **kwargs)
    return path


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode="w:gz"):
    """A tar (gzip-compressed by default) of these members; data for regular files only."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, None if data is None else io.BytesIO(data))
    return path


def tar_member(name: str, data: bytes | None = None, **fields) -> tuple[tarfile.TarInfo, bytes]:
    """A tar member: a regular file holding data unless fields give another type."""
    info = tarfile.TarInfo(name)
    info.size = len(data or b"")
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def zip_study(study: Path, path: Path, prefix: str = "") -> Path:
    """A zip of the study's files, their names under prefix."""
    return write_zip(path, [(prefix + name, data) for name, data in STUDY.items()])


def tar_study(study: Path, path: Path, arcname: str, mode: str = "w:gz") -> Path:
    """A tar of the study folder as `tar` makes it, folder entries included."""
    with tarfile.open(path, mode) as archive:
        archive.add(study, arcname=arcname)
    return path


def good_then(
    entry: tuple[str | zipfile.ZipInfo, bytes],
) -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    """A regular study file, then the given entry: the check must come before any write."""
    return [("T2/image.nii.gz", STUDY["T2/image.nii.gz"]), entry]


def assert_refused(
    archive: Path, work: Path, error: type[NnunetBentoError], *words: str, limits=LIMITS
) -> NnunetBentoError:
    """extract_study raises error naming every word, without a server path, leaving nothing."""
    with pytest.raises(error) as caught:
        extract_study(archive, work / "study", limits)
    message = str(caught.value)
    for word in words:
        assert word in message
    assert str(work) not in message and str(archive.parent) not in message
    assert list(work.iterdir()) == []
    return caught.value


def patch_zip_entry(path: Path, name: str, local_at: int, central_at: int, fmt: str, value: int):
    """Overwrite one field of the entry's local header and its central directory record."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
    struct.pack_into(fmt, data, local + local_at, value)
    central = data.find(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into(fmt, data, central + central_at, value)
    path.write_bytes(bytes(data))


def declare_size(path: Path, name: str, size: int) -> None:
    """Make the zip's headers state a false uncompressed size for the entry."""
    patch_zip_entry(path, name, 22, 24, "<I", size)


# --- extraction -----------------------------------------------------------------------------


def test_zip_of_a_study_extracts_identical_files(study: Path, tmp_path: Path, work: Path) -> None:
    archive = zip_study(study, tmp_path / "study.zip")
    root = extract_study(archive, work / "study", LIMITS)
    assert root == work / "study"
    assert files_under(root) == STUDY


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_tar_of_a_study_extracts_identical_files(
    study: Path, tmp_path: Path, work: Path, mode: str
) -> None:
    archive = tar_study(study, tmp_path / "study.tar", arcname=".", mode=mode)
    assert "./T2/image.nii.gz" in tar_names(archive)
    root = extract_study(archive, work / "study", LIMITS)
    assert root == work / "study"
    assert files_under(root) == STUDY


def test_streamed_zip_with_data_descriptors_extracts(tmp_path: Path, work: Path) -> None:
    """A zip written to a pipe (as macOS Finder and `zip -` do) sets sizes after the data."""

    class Pipe(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:
            return buffer.write(data)

    buffer = io.BytesIO()
    with zipfile.ZipFile(Pipe(), "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in STUDY.items():
            archive.writestr(name, data)
    path = tmp_path / "streamed.zip"
    path.write_bytes(buffer.getvalue())
    assert all(info.flag_bits & 0x8 for info in zip_infos(path))
    assert files_under(extract_study(path, work / "study", LIMITS)) == STUDY


def test_kind_is_read_from_the_content_not_the_name(
    study: Path, tmp_path: Path, work: Path
) -> None:
    zipped = zip_study(study, tmp_path / "study.tar.gz")
    tarred = tar_study(study, tmp_path / "study.zip", arcname=".")
    assert files_under(extract_study(zipped, work / "a", LIMITS)) == STUDY
    assert files_under(extract_study(tarred, work / "b", LIMITS)) == STUDY


def test_one_top_folder_in_a_zip_is_the_study_root(study: Path, tmp_path: Path, work: Path) -> None:
    archive = zip_study(study, tmp_path / "study.zip", prefix="study01/")
    root = extract_study(archive, work / "study", LIMITS)
    assert root == work / "study" / "study01"
    assert files_under(root) == STUDY


def test_one_top_folder_in_a_tar_is_the_study_root(study: Path, tmp_path: Path, work: Path) -> None:
    archive = tar_study(study, tmp_path / "study.tgz", arcname="study01")
    root = extract_study(archive, work / "study", LIMITS)
    assert root == work / "study" / "study01"
    assert files_under(root) == STUDY


def test_a_top_folder_beside_a_root_file_keeps_the_target_as_root(
    tmp_path: Path, work: Path
) -> None:
    archive = write_zip(tmp_path / "a.zip", [("study01/T2/a.nii.gz", b"a"), ("readme.txt", b"r")])
    assert extract_study(archive, work / "study", LIMITS) == work / "study"


def test_a_single_root_file_is_not_a_top_folder(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", [("image.nii.gz", b"a")])
    root = extract_study(archive, work / "study", LIMITS)
    assert root == work / "study"
    assert files_under(root) == {"image.nii.gz": b"a"}


def test_macos_resource_forks_are_not_extracted(tmp_path: Path, work: Path) -> None:
    entries = [("study01/T2/a.nii.gz", b"a"), ("__MACOSX/study01/T2/._a.nii.gz", b"fork")]
    root = extract_study(write_zip(tmp_path / "a.zip", entries), work / "study", LIMITS)
    assert root == work / "study" / "study01"
    assert not (work / "study" / "__MACOSX").exists()


def test_an_existing_empty_target_is_used_and_emptied_on_failure(
    study: Path, tmp_path: Path, work: Path
) -> None:
    (work / "study").mkdir()
    archive = zip_study(study, tmp_path / "study.zip")
    assert files_under(extract_study(archive, work / "study", LIMITS)) == STUDY
    (work / "again").mkdir()
    small = ArchiveLimits(64 * MB, 1000, 100)
    declare_size(archive, "T2/image.nii.gz", 10)
    with pytest.raises(TooLargeError):
        extract_study(archive, work / "again", small)
    assert list((work / "again").iterdir()) == []


def test_a_target_with_files_in_it_is_a_programming_error(
    study: Path, tmp_path: Path, work: Path
) -> None:
    (work / "study").mkdir()
    (work / "study" / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="not an empty folder"):
        extract_study(zip_study(study, tmp_path / "study.zip"), work / "study", LIMITS)
    assert files_under(work) == {"study/old.txt": b"old"}


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.txt", "study01/../../evil.txt", "a/../b/../../evil"])
def test_dotdot_zip_entry_is_refused(tmp_path: Path, work: Path, name: str) -> None:
    archive = write_zip(tmp_path / "a.zip", good_then((name, b"evil")))
    assert_refused(archive, work, RequestError, repr(name), "'..'")


def test_dotdot_tar_entry_is_refused(tmp_path: Path, work: Path) -> None:
    members = [tar_member("T2/a.nii.gz", b"a"), tar_member("../evil.txt", b"evil")]
    archive = write_tar(tmp_path / "a.tar.gz", members)
    assert_refused(archive, work, RequestError, "'../evil.txt'", "'..'")
    assert not (tmp_path / "evil.txt").exists()


def test_absolute_zip_entry_is_refused(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", good_then(("/tmp/evil.txt", b"evil")))
    assert zip_infos(archive)[1].filename == "/tmp/evil.txt"
    assert_refused(archive, work, RequestError, "'/tmp/evil.txt'", "absolute path")


def test_absolute_tar_entry_is_refused(tmp_path: Path, work: Path) -> None:
    members = [tar_member("T2/a.nii.gz", b"a"), tar_member("/tmp/evil.txt", b"evil")]
    archive = write_tar(tmp_path / "a.tar.gz", members)
    assert_refused(archive, work, RequestError, "'/tmp/evil.txt'", "absolute path")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("..\\evil.txt", "backslash"),
        ("T2\\image.nii.gz", "backslash"),
        ("C:/evil.txt", "drive letter"),
        ("c:evil.txt", "drive letter"),
    ],
)
def test_windows_names_are_refused(tmp_path: Path, work: Path, name: str, problem: str) -> None:
    archive = write_zip(tmp_path / "a.zip", good_then((name, b"evil")))
    assert_refused(archive, work, RequestError, repr(name), problem)


def test_a_name_part_past_255_bytes_is_refused(tmp_path: Path, work: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", [tar_member("T2/" + "a" * 256, b"a")])
    assert_refused(archive, work, RequestError, "longer than 255 bytes")


def test_a_file_named_twice_is_refused(tmp_path: Path, work: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = write_zip(tmp_path / "a.zip", [("T2/a.nii.gz", b"a"), ("T2/a.nii.gz", b"b")])
    assert_refused(archive, work, RequestError, "'T2/a.nii.gz'", "appears twice")


def test_a_name_used_by_a_file_and_a_folder_is_refused(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", [("T2", b"a"), ("T2/a.nii.gz", b"b")])
    assert_refused(archive, work, RequestError, "'T2'", "both a file and a folder")


# --- entry types ----------------------------------------------------------------------------


def test_zip_symlink_entry_is_refused(tmp_path: Path, work: Path) -> None:
    link = zipfile.ZipInfo("T2/link.nii.gz")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_zip(tmp_path / "a.zip", good_then((link, b"/etc/passwd")))
    assert_refused(archive, work, RequestError, "'T2/link.nii.gz'", "symbolic link")


def test_zip_special_file_entry_is_refused(tmp_path: Path, work: Path) -> None:
    fifo = zipfile.ZipInfo("T2/pipe")
    fifo.create_system = 3
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    archive = write_zip(tmp_path / "a.zip", good_then((fifo, b"")))
    assert_refused(archive, work, RequestError, "'T2/pipe'", "not a regular file or folder")


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "device"),
        (tarfile.BLKTYPE, "device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.GNUTYPE_SPARSE, "not a regular file or folder"),
    ],
)
def test_tar_link_device_and_fifo_members_are_refused(
    tmp_path: Path, work: Path, kind: bytes, problem: str
) -> None:
    members = [
        tar_member("T2/a.nii.gz", b"a"),
        tar_member("T2/b.nii.gz", type=kind, linkname="/etc/passwd"),
    ]
    archive = write_tar(tmp_path / "a.tar.gz", members)
    assert_refused(archive, work, RequestError, "'T2/b.nii.gz'", problem)


def test_hard_link_to_a_file_inside_the_archive_is_refused(tmp_path: Path, work: Path) -> None:
    members = [
        tar_member("T2/a.nii.gz", b"a"),
        tar_member("T2/b.nii.gz", type=tarfile.LNKTYPE, linkname="T2/a.nii.gz"),
    ]
    archive = write_tar(tmp_path / "a.tar", members, mode="w")
    assert_refused(archive, work, RequestError, "'T2/b.nii.gz'", "hard link")


def test_encrypted_zip_entry_is_refused(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", good_then(("T2/b.nii.gz", b"secret")))
    patch_zip_entry(archive, "T2/b.nii.gz", 6, 8, "<H", 0x1)
    assert_refused(archive, work, RequestError, "'T2/b.nii.gz'", "encrypted")


def test_bzip2_zip_entry_is_refused(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", [("T2/a.nii.gz", b"a")], compression=zipfile.ZIP_BZIP2)
    assert_refused(archive, work, RequestError, "'T2/a.nii.gz'", "compression method 12")


# --- sizes ----------------------------------------------------------------------------------


def test_archive_past_the_upload_limit_is_refused(study: Path, tmp_path: Path, work: Path) -> None:
    archive = zip_study(study, tmp_path / "study.zip")
    limits = ArchiveLimits(max_upload_bytes=MB // 2**4, max_unpacked_bytes=10 * MB, max_entries=10)
    assert archive.stat().st_size > limits.max_upload_bytes
    assert_refused(archive, work, TooLargeError, "NNUNET_BENTO_MAX_UPLOAD_MB", limits=limits)


def test_zip_bomb_is_refused_by_its_declared_sizes(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "bomb.zip", good_then(("T2/zeros.nii", bytes(50 * MB))))
    assert archive.stat().st_size < 200_000
    assert_refused(archive, work, TooLargeError, "unpacked size limit", str(10 * MB))


def test_tar_gz_bomb_is_refused_by_its_declared_sizes(tmp_path: Path, work: Path) -> None:
    members = [tar_member("T2/a.nii.gz", b"a"), tar_member("T2/zeros.nii", bytes(50 * MB))]
    archive = write_tar(tmp_path / "bomb.tar.gz", members)
    assert archive.stat().st_size < 200_000
    assert_refused(archive, work, TooLargeError, "unpacked size limit", str(10 * MB))


def test_zip_that_understates_its_size_is_stopped_while_streaming(
    tmp_path: Path, work: Path
) -> None:
    archive = write_zip(tmp_path / "bomb.zip", good_then(("T2/zeros.nii", bytes(50 * MB))))
    declare_size(archive, "T2/zeros.nii", 1000)
    assert sum(info.file_size for info in zip_infos(archive)) < LIMITS.max_unpacked_bytes
    assert_refused(archive, work, TooLargeError, "unpacked size limit", str(10 * MB))


def test_zip_whose_size_lie_fits_the_limit_is_refused(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", good_then(("T2/b.nii", bytes(2 * MB))))
    declare_size(archive, "T2/b.nii", 1000)
    assert_refused(archive, work, RequestError, "'T2/b.nii'", f"holds {2 * MB} bytes", "1000")


@pytest.mark.parametrize(
    ("size", "problem"), [(12 * MB, "unpacked size limit"), (40 * MB, "tar record")]
)
def test_tar_long_name_record_past_the_bounds_is_refused(
    tmp_path: Path, work: Path, size: int, problem: str
) -> None:
    members = [
        tar_member("T2/a.nii.gz", b"a"),
        tar_member("././@LongLink", bytes(size), type=tarfile.GNUTYPE_LONGNAME),
        tar_member("T2/b.nii.gz", b"b"),
    ]
    archive = write_tar(tmp_path / "a.tar.gz", members)
    assert_refused(archive, work, TooLargeError, problem)


def test_too_many_entries_are_refused(tmp_path: Path, work: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", [(f"T2/{i}.dcm", b"d") for i in range(5)])
    limits = ArchiveLimits(max_upload_bytes=MB, max_unpacked_bytes=MB, max_entries=3)
    assert_refused(archive, work, TooLargeError, "more than 3 entries", limits=limits)


def test_a_zip_directory_claiming_too_many_entries_is_refused_before_it_is_parsed(
    tmp_path: Path, work: Path
) -> None:
    """An end record alone that claims 60,000 entries: refused from the record (413), not
    read by zipfile (which would find no directory and answer 400)."""
    end = b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 60000, 60000, 60000 * 46, 0, 0)
    archive = tmp_path / "claims.zip"
    archive.write_bytes(end)
    assert_refused(archive, work, TooLargeError, "more than 100 entries")
    directory = b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 5, 5, 50 * 2**20, 0, 0)
    archive.write_bytes(directory)
    assert_refused(archive, work, TooLargeError, "central directory (52428800 bytes)")


# --- not an archive, corrupt, empty ---------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        _random.randbytes(4096),
        PNG,
        gzip.compress(_random.randbytes(4096)),
        b"",
        b"PK\x03\x04 truncated",
        b"study_path,series\n/data/study01,T2\n",
    ],
    ids=["random", "png", "gzip-not-tar", "empty-file", "zip-magic-only", "text"],
)
def test_not_an_archive_is_refused(tmp_path: Path, work: Path, content: bytes) -> None:
    archive = tmp_path / "upload.zip"
    archive.write_bytes(content)
    assert_refused(archive, work, RequestError, "not a zip or tar.gz archive")


def test_zip_with_a_corrupt_entry_is_refused_after_writing_started(
    tmp_path: Path, work: Path
) -> None:
    archive = write_zip(tmp_path / "a.zip", [("T2/a.nii.gz", b"a"), ("T2/b.nii", b"b" * 100)])
    patch_zip_entry(archive, "T2/b.nii", 14, 16, "<I", 0xDEADBEEF)  # the CRC-32
    assert_refused(archive, work, RequestError, "cannot be read", "CRC")


def test_truncated_tar_gz_is_refused(study: Path, tmp_path: Path, work: Path) -> None:
    archive = tar_study(study, tmp_path / "study.tar.gz", arcname=".")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert_refused(archive, work, RequestError, "cannot be read")


@pytest.mark.parametrize(
    "build",
    [
        lambda path: write_zip(path, []),
        lambda path: write_zip(path, [("T2/", b""), ("study01/", b"")]),
        lambda path: write_tar(path, [tar_member("T2", type=tarfile.DIRTYPE)]),
        lambda path: write_tar(path, []),
        lambda path: write_zip(path, [("__MACOSX/._a", b"fork")]),
    ],
    ids=["zip", "zip-folders", "tar-folder", "tar", "zip-resource-forks"],
)
def test_an_archive_without_files_is_empty(tmp_path: Path, work: Path, build) -> None:
    assert_refused(build(tmp_path / "empty"), work, RequestError, "the archive is empty")


# --- packing --------------------------------------------------------------------------------


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """An output folder as /infer writes it."""
    folder = tmp_path / "out"
    for name, data in {
        "stage_0/prediction.nii.gz": b"p0",
        "stage_0/proba.nii.gz": b"q0",
        "stage_1/prediction.nii.gz": b"p1",
        "stage_1/seg.dcm": b"d" * 1000,
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_pack_outputs_round_trips(outputs: Path, tmp_path: Path, work: Path) -> None:
    response = {"nifti_prediction": ["stage_0/prediction.nii.gz", "stage_1/prediction.nii.gz"]}
    packed = pack_outputs(outputs, response, tmp_path / "result.zip")
    assert packed == tmp_path / "result.zip"
    with zipfile.ZipFile(packed) as archive:
        assert archive.namelist() == [
            "response.json",
            "stage_0/prediction.nii.gz",
            "stage_0/proba.nii.gz",
            "stage_1/prediction.nii.gz",
            "stage_1/seg.dcm",
        ]
        assert json.loads(archive.read("response.json")) == response
        assert archive.read("response.json").decode() == json.dumps(response, indent=2) + "\n"
        assert archive.getinfo("stage_0/proba.nii.gz").compress_type == zipfile.ZIP_STORED
        assert archive.getinfo("stage_1/seg.dcm").compress_type == zipfile.ZIP_DEFLATED
    root = extract_study(packed, work / "result", LIMITS)
    assert files_under(root) == {
        **files_under(outputs),
        "response.json": (json.dumps(response, indent=2) + "\n").encode(),
    }
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "result.zip", "work"]


def test_pack_outputs_replaces_an_older_result(outputs: Path, tmp_path: Path) -> None:
    destination = tmp_path / "result.zip"
    destination.write_bytes(b"old")
    pack_outputs(outputs, {}, destination)
    assert zip_infos(destination)[0].filename == "response.json"


def test_pack_outputs_leaves_nothing_when_it_fails(outputs: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        pack_outputs(outputs, {"not json": {1, 2}}, tmp_path / "result.zip")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_pack_outputs_refuses_a_folder_holding_response_json(outputs: Path, tmp_path: Path) -> None:
    (outputs / "response.json").write_text("{}")
    with pytest.raises(ValueError, match=r"response\.json"):
        pack_outputs(outputs, {}, tmp_path / "result.zip")
    assert not (tmp_path / "result.zip").exists()
