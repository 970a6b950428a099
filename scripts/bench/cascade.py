"""Speed of an organ -> lesion cascade in `crop` mode against `intersect` mode.

Both run the same pipeline in-process on the demo study, placed in a field of view twice as
wide (noise around it) as a clinical series would be. The organ stage keeps the prostate
(class_idx 1) and drops components below --organ-confidence. `intersect` predicts the lesion model
on the whole volume; `crop` predicts it on the organ's box plus crop_padding. Prints the
medians, the speed-up and the agreement (Dice) of the lesion masks.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from demo_pipeline import REPO, demo_pipeline

from nnunet_bento.request import InferenceRequest

STUDY = REPO / "examples" / "study"


def widened(image: sitk.Image, factor: int, rng: np.random.Generator) -> sitk.Image:
    """``image`` in the middle of a field of view ``factor`` times wider in y and x."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    z, y, x = array.shape
    background = array[:, :4, :4]
    wide = rng.normal(background.mean(), background.std() + 1e-3, (z, y * factor, x * factor))
    y0, x0 = (y * factor - y) // 2, (x * factor - x) // 2
    wide[:, y0 : y0 + y, x0 : x0 + x] = array
    result = sitk.GetImageFromArray(wide.astype(np.float32))
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    result.SetOrigin(image.TransformIndexToPhysicalPoint((-x0, -y0, 0)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--organ-confidence",
        type=float,
        default=0.95,
        help="min_confidence of the organ stage: drops the specks the demo model predicts in "
        "the added field of view",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    study = Path(tempfile.mkdtemp(prefix="bench-cascade-"))
    t2 = widened(sitk.ReadImage(str(STUDY / "T2" / "T2.nii.gz")), args.factor, rng)
    adc = sitk.Resample(
        sitk.ReadImage(str(STUDY / "ADC" / "ADC.nii.gz")),
        t2,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    for name, image in (("T2", t2), ("ADC", adc)):
        (study / name).mkdir()
        sitk.WriteImage(image, str(study / name / f"{name}.nii.gz"))
    pipeline = demo_pipeline("organ", "lesion")
    seconds, lesions = {}, {}
    for mode in ("intersect", "crop"):
        request = InferenceRequest(
            nnunet_id=["organ", "lesion"],
            study_path=str(study),
            series_folders=[["T2"], ["T2", "ADC"]],
            output_dir=str(study / f"out-{mode}"),
            cascade_mode=mode,
            class_idx=[[1], None],
            min_confidence=[args.organ_confidence, None],
        )
        response = pipeline.run(request)
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            pipeline.run(request)
            timings.append(time.perf_counter() - started)
        seconds[mode] = statistics.median(timings)
        lesions[mode] = sitk.GetArrayFromImage(sitk.ReadImage(response.nifti_prediction[1])) > 0
    overlap = np.logical_and(lesions["crop"], lesions["intersect"]).sum()
    dice = 2 * overlap / max(lesions["crop"].sum() + lesions["intersect"].sum(), 1)
    device = pipeline.predictor.selector.describe()["device"]
    print(f"organ -> lesion on {t2.GetSize()} voxels, device {device}")
    for mode, value in seconds.items():
        print(f"  cascade_mode {mode:9s} {value:7.2f} s")
    print(
        f"crop speed-up: {seconds['intersect'] / seconds['crop']:.2f}x; "
        f"lesion Dice crop vs intersect {dice:.3f} ({lesions['intersect'].sum()} voxels)"
    )


if __name__ == "__main__":
    main()
