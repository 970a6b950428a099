"""The preview PNG: outlines where the mask is, to scale, with direction letters and a legend."""

import datetime
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from preview_pixels import voxel_at

from nnunet_bento.preview import (
    CT_WINDOW,
    PanelGeometry,
    PreviewSummary,
    axis_direction_letters,
    label_colour,
    window_bounds,
    write_preview,
)

NAMES = {1: "liver", 2: "lesion", 3: "spleen"}


def make_image(
    shape_xyz: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: np.ndarray | None = None,
    value: float | None = None,
) -> sitk.Image:
    """A gradient (or constant) int16 image on the given grid."""
    z, _, x = np.mgrid[: shape_xyz[2], : shape_xyz[1], : shape_xyz[0]]
    values = np.full(z.shape, value) if value is not None else 300 * np.sin(x / 6) + 20 * z
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-100.0, 20.0, 35.0))
    if direction is not None:
        image.SetDirection(direction.ravel().tolist())
    return image


def physical_mm(image: sitk.Image) -> np.ndarray:
    """Patient coordinates (mm) of every voxel, shape (z, y, x, 3)."""
    size, spacing = image.GetSize(), np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    z, y, x = np.mgrid[: size[2], : size[1], : size[0]]
    scaled = np.stack([x, y, z], axis=-1) * spacing
    return scaled @ direction.T + np.asarray(image.GetOrigin())


def ellipsoid(image: sitk.Image, centre_index: tuple[float, ...], radii_mm: tuple[float, ...]):
    """Boolean (z, y, x) mask of an axis-aligned ellipsoid in patient mm around a grid index."""
    points = physical_mm(image)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(centre_index))
    return (((points - centre) / np.asarray(radii_mm)) ** 2).sum(axis=-1) <= 1.0


def sphere_mask(image: sitk.Image, radius_mm: float) -> np.ndarray:
    """A label-1 sphere (in patient mm) around the grid's centre."""
    centre = tuple((size - 1) / 2 for size in image.GetSize())
    return ellipsoid(image, centre, (radius_mm,) * 3).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    """The PNG as an (height, width, 3) uint8 array."""
    return np.asarray(Image.open(path).convert("RGB"))


def colour_pixels(png: np.ndarray, panel: PanelGeometry, colour) -> tuple[np.ndarray, np.ndarray]:
    """PNG (x, y) of the pixels with exactly ``colour`` inside a panel's image box."""
    x0, y0, x1, y1 = panel.box
    ys, xs = np.nonzero((png[y0:y1, x0:x1] == colour).all(axis=-1))
    return xs + x0, ys + y0


def extent_mm(png: np.ndarray, panel: PanelGeometry, spacing) -> tuple[float, float]:
    """Horizontal and vertical extent (mm) of the label-1 outline in a panel."""
    xs, ys = colour_pixels(png, panel, label_colour(1))
    assert xs.size, f"no outline in the {panel.name} panel"
    x0, y0, x1, y1 = panel.box
    horizontal, vertical = panel.axes
    px_per_mm_x = (x1 - x0) / (panel.shape[0] * spacing[horizontal])
    px_per_mm_y = (y1 - y0) / (panel.shape[1] * spacing[vertical])
    return (np.ptp(xs) + 1) / px_per_mm_x, (np.ptp(ys) + 1) / px_per_mm_y


def assert_outline_on_mask(png: np.ndarray, panel: PanelGeometry, mask: np.ndarray, label: int):
    """The label's colour is in the panel, only on its voxels, out to its extremes in the slice."""
    x0, y0, x1, y1 = panel.box
    assert 0 <= x0 < x1 <= png.shape[1] and 0 <= y0 < y1 <= png.shape[0]
    xs, ys = colour_pixels(png, panel, label_colour(label))
    assert xs.size > 50, f"no outline pixels for label {label} in the {panel.name} panel"
    voxels = np.array([voxel_at(panel, x, y) for x, y in zip(xs, ys, strict=True)])
    assert (voxels[:, panel.slice_axis] == panel.slice_index).all()
    assert (mask[voxels[:, 2], voxels[:, 1], voxels[:, 0]] == label).all()
    in_slice = np.argwhere(mask == label)[:, ::-1]  # (i, j, k)
    in_slice = in_slice[in_slice[:, panel.slice_axis] == panel.slice_index]
    for axis in panel.axes:
        assert voxels[:, axis].min() == in_slice[:, axis].min()
        assert voxels[:, axis].max() == in_slice[:, axis].max()


def preview(image: sitk.Image, mask: np.ndarray, path: Path, **kwargs) -> PreviewSummary:
    """write_preview with fixed model, folds and date."""
    defaults = {"model_id": "Dataset001_Organ", "folds": (0, 1), "date": datetime.date(2024, 5, 1)}
    return write_preview(image, mask, NAMES, path=path, **(defaults | kwargs))


