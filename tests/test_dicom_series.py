"""A DICOM series folder becomes one volume, as SimpleITK's GDCM reader sees it."""

import shutil
import subprocess
import sys
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_image_writer import SeriesIdentity, write_image_series
from pydicom.uid import generate_uid

from nnunet_bento.errors import InputNotFoundError, RequestError
from nnunet_bento.io.dicom_series import read_dicom_series

SERIES = ["ct/CT", "mr/T2", "mr/ADC", "oblique/T2", "shuffled/T2"]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_study.py"


@pytest.fixture(scope="module")
def demo_dicom(demo_study: Path) -> Path:
    return demo_study.parent / "dicom"


def gdcm_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_grid(image: sitk.Image, expected: sitk.Image) -> None:
    assert image.GetSize() == expected.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-4)


def assert_same_image(image: sitk.Image, expected: sitk.Image) -> None:
    assert_same_grid(image, expected)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected), atol=1e-4
    )


def copy_series(source: Path, target: Path, prefix: str = "") -> Path:
    """Copy the files of a series folder, optionally renaming them with a prefix."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        shutil.copy(path, target / f"{prefix}{path.name}")
    return target


def normal_of(ds: pydicom.Dataset) -> np.ndarray:
    cosines = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(cosines[:3], cosines[3:])


def along_normal(ds: pydicom.Dataset) -> float:
    return float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal_of(ds)))


def edit_slices(folder: Path, edit: Callable[[pydicom.Dataset], None], names: list[str]) -> None:
    """Apply ``edit`` to the datasets in the named files of ``folder`` and save them."""
    for name in names:
        ds = pydicom.dcmread(folder / name)
        edit(ds)
        ds.save_as(folder / name, enforce_file_format=True)


def no_pixel_data_file(source: Path, target: Path) -> None:
    """Write a DICOM file without pixel data (like an SR) from another series."""
    ds = pydicom.dcmread(source)
    del ds.PixelData
    ds.SeriesInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.save_as(target, enforce_file_format=True)


@pytest.mark.parametrize("series", SERIES)
def test_volume_equals_gdcm_reader(demo_dicom: Path, series: str):
    source = read_dicom_series(demo_dicom / series)
    assert_same_image(source.image, gdcm_read(demo_dicom / series))
    assert source.folder == demo_dicom / series
    assert len(source.datasets) == source.image.GetSize()[2]


def test_non_square_pixels_and_slices_equal_gdcm_reader(demo_dicom: Path, tmp_path: Path):
    oblique = read_dicom_series(demo_dicom / "oblique" / "T2").image
    image = sitk.Cast(oblique[:40, 4:, ::2], sitk.sitkFloat32) * 0.25 + 10
    image.SetSpacing((0.9, 1.6, 4.0))
    identity = SeriesIdentity(rescale_slope=0.25, rescale_intercept=10)
    write_image_series(image, tmp_path, identity, file_order=[5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6])
    source = read_dicom_series(tmp_path)
    assert source.image.GetSize() == (40, 44, 12)
    assert_same_image(source.image, gdcm_read(tmp_path))
    assert_same_image(source.image, image)


def test_rescaled_ct_is_float_and_plain_mr_keeps_integers(demo_dicom: Path):
    ct = read_dicom_series(demo_dicom / "ct" / "CT")
    assert (ct.datasets[0].RescaleSlope, ct.datasets[0].RescaleIntercept) == (0.5, -1024)
    assert ct.image.GetPixelID() == sitk.sitkFloat32
    stored = pydicom.dcmread(ct.datasets[3].filename).pixel_array
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct.image)[3], stored * 0.5 - 1024)
    assert read_dicom_series(demo_dicom / "mr" / "T2").image.GetPixelID() == sitk.sitkInt16


def test_datasets_follow_the_slice_normal_not_names_or_instance_numbers(demo_dicom: Path):
    source = read_dicom_series(demo_dicom / "shuffled" / "T2")
    names = [Path(ds.filename).name for ds in source.datasets]
    numbers = [int(ds.InstanceNumber) for ds in source.datasets]
    assert names != sorted(names)
    assert numbers not in (sorted(numbers), sorted(numbers, reverse=True))
    positions = [along_normal(ds) for ds in source.datasets]
    assert np.all(np.diff(positions) > 0)
    array = sitk.GetArrayFromImage(source.image)
    for k, ds in enumerate(source.datasets):
        np.testing.assert_array_equal(array[k], pydicom.dcmread(ds.filename).pixel_array)
        assert source.image.TransformIndexToPhysicalPoint((0, 0, k)) == pytest.approx(
            [float(v) for v in ds.ImagePositionPatient], abs=1e-4
        )


def test_oblique_series_keeps_its_direction_and_matches_its_labels(demo_dicom: Path):
    source = read_dicom_series(demo_dicom / "oblique" / "T2")
    direction = np.array(source.image.GetDirection()).reshape(3, 3)
    assert np.abs(direction - np.eye(3)).max() > 0.1
    np.testing.assert_allclose(direction[:, 2], normal_of(source.datasets[0]), atol=1e-6)
    labels = sitk.ReadImage(str(demo_dicom / "oblique" / "labels" / "organ.nii.gz"))
    original = sitk.ReadImage(str(demo_dicom.parent / "study" / "labels" / "organ.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(original))
    assert_same_grid(labels, source.image)


def test_mr_series_share_study_and_frame_of_reference(demo_dicom: Path):
    t2 = read_dicom_series(demo_dicom / "mr" / "T2")
    adc = read_dicom_series(demo_dicom / "mr" / "ADC")
    first_t2, first_adc = t2.datasets[0], adc.datasets[0]
    assert first_t2.StudyInstanceUID == first_adc.StudyInstanceUID
    assert first_t2.FrameOfReferenceUID == first_adc.FrameOfReferenceUID
    assert t2.series_instance_uid != adc.series_instance_uid
    assert adc.image.GetSize()[2] < t2.image.GetSize()[2]
    assert min(adc.image.GetSpacing()) > max(t2.image.GetSpacing()[:2])


def test_other_files_in_the_folder_are_ignored(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "mr" / "ADC", tmp_path / "ADC")
    (folder / "README.txt").write_text("not DICOM")
    (folder / "empty").write_bytes(b"")
    (folder / "junk.dcm").write_bytes(b"\0" * 200)
    (folder / "nested").mkdir()
    no_pixel_data_file(folder / "IM0000.dcm", folder / "SR0000.dcm")
    source = read_dicom_series(folder)
    assert_same_image(source.image, gdcm_read(demo_dicom / "mr" / "ADC"))
    assert len(source.datasets) == 20


def test_several_series_are_listed(demo_dicom: Path, tmp_path: Path):
    copy_series(demo_dicom / "mr" / "T2", tmp_path / "both", "t2_")
    copy_series(demo_dicom / "mr" / "ADC", tmp_path / "both", "adc_")
    t2_uid = read_dicom_series(demo_dicom / "mr" / "T2").series_instance_uid
    adc_uid = read_dicom_series(demo_dicom / "mr" / "ADC").series_instance_uid
    with pytest.raises(RequestError, match="holds 2 series") as raised:
        read_dicom_series(tmp_path / "both")
    message = str(raised.value)
    assert f"{t2_uid} 'T2 axial' (24 slices)" in message
    assert f"{adc_uid} 'ADC' (20 slices)" in message
    assert raised.value.status_code == HTTPStatus.BAD_REQUEST


def test_a_missing_middle_slice_is_located(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "ct" / "CT", tmp_path / "CT")
    (folder / "IM0012.dcm").unlink()
    with pytest.raises(RequestError) as raised:
        read_dicom_series(folder)
    message = str(raised.value)
    assert "missing or unevenly spaced (expected spacing 2.5 mm along the slice normal)" in message
    assert "1 missing slice(s): gap of 5 mm between IM0011.dcm at 45 mm and IM0013.dcm" in message


def test_uneven_spacing_is_located(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "oblique" / "T2", tmp_path / "T2")

    def shift_along_normal(ds: pydicom.Dataset) -> None:
        position = np.array(ds.ImagePositionPatient, dtype=float) + normal_of(ds)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]

    edit_slices(folder, shift_along_normal, [f"IM{k:04d}.dcm" for k in range(8, 24)])
    with pytest.raises(RequestError) as raised:
        read_dicom_series(folder)
    message = str(raised.value)
    assert "missing or unevenly spaced (expected spacing 2.5 mm" in message
    assert "gap of 3.5 mm between IM0007.dcm" in message
    assert "and IM0008.dcm" in message


def test_duplicate_slices_are_named(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "mr" / "T2", tmp_path / "T2")
    shutil.copy(folder / "IM0005.dcm", folder / "IM0005-copy.dcm")
    with pytest.raises(RequestError) as raised:
        read_dicom_series(folder)
    assert "IM0005-copy.dcm and IM0005.dcm lie at the same position 30 mm" in str(raised.value)


@pytest.mark.parametrize(
    ("keyword", "value", "what"),
    [
        ("ImageOrientationPatient", [0, 1, 0, 1, 0, 0], "orientation"),
        ("PixelSpacing", [2.0, 2.0], "pixel spacing"),
    ],
)
def test_slices_with_other_geometry_are_refused(demo_dicom, tmp_path, keyword, value, what):
    folder = copy_series(demo_dicom / "mr" / "T2", tmp_path / "T2")
    edit_slices(folder, lambda ds: setattr(ds, keyword, value), ["IM0007.dcm"])
    with pytest.raises(RequestError, match=f"differ in {what}: .* in IM0000.dcm but .* IM0007"):
        read_dicom_series(folder)


def test_slices_of_another_size_are_refused(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "mr" / "T2", tmp_path / "T2")

    def crop(ds: pydicom.Dataset) -> None:
        ds.PixelData = ds.pixel_array[:32, :40].tobytes()
        ds.Rows, ds.Columns = 32, 40

    edit_slices(folder, crop, ["IM0003.dcm"])
    with pytest.raises(RequestError, match=r"size \(rows, columns\): \[48, 48\] .* \[32, 40\]"):
        read_dicom_series(folder)


def test_a_sheared_stack_is_refused(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "ct" / "CT", tmp_path / "CT")

    def tilt(ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * (z - 17.5), z]

    edit_slices(folder, tilt, [p.name for p in folder.iterdir()])
    with pytest.raises(RequestError, match="tilted gantry"):
        read_dicom_series(folder)


@pytest.mark.parametrize("n_text_files", [0, 2])
def test_a_folder_without_an_image_says_what_it_saw(demo_dicom, tmp_path, n_text_files):
    for k in range(n_text_files):
        (tmp_path / f"notes{k}.txt").write_text("no image here")
    no_pixel_data_file(demo_dicom / "mr" / "T2" / "IM0000.dcm", tmp_path / "SR.dcm")
    with pytest.raises(RequestError) as raised:
        read_dicom_series(tmp_path)
    assert str(raised.value) == (
        f"no DICOM image in {tmp_path}: looked at {n_text_files + 1} files, "
        f"{n_text_files} not DICOM, 1 DICOM without pixel data"
    )


def test_corrupt_pixel_data_names_the_file(demo_dicom: Path, tmp_path: Path):
    folder = copy_series(demo_dicom / "mr" / "T2", tmp_path / "T2")
    truncated = folder / "IM0004.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    with pytest.raises(RequestError, match=r"cannot decode the pixel data of .*IM0004\.dcm"):
        read_dicom_series(folder)


def test_a_missing_folder_is_not_found(tmp_path: Path):
    with pytest.raises(InputNotFoundError, match="does not exist") as raised:
        read_dicom_series(tmp_path / "absent")
    assert raised.value.status_code == HTTPStatus.NOT_FOUND


def test_a_single_slice_takes_its_thickness(demo_study: Path, tmp_path: Path):
    t2 = sitk.ReadImage(str(demo_study / "T2" / "T2.nii.gz"))
    write_image_series(t2[:, :, 5:6], tmp_path, SeriesIdentity(modality="MR"))
    image = read_dicom_series(tmp_path).image
    assert image.GetSize() == (48, 48, 1)
    assert image.GetSpacing() == pytest.approx((1.25, 1.25, 2.5))
    assert image.GetOrigin() == pytest.approx(t2.TransformIndexToPhysicalPoint((0, 0, 5)))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image)[0], np.round(sitk.GetArrayFromImage(t2)[5])
    )


def test_demo_series_are_what_the_script_writes(demo_dicom: Path, tmp_path: Path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(
        p.relative_to(demo_dicom) for p in demo_dicom.rglob("*") if p.is_file()
    )
    for path in written:
        if path.suffix == ".dcm":
            assert pydicom.dcmread(tmp_path / path) == pydicom.dcmread(demo_dicom / path)
        else:
            assert_same_image(
                sitk.ReadImage(str(tmp_path / path)), sitk.ReadImage(str(demo_dicom / path))
            )
