"""PACS round trip without inference: pull a series and push a SEG, against a folder read.

A real Orthanc (scripts/install-orthanc) is started on loopback ports with the series in it:
the demo CT (48x48x24) by default, or with --slices N a 512x512xN CT-like series. Timed, as
medians of --repeats alternating runs:

1. folder: read_dicom_series on the series folder (what /infer does with study_path);
2. pull + read, for DICOMweb (QIDO-RS + WADO-RS) and DIMSE (C-FIND + C-GET): pull_series
   into a new folder, then read_dicom_series on it;
3. push: one BINARY SEG of the series, over STOW-RS and over C-STORE.
Prints the medians and (pull + read + push) / folder for each kind of node.
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from dicom_image_writer import SeriesIdentity, write_image_series
from orthanc import orthanc

from nnunet_bento.io.dicom_seg import write_label_segmentation
from nnunet_bento.io.dicom_series import read_dicom_series
from nnunet_bento.io.dicom_source import AlgorithmIdentity, DicomSource
from nnunet_bento.io.seg_metadata import SegmentationMetadata
from nnunet_bento.pacs.nodes import DicomNode, DicomWebNode, DimseNode
from nnunet_bento.pacs.pull import pull_series
from nnunet_bento.pacs.push import push_files

DEMO_CT = Path(__file__).resolve().parents[2] / "examples" / "dicom" / "ct" / "CT"
IDENTITY = AlgorithmIdentity("nnU-Net bench", "0.1.0", "bench:latest", "0" * 64)


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each run; the runs take turns, so a busy machine slows them alike."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def ct_like_series(folder: Path, slices: int) -> Path:
    """A 512x512 CT-like series of ``slices`` slices: a water cylinder in air."""
    _, y, x = np.ogrid[:slices, :512, :512]
    values = np.where((y - 256) ** 2 + (x - 256) ** 2 < 220**2, 40, -1000)
    image = sitk.GetImageFromArray((values + np.zeros((slices, 1, 1))).astype(np.int16))
    image.SetSpacing((0.7, 0.7, 1.5))
    write_image_series(image, folder, SeriesIdentity(series_description="Bench CT"))
    return folder


def write_seg(source: DicomSource, path: Path) -> Path:
    """A BINARY SEG of two boxes on the source grid."""
    mask = np.zeros(sitk.GetArrayViewFromImage(source.image).shape, np.uint8)
    z, y, x = mask.shape
    mask[z // 4 : z // 2, y // 4 : y // 2, x // 4 : x // 2] = 1
    mask[z // 2 : 3 * z // 4, y // 2 : 3 * y // 4, x // 2 : 3 * x // 4] = 2
    metadata = SegmentationMetadata.from_inline(
        {"algorithm_name": "nnU-Net bench", "segment_names": {1: "liver", 2: "spleen"}}
    )
    write_label_segmentation(mask, source, metadata, IDENTITY, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, help="a 512x512xN series instead of the demo CT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as folder:
        bench(Path(folder), args.repeats, args.slices)


def bench(work: Path, repeats: int, slices: int | None) -> None:
    """Start Orthanc with the series, time the runs and print the figures."""
    series = ct_like_series(work / "series", slices) if slices else DEMO_CT
    source = read_dicom_series(series)
    study = str(source.datasets[0].StudyInstanceUID)
    seg = write_seg(source, work / "seg.dcm")
    pulls = count()
    with orthanc(work / "orthanc") as server:
        server.upload(sorted(series.glob("*.dcm")))
        nodes: dict[str, DicomNode] = {
            "DICOMweb": DicomWebNode(name="web", dicomweb_url=server.dicomweb_url),
            "DIMSE": DimseNode(
                name="dimse", host="127.0.0.1", port=server.dicom_port, ae_title="ORTHANC"
            ),
        }

        def pull_and_read(node: DicomNode) -> Callable[[], object]:
            uid = source.series_instance_uid
            return lambda: read_dicom_series(
                pull_series(node, study, [uid], work / f"pull{next(pulls)}")[0]
            )

        def push(node: DicomNode) -> Callable[[], object]:
            def run() -> None:
                (result,) = push_files(node, [seg])
                assert result.status == "stored", result.reason

            return run

        runs: dict[str, Callable[[], object]] = {"folder read": lambda: read_dicom_series(series)}
        for kind, node in nodes.items():
            runs[f"{kind} pull + read"] = pull_and_read(node)
            runs[f"{kind} push SEG"] = push(node)
        for run in runs.values():
            run()
        seconds = median_seconds(runs, repeats)
    report(seconds, source, seg, repeats, list(nodes))


def report(
    seconds: dict[str, float], source: DicomSource, seg: Path, repeats: int, kinds: list[str]
) -> None:
    x, y, z = source.image.GetSize()
    print(
        f"{x}x{y}x{z} series ({len(source.datasets)} files), SEG {seg.stat().st_size / 1e6:.2f} MB,"
        f" median of {repeats} repeats"
    )
    for name, value in seconds.items():
        print(f"  {name:<24} {value:7.3f} s")
    for kind in kinds:
        total = seconds[f"{kind} pull + read"] + seconds[f"{kind} push SEG"]
        ratio = total / seconds["folder read"]
        print(f"  {kind}: (pull + read + push) / folder read = {ratio:.1f} ({total:.3f} s)")


if __name__ == "__main__":
    main()
