"""Preview PNG of a segmentation result, for a check at a glance.

The picture shows three orthogonal slices of the image grid (a k-, a j- and an i-slice) through
the centre of the predicted labels, each marked at its edges with the nearest patient directions
(LPS) and drawn to scale. The image is greyscale (CT soft-tissue window, otherwise the 1st-99th
percentile); every label gets a light fill and a 2-pixel outline in its palette colour. A legend
lists each label present with its volume and connected-component count, and the title names the
model, folds and date ("no findings" when no label is present). Drawing uses matplotlib's Agg
canvas without pyplot, so worker threads may call it.
"""

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy import ndimage

from .measure import LabelMeasurement, measure_labels

PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 30, 30),
    (0, 210, 0),
    (30, 120, 255),
    (255, 215, 0),
    (230, 0, 230),
    (0, 220, 220),
    (255, 130, 0),
    (150, 70, 255),
    (0, 255, 140),
    (255, 0, 120),
    (170, 255, 0),
    (0, 150, 160),
)
CT_WINDOW = (-160.0, 240.0)
FILL_ALPHA = 0.25
OUTLINE_PX = 2
PERCENTILE_SAMPLES = 1_000_000

WIDTH, HEIGHT, DPI = 1200, 500, 100
BACKGROUND, TEXT, MUTED = "#111111", "#f0f0f0", "#a8a8a8"
CELL_LEFT, CELL_WIDTH, SIDE_MARGIN = 8, 288, 24
BOX_TOP, BOX_BOTTOM = 96, 474
LEGEND_LEFT, LEGEND_RIGHT, LEGEND_TOP, LINE_HEIGHT, NAME_CHARS = 884, 1190, 96, 22, 18

# (name, horizontal grid axis, vertical grid axis, vertical index increases upward)
PANEL_LAYOUT = (("axial", 0, 1, False), ("coronal", 0, 2, True), ("sagittal", 1, 2, True))
_POSITIVE = ("L", "P", "S")
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
_PLANE = (
    dict.fromkeys("SI", "axial") | dict.fromkeys("PA", "coronal") | dict.fromkeys("LR", "sagittal")
)


@dataclass(frozen=True)
class LabelSummary:
    """One label in the legend: volume in ml, connected components (26-connectivity), colour."""

    label: int
    name: str
    volume_ml: float
    components: int
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class PanelGeometry:
    """Where a slice sits in the PNG; grid axes are ITK's (0 = i/x, 1 = j/y, 2 = k/z)."""

    name: str  # grid role: "axial" (k-slice), "coronal" (j-slice), "sagittal" (i-slice)
    plane: str  # anatomical plane nearest to the slice, from the direction matrix
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the image in the PNG, x1 and y1 excluded
    axes: tuple[int, int]  # grid axes shown left to right, and top to bottom (or up if flipped)
    shape: tuple[int, int]  # voxels along those two axes
    slice_index: int  # index along the remaining grid axis
    flip_vertical: bool  # the vertical grid index increases upward
    edge_letters: tuple[str, str, str, str]  # patient direction at left, right, top, bottom

    @property
    def slice_axis(self) -> int:
        """The grid axis this panel cuts across."""
        return 3 - sum(self.axes)


@dataclass(frozen=True)
class PreviewSummary:
    """What the preview shows; empty when no label of ``label_names`` is in the mask."""

    path: Path
    width: int
    height: int
    title: str
    labels: list[LabelSummary]
    is_empty: bool
    panels: tuple[PanelGeometry, ...]