@pytest.fixture
def phantom() -> tuple[sitk.Image, np.ndarray]:
    """48x48x24 anisotropic grid: label 1 an ellipsoid, label 2 two blobs, label 7 unnamed."""
    image = make_image((48, 48, 24), (0.9, 1.2, 2.5))
    mask = np.zeros((24, 48, 48), np.uint8)
    mask[ellipsoid(image, (18, 24, 9), (12, 15, 16))] = 1
    mask[ellipsoid(image, (39, 10, 12), (4, 4, 8))] = 2
    mask[ellipsoid(image, (39, 38, 11), (4, 4, 8))] = 2
    mask[ellipsoid(image, (6, 6, 9), (3, 3, 6))] = 7
    return image, mask


def test_two_label_phantom_draws_outlines_on_the_mask_and_lists_volumes(phantom, tmp_path):
    image, mask = phantom
    summary = preview(image, mask, tmp_path / "preview.png", modality="CT")
    png = read_png(summary.path)
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]
    assert png.shape == (summary.height, summary.width, 3)
    assert 600 <= summary.width <= 2000
    assert not summary.is_empty and "no findings" not in summary.title
    assert [(p.name, p.axes) for p in summary.panels] == [
        ("axial", (0, 1)),
        ("coronal", (0, 2)),
        ("sagittal", (1, 2)),
    ]
    for panel, label in [(summary.panels[0], 2)] + [(panel, 1) for panel in summary.panels]:
        assert_outline_on_mask(png, panel, mask, label)
    assert not (png == label_colour(7)).all(axis=-1).any(), "an unnamed label was drawn"
    voxel_ml = 0.9 * 1.2 * 2.5 / 1000
    assert [s.label for s in summary.labels] == [1, 2]
    for entry in summary.labels:
        assert entry.name == NAMES[entry.label]
        assert entry.colour == label_colour(entry.label)
        expected = np.count_nonzero(mask == entry.label) * voxel_ml
        assert entry.volume_ml == pytest.approx(expected, rel=0.01)
    assert [s.components for s in summary.labels] == [1, 2]


def test_slices_pass_through_an_off_centre_mask(tmp_path):
    image = make_image((48, 48, 24), (0.9, 1.2, 2.5))
    mask = np.zeros((24, 48, 48), np.uint8)
    mask[ellipsoid(image, (8, 38, 4), (5, 5, 7))] = 1
    mask[ellipsoid(image, (8, 38, 19), (5, 5, 7))] = 1
    summary = preview(image, mask, tmp_path / "corner.png")
    png = read_png(summary.path)
    for panel in summary.panels:
        assert_outline_on_mask(png, panel, mask, 1)
    assert summary.labels[0].components == 2


def test_components_touching_at_a_corner_are_one_26_connected_component(tmp_path):
    image = make_image((16, 16, 8), (1.0, 1.0, 2.0))
    mask = np.zeros((8, 16, 16), np.uint8)
    mask[2:4, 2:5, 2:5] = 1
    mask[4:6, 5:8, 5:8] = 1
    mask[2:4, 10:13, 10:13] = 1
    summary = preview(image, mask, tmp_path / "corner.png")
    assert summary.labels[0].components == 2


