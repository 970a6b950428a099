"""Per-label measurements of a stage's final mask on its output grid.

One module measures; the response, ``statistics.json``, the preview legend and the DICOM SR
take its numbers. For each label named:

1. voxels and volume: the voxel count times the voxel volume, the product of the grid's
   spacing in mm³ / 1000 (ml); on a 2D grid a pixel counts as 1 mm thick.
2. components: connected components with full connectivity (26 in 3D, 8 in 2D), as
   ``scipy.ndimage.label`` with a full 3×3×3 structure counts them, and the volume of the
   largest.
3. centroid: the physical point (LPS, mm) of the label's mean continuous index, so that an
   oblique or anisotropic grid places it where the voxels are.
4. bounding box: the minimum and maximum per patient axis (LPS, mm) over the centres of the
   corner voxels of the label's index box; all corners are taken, so an oblique box is
   enclosed.
5. intensity: mean, standard deviation (of the population), median, minimum and maximum of
   the first input channel inside the label, in modality units (HU for CT).
6. mean probability: the mean of the label's probability map inside the label.

An empty label has no voxels, no components, and no centroid, box, intensity or probability.
"""

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: A point in patient coordinates (LPS, mm): (x, y, z), or (x, y) on a 2D grid.
Point = tuple[float, ...]


@dataclass(frozen=True)
class IntensityStatistics:
    """Statistics of the input values inside a label; ``unit`` is "HU" for CT, else None."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    unit: str | None

    @classmethod
    def of(cls, values: np.ndarray, unit: str | None) -> "IntensityStatistics":
        """The statistics of a non-empty array of values, computed in float64."""
        return cls(
            mean=float(values.mean(dtype=np.float64)),
            std=float(values.std(dtype=np.float64)),
            median=float(np.median(values)),
            min=float(values.min()),
            max=float(values.max()),
            unit=unit,
        )


@dataclass(frozen=True)
class LabelMeasurement:
    """The numbers of one label on its grid (rules 1-6 of the module docstring)."""

    label: int
    voxels: int
    volume_ml: float
    components: int
    largest_component_ml: float
    centroid_mm: Point | None
    bbox_mm: tuple[Point, Point] | None
    intensity: IntensityStatistics | None
    mean_probability: float | None

    @classmethod
    def empty(cls, label: int) -> "LabelMeasurement":
        """A label with no voxels."""
        return cls(label, 0, 0.0, 0, 0.0, None, None, None, None)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this measurement, values as computed (not rounded).

        ``bbox_mm`` is ``[[x0, y0, z0], [x1, y1, z1]]`` (minimum, maximum); absent values
        are null.
        """
        return {
            "label": self.label,
            "voxels": self.voxels,
            "volume_ml": self.volume_ml,
            "components": self.components,
            "largest_component_ml": self.largest_component_ml,
            "centroid_mm": None if self.centroid_mm is None else list(self.centroid_mm),
            "bbox_mm": None if self.bbox_mm is None else [list(corner) for corner in self.bbox_mm],
            "intensity": None if self.intensity is None else asdict(self.intensity),
            "mean_probability": self.mean_probability,
        }


def intensity_unit(modality: str | None) -> str | None:
    """The unit of a modality's pixel values: "HU" for CT (any case), None otherwise."""
    return "HU" if modality is not None and modality.casefold() == "ct" else None


def measure_labels(
    mask: np.ndarray,
    grid: sitk.Image,
    names: dict[int, str],
    *,
    intensity: np.ndarray | None = None,
    unit: str | None = None,
    probabilities: np.ndarray | None = None,
    probability_labels: tuple[int, ...] = (),
) -> dict[str, LabelMeasurement]:
    """Measure each label of ``names`` in ``mask`` (z, y, x), or (y, x) on a 2D ``grid``.

    ``intensity`` is the first input channel on the same grid, in ``unit``; ``probabilities``
    (k, z, y, x) hold the maps of ``probability_labels``, in that order. The result is keyed
    by name, in label order.
    """
    shape = tuple(reversed(grid.GetSize()))
    _check_mask(mask, shape)
    if intensity is not None and intensity.shape != shape:
        raise ValueError(f"intensity: shape {intensity.shape} is not the grid's {shape}")
    if probabilities is not None and probabilities.shape != (len(probability_labels), *shape):
        raise ValueError(
            f"probabilities: shape {probabilities.shape} is not (k, *grid) with "
            f"k = len(probability_labels) = {len(probability_labels)} and grid {shape}"
        )
    if not_positive := [label for label in names if label < 1]:
        raise ValueError(f"names: labels must be 1 or more, got {sorted(not_positive)}")
    labels = sorted(names)
    if not labels:
        return {}
    boxes = ndimage.find_objects(mask.view(np.uint8) if mask.dtype == bool else mask, max(labels))
    voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0
    result = {}
    for label in labels:
        box = boxes[label - 1]
        if box is None:
            result[names[label]] = LabelMeasurement.empty(label)
            continue
        inside = mask[box] == label
        probability = None
        if probabilities is not None and label in probability_labels:
            probability = probabilities[probability_labels.index(label)][box][inside]
        result[names[label]] = _measure(
            label,
            inside,
            box,
            grid,
            voxel_ml,
            None if intensity is None else IntensityStatistics.of(intensity[box][inside], unit),
            None if probability is None else float(probability.mean(dtype=np.float64)),
        )
    return result


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> None:
    if mask.shape != shape:
        raise ValueError(f"mask: shape {mask.shape} is not the grid's {shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"mask: dtype {mask.dtype} is not an integer type")


def _measure(
    label: int,
    inside: np.ndarray,
    box: tuple[slice, ...],
    grid: sitk.Image,
    voxel_ml: float,
    intensity: IntensityStatistics | None,
    mean_probability: float | None,
) -> LabelMeasurement:
    """Rules 1-4 on ``inside``, the label's voxels in its index ``box``."""
    structure = ndimage.generate_binary_structure(inside.ndim, inside.ndim)
    components, count = ndimage.label(inside, structure=structure)
    sizes = np.bincount(components[inside])
    voxels = int(sizes.sum())
    largest = int(sizes.max())
    return LabelMeasurement(
        label=label,
        voxels=voxels,
        volume_ml=voxels * voxel_ml,
        components=int(count),
        largest_component_ml=largest * voxel_ml,
        centroid_mm=grid.TransformContinuousIndexToPhysicalPoint(_mean_index(inside, box, voxels)),
        bbox_mm=_corner_bounds(grid, box),
        intensity=intensity,
        mean_probability=mean_probability,
    )


def _mean_index(inside: np.ndarray, box: tuple[slice, ...], total: int) -> tuple[float, ...]:
    """The mean continuous index (x, y, z) of the ``total`` voxels, one projection per axis."""
    means = []
    for axis, part in enumerate(box):
        others = tuple(other for other in range(inside.ndim) if other != axis)
        counts = np.count_nonzero(inside, axis=others)
        means.append(part.start + float(counts @ np.arange(counts.size)) / total)
    return tuple(reversed(means))


def _corner_bounds(grid: sitk.Image, box: tuple[slice, ...]) -> tuple[Point, Point]:
    """Per-axis minimum and maximum of the physical points of the box's corner voxels."""
    ends = [(part.start, part.stop - 1) for part in reversed(box)]
    corners = np.array(
        [grid.TransformIndexToPhysicalPoint(corner) for corner in itertools.product(*ends)]
    )
    return tuple(map(float, corners.min(axis=0))), tuple(map(float, corners.max(axis=0)))
