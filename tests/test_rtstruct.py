"""RT Structure Set writer: valid DICOM, contours where the mask is, read back by rt-utils."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import dciodvfy_errors
from dicom_image_writer import SeriesIdentity, write_image_series
from rt_utils import RTStructBuilder

from nnunet_bento.io.dicom_source import AlgorithmIdentity, DicomSource
from nnunet_bento.io.rtstruct import write_rtstruct
from nnunet_bento.io.staging import OutputStaging

SHAPE = (24, 48, 48)
SPACING = (1.25, 1.25, 2.5)
IDENTITY = AlgorithmIdentity(
    name="organ-model",
    version="0.1.0",
    model_tag="organ:abc123",
    checkpoint_sha256="0123456789abcdef" * 4,
)
NAMES = {1: "liver", 2: "spleen"}


def _rotation(degrees_x: float, degrees_y: float) -> tuple[float, ...]:
    """A direction matrix rotated about x, then y."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(np.deg2rad(degrees_x), np.deg2rad(degrees_y), 0.0)
    return transform.GetMatrix()


GEOMETRIES = {
    # name: (modality, origin, direction, (z, y, x) shape, (x, y, z) spacing)
    "ct-axial": ("CT", (-29.7, -211.3, -512.75), (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE, SPACING),
    "mr-coronal": ("MR", (-31.1, 12.6, 40.2), (1, 0, 0, 0, 0, 1, 0, -1, 0), SHAPE, SPACING),
    "oblique": ("MR", (-30.123, -30.77, -30.3), _rotation(20, 10), SHAPE, SPACING),
    # slices stored against the normal, so rt-utils sorts them the other way round from us
    "z-reversed": ("CT", (-29.7, -211.3, 17.5), (1, 0, 0, 0, 1, 0, 0, 0, -1), SHAPE, SPACING),
    # rows != columns and unequal row and column spacing (rt-utils swaps them: issue 92)
    "non-square": ("CT", (-40.3, -25.9, 3.25), _rotation(15, 0), (20, 40, 56), (0.8, 1.3, 3.0)),
}


def _write_source(folder: Path, geometry: str) -> DicomSource:
    """Write a series (files named against slice order); datasets sorted along the image's z."""
    modality, origin, direction, shape, spacing = GEOMETRIES[geometry]
    image = sitk.GetImageFromArray(np.zeros(shape, np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    order = list(range(shape[0]))[::-1]
    write_image_series(image, folder, SeriesIdentity(modality=modality), file_order=order)
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient))))
    return DicomSource(image=image, datasets=datasets, folder=folder)


