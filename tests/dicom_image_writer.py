"""Write a SimpleITK volume as a DICOM CT or MR image series (one file per slice).

Used to build the demo study and test series. Geometry follows PS3.3 C.7.6.2: Image
Orientation (Patient) holds the row and column direction cosines, Image Position (Patient)
the centre of the first voxel of each slice.
"""

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass
class SeriesIdentity:
    """Patient, study and series attributes shared by the slices of one series."""

    modality: str = "CT"
    series_description: str = "Demo series"
    patient_id: str = "DEMO-001"
    patient_name: str = "Demo^Patient"
    study_instance_uid: str = field(default_factory=generate_uid)
    series_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_id: str = "1"
    series_number: int = 1
    accession_number: str = "ACC0001"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0


def _slice_dataset(
    identity: SeriesIdentity, image: sitk.Image, pixels: np.ndarray, index: int
) -> pydicom.Dataset:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, index)))
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[identity.modality]
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    today = datetime.date.today().strftime("%Y%m%d")
    ds.SOPClassUID = SOP_CLASSES[identity.modality]
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = identity.modality
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = identity.study_id
    ds.AccessionNumber = identity.accession_number
    ds.ReferringPhysicianName = "Demo^Referrer"
    ds.OperatorsName = "Demo^Operator"
    ds.Manufacturer = "nnunet-bento demo"
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = identity.series_number
    ds.SeriesDescription = identity.series_description
    ds.PatientPosition = "HFS"
    ds.Laterality = ""
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [f"{image.GetSpacing()[1]:.6f}", f"{image.GetSpacing()[0]:.6f}"]
    ds.SliceThickness = f"{image.GetSpacing()[2]:.6f}"
    ds.SliceLocation = f"{float(np.dot(position, direction[:, 2])):.6f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{identity.rescale_slope:g}"
    ds.RescaleIntercept = f"{identity.rescale_intercept:g}"
    if identity.modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = "90"
        ds.RepetitionTime = "4000"
        ds.EchoTrainLength = "1"
    ds.AcquisitionNumber = 1
    ds.PixelData = pixels[index].astype("<i2").tobytes()
    return ds


def write_image_series(
    image: sitk.Image, folder: Path, identity: SeriesIdentity, file_order: list[int] | None = None
) -> list[Path]:
    """Write ``image`` as one file per slice; ``file_order`` renames files to test sorting."""
    folder.mkdir(parents=True, exist_ok=True)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    stored = np.round((values - identity.rescale_intercept) / identity.rescale_slope)
    pixels = np.clip(stored, -32768, 32767).astype(np.int16)
    order = list(range(pixels.shape[0])) if file_order is None else [int(i) for i in file_order]
    paths = []
    for file_index, slice_index in enumerate(order):
        path = folder / f"IM{file_index:04d}.dcm"
        _slice_dataset(identity, image, pixels, slice_index).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