def write_preview(
    image: sitk.Image,
    mask: np.ndarray,
    label_names: dict[int, str],
    *,
    model_id: str,
    folds: Sequence[int | str],
    path: Path,
    modality: str | None = None,
    date: datetime.date | None = None,
    measurements: Mapping[int, LabelMeasurement] | None = None,
) -> PreviewSummary:
    """Draw the PNG of ``mask`` (z, y, x) over ``image``; only labels in ``label_names`` count.

    The legend's volumes and component counts are ``measurements`` (by label), measured by
    ``measure.measure_labels`` on ``image``'s grid when not given."""
    volume = sitk.GetArrayViewFromImage(image)
    mask = _label_array(mask, volume.shape)
    spacing = image.GetSpacing()
    boxes = _label_boxes(mask, label_names)
    if measurements is None:
        measured = measure_labels(mask, image, {label: label_names[label] for label in boxes})
        measurements = {m.label: m for m in measured.values()}
    labels = _summarise(boxes, label_names, measurements)
    window = window_bounds(volume, modality)
    title = _title(model_id, folds, date or datetime.date.today(), not labels)
    letters = axis_direction_letters(image.GetDirection())
    centre = _slice_indices(mask, boxes)
    colours = {summary.label: summary.colour for summary in labels}
    figure = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, facecolor=BACKGROUND)
    panels = []
    for column, layout in enumerate(PANEL_LAYOUT):
        panel = _panel_geometry(column, layout, image.GetSize(), spacing, letters, centre)
        pixels = _panel_pixels(volume, mask, panel, window, colours)
        figure.figimage(pixels, xo=panel.box[0], yo=HEIGHT - panel.box[3], origin="upper")
        _draw_panel_text(figure, panel, column)
        panels.append(panel)
    _draw_header(figure, title, _subtitle(image, modality, window))
    _draw_legend(figure, labels)
    path = Path(path)
    FigureCanvasAgg(figure).print_png(path)
    return PreviewSummary(path, WIDTH, HEIGHT, title, labels, not labels, tuple(panels))


def label_colour(label: int) -> tuple[int, int, int]:
    """The fixed palette colour (RGB 0-255) of a label value."""
    return PALETTE[(label - 1) % len(PALETTE)]


def axis_direction_letters(direction: Sequence[float]) -> list[str]:
    """The LPS letter each grid axis (i, j, k) points towards, from a row-major 3x3 direction."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    letters = []
    for column in matrix.T:
        axis = int(np.argmax(np.abs(column)))
        letter = _POSITIVE[axis]
        letters.append(letter if column[axis] > 0 else _OPPOSITE[letter])
    return letters


def window_bounds(values: np.ndarray, modality: str | None) -> tuple[float, float]:
    """Grey window: CT level 40 width 400, else the 1st-99th percentile (of <= 1e6 samples)."""
    if modality is not None and modality.upper() == "CT":
        return CT_WINDOW
    flat = np.ravel(values)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLES)]
    low, high = (float(bound) for bound in np.percentile(sample, (1, 99)))
    return low, high if high > low else low + 1.0


def _display_indices(voxels: int, pixels: int) -> np.ndarray:
    """The voxel each display pixel shows when ``voxels`` are drawn over ``pixels`` (nearest)."""
    return ((np.arange(pixels) + 0.5) * (voxels / pixels)).astype(np.intp)


def _label_array(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The mask as a non-boolean integer array, checked against the image grid."""
    mask = np.asarray(mask)
    if mask.shape != shape or len(shape) != 3:
        raise ValueError(f"mask shape {mask.shape} does not match the 3D image grid {shape}")
    return mask.astype(np.uint8) if mask.dtype == bool else mask


