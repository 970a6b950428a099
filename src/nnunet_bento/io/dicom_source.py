"""Plain data shared by the DICOM reader and writers."""

from dataclasses import dataclass
from pathlib import Path

import pydicom
import SimpleITK as sitk


@dataclass(frozen=True)
class DicomSource:
    """A DICOM image series read as one volume.

    ``datasets`` are the slices sorted along the slice normal, in the same order as the
    volume's z axis (index k of the array is ``datasets[k]``); writers reference them.
    """

    image: sitk.Image
    datasets: list[pydicom.Dataset]
    folder: Path

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


@dataclass(frozen=True)
class AlgorithmIdentity:
    """What every DICOM output says about the algorithm and the model that made it."""

    name: str
    version: str
    model_tag: str
    checkpoint_sha256: str
