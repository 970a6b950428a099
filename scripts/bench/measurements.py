"""What the measurements cost on the clinical-size case, as a share of the request's time.

The case is scale.py's: the demo T2 tiled 2x8x8 (z, y, x), 7.1 M voxels, the organ model,
fold 0, no mirroring. The pipeline runs in-process (CLI runners), warm, interleaved: with
save_statistics (the default) and without it, --repeats times each. Figures:

1. the measure step's seconds over the whole request's, from the response's timings;
2. the request with statistics over the request without (the reference, same process).
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from demo_pipeline import REPO, demo_pipeline

from nnunet_bento.request import InferenceRequest


def tiled_case(folder: Path, tile: tuple[int, int, int]) -> Path:
    """The demo T2 tiled ``tile`` (z, y, x) times, written as ``folder``/T2/T2.nii.gz."""
    image = sitk.ReadImage(str(REPO / "examples" / "study" / "T2" / "T2.nii.gz"))
    tiled = sitk.GetImageFromArray(np.tile(sitk.GetArrayFromImage(image), tile))
    tiled.SetSpacing(image.GetSpacing())
    tiled.SetOrigin(image.GetOrigin())
    tiled.SetDirection(image.GetDirection())
    (folder / "T2").mkdir(parents=True)
    sitk.WriteImage(tiled, str(folder / "T2" / "T2.nii.gz"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile", type=int, nargs=3, default=(2, 8, 8), help="z y x tiles")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    study = tiled_case(Path(tempfile.mkdtemp(prefix="bench-measure-")), tuple(args.tile))
    pipeline = demo_pipeline("organ")

    def run(save_statistics: bool, index: int) -> tuple[float, float]:
        request = InferenceRequest(
            nnunet_id="organ",
            study_path=str(study),
            series_folders=["T2"],
            output_dir=str(study / f"out-{save_statistics}-{index}"),
            use_folds=[0],
            tta=False,
            save_statistics=save_statistics,
        )
        response = pipeline.run(request)
        return response.time_elapsed, response.timings.get("measure", 0.0)

    run(True, -1)
    with_statistics, without, shares = [], [], []
    for index in range(args.repeats):
        elapsed, measure = run(True, index)
        with_statistics.append(elapsed)
        shares.append(measure / elapsed)
        without.append(run(False, index)[0])
        print(
            f"pair {index + 1}: with statistics {elapsed:.2f} s (measure {measure:.2f} s), "
            f"without {without[-1]:.2f} s"
        )
    print(
        f"measure step / request: {statistics.median(shares):.4f} "
        f"({min(shares):.4f} to {max(shares):.4f}); with / without statistics: "
        f"{statistics.median(with_statistics) / statistics.median(without):.3f}"
    )


if __name__ == "__main__":
    main()
