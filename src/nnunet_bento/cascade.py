"""How one stage's mask limits another: the reference mask, crop boxes, the crop and the paste
back.

The plan resolves which mask limits a stage (a file under the study, or an earlier stage's
mask, with cascade_mode applied). Here that mask is put on the stage's grid; with a crop
reference, the model runs on the padded box around the mask and its result is pasted back
into the full grid.
"""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RequestError
from .io.images import NnunetInput, image_file_in, nnunet_properties, read_image, resample_mask_onto
from .plan import Reference
from .runners.protocol import PredictionResult

Box = tuple[slice, slice, slice]


def reference_mask(
    reference: Reference,
    study: Path,
    earlier_masks: list[sitk.Image],
    grid: sitk.Image,
    max_voxels: int | None = None,
) -> np.ndarray:
    """The reference's mask on ``grid`` (nearest neighbour), as a (z, y, x) array: an earlier
    stage's mask, else the checked file (read inside the study), which must be a grayscale
    image of the grid's dimension."""
    if reference.stage is not None:
        mask = earlier_masks[reference.stage]
    else:
        assert reference.file is not None, "the plan resolves every mask file"
        mask = read_image(
            image_file_in(reference.file),
            (grid.GetDimension(),),
            max_voxels,
            inside=study,
            field=reference.field,
        )
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
    crop_from: Reference,
) -> PredictionResult:
    """Run ``predict`` on the padded box around ``crop_mask`` and paste the result back.

    An empty mask that the stage names itself is the caller's error; an empty previous
    stage in a crop cascade gives an empty result without running the model.
    """
    shape = image.array.shape[1:]
    box = bounding_box(crop_mask, padding)
    if box is None:
        if crop_from.explicit:
            raise RequestError(
                f"crop_from mask {crop_from.name!r} is empty: there is nothing to crop to"
            )
        return nothing_to_predict(labels, shape)
    cropped = predict(crop_input(image, box))
    return replace(
        cropped,
        segmentation=paste(cropped.segmentation, box, shape),
        probabilities=None
        if cropped.probabilities is None
        else paste(cropped.probabilities, box, shape),
    )
