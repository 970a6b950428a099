"""Every file an image read touches lies in its folder: detached data files, linked files,
and compressed streams bounded by their headers. The files are written here; the secret lies
outside the study."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from nnunet_bento.errors import ForbiddenPathError, RequestError
from nnunet_bento.io.dicom_inflate import FileChangedError, read_header, read_whole
from nnunet_bento.io.dicom_series import read_dicom_series
from nnunet_bento.io.images import image_file_in, read_image
from nnunet_bento.io.input_files import data_file_names

SECRET = b"top-secret-bytes-" * 64


@pytest.fixture
def area(demo_study, tmp_path) -> Path:
    """study/ with the demo T2 as MetaImage and NRRD pairs, and secret.raw outside it."""
    study = tmp_path / "study"
    study.mkdir()
    (tmp_path / "secret.raw").write_bytes(SECRET * 64)
    image = sitk.ReadImage(str(demo_study / "T2" / "T2.nii.gz"))
    (study / "mhd").mkdir()
    sitk.WriteImage(image, str(study / "mhd" / "T2.mhd"))
    (study / "nhdr").mkdir()
    sitk.WriteImage(image, str(study / "nhdr" / "T2.nhdr"))
    return tmp_path


def rewrite(header: Path, old: str, new: str) -> None:
    text = header.read_text(encoding="latin-1")
    assert old in text
    header.write_text(text.replace(old, new), encoding="latin-1")


def read(area: Path, series: str) -> sitk.Image:
    folder = area / "study" / series
    return read_image(image_file_in(folder), inside=area / "study", field="series_folders[0]")


def test_detached_pairs_inside_their_folder_read_like_the_original(area, demo_study):
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_study / "T2" / "T2.nii.gz")))
    for series in ("mhd", "nhdr"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read(area, series)), original)


@pytest.mark.parametrize(
    ("series", "header", "old", "new"),
    [
        ("mhd", "T2.mhd", "ElementDataFile = T2.raw", "ElementDataFile = {secret}"),
        ("mhd", "T2.mhd", "ElementDataFile = T2.raw", "ElementDataFile = ../../secret.raw"),
        ("mhd", "T2.mhd", "ElementDataFile = T2.raw", "ElementDataFile = LIST\n{secret}"),
        (
            "mhd",
            "T2.mhd",
            "ElementDataFile = T2.raw",
            "ElementDataFile = ../../secre%c.raw 116 116 1",
        ),
        ("nhdr", "T2.nhdr", "data file: T2.raw", "data file: {secret}"),
        ("nhdr", "T2.nhdr", "data file: T2.raw", "datafile: ../../secret.raw"),
        ("nhdr", "T2.nhdr", "data file: T2.raw", "data file: LIST\n../../secret.raw"),
    ],
)
def test_a_detached_data_file_out_of_its_folder_is_403_naming_the_field(
    area, series, header, old, new
):
    rewrite(area / "study" / series / header, old, new.format(secret=area / "secret.raw"))
    with pytest.raises(ForbiddenPathError) as refused:
        read(area, series)
    assert str(refused.value) == "series_folders[0]: a detached data file leaves its folder"


def test_data_file_names_in_every_form_the_formats_allow():
    assert data_file_names("a.mhd", b"NDims = 3\nElementDataFile = a.raw\n") == ["a.raw"]
    assert data_file_names("a.mha", b"ElementDataFile = LOCAL\n\x00\x01") == []
    assert data_file_names("a.mhd", b"ElementDataFile = s%02d.raw 1 3 1\n") == [
        "s01.raw",
        "s02.raw",
        "s03.raw",
    ]
    assert data_file_names("a.mhd", b"ElementDataFile = LIST 2D\nx.raw\ny.raw\n") == [
        "x.raw",
        "y.raw",
    ]
    assert data_file_names("a.nhdr", b"NRRD0004\ndata file: /abs/d.raw\n\n") == ["/abs/d.raw"]
    assert data_file_names("a.nhdr", b"NRRD0004\ndata file: d%d.raw 3 1 -1 2\n") == [
        "d3.raw",
        "d2.raw",
        "d1.raw",
    ]
    assert data_file_names("a.nrrd", b"NRRD0004\ntype: short\n\ndata file: x\n") == []
    assert data_file_names("a.nii.gz", b"ElementDataFile = x.raw\n") == []


def test_an_image_file_linked_out_of_the_study_is_403(area, demo_study):
    linked = area / "study" / "linked"
    linked.mkdir()
    shutil.copy(demo_study / "T2" / "T2.nii.gz", area / "outside.nii.gz")
    (linked / "T2.nii.gz").symlink_to(area / "outside.nii.gz")
    with pytest.raises(ForbiddenPathError, match=r"^series_folders\[0\]: the image file leaves"):
        read(area, "linked")


def test_a_gzip_stream_longer_than_its_header_says_is_refused(area, demo_study):
    bomb = area / "study" / "bomb"
    bomb.mkdir()
    stream = (demo_study / "T2" / "T2.nii.gz").read_bytes()
    with gzip.open(bomb / "T2.nii.gz", "wb") as extra:
        extra.write(stream and gzip.decompress(stream))
        zeros = bytes(1 << 20)
        for _ in range(4):
            extra.write(zeros)
    with pytest.raises(RequestError, match="inflates to more than its header's"):
        read(area, "bomb")


def test_a_dicom_file_linked_out_of_the_study_is_403(tmp_path):
    study = tmp_path / "study"
    shutil.copytree(REPO / "examples" / "dicom" / "ct" / "CT", study / "CT")
    outside = study / "CT" / "IM0005.dcm"
    outside.rename(tmp_path / "IM0005.dcm")
    outside.symlink_to(tmp_path / "IM0005.dcm")
    with pytest.raises(ForbiddenPathError, match=r"^series_folders\[0\]: a file of the series"):
        read_dicom_series(study / "CT", inside=study, field="series_folders[0]")


def test_a_dicom_file_swapped_after_its_header_was_read_is_not_decoded(tmp_path):
    source = REPO / "examples" / "dicom" / "ct" / "CT" / "IM0005.dcm"
    path = tmp_path / "IM0005.dcm"
    shutil.copy(source, path)
    header = read_header(path, 4096, 1 << 20)
    path.rename(tmp_path / "checked.dcm")
    shutil.copy(source, path)
    with pytest.raises(FileChangedError):
        read_whole(path, 1 << 24, header.identity)
    assert read_whole(path, 1 << 24, read_header(path, 4096, 1 << 20).identity).PixelData