def _label_boxes(mask: np.ndarray, label_names: dict[int, str]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of each named label (> 0) present in the mask, by label value."""
    wanted = sorted(label for label in label_names if label > 0)
    if not wanted:
        return {}
    objects = ndimage.find_objects(mask, max_label=wanted[-1])
    return {label: objects[label - 1] for label in wanted if objects[label - 1] is not None}


def _summarise(
    boxes: dict[int, tuple[slice, ...]],
    label_names: dict[int, str],
    measurements: Mapping[int, LabelMeasurement],
) -> list[LabelSummary]:
    """The legend entry of each label present: its volume and component count, measured."""
    return [
        LabelSummary(
            label,
            label_names[label],
            measurements[label].volume_ml,
            measurements[label].components,
            label_colour(label),
        )
        for label in boxes
    ]


def _slice_indices(mask: np.ndarray, boxes: dict[int, tuple[slice, ...]]) -> tuple[int, ...]:
    """(i, j, k) through the labels' joint box centre, each moved to its nearest labelled slice."""
    if not boxes:
        return tuple(size // 2 for size in mask.shape[::-1])
    labels = np.fromiter(boxes, dtype=np.int64)
    indices = []
    for axis in (2, 1, 0):
        start = min(box[axis].start for box in boxes.values())
        stop = max(box[axis].stop for box in boxes.values())
        centre = (start + stop - 1) // 2
        order = sorted(range(start, stop), key=lambda index: abs(index - centre))
        indices.append(next(i for i in order if _has_label(mask, axis, i, labels)))
    return tuple(indices)


def _has_label(mask: np.ndarray, axis: int, index: int, labels: np.ndarray) -> bool:
    """Whether the slice ``index`` along numpy ``axis`` contains one of ``labels``."""
    return bool(np.isin(np.take(mask, index, axis=axis), labels).any())


def _panel_geometry(
    column: int,
    layout: tuple[str, int, int, bool],
    size: tuple[int, ...],
    spacing: tuple[float, ...],
    letters: list[str],
    centre: tuple[int, ...],
) -> PanelGeometry:
    """Place one slice, to scale, centred in its cell of the figure."""
    name, horizontal, vertical, flip = layout
    slice_axis = 3 - horizontal - vertical
    extent = (size[horizontal] * spacing[horizontal], size[vertical] * spacing[vertical])
    room = (CELL_WIDTH - 2 * SIDE_MARGIN, BOX_BOTTOM - BOX_TOP)
    scale = min(room[0] / extent[0], room[1] / extent[1])
    width, height = (max(1, round(mm * scale)) for mm in extent)
    x0 = CELL_LEFT + column * CELL_WIDTH + SIDE_MARGIN + (room[0] - width) // 2
    y0 = BOX_TOP + (room[1] - height) // 2
    right, up = letters[horizontal], letters[vertical]
    top, bottom = (up, _OPPOSITE[up]) if flip else (_OPPOSITE[up], up)
    return PanelGeometry(
        name=name,
        plane=_PLANE[letters[slice_axis]],
        box=(x0, y0, x0 + width, y0 + height),
        axes=(horizontal, vertical),
        shape=(size[horizontal], size[vertical]),
        slice_index=centre[slice_axis],
        flip_vertical=flip,
        edge_letters=(_OPPOSITE[right], right, top, bottom),
    )


def _panel_pixels(
    volume: np.ndarray,
    mask: np.ndarray,
    panel: PanelGeometry,
    window: tuple[float, float],
    colours: dict[int, tuple[int, int, int]],
) -> np.ndarray:
    """The panel's RGB pixels: the windowed slice, resized (nearest), with the labels drawn."""
    x0, y0, x1, y1 = panel.box
    rows = _display_indices(panel.shape[1], y1 - y0)
    columns = _display_indices(panel.shape[0], x1 - x0)
    grid = np.ix_(rows, columns)
    grey = _grey(_plane(volume, panel)[grid], window)
    labels = _plane(mask, panel)[grid]
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for label in np.unique(labels):
        if int(label) in colours:
            _draw_label(rgb, labels == label, colours[int(label)])
    return rgb.astype(np.uint8)


def _plane(volume: np.ndarray, panel: PanelGeometry) -> np.ndarray:
    """The panel's 2D slice of a (z, y, x) array: rows = vertical axis, top row first."""
    plane = np.take(volume, panel.slice_index, axis=2 - panel.slice_axis)
    return plane[::-1] if panel.flip_vertical else plane


def _grey(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Window values to grey levels 0-255 (float32)."""
    low, high = window
    scaled = (values.astype(np.float32) - low) / (high - low)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0)


def _draw_label(rgb: np.ndarray, inside: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Blend a light fill and paint a 2-pixel outline (inside the label) in its colour."""
    paint = np.asarray(colour, dtype=np.float32)
    rgb[inside] = np.rint(rgb[inside] + FILL_ALPHA * (paint - rgb[inside]))
    rgb[inside & ~ndimage.binary_erosion(inside, iterations=OUTLINE_PX)] = paint


def _title(model_id: str, folds: Sequence[int | str], date: datetime.date, empty: bool) -> str:
    """Model, folds and date, plus "no findings" for an empty result."""
    fold_word = "fold" if len(folds) == 1 else "folds"
    parts = [model_id, f"{fold_word} {', '.join(str(fold) for fold in folds)}", date.isoformat()]
    return "  ·  ".join([*parts, "no findings"] if empty else parts)


def _subtitle(image: sitk.Image, modality: str | None, window: tuple[float, float]) -> str:
    """Modality, grey window, grid size and voxel spacing."""
    grid = " × ".join(str(size) for size in image.GetSize())
    spacing = " × ".join(f"{mm:.3g}" for mm in image.GetSpacing())
    return (
        f"{modality or 'image'}  ·  window {window[0]:.4g} to {window[1]:.4g}"
        f"  ·  grid {grid}  ·  spacing {spacing} mm"
    )


def _frac(x: float, y: float) -> tuple[float, float]:
    """Figure fraction of a PNG pixel position (x right, y down)."""
    return x / WIDTH, 1.0 - y / HEIGHT


def _draw_header(figure: Figure, title: str, subtitle: str) -> None:
    """Title and subtitle across the top."""
    left = CELL_LEFT + 8
    figure.text(*_frac(left, 22), title, color=TEXT, fontsize=15, weight="bold", va="center")
    figure.text(*_frac(left, 48), subtitle, color=MUTED, fontsize=10, va="center")


def _draw_panel_text(figure: Figure, panel: PanelGeometry, column: int) -> None:
    """The panel's caption and the patient direction letter at each edge."""
    x0, y0, x1, y1 = panel.box
    middle_x, middle_y = (x0 + x1) / 2, (y0 + y1) / 2
    caption = f"{panel.plane.capitalize()}  ·  {'ijk'[panel.slice_axis]} = {panel.slice_index}"
    cell_middle = CELL_LEFT + (column + 0.5) * CELL_WIDTH
    figure.text(*_frac(cell_middle, 74), caption, color=TEXT, fontsize=12, ha="center", va="center")
    left, right, top, bottom = panel.edge_letters
    style = {"color": "#ffd27f", "fontsize": 13, "weight": "bold"}
    figure.text(*_frac(x0 - 6, middle_y), left, ha="right", va="center", **style)
    figure.text(*_frac(x1 + 6, middle_y), right, ha="left", va="center", **style)
    figure.text(*_frac(middle_x, y0 - 3), top, ha="center", va="bottom", **style)
    figure.text(*_frac(middle_x, y1 + 3), bottom, ha="center", va="top", **style)


def _draw_legend(figure: Figure, labels: list[LabelSummary]) -> None:
    """Colour, name, volume and component count of each label, or "no findings"."""
    header = {"color": MUTED, "fontsize": 10, "va": "center"}
    if not labels:
        figure.text(*_frac(LEGEND_LEFT, 74), "no findings", **{**header, "fontsize": 12})
        return
    figure.text(*_frac(LEGEND_LEFT, 74), "label", **header)
    figure.text(*_frac(LEGEND_RIGHT, 74), "volume · components", ha="right", **header)
    rows = (BOX_BOTTOM - LEGEND_TOP) // LINE_HEIGHT
    shown = labels if len(labels) <= rows else labels[: rows - 1]
    for row, summary in enumerate(shown):
        _draw_legend_row(figure, LEGEND_TOP + row * LINE_HEIGHT, summary)
    if len(shown) < len(labels):
        more = f"+ {len(labels) - len(shown)} more labels"
        figure.text(*_frac(LEGEND_LEFT, LEGEND_TOP + len(shown) * LINE_HEIGHT + 8), more, **header)


def _draw_legend_row(figure: Figure, top: int, summary: LabelSummary) -> None:
    """One legend line: colour swatch, name, then volume and component count."""
    middle = top + LINE_HEIGHT / 2
    colour = tuple(channel / 255 for channel in summary.colour)
    x, y = _frac(LEGEND_LEFT, top + LINE_HEIGHT - 4)
    swatch = Rectangle((x, y), 14 / WIDTH, 14 / HEIGHT, transform=figure.transFigure, color=colour)
    figure.add_artist(swatch)
    name = summary.name if len(summary.name) <= NAME_CHARS else summary.name[: NAME_CHARS - 1] + "…"
    figure.text(*_frac(LEGEND_LEFT + 22, middle), name, color=TEXT, fontsize=11, va="center")
    stats = f"{_format_ml(summary.volume_ml)} ml  ·  {summary.components}"
    figure.text(
        *_frac(LEGEND_RIGHT, middle), stats, color=MUTED, fontsize=11, ha="right", va="center"
    )


def _format_ml(volume_ml: float) -> str:
    """A volume in ml, with more decimals for small ones."""
    return f"{volume_ml:,.1f}" if volume_ml >= 1 else f"{volume_ml:.3f}"
