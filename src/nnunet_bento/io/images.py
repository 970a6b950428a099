"""Read image series that SimpleITK understands, and put them on one grid for nnU-Net."""

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputNotFoundError, RequestError, TooLargeError
from .input_files import opened_image

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
#: What a compressed image may hold besides its voxels: its header and extensions.
HEADER_SLACK_BYTES = 1 << 20


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def image_file_in(series: Path) -> Path:
    """The image a series entry names: the file itself, or the one image file in a folder."""
    if not series.exists():
        raise InputNotFoundError(f"input series {series} does not exist")
    if series.is_file():
        return series
    if not series.is_dir():
        raise RequestError(f"input series {series} is neither a regular file nor a folder")
    try:
        images = sorted(p for p in series.iterdir() if is_image_file(p))
    except OSError as error:
        raise RequestError(f"cannot list series folder {series}: {error.strerror}") from None
    if len(images) != 1:
        found = ", ".join(p.name for p in images) or "no image file"
        raise RequestError(
            f"series folder {series} must hold exactly one image file "
            f"({', '.join(IMAGE_SUFFIXES)}); found {found}"
        )
    return images[0]


def check_compressed_stream(path: Path, shown: Path, max_bytes: int) -> None:
    """A gzip file must decompress to its end with a valid checksum (a truncated or corrupt
    .nii.gz otherwise reads as an image with missing voxels), and to at most ``max_bytes``
    (what its header says it holds): more is a bomb, refused before it is read."""
    if not path.name.lower().endswith(".gz"):
        return
    inflated = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                inflated += len(chunk)
                if inflated > max_bytes:
                    raise RequestError(
                        f"image {shown} inflates to more than its header's {max_bytes} bytes; "
                        "send an image whose compressed stream holds only its voxels"
                    )
    except (OSError, EOFError, zlib.error) as error:
        raise RequestError(
            f"image {shown} is truncated or corrupt ({type(error).__name__}: its compressed "
            "stream does not end with a valid checksum); send the complete file"
        ) from None


def check_image_header(
    path: Path, shown: Path, dimensions: tuple[int, ...], max_voxels: int | None
) -> int:
    """From the header, before the pixels are read: a grayscale image of ``dimensions``
    dimensions and at most ``max_voxels`` voxels (None: no bound). Answers the bytes its
    voxels take."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        check_compressed_stream(path, shown, HEADER_SLACK_BYTES)
        raise RequestError(f"cannot read image {shown}: {_last_line(error)}") from None
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise RequestError(
            f"image {shown} has {reader.GetNumberOfComponents()} components per voxel (a colour "
            "or vector image); expected a grayscale image"
        )
    if len(size) not in dimensions:
        expected = " or ".join(f"{d}D" for d in dimensions)
        raise RequestError(f"image {shown} is {len(size)}D; expected {expected}")
    check_voxel_count(f"image {shown}", math.prod(size), max_voxels)
    voxel_bytes = sitk.Image([1] * len(size), reader.GetPixelID()).GetSizeOfPixelComponent()
    return math.prod(size) * voxel_bytes


def check_voxel_count(what: str, voxels: int, max_voxels: int | None) -> None:
    """413 when an input has more voxels than NNUNET_BENTO_MAX_VOXELS allows."""
    if max_voxels is not None and voxels > max_voxels:
        raise TooLargeError(
            f"{what} has {voxels} voxels, more than NNUNET_BENTO_MAX_VOXELS ({max_voxels})"
        )


def read_image(
    path: Path,
    dimensions: tuple[int, ...] = (2, 3),
    max_voxels: int | None = None,
    *,
    inside: Path | None = None,
    field: str = "image",
) -> sitk.Image:
    """Read one image file, checked first; an unreadable file is the client's error.

    The file, and any detached data file, are checked and opened as input_files says: the
    file must resolve inside ``inside`` (default: its own folder), and a refusal names
    ``field``.
    """
    with opened_image(path, inside or path.parent, field) as readable:
        voxel_bytes = check_image_header(readable, path, dimensions, max_voxels)
        check_compressed_stream(readable, path, voxel_bytes + HEADER_SLACK_BYTES)
        try:
            return sitk.ReadImage(str(readable))
        except RuntimeError as error:
            raise RequestError(f"cannot read image {path}: {_last_line(error)}") from None


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


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
