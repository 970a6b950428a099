"""Turn the held-out demo study (NIfTI) into real DICOM series for reader and end-to-end tests.

Usage:
    python scripts/make_demo_study.py [--study examples/study] [--out examples/dicom] [--seed 0]

Writes, replacing what was there:
    OUT/ct/CT/            CT study, one series: T2 mapped to HU-like values, stored with
                          Rescale Slope 0.5 and Intercept -1024
    OUT/mr/T2/, OUT/mr/ADC/
                          MR study, two series in one study and frame of reference: T2 on the
                          label grid, ADC on its coarser grid
    OUT/oblique/T2/       MR T2 turned 20° about x and 10° about y around the volume centre
    OUT/oblique/labels/organ.nii.gz
                          the organ labels on that oblique grid
    OUT/shuffled/T2/      MR T2 whose file names and Instance Numbers do not follow slice order
UIDs, dates and orders derive from the seed, so a rerun writes identical files.
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_image_writer import SeriesIdentity, write_image_series

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("ct", "mr", "oblique", "shuffled")
DEMO_DATE = "20240101"
CT_SLOPE, CT_INTERCEPT = 0.5, -1024.0
# value -> scale * value + offset; affine, so nnU-Net's z-score normalisation sees the same input
CT_FROM_T2 = (2.0, -50.0)  # HU-like soft tissue
MR_T2 = (8.0, 400.0)
MR_ADC = (10.0, 800.0)  # ADC-like, in 1e-6 mm²/s
OBLIQUE_DEGREES = (20.0, 10.0)  # about x, then about y


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=REPO / "examples" / "study")
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "dicom")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def demo_uid(seed: int, *keys: str) -> str:
    """A UID that depends only on the seed and the keys."""
    return generate_uid(entropy_srcs=["nnunet-bento demo study", str(seed), *keys])


def identity(seed: int, study: str, series: str, number: int, **fields: object) -> SeriesIdentity:
    """Patient, study and series attributes with UIDs fixed by the seed."""
    return SeriesIdentity(
        patient_id=f"DEMO-{study.upper()}",
        patient_name=f"Demo^{study.capitalize()}",
        study_instance_uid=demo_uid(seed, study, "study"),
        series_instance_uid=demo_uid(seed, study, series, "series"),
        frame_of_reference_uid=demo_uid(seed, study, "frame of reference"),
        accession_number=f"ACC-{study.upper()}",
        series_number=number,
        **fields,
    )


def remap(image: sitk.Image, scale_offset: tuple[float, float]) -> sitk.Image:
    """``scale * image + offset`` in float32, on the same grid."""
    scale, offset = scale_offset
    return sitk.Cast(image, sitk.sitkFloat32) * scale + offset


def rotation(degrees_x: float, degrees_y: float) -> np.ndarray:
    """Rotation about x by ``degrees_x`` after rotation about y by ``degrees_y``."""
    a, b = np.radians([degrees_x, degrees_y])
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return about_x @ about_y


def turned(image: sitk.Image, rotation_matrix: np.ndarray) -> sitk.Image:
    """The same voxels on a grid turned by ``rotation_matrix`` about the volume's centre."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    half = direction @ (np.asarray(image.GetSpacing()) * (np.asarray(image.GetSize()) - 1) / 2)
    centre = np.asarray(image.GetOrigin()) + half
    result = sitk.Image(image)
    result.SetDirection(tuple((rotation_matrix @ direction).ravel()))
    result.SetOrigin(tuple(centre - rotation_matrix @ half))
    return result


def write_series(
    image: sitk.Image,
    folder: Path,
    series: SeriesIdentity,
    seed: int,
    file_order: list[int] | None = None,
    instance_numbers: list[int] | None = None,
) -> list[Path]:
    """Write one series, then fix its SOP Instance UIDs and dates (and Instance Numbers)."""
    paths = write_image_series(image, folder, series, file_order=file_order)
    for path in paths:
        ds = pydicom.dcmread(path)
        index = int(ds.InstanceNumber) - 1  # the writer numbers slices from 1 in z order
        sop_instance_uid = demo_uid(seed, series.series_instance_uid, "slice", str(index))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = DEMO_DATE
        if instance_numbers:
            ds.InstanceNumber = instance_numbers[index]
        ds.save_as(path, enforce_file_format=True)
    return paths


def report(folder: Path, out: Path) -> int:
    """Print a written folder's file count and size; return the size in bytes."""
    files = [p for p in folder.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"{folder.relative_to(out)}/: {len(files)} files, {size / 1024:.0f} KiB")
    return size


def main() -> None:
    """Write the CT, MR, oblique and shuffled demo series and the oblique labels."""
    args = parse_args()
    seed, out = args.seed, args.out
    t2 = sitk.ReadImage(str(args.study / "T2" / "T2.nii.gz"))
    adc = sitk.ReadImage(str(args.study / "ADC" / "ADC.nii.gz"))
    organ = sitk.ReadImage(str(args.study / "labels" / "organ.nii.gz"))
    for study in STUDIES:
        shutil.rmtree(out / study, ignore_errors=True)

    ct = identity(
        seed,
        "ct",
        "CT",
        1,
        modality="CT",
        series_description="CT demo (HU-like)",
        rescale_slope=CT_SLOPE,
        rescale_intercept=CT_INTERCEPT,
    )
    write_series(remap(t2, CT_FROM_T2), out / "ct" / "CT", ct, seed)

    mr_t2 = identity(seed, "mr", "T2", 1, modality="MR", series_description="T2 axial")
    write_series(remap(t2, MR_T2), out / "mr" / "T2", mr_t2, seed)
    mr_adc = identity(seed, "mr", "ADC", 2, modality="MR", series_description="ADC")
    write_series(remap(adc, MR_ADC), out / "mr" / "ADC", mr_adc, seed)

    oblique_rotation = rotation(*OBLIQUE_DEGREES)
    oblique = identity(seed, "oblique", "T2", 1, modality="MR", series_description="T2 oblique")
    write_series(turned(remap(t2, MR_T2), oblique_rotation), out / "oblique" / "T2", oblique, seed)
    labels = out / "oblique" / "labels"
    labels.mkdir(parents=True)
    sitk.WriteImage(turned(organ, oblique_rotation), str(labels / "organ.nii.gz"))

    rng = np.random.default_rng(seed)
    slices = t2.GetSize()[2]
    file_order = [int(k) for k in rng.permutation(slices)]
    instance_numbers = [int(k) + 1 for k in rng.permutation(slices)]
    shuffled = identity(seed, "shuffled", "T2", 1, modality="MR", series_description="T2 shuffled")
    write_series(
        remap(t2, MR_T2), out / "shuffled" / "T2", shuffled, seed, file_order, instance_numbers
    )

    folders = [out / "ct" / "CT", out / "mr" / "T2", out / "mr" / "ADC", out / "oblique" / "T2"]
    folders += [labels, out / "shuffled" / "T2"]
    total = sum(report(folder, out) for folder in folders)
    print(f"wrote {total / 1024:.0f} KiB under {out}")


if __name__ == "__main__":
    main()