def test_outlines_are_at_least_two_pixels_wide(phantom, tmp_path):
    image, mask = phantom
    summary = preview(image, mask, tmp_path / "preview.png")
    png = read_png(summary.path)
    axial = summary.panels[0]
    x0, y0, x1, y1 = axial.box
    outline = (png[y0:y1, x0:x1] == label_colour(1)).all(axis=-1)
    row = outline[outline.shape[0] // 2]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]
    assert len(runs) == 2 and (runs >= 2).all()


def test_empty_mask_says_no_findings(tmp_path):
    image = make_image((48, 48, 24), (0.9, 1.2, 2.5), value=40.0)
    mask = np.zeros((24, 48, 48), np.int16)
    summary = preview(image, mask, tmp_path / "empty.png", modality="CT")
    assert summary.is_empty and summary.labels == []
    assert summary.title.endswith("no findings")
    png = read_png(summary.path)
    assert png.shape == (summary.height, summary.width, 3)
    assert [panel.slice_index for panel in summary.panels] == [12, 24, 24]
    x0, y0, x1, y1 = summary.panels[0].box
    assert (png[y0:y1, x0:x1] == 128).all(), "40 HU is mid-grey in the soft-tissue window"


def rotation(axis: int, degrees: float) -> np.ndarray:
    """The 3x3 rotation by ``degrees`` about patient axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    first, second = (axis + 1) % 3, (axis + 2) % 3
    cos, sin = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    matrix = np.eye(3)
    matrix[[first, first, second, second], [first, second, first, second]] = cos, -sin, sin, cos
    return matrix


OBLIQUE = rotation(0, 20) @ rotation(2, 30)
ROUNDNESS_GRIDS = {
    "anisotropic": ((100, 100, 28), (0.8, 0.8, 3.0), None),
    "oblique": ((72, 72, 36), (1.0, 1.0, 2.0), OBLIQUE),
    "thick_slices_2d": ((128, 128, 12), (0.5, 0.5, 5.0), None),
}


@pytest.mark.parametrize("grid", sorted(ROUNDNESS_GRIDS))
def test_sphere_is_round_in_the_axial_panel(grid, tmp_path):
    image = make_image(*ROUNDNESS_GRIDS[grid])
    spacing = ROUNDNESS_GRIDS[grid][1]
    summary = preview(image, sphere_mask(image, 25.0), tmp_path / "sphere.png")
    png = read_png(summary.path)
    width_mm, height_mm = extent_mm(png, summary.panels[0], spacing)
    assert width_mm == pytest.approx(height_mm, rel=0.1)
    assert width_mm == pytest.approx(50.0, rel=0.1)


def test_sphere_is_round_in_the_coronal_panel_of_an_anisotropic_grid(tmp_path):
    size, spacing, _ = ROUNDNESS_GRIDS["anisotropic"]
    image = make_image(size, spacing)
    summary = preview(image, sphere_mask(image, 30.0), tmp_path / "sphere.png")
    png = read_png(summary.path)
    coronal = summary.panels[1]
    assert coronal.axes == (0, 2) and coronal.flip_vertical
    x_mm, z_mm = extent_mm(png, coronal, spacing)
    assert z_mm == pytest.approx(x_mm, rel=0.1)
    assert z_mm == pytest.approx(60.0, rel=0.1)
    x0, y0, x1, y1 = coronal.box
    assert (y1 - y0) / (x1 - x0) == pytest.approx((28 * 3.0) / (100 * 0.8), rel=0.02)


def test_direction_letters_identity():
    assert axis_direction_letters(np.eye(3).ravel()) == ["L", "P", "S"]


def test_direction_letters_flip_when_the_first_axis_points_right():
    rotated = np.diag([-1.0, -1.0, 1.0])
    assert axis_direction_letters(rotated.ravel()) == ["R", "A", "S"]
    assert axis_direction_letters(OBLIQUE.ravel()) == ["L", "P", "S"]
    sagittal_stack = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)
    assert axis_direction_letters(sagittal_stack.ravel()) == ["P", "I", "L"]


@pytest.mark.parametrize(
    ("direction", "axial_edges", "sagittal_edges"),
    [
        (np.eye(3), ("R", "L", "A", "P"), ("A", "P", "S", "I")),
        (np.diag([-1.0, -1.0, 1.0]), ("L", "R", "P", "A"), ("P", "A", "S", "I")),
    ],
)
def test_panel_edges_show_patient_directions(direction, axial_edges, sagittal_edges, tmp_path):
    image = make_image((16, 16, 8), (1.0, 1.0, 2.0), direction)
    summary = preview(image, np.zeros((8, 16, 16), np.uint8), tmp_path / "p.png")
    axial, coronal, sagittal = summary.panels
    assert axial.edge_letters == axial_edges and axial.plane == "axial"
    assert coronal.edge_letters[2:] == ("S", "I") and coronal.plane == "coronal"
    assert sagittal.edge_letters == sagittal_edges and sagittal.plane == "sagittal"


def test_k_slices_of_a_sagittal_stack_are_called_sagittal(tmp_path):
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)
    image = make_image((16, 16, 8), (1.0, 1.0, 2.0), direction)
    summary = preview(image, np.zeros((8, 16, 16), np.uint8), tmp_path / "p.png")
    assert [panel.plane for panel in summary.panels] == ["sagittal", "axial", "coronal"]
    assert summary.panels[0].edge_letters == ("A", "P", "S", "I")


def test_ct_window_is_soft_tissue_and_other_modalities_use_percentiles():
    values = np.arange(-1000, 1001, dtype=np.int16).reshape(1, 1, -1)
    assert window_bounds(values, "CT") == CT_WINDOW == (-160.0, 240.0)
    assert window_bounds(values, "ct") == CT_WINDOW
    expected = tuple(np.percentile(values, (1, 99)))
    assert window_bounds(values, "MR") == pytest.approx(expected)
    assert window_bounds(values, None) == pytest.approx((-980.0, 980.0))
    low, high = window_bounds(np.full((2, 2, 2), 7.0), "MR")
    assert high > low


def test_mask_on_another_grid_is_rejected(tmp_path):
    image = make_image((16, 16, 8), (1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="does not match"):
        preview(image, np.zeros((16, 16, 8), np.uint8), tmp_path / "p.png")


def test_preview_is_fast(phantom, tmp_path):
    image, mask = phantom
    preview(image, mask, tmp_path / "warm.png")
    start = time.perf_counter()
    preview(image, mask, tmp_path / "timed.png")
    assert time.perf_counter() - start < 1.0
