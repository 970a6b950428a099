"""DICOM bombs: our reader against pydicom's own, each in a fresh process, on the same files.

Two files of 1.5 MB that inflate to 1.5 GB, written as the tests write them: "declared"
(Rows × Columns × NumberOfFrames declare 1.5 GB of pixels) and "hidden" (a 64 × 64 header
with 1.5 GB of deflated pixel data behind it). The reference is what the server did before:
`pydicom.dcmread(stop_before_pixels=True)`, which inflates the whole dataset at once. Figures
per bomb: seconds and peak resident memory growth of each reader, and the ratio ours/pydicom.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import pydicom  # noqa: E402
from test_dicom_bombs import DEFAULT_MAX_VOXELS, write_bombs  # noqa: E402

READERS = {
    "ours": "from nnunet_bento.io.dicom_series import read_dicom_series as read\n"
    "call = lambda folder: read(folder, {max_voxels})",
    "pydicom": "import pydicom\n"
    "call = lambda folder: [pydicom.dcmread(p, stop_before_pixels=True) for p in "
    "folder.iterdir()]",
}
MEASURE = """
import json, resource, sys, time
from pathlib import Path
{reader}
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before, started = peak(), time.perf_counter()
try:
    call(Path(sys.argv[1]))
    raised = None
except Exception as error:
    raised = type(error).__name__
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "raised": raised, "growth_mib": peak() - before}}))
"""


def bombs(folder: Path) -> dict[str, Path]:
    """The declared and hidden bombs of the tests, one series folder each."""
    template = pydicom.dcmread(REPO / "examples" / "dicom" / "mr" / "T2" / "IM0000.dcm")
    del template.PixelData
    write_bombs(template, folder)
    return {name: folder / name for name in ("declared", "hidden")}


def measure(reader: str, series: Path) -> dict:
    code = MEASURE.format(reader=READERS[reader].format(max_voxels=DEFAULT_MAX_VOXELS))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, str(series)], capture_output=True, text=True, check=True
    )
    return {**json.loads(done.stdout.splitlines()[-1]), "wall": time.perf_counter() - started}


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bombs-") as folder:
        for name, series in bombs(Path(folder)).items():
            size = (series / "IM0000.dcm").stat().st_size / 2**20
            ours, theirs = measure("ours", series), measure("pydicom", series)
            print(
                f"{name} ({size:.1f} MiB on disk): ours {ours['seconds']:.2f} s, "
                f"+{ours['growth_mib']:.0f} MiB, {ours['raised']}; pydicom "
                f"{theirs['seconds']:.2f} s, +{theirs['growth_mib']:.0f} MiB, {theirs['raised']}; "
                f"memory ours/pydicom {ours['growth_mib'] / max(theirs['growth_mib'], 1):.3f}"
            )


if __name__ == "__main__":
    main()
