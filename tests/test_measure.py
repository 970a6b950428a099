"""Per-label measurements: volumes, components, centroids, boxes, intensity and probability."""

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import apply_rescale
from scipy import ndimage

from nnunet_bento.io.dicom_series import read_dicom_series
from nnunet_bento.measure import LabelMeasurement, intensity_unit, measure_labels

REPO = Path(__file__).resolve().parents[1]
SHAPE = (9, 16, 12)  # z, y, x
SPACING = (0.8, 0.7, 2.5)  # x, y, z (mm)
NAMES = {1: "organ", 2: "lesion", 3: "vessel", 4: "absent"}


@pytest.fixture(scope="module")
def oblique_grid(tmp_path_factory: pytest.TempPathFactory) -> sitk.Image:
    """An oblique, anisotropic grid, written as NIfTI and read back."""
    a, b = math.radians(25), math.radians(15)
    about_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_z = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    image = sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8))
    image.SetSpacing(SPACING)
    image.SetOrigin((-12.5, 30.0, 104.0))
    image.SetDirection((about_z @ about_x).ravel().tolist())
    path = tmp_path_factory.mktemp("grid") / "grid.nii.gz"
    sitk.WriteImage(image, path)
    return sitk.ReadImage(path)


def labelled_mask() -> np.ndarray:
    """Organ: a box; lesion: two cubes touching only at a corner, and one apart; vessel: a
    diagonal line of voxels touching edge to edge; no label 4."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:4, 2:9, 1:6] = 1
    mask[5:7, 10:12, 2:4] = 2
    mask[7:9, 12:14, 4:6] = 2
    mask[3:5, 2:4, 8:11] = 2
    for i in range(5):
        mask[2 + i, 10 + i, 6 + i] = 3
    return mask


def physical_points(grid: sitk.Image, indices: np.ndarray) -> np.ndarray:
    """Physical points (LPS mm) of (z, y, x) indices, from the grid's matrices, not ITK."""
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    steps = direction * np.asarray(grid.GetSpacing())
    return np.asarray(grid.GetOrigin()) + indices[:, ::-1] @ steps.T


