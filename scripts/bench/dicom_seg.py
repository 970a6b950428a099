"""DICOM SEG writing: our BINARY writer against dcmqi's itkimage2segimage, and our LABELMAP.

One 512x512x200 CT-like series (written with write_image_series to a temporary folder), one
mask of 5 sphere labels and one DCMQI template. Timed, as medians of --repeats runs:

1. ours, BINARY: write_label_segmentation on the mask and source already in memory (as in
   the server), after one warm-up run that loads highdicom's module tables;
2. dcmqi itkimage2segimage --skip 0 and --skip 1 (skip empty slices; 1 is dcmqi 1.5's
   default): a new process that reads the series, the NRRD mask and the template;
3. ours, LABELMAP with compression (RLE Lossless).
The runs take turns for --repeats rounds. Prints the medians, ours/dcmqi --skip 1 (goal
<= 0.5) and the LABELMAP-compressed/BINARY file size (goal <= 1/12).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from dicom_image_writer import SeriesIdentity, write_image_series

from nnunet_bento.io.dicom_seg import write_label_segmentation
from nnunet_bento.io.dicom_source import AlgorithmIdentity, DicomSource
from nnunet_bento.io.seg_metadata import SegmentationMetadata

SHAPE = (200, 512, 512)  # z, y, x
SPHERES = [(50, 150, 150, 40), (100, 300, 300, 60), (150, 200, 400, 30), (80, 400, 100, 50)]
SPHERES.append((120, 256, 256, 20))
ORGANS = ["liver", "spleen", "kidney", "pancreas", "stomach"]
IDENTITY = AlgorithmIdentity("nnU-Net bench", "0.1.0", "bench:latest", "0" * 64)
ITKIMAGE2SEGIMAGE = Path(sys.executable).parent / "itkimage2segimage"


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each run; the runs take turns, so a busy machine slows them alike."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def ct_source(folder: Path) -> DicomSource:
    """A CT-like series: a water cylinder in air, 0.7 x 0.7 x 1.5 mm."""
    _, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = (y - 256) ** 2 + (x - 256) ** 2 < 220**2
    values = np.where(body, 40, -1000) + np.zeros(SHAPE, np.int16)
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 1.5))
    image.SetOrigin((-179.0, -179.0, -150.0))
    paths = write_image_series(image, folder, SeriesIdentity(rescale_intercept=-1024))
    datasets = [pydicom.dcmread(path) for path in paths]
    return DicomSource(image=image, datasets=datasets, folder=folder)


def sphere_mask() -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask = np.zeros(SHAPE, np.uint8)
    for label, (cz, cy, cx, radius) in enumerate(SPHERES, start=1):
        mask[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius**2] = label
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="highdicom workers for RLE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dicom-seg-") as folder:
        bench(Path(folder), args.repeats, args.workers)


def bench(work: Path, repeats: int, workers: int) -> None:
    """Write the inputs under ``work``, time the runs and print the figures."""
    source = ct_source(work / "series")
    mask = sphere_mask()
    metadata = SegmentationMetadata.from_inline(
        {"algorithm_name": "nnU-Net bench", "segment_names": ORGANS}
    )
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(source.image)
    sitk.WriteImage(mask_image, work / "mask.nrrd", useCompression=True)
    (work / "template.json").write_text(json.dumps(metadata.to_dcmqi()))
    outputs = {name: work / f"{name}.dcm" for name in ("binary", "labelmap", "dcmqi")}

    def ours(kind: str, compress: bool) -> Callable[[], object]:
        return lambda: write_label_segmentation(
            mask,
            source,
            metadata,
            IDENTITY,
            outputs[kind],
            segmentation_type=kind,
            compress=compress,
            workers=workers,
        )

    def dcmqi(skip: int) -> Callable[[], object]:
        command = [
            ITKIMAGE2SEGIMAGE,
            *("--inputImageList", work / "mask.nrrd"),
            *("--inputDICOMDirectory", source.folder),
            *("--inputMetadata", work / "template.json"),
            *("--outputDICOM", outputs["dcmqi"]),
            *("--skip", str(skip)),
        ]
        return lambda: subprocess.run(command, check=True, capture_output=True)

    ours("binary", False)()
    runs = {
        "ours BINARY": ours("binary", False),
        "dcmqi --skip 0": dcmqi(0),
        "dcmqi --skip 1": dcmqi(1),
        "ours LABELMAP RLE": ours("labelmap", True),
    }
    seconds = median_seconds(runs, repeats)
    sizes = {name: path.stat().st_size / 1e6 for name, path in outputs.items()}
    print(f"{SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} series, 5 sphere labels, {repeats} repeats")
    for name, value in seconds.items():
        print(f"  {name:<20} {value:6.2f} s")
    ratio = seconds["ours BINARY"] / seconds["dcmqi --skip 1"]
    print(f"  ours BINARY / dcmqi --skip 1: {ratio:.2f} (goal <= 0.5)")
    print(
        f"  sizes: BINARY {sizes['binary']:.2f} MB, dcmqi {sizes['dcmqi']:.2f} MB, "
        f"LABELMAP RLE {sizes['labelmap']:.2f} MB"
    )
    size_ratio = sizes["labelmap"] / sizes["binary"]
    print(f"  LABELMAP RLE / BINARY size: {size_ratio:.3f} = 1/{1 / size_ratio:.1f} (goal <= 1/12)")


if __name__ == "__main__":
    main()