def _ellipsoid(
    shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    """A boolean (z, y, x) ellipsoid."""
    grid = np.indices(shape, dtype=np.float64)
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return distance <= 1.0


def _two_organs(shape: tuple[int, ...]) -> np.ndarray:
    """Label 1 and label 2 ellipsoids, apart from each other."""
    z, y, x = shape
    mask = np.zeros(shape, np.uint8)
    mask[_ellipsoid(shape, (z * 0.35, y * 0.33, x * 0.33), (5, 10, 9))] = 1
    mask[_ellipsoid(shape, (z * 0.65, y * 0.67, x * 0.67), (5, 8, 11))] = 2
    return mask


def _corner_blob(shape: tuple[int, ...]) -> np.ndarray:
    """One label at high z, low y, high x."""
    z, _, x = shape
    mask = np.zeros(shape, np.uint8)
    mask[_ellipsoid(shape, (z - 5, 8, x - 9), (3, 6, 6))] = 1
    return mask


def _write_valid(mask: np.ndarray, source: DicomSource, path: Path, **kwargs) -> pydicom.Dataset:
    """Write an RT Struct, check it passes dciodvfy, and read it."""
    assert write_rtstruct(mask, source, NAMES, IDENTITY, path, **kwargs)
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


def _read_back(source: DicomSource, path: Path, name: str) -> np.ndarray:
    """The mask rt-utils reads for ROI ``name``, in our (z, y, x) order."""
    rtstruct = RTStructBuilder.create_from(
        dicom_series_path=str(source.folder), rt_struct_path=str(path)
    )
    rt_mask = rtstruct.get_roi_mask_by_name(name)
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(source.datasets)}
    mask = np.zeros((len(source.datasets), *rt_mask.shape[:2]), bool)
    for rt_index, dataset in enumerate(rtstruct.series_data):
        mask[index[dataset.SOPInstanceUID]] = rt_mask[:, :, rt_index]
    return mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two boolean masks."""
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("geometry", ["ct-axial", "mr-coronal", "oblique", "z-reversed"])
def test_rt_utils_reads_back_each_roi(tmp_path: Path, geometry: str) -> None:
    source = _write_source(tmp_path / "series", geometry)
    mask = _two_organs(SHAPE)
    _write_valid(mask, source, tmp_path / "rs.dcm")
    for label, name in NAMES.items():
        dice = _dice(_read_back(source, tmp_path / "rs.dcm", name), mask == label)
        print(f"{geometry} {name}: Dice {dice:.4f}")
        assert dice >= 0.9, f"{geometry} {name}: Dice {dice:.3f}"


@pytest.mark.parametrize("geometry", ["ct-axial", "oblique", "z-reversed"])
def test_corner_blob_comes_back_in_its_corner(tmp_path: Path, geometry: str) -> None:
    source = _write_source(tmp_path / "series", geometry)
    mask = _corner_blob(SHAPE)
    _write_valid(mask, source, tmp_path / "rs.dcm")
    back = _read_back(source, tmp_path / "rs.dcm", NAMES[1])
    expected = np.argwhere(mask).mean(axis=0)
    assert back.any()
    np.testing.assert_allclose(np.argwhere(back).mean(axis=0), expected, atol=1.5)


@pytest.mark.parametrize("geometry", ["ct-axial", "oblique", "z-reversed", "non-square"])
def test_contour_points_lie_on_the_mask_boundary(tmp_path: Path, geometry: str) -> None:
    source = _write_source(tmp_path / "series", geometry)
    mask = _two_organs(sitk.GetArrayViewFromImage(source.image).shape)
    ds = _write_valid(mask, source, tmp_path / "rs.dcm")
    label_of = {name: label for label, name in NAMES.items()}
    labels = {roi.ROINumber: label_of[roi.ROIName] for roi in ds.StructureSetROISequence}
    checked = 0
    for roi_contour in ds.ROIContourSequence:
        label = labels[roi_contour.ReferencedROINumber]
        for contour in roi_contour.ContourSequence:
            points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
            for point in points:
                index = source.image.TransformPhysicalPointToContinuousIndex(point.tolist())
                x, y, z = np.rint(index).astype(int)
                np.testing.assert_allclose(index, (x, y, z), atol=0.01)
                assert mask[z, y, x] == label, f"point {point} is off label {label}"
                around = np.pad(mask[z], 1)[y : y + 3, x : x + 3]
                assert (around != label).any(), f"point {point} is inside label {label}"
                checked += 1
    assert checked > 100


def test_identity_names_and_references(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "series", "ct-axial")
    ds = _write_valid(_two_organs(SHAPE), source, tmp_path / "rs.dcm")
    first = source.datasets[0]
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["liver", "spleen"]
    assert ds.SeriesDescription == "nnU-Net RT Struct: organ-model"
    assert ds.StructureSetLabel == "organ-model"
    assert "organ:abc123" in ds.StructureSetDescription
    assert IDENTITY.checkpoint_sha256 in ds.StructureSetDescription
    assert (ds.Manufacturer, ds.SoftwareVersions) == ("organ-model", "0.1.0")
    for roi in ds.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription == "organ:abc123 sha256:0123456789ab"
    assert "Qurit" not in str(ds)
    for keyword in ("StudyInstanceUID", "PatientID", "AccessionNumber", "FrameOfReferenceUID"):
        assert ds[keyword].value == first[keyword].value
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.series_instance_uid
    referenced = {image.ReferencedSOPInstanceUID for image in series.ContourImageSequence}
    assert referenced == {dataset.SOPInstanceUID for dataset in source.datasets}
    assert ds.SeriesInstanceUID != source.series_instance_uid


def test_series_description_can_be_given(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "series", "ct-axial")
    ds = _write_valid(_corner_blob(SHAPE), source, tmp_path / "rs.dcm", series_description="Mine")
    assert ds.SeriesDescription == "Mine"
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["liver"]


def test_other_files_in_the_series_folder_are_ignored(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "series", "ct-axial")
    (source.folder / "notes.txt").write_text("not DICOM")
    _write_source(source.folder / "other", "oblique")
    ds = _write_valid(_two_organs(SHAPE), source, tmp_path / "rs.dcm")
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    referenced = {image.ReferencedSOPInstanceUID for image in series.ContourImageSequence}
    assert referenced == {dataset.SOPInstanceUID for dataset in source.datasets}


def test_empty_mask_writes_nothing(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "series", "ct-axial")
    path = tmp_path / "out" / "rs.dcm"
    path.parent.mkdir()
    assert not write_rtstruct(np.zeros(SHAPE, np.uint8), source, NAMES, IDENTITY, path)
    assert list(path.parent.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write_source(tmp_path / "series", "ct-axial")
    out = tmp_path / "out"

    def write_half_then_fail(self: pydicom.Dataset, filename: Path, **kwargs) -> None:
        Path(filename).write_bytes(b"DICM partial")
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.Dataset, "save_as", write_half_then_fail)
    with (
        pytest.raises(OSError, match="disk full"),
        OutputStaging(out, tmp_path / "work", overwrite=False) as staging,
    ):
        write_rtstruct(_two_organs(SHAPE), source, NAMES, IDENTITY, staging.path("struct.dcm"))
    assert not out.exists()


@pytest.mark.parametrize(
    ("mask", "names", "message"),
    [
        (np.ones((24, 48, 47), np.uint8), NAMES, "not the source series grid"),
        (np.full(SHAPE, 3, np.uint8), NAMES, r"labels \[3\] have no segment name"),
    ],
)
def test_bad_input_is_refused_by_name(
    tmp_path: Path, mask: np.ndarray, names: dict[int, str], message: str
) -> None:
    source = _write_source(tmp_path / "series", "ct-axial")
    with pytest.raises(ValueError, match=message):
        write_rtstruct(mask, source, names, IDENTITY, tmp_path / "rs.dcm")
    assert not (tmp_path / "rs.dcm").exists()
