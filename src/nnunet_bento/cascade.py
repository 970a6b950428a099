"""How one stage's mask limits another: reference masks, crop boxes, pasting back.

A stage's ``intersect_with`` or ``crop_from`` names a mask file under the study, or an
earlier stage's mask as ``stage_N``. In a cascade, ``cascade_mode`` of the transition into a
stage supplies the previous stage's mask as its overlap reference (``intersect``) or crop
reference (``crop``) when the stage names none itself.
"""

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RequestError
from .io.images import image_file_in, read_image, resample_mask_onto

STAGE_REFERENCE = re.compile(r"^stage_(\d+)$")
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


def reference_mask(
    name: str, study: Path, earlier_masks: list[sitk.Image], grid: sitk.Image
) -> np.ndarray:
    """The named mask on ``grid`` (nearest neighbour), as a (z, y, x) array."""
    index = earlier_stage(name)
    mask = earlier_masks[index] if index is not None else read_image(image_file_in(study / name))
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


def paste(cropped: np.ndarray, box: Box, shape: tuple[int, ...]) -> np.ndarray:
    """``cropped`` put back at ``box`` of a zero array; leading axes (labels) are kept."""
    full = np.zeros((*cropped.shape[: cropped.ndim - 3], *shape), dtype=cropped.dtype)
    full[(..., *box)] = cropped
    return full
