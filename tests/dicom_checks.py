"""Independent readers of the DICOM we write: dciodvfy, highdicom, dcmqi and rt-utils."""

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk

from nnunet_bento.io.dicom_source import DicomSource

TOOLS = Path(sys.executable).parent


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines; a failing exit status with no Error and no Warning is one too."""
    result = subprocess.run([TOOLS / "dciodvfy", path], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if result.returncode != 0 and not any(line.startswith(("Error", "Warning")) for line in lines):
        errors.append(f"dciodvfy exited with {result.returncode}: {result.stderr}")
    return errors


def highdicom_labels(path: Path, source: DicomSource, label_of: dict[str, int]) -> np.ndarray:
    """The label volume highdicom reads from a BINARY or LABELMAP SEG, frame by source image.

    ``label_of`` maps each SegmentLabel to the label value it stands for.
    """
    seg = hd.seg.segread(path)
    numbers = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source.datasets],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    lookup = np.zeros(int(numbers.max(initial=0)) + 1 + len(seg.SegmentSequence), np.uint8)
    for item in seg.SegmentSequence:
        if item.SegmentNumber != 0:
            lookup[int(item.SegmentNumber)] = label_of[item.SegmentLabel]
    return lookup[numbers]


def dcmqi_labels(
    path: Path, source: DicomSource, out: Path, label_of: dict[str, int]
) -> np.ndarray:
    """The label volume dcmqi's segimage2itkimage reads, pasted onto the source grid.

    Each image dcmqi writes must share the source's direction and spacing, and its origin must
    lie on a source slice: the SEG is in the source's physical space.
    """
    out.mkdir()
    subprocess.run(
        [TOOLS / "segimage2itkimage", "--inputDICOM", path, "--outputDirectory", out],
        check=True,
        capture_output=True,
    )
    meta = json.loads((out / "meta.json").read_text())
    labels = np.zeros(sitk.GetArrayViewFromImage(source.image).shape, np.uint8)
    for index, group in enumerate(meta["segmentAttributes"], start=1):
        image = sitk.ReadImage(out / f"{index}.nrrd")
        np.testing.assert_allclose(image.GetDirection(), source.image.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(image.GetSpacing(), source.image.GetSpacing(), rtol=1e-5)
        start = source.image.TransformPhysicalPointToContinuousIndex(image.GetOrigin())
        np.testing.assert_allclose(start, np.round(start), atol=1e-3)
        x, y, z = (round(v) for v in start)
        assert (x, y) == (0, 0)
        values = sitk.GetArrayFromImage(image)
        window = labels[z : z + values.shape[0]]
        for segment in group:
            window[values == segment["labelID"]] = label_of[segment["SegmentLabel"]]
    return labels


def rtstruct_masks(path: Path, source: DicomSource) -> dict[str, np.ndarray]:
    """Each ROI of an RT Struct rasterised by rt-utils, in the source's (z, y, x) order."""
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_from(str(source.folder), str(path))
    loaded = [ds.SOPInstanceUID for ds in rtstruct.series_data]
    order = [loaded.index(ds.SOPInstanceUID) for ds in source.datasets]
    return {
        name: np.transpose(rtstruct.get_roi_mask_by_name(name), (2, 0, 1))[order]
        for name in rtstruct.get_roi_names()
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)
