"""Latency of one demo case four ways: warm /infer against three nnU-Net references.

1. floor: in-process nnUNetPredictor.predict_single_npy_array, plus the read and the write;
2. in-process nnUNetPredictor.predict_from_files (warm predictor);
3. the nnUNetv2_predict_from_modelfolder command;
4. warm /infer on a `bentoml serve` started by this script.
All four use the same model, input, folds and mirroring. Prints medians and ratios.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="organ")
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-store-"))
    import SimpleITK as sitk
    import torch
    from conftest import bentoml_serve
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_bento.catalog.store import import_model

    model_dir = REPO / "examples" / "models" / args.model
    image = REPO / "examples" / "study" / "T2" / "T2.nii.gz"
    tta = not args.no_tta
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    predictor = nnUNetPredictor(
        use_mirroring=tta,
        device=torch.device(args.device),
        perform_everything_on_device=args.device == "cuda",
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(model_dir), args.folds, "checkpoint_final.pth"
    )

    def floor() -> None:
        data, properties = SimpleITKIO().read_images([str(image)])
        segmentation = predictor.predict_single_npy_array(data, properties)
        SimpleITKIO().write_seg(segmentation, str(work / "floor.nii.gz"), properties)

    def from_files() -> None:
        predictor.predict_from_files(
            [[str(image)]],
            [str(work / "files" / "case")],
            num_processes_preprocessing=1,
            num_processes_segmentation_export=1,
        )

    (work / "cli_in").mkdir()
    os.symlink(image, work / "cli_in" / "case_0000.nii.gz")

    def cli() -> None:
        command = [
            str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"),
            "-i",
            str(work / "cli_in"),
            "-o",
            str(work / "cli_out"),
            "-m",
            str(model_dir),
            "-f",
            *map(str, args.folds),
            "-device",
            args.device,
            "-npp",
            "1",
            "-nps",
            "1",
            *(["--disable_tta"] if not tta else []),
        ]
        subprocess.run(command, check=True, capture_output=True)

    (work / "files").mkdir()
    floor()
    results = {
        "floor (predict_single_npy_array + read + write)": median_seconds(floor, args.repeats)
    }
    results["in-process predict_from_files"] = median_seconds(from_files, args.repeats)
    results["nnUNetv2_predict_from_modelfolder CLI"] = median_seconds(cli, args.cli_repeats)

    import_model(model_dir, args.model)
    spec = work / "spec.yaml"
    spec.write_text(f"models:\n  - id: {args.model}\n    tag: {args.model}:latest\n")
    with bentoml_serve(spec, work / "serve.log") as served:

        def infer() -> None:
            served.client.infer(
                nnunet_id=args.model,
                study_path=str(image.parent.parent),
                series_folders=["T2"],
                output_dir=str(work / "infer"),
                use_folds=args.folds,
                tta=tta,
            )

        infer()
        results["warm /infer (bentoml serve)"] = median_seconds(infer, args.repeats)

    floor_s = results["floor (predict_single_npy_array + read + write)"]
    infer_s = results["warm /infer (bentoml serve)"]
    name = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    print(
        f"model {args.model}, folds {args.folds}, tta {tta}, device {name}, "
        f"input {sitk.ReadImage(str(image)).GetSize()}"
    )
    for label, seconds in results.items():
        print(f"  {label:55s} {seconds:8.3f} s   {seconds / floor_s:6.2f}x floor")
    print(f"warm /infer / floor = {infer_s / floor_s:.2f} (goal <= 1.25)")
    cli_s = results["nnUNetv2_predict_from_modelfolder CLI"]
    print(f"CLI / warm /infer = {cli_s / infer_s:.1f} (goal >= 10)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
