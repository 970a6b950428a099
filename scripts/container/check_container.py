"""The host-side checks of scripts/test-container against a running image.

- /readyz answers without a token, /model_info only with it, and lists the spec's models;
- /infer by mounted path, through bentoml.SyncHTTPClient, gives the labels (and the grid)
  of in-process `nnunet-bento predict` on the same input and folds, voxel for voxel;
- a path outside the image's roots is refused (403);
- /infer_file, if the image has it: the demo study uploaded as a zip gives the same labels;
- scripts/docker-run runs `nnunet-bento predict` in the same image, with the same labels.

Prints what it checked to stderr and one JSON line of per-check seconds to stdout; exits
non-zero at the first failed check.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[2]

#: (model id, series under the study, folds, model folder): the same folds on both sides,
#: since in-process `-m FOLDER` defaults to fold 0 and the spec's default_args may differ.
CASES = [
    ("organ2d", ["T2"], [0], "examples/models/organ2d"),
    ("organ", ["T2"], [0, 1], "examples/models/organ"),
]


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    print(f"  ok: {message}", file=sys.stderr, flush=True)


def same_labels(expected: Path, actual: Path) -> None:
    a, b = sitk.ReadImage(str(expected)), sitk.ReadImage(str(actual))
    x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    check(x.shape == y.shape, f"{actual.name}: shape {y.shape} as in-process")
    check(
        np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection()),
        f"{actual.name}: spacing, origin and direction as in-process",
    )
    differing = int((x != y).sum())
    check(
        differing == 0,
        f"{actual} equals {expected} voxel for voxel (labels {np.unique(x).tolist()}, "
        f"{differing} of {x.size} voxels differ)",
    )


def check_upload(args: argparse.Namespace, expected: Path) -> None:
    """/infer_file: the demo study as a zip, the request as a field; the answer is a zip of
    the outputs whose prediction equals in-process predict's."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((REPO / "examples/study").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(REPO / "examples/study").as_posix())
    fields = {"nnunet_id": "organ2d", "series_folders": ["T2"], "use_folds": [0], "tta": True}
    with httpx.Client(base_url=args.url, timeout=600) as http:
        answer = http.post(
            "/infer_file",
            headers={"Authorization": f"Bearer {args.token}"},
            files={"archive": ("study.zip", buffer.getvalue(), "application/zip")},
            data={"request": json.dumps(fields)},
        )
    failed = "" if answer.status_code == 200 else f" {answer.text[:300]}"
    check(answer.status_code == 200, f"/infer_file: {answer.status_code}{failed}")
    out = args.work / "upload"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as result:
        result.extractall(out)
    response = json.loads((out / "response.json").read_text())
    check(response["status"] == "done", "/infer_file: response.json says done")
    same_labels(expected, out / "stage_0" / "prediction.nii.gz")


def in_process(model_folder: str, series: list[str], folds: list[int], out: Path) -> Path:
    command = [
        str(REPO / ".venv/bin/nnunet-bento"),
        "predict",
        "-i",
        *[str(REPO / "examples/study" / s) for s in series],
        "-m",
        str(REPO / model_folder),
        "-o",
        str(out),
        "-f",
        *map(str, folds),
        "-t",
    ]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    return out / "prediction.nii.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--host-out", type=Path, required=True, help="mounted at /data/out")
    parser.add_argument("--work", type=Path, required=True, help="in-process outputs")
    parser.add_argument(
        "--container-study", default="/data/in/study", help="examples/study in the container"
    )
    args = parser.parse_args()
    timings: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        timings[name] = round(time.monotonic() - started, 1)

    import bentoml

    try:
        started = time.monotonic()
        with httpx.Client(base_url=args.url, timeout=60) as http:
            check(http.get("/readyz").status_code == 200, "/readyz answers without a token")
            check(http.get("/model_info").status_code == 401, "/model_info without token: 401")
            info = http.get("/model_info", headers={"Authorization": f"Bearer {args.token}"})
            check(info.status_code == 200, "/model_info with the token: 200")
            spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
            expected = {model["id"] for model in spec["models"]}
            models = info.json()
            check(set(models) == expected, f"/model_info lists {sorted(expected)}")
            check(all(models[m]["available"] for m in expected), "every demo model is available")
            # The upload route lives on the mounted app: probe it (404 where it is absent).
            probe = http.post("/infer_file", headers={"Authorization": f"Bearer {args.token}"})
            has_upload = probe.status_code != 404
        timed("model_info", started)

        client = bentoml.SyncHTTPClient(args.url, token=args.token, timeout=600)
        try:
            for model_id, series, folds, folder in CASES:
                started = time.monotonic()
                response = client.infer(
                    nnunet_id=model_id,
                    study_path=args.container_study,
                    series_folders=series,
                    output_dir=f"/data/out/{model_id}",
                    use_folds=folds,
                    tta=True,
                )
                check(response["status"] == "done", f"/infer {model_id} folds {folds}: done")
                served = args.host_out / model_id / "stage_0" / "prediction.nii.gz"
                timed(f"infer_{model_id}", started)
                started = time.monotonic()
                local = in_process(folder, series, folds, args.work / f"inproc-{model_id}")
                timed(f"in_process_{model_id}", started)
                same_labels(local, served)

            started = time.monotonic()
            try:
                client.infer(
                    nnunet_id="organ2d",
                    study_path=args.container_study,
                    series_folders=["T2"],
                    output_dir="/tmp/outside-the-root",
                )
                raise CheckFailed("an output_dir outside NNUNET_BENTO_OUTPUT_ROOT was accepted")
            except bentoml.exceptions.BentoMLException as error:
                check(
                    getattr(error, "error_code", None) == 403,
                    f"output_dir outside the root: {getattr(error, 'error_code', error)}",
                )
            timed("roots", started)
        finally:
            client.close()

        if has_upload:
            started = time.monotonic()
            check_upload(args, args.work / "inproc-organ2d" / "prediction.nii.gz")
            timed("infer_file", started)
        else:
            print("  skipped: /infer_file (the upload route has not landed)", file=sys.stderr)

        # scripts/docker-run builds a `docker run` command; run it with this engine.
        started = time.monotonic()
        out = args.work / "docker-run"
        out.mkdir(parents=True, exist_ok=True)
        dry = subprocess.run(
            [
                str(REPO / "scripts/docker-run"),
                "-c",
                args.image,
                "--gpus",
                "",
                "--dry-run",
                "-i",
                str(REPO / "examples/study/T2"),
                "-m",
                str(REPO / "examples/models/organ2d"),
                "-o",
                str(out),
                "-f",
                "0",
                "-t",
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        command = shlex.split(dry.stdout)
        check(command[:2] == ["docker", "run"], "scripts/docker-run --dry-run: a docker command")
        command[0] = args.engine
        if args.engine == "podman":
            command.insert(2, "--no-healthcheck")
        ran = subprocess.run(command, capture_output=True, text=True, check=False)
        if ran.returncode != 0:
            print(ran.stdout[-3000:], ran.stderr[-3000:], sep="\n", file=sys.stderr)
        check(ran.returncode == 0, f"scripts/docker-run's command with {args.engine}: exit 0")
        same_labels(args.work / "inproc-organ2d" / "prediction.nii.gz", out / "prediction.nii.gz")
        timed("docker_run", started)
    except CheckFailed as failure:
        print(f"  FAILED: {failure}", file=sys.stderr, flush=True)
        print(json.dumps(timings))
        return 1
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
