"""Segment the demo study through a running server's HTTP API and score it against its labels."""

import argparse
from pathlib import Path

import bentoml
import numpy as np
import SimpleITK as sitk

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STUDY = EXAMPLES / "study"
DICOM_MR = EXAMPLES / "dicom" / "mr"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def labels_of(path: str | Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://localhost:12345")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"))
    args = parser.parse_args()
    output = args.output_dir.resolve()
    client = bentoml.SyncHTTPClient(args.url, server_ready_timeout=300, timeout=600)
    print("models:", ", ".join(client.model_info()))
    runs = [
        ("organ", ["T2"], "organ", {1: "prostate", 2: "bladder"}),
        ("lesion", ["T2", "ADC"], "lesion", {1: "lesion"}),
    ]
    for model, series, truth, names in runs:
        response = client.infer(
            nnunet_id=model,
            study_path=str(STUDY),
            series_folders=series,
            output_dir=str(output / model),
            save_proba_map=True,
            proba_threshold=0.1,
            save_preview=True,
            overwrite=True,
        )
        predicted = labels_of(response["nifti_prediction"][0])
        expected = labels_of(STUDY / "labels" / f"{truth}.nii.gz")
        scores = ", ".join(
            f"{name} Dice {dice(predicted == value, expected == value):.3f}"
            for value, name in names.items()
        )
        print(
            f"{model}: {response['nifti_prediction'][0]} ({scores}; "
            f"{response['time_elapsed']:.2f} s on {response['device']}); "
            f"preview {response['preview'][0]}"
        )
    cascade = client.infer(
        nnunet_id=["organ", "lesion"],
        study_path=str(DICOM_MR),
        is_dicom=True,
        series_folders=[["T2"], ["T2", "ADC"]],
        output_dir=str(output / "dicom-cascade"),
        cascade_mode="crop",
        save_rt_struct_output=True,
        save_dicom_sr=True,
        save_preview=True,
        overwrite=True,
    )
    written = [
        *cascade["dicom_segmentation"],
        *cascade["dicom_struct"],
        *cascade["dicom_sr"],
        *cascade["preview"],
    ]
    print(f"DICOM organ -> lesion cascade: {', '.join(written)}")


if __name__ == "__main__":
    main()
