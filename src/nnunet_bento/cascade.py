"""How one stage's mask limits another: references, crop boxes, the crop and the paste back.

A stage's ``intersect_with`` or ``crop_from`` names a mask file under the study, or an
earlier stage's mask as ``stage_N``. In a cascade, ``cascade_mode`` of the transition into a
stage supplies the previous stage's mask as its overlap reference (``intersect``) or crop
reference (``crop``) when the stage names none itself. With a crop reference, the model runs
on the padded box around the mask and its result is pasted back into the full grid.
"""

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RequestError
from .io.images import NnunetInput, image_file_in, nnunet_properties, read_image, resample_mask_onto
from .runners.protocol import PredictionResult

STAGE_REFERENCE = re.compile(r"^stage_(\d+)$")
REFERENCE_FIELDS = {"intersect_with": "intersect", "crop_from": "crop"}
Box = tuple[slice, slice, slice]


def earlier_stage(name: str) -> int | None:
    """N for ``stage_N``, else None (a file)."""
    match = STAGE_REFERENCE.match(name)
    return int(match.group(1)) if match else None


def check_stage_reference(field: str, name: str | None, stage_index: int) -> None:
    """A stage may only name a stage that runs before it."""
    referenced = None if name is None else earlier_stage(name)
    if referenced is not None and referenced >= stage_index:
        raise RequestError(
            f"{field} {name!r} of stage {stage_index} names a stage that has not run before it"
        )


def stage_reference(
    field: str, own: str | None, stage_index: int, cascade_mode: str | None
) -> str | None:
    """The mask that limits a stage for ``field`` (intersect_with or crop_from).

    The stage's own setting wins; else the previous stage's mask when the transition's
    cascade_mode is the one the field stands for.
    """
    if own is None and stage_index > 0 and cascade_mode == REFERENCE_FIELDS[field]:
        return f"stage_{stage_index - 1}"
    return own


def reference_mask(
    name: str,
    file: Path | None,
    earlier_masks: list[sitk.Image],
    grid: sitk.Image,
    max_voxels: int | None = None,
) -> np.ndarray:
    """The mask ``name`` stands for on ``grid`` (nearest neighbour), as a (z, y, x) array:
    an earlier stage's mask for ``stage_N``, else the (checked) ``file``, which must be a
    grayscale image of the grid's dimension."""
    index = earlier_stage(name)
    if index is not None:
        mask = earlier_masks[index]
    else:
        assert file is not None, "check_request_paths resolves every mask file"
        mask = read_image(image_file_in(file), (grid.GetDimension(),), max_voxels)
    return sitk.GetArrayFromImage(resample_mask_onto(mask, grid))


def bounding_box(mask: np.ndarray, padding: tuple[int, int, int]) -> Box | None:
    """The box around the mask's voxels, padded by (z, y, x) voxels and clipped; None if empty."""
    nonzero = np.nonzero(mask)
    if not nonzero[0].size:
        return None
    return tuple(
        slice(max(int(axis.min()) - pad, 0), min(int(axis.max()) + pad + 1, size))
        for axis, pad, size in zip(nonzero, padding, mask.shape, strict=True)
    )


def crop_input(image: NnunetInput, box: Box) -> NnunetInput:
    """The stack inside ``box`` (z, y, x slices), with the geometry of that region."""
    z, y, x = box
    size = [x.stop - x.start, y.stop - y.start, z.stop - z.start]
    index = [x.start, y.start, z.start]
    reference = image.reference
    if reference.GetDimension() == 2:
        size, index = size[:2], index[:2]
    cropped = sitk.RegionOfInterest(reference, size, index)
    return NnunetInput(
        image.array[:, z, y, x], nnunet_properties(cropped, image.properties["spacing"]), cropped
    )


def paste(cropped: np.ndarray, box: Box, shape: tuple[int, ...]) -> np.ndarray:
    """``cropped`` put back at ``box`` of a zero array; leading axes (labels) are kept."""
    full = np.zeros((*cropped.shape[: cropped.ndim - 3], *shape), dtype=cropped.dtype)
    full[(..., *box)] = cropped
    return full


def nothing_to_predict(labels: tuple[int, ...], shape: tuple[int, ...]) -> PredictionResult:
    """The result of a cascade stage whose crop reference (the previous mask) is empty."""
    return PredictionResult(
        segmentation=np.zeros(shape, np.uint8),
        probabilities=np.zeros((len(labels), *shape), np.float16),
        device="none",
        seconds=0.0,
    )


def predict_in_box(
    predict: Callable[[NnunetInput], PredictionResult],
    image: NnunetInput,
    crop_mask: np.ndarray,
    padding: tuple[int, int, int],
    labels: tuple[int, ...],
    explicit: str | None,
) -> PredictionResult:
    """Run ``predict`` on the padded box around ``crop_mask`` and paste the result back.

    An empty mask named by the stage itself (``explicit``) is the caller's error; an empty
    previous stage in a crop cascade gives an empty result without running the model.
    """
    shape = image.array.shape[1:]
    box = bounding_box(crop_mask, padding)
    if box is None:
        if explicit is not None:
            raise RequestError(f"crop_from mask {explicit!r} is empty: there is nothing to crop to")
        return nothing_to_predict(labels, shape)
    cropped = predict(crop_input(image, box))
    return replace(
        cropped,
        segmentation=paste(cropped.segmentation, box, shape),
        probabilities=None
        if cropped.probabilities is None
        else paste(cropped.probabilities, box, shape),
    )