def test_volume_is_count_times_voxel_volume_on_an_oblique_grid(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    result = measure_labels(mask, oblique_grid, NAMES)
    assert list(result) == ["organ", "lesion", "vessel", "absent"]
    voxel_ml = 0.8 * 0.7 * 2.5 / 1000
    for label, name in NAMES.items():
        count = int(np.count_nonzero(mask == label))
        assert result[name].label == label
        assert result[name].voxels == count
        assert result[name].volume_ml == pytest.approx(count * voxel_ml, rel=1e-6)
    assert result["organ"].volume_ml == pytest.approx(3 * 7 * 5 * voxel_ml, rel=1e-6)


def test_components_are_26_connected(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    result = measure_labels(mask, oblique_grid, NAMES)
    full = ndimage.generate_binary_structure(3, 3)
    for label, name in NAMES.items():
        assert result[name].components == ndimage.label(mask == label, structure=full)[1]
    assert result["lesion"].components == 2  # the corner-touching cubes are one
    assert ndimage.label(mask == 2)[1] == 3  # face connectivity would split them
    assert result["vessel"].components == 1
    voxel_ml = 0.8 * 0.7 * 2.5 / 1000
    assert result["lesion"].largest_component_ml == pytest.approx(16 * voxel_ml, rel=1e-6)
    assert result["organ"].largest_component_ml == result["organ"].volume_ml


def test_centroid_is_the_physical_point_of_the_mean_index(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    result = measure_labels(mask, oblique_grid, NAMES)
    for label, name in list(NAMES.items())[:3]:
        indices = np.argwhere(mask == label).astype(float)
        expected = physical_points(oblique_grid, indices).mean(axis=0)
        np.testing.assert_allclose(result[name].centroid_mm, expected, atol=1e-4)
        mean_index = tuple(float(v) for v in indices.mean(axis=0)[::-1])
        np.testing.assert_allclose(
            result[name].centroid_mm,
            oblique_grid.TransformContinuousIndexToPhysicalPoint(mean_index),
            atol=1e-9,
        )


def test_bounding_box_on_an_oblique_grid(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    result = measure_labels(mask, oblique_grid, NAMES)
    for label, name in list(NAMES.items())[:3]:
        found = np.argwhere(mask == label)
        z, y, x = (np.arange(lo, hi + 1) for lo, hi in zip(found.min(0), found.max(0), strict=True))
        box = np.stack(np.meshgrid(z, y, x, indexing="ij"), axis=-1).reshape(-1, 3)
        points = physical_points(oblique_grid, box.astype(float))
        low, high = result[name].bbox_mm
        np.testing.assert_allclose(low, points.min(axis=0), atol=1e-4)
        np.testing.assert_allclose(high, points.max(axis=0), atol=1e-4)
    # The organ is its own index box: its box is the extent of its voxel centres.
    organ = physical_points(oblique_grid, np.argwhere(mask == 1).astype(float))
    np.testing.assert_allclose(result["organ"].bbox_mm[0], organ.min(axis=0), atol=1e-4)
    np.testing.assert_allclose(result["organ"].bbox_mm[1], organ.max(axis=0), atol=1e-4)


def test_empty_label(oblique_grid: sitk.Image) -> None:
    intensity = np.ones(SHAPE, np.int16)
    probabilities = np.full((1, *SHAPE), 0.5, np.float32)
    result = measure_labels(
        labelled_mask(),
        oblique_grid,
        NAMES,
        intensity=intensity,
        unit="HU",
        probabilities=probabilities,
        probability_labels=(4,),
    )
    assert result["absent"] == LabelMeasurement(4, 0, 0.0, 0, 0.0, None, None, None, None)
    assert result["absent"].to_json() == {
        "label": 4,
        "voxels": 0,
        "volume_ml": 0.0,
        "components": 0,
        "largest_component_ml": 0.0,
        "centroid_mm": None,
        "bbox_mm": None,
        "intensity": None,
        "mean_probability": None,
    }


def test_mean_probability_inside_each_label(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    rng = np.random.default_rng(1)
    probabilities = rng.random((2, *SHAPE)).astype(np.float32)
    result = measure_labels(
        mask, oblique_grid, NAMES, probabilities=probabilities, probability_labels=(3, 1)
    )
    assert result["vessel"].mean_probability == pytest.approx(probabilities[0][mask == 3].mean())
    assert result["organ"].mean_probability == pytest.approx(probabilities[1][mask == 1].mean())
    assert result["lesion"].mean_probability is None
    assert result["organ"].intensity is None


def test_ct_intensity_matches_the_source_values() -> None:
    """The mask's voxels on the demo CT, against pydicom's rescaled values of each slice."""
    source = read_dicom_series(REPO / "examples" / "dicom" / "ct" / "CT")
    volume = sitk.GetArrayFromImage(source.image)
    z, y, x = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    mask = (((z - 12) / 6) ** 2 + ((y - 24) / 12) ** 2 + ((x - 20) / 9) ** 2 < 1).astype(np.uint8)
    mask[volume < -50] = 0
    unit = intensity_unit(source.datasets[0].Modality)
    result = measure_labels(mask, source.image, {1: "organ"}, intensity=volume, unit=unit)
    slices = [pydicom.dcmread(ds.filename) for ds in source.datasets]
    hu = np.stack([apply_rescale(ds.pixel_array, ds) for ds in slices])
    inside = hu[mask == 1]
    stats = result["organ"].intensity
    assert stats is not None and stats.unit == "HU"
    assert inside.size > 100 and inside.std() > 1
    assert stats.mean == pytest.approx(inside.mean(), abs=0.01)
    assert stats.std == pytest.approx(inside.std(), abs=0.01)
    assert stats.median == pytest.approx(np.median(inside), abs=0.01)
    assert (stats.min, stats.max) == pytest.approx((inside.min(), inside.max()), abs=0.01)


def test_intensity_unit() -> None:
    assert intensity_unit("CT") == "HU"
    assert intensity_unit("ct") == "HU"
    assert intensity_unit("MR") is None
    assert intensity_unit(None) is None


def test_to_json_is_unrounded_json(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    intensity = (np.arange(mask.size).reshape(SHAPE) / 3).astype(np.float64)
    measurement = measure_labels(mask, oblique_grid, NAMES, intensity=intensity, unit="HU")["organ"]
    obj = json.loads(json.dumps(measurement.to_json()))
    assert obj["volume_ml"] == measurement.volume_ml
    assert obj["centroid_mm"] == list(measurement.centroid_mm)
    assert obj["bbox_mm"] == [list(measurement.bbox_mm[0]), list(measurement.bbox_mm[1])]
    assert obj["intensity"]["mean"] == measurement.intensity.mean
    assert obj["intensity"]["unit"] == "HU"
    assert set(obj["intensity"]) == {"mean", "std", "median", "min", "max", "unit"}


def test_a_2d_grid_uses_8_connectivity_and_2d_points() -> None:
    grid = sitk.Image(6, 5, sitk.sitkUInt8)
    grid.SetSpacing((0.5, 2.0))
    grid.SetOrigin((10.0, -4.0))
    mask = np.zeros((5, 6), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[4, 5] = 1
    result = measure_labels(mask, grid, {1: "spot"})["spot"]
    assert (result.voxels, result.components) == (3, 2)
    assert result.volume_ml == pytest.approx(3 * 1.0 / 1000)
    assert result.centroid_mm == pytest.approx((10.0 + 0.5 * 2, -4.0 + 2.0 * 5 / 3))
    assert result.bbox_mm == ((10.0, -4.0), (12.5, 4.0))


def test_errors_name_the_argument(oblique_grid: sitk.Image) -> None:
    mask = labelled_mask()
    with pytest.raises(ValueError, match=r"mask: shape \(9, 12, 16\)"):
        measure_labels(mask.transpose(0, 2, 1), oblique_grid, NAMES)
    with pytest.raises(ValueError, match="mask: dtype float32"):
        measure_labels(mask.astype(np.float32), oblique_grid, NAMES)
    with pytest.raises(ValueError, match="intensity: shape"):
        measure_labels(mask, oblique_grid, NAMES, intensity=np.zeros((9, 16), np.int16))
    with pytest.raises(ValueError, match="probabilities: shape"):
        measure_labels(
            mask, oblique_grid, NAMES, probabilities=np.zeros((1, *SHAPE)), probability_labels=()
        )
    with pytest.raises(ValueError, match=r"names: labels must be 1 or more, got \[0\]"):
        measure_labels(mask, oblique_grid, {0: "background"})
