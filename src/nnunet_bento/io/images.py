"""Read image series that SimpleITK understands, and put them on one grid for nnU-Net."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputNotFoundError, RequestError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def image_file_in(series: Path) -> Path:
    """The image a series entry names: the file itself, or the one image file in a folder."""
    if not series.exists():
        raise InputNotFoundError(f"input series {series} does not exist")
    if series.is_file():
        return series
    images = sorted(p for p in series.iterdir() if is_image_file(p))
    if len(images) != 1:
        found = ", ".join(p.name for p in images) or "no image file"
        raise RequestError(
            f"series folder {series} must hold exactly one image file "
            f"({', '.join(IMAGE_SUFFIXES)}); found {found}"
        )
    return images[0]


def read_image(path: Path) -> sitk.Image:
    """Read one image file; an unreadable file is the client's error."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise RequestError(f"cannot read image {path}: {first_line}") from None


def resample_onto(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Linear resampling of ``image`` onto ``reference``'s grid, in float32; same grid: as is."""
    if (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetSpacing(), reference.GetSpacing())
        and np.allclose(image.GetOrigin(), reference.GetOrigin())
        and np.allclose(image.GetDirection(), reference.GetDirection())
    ):
        return image
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def resample_mask_onto(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label mask onto the grid of ``reference``."""
    return sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


@dataclass
class NnunetInput:
    """An image stack in nnU-Net's layout, with the properties its SimpleITK reader makes."""

    array: np.ndarray
    properties: dict[str, Any]
    reference: sitk.Image


def to_nnunet_input(channels: list[sitk.Image]) -> NnunetInput:
    """Stack channels as nnunetv2's SimpleITKIO.read_images does: (c, z, y, x), same props.

    The array keeps its stored dtype to stay compact between processes; nnU-Net casts it.
    """
    reference = channels[0]
    arrays = [sitk.GetArrayFromImage(resample_onto(image, reference)) for image in channels]
    spacing = reference.GetSpacing()
    if arrays[0].ndim == 2:
        arrays = [a[None, None] for a in arrays]
        nnunet_spacing = [max(spacing) * 999, *list(spacing)[::-1]]
    elif arrays[0].ndim == 3:
        arrays = [a[None] for a in arrays]
        nnunet_spacing = list(spacing)[::-1]
    else:
        raise RequestError(f"images must be 2D or 3D; got {arrays[0].ndim} dimensions")
    dtype = np.result_type(*arrays)
    properties = nnunet_properties(reference, nnunet_spacing)
    return NnunetInput(np.concatenate(arrays).astype(dtype, copy=False), properties, reference)


def nnunet_properties(reference: sitk.Image, nnunet_spacing: list[float]) -> dict[str, Any]:
    """The properties dict nnU-Net's SimpleITKIO makes for an image on ``reference``'s grid."""
    return {
        "sitk_stuff": {
            "spacing": reference.GetSpacing(),
            "origin": reference.GetOrigin(),
            "direction": reference.GetDirection(),
        },
        "spacing": [abs(s) for s in nnunet_spacing],
    }


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``array`` (z, y, x) on the grid of ``reference``."""
    if reference.GetDimension() == 2 and array.ndim == 3:
        array = array[0]
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def segmentation_dtype(segmentation: np.ndarray) -> type[np.integer]:
    """uint8 when labels fit, as nnU-Net writes them; else uint16."""
    return np.uint8 if segmentation.max(initial=0) < 255 else np.uint16
