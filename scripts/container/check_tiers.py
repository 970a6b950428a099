"""scripts/test-container's check of deploy/kubernetes: the two tiers as its Deployments
start them (args and workingDir read from the manifests), in two containers of the image
that share one network namespace with no network at all (`--network none`): the runner
URL is then 127.0.0.1 instead of the runner's Service name. One /infer through the API,
sent from inside, must give the labels of in-process predict (check_container.py's output).
This also shows that the image starts and serves with no network: the models are inside.

Prints what it checked to stderr; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"


def container_spec(file: str, name: str) -> dict:
    for doc in yaml.safe_load_all((DEPLOY / file).read_text()):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == name:
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            return container
    raise SystemExit(f"no Deployment {name} in {file}")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


INSIDE = """
import json, sys, time, urllib.request, urllib.error
url, token, body = sys.argv[1], sys.argv[2], sys.argv[3]
if body == "ready":
    for _ in range(180):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=5)
            sys.exit(0)
        except Exception:
            time.sleep(1)
    sys.exit(1)
request = urllib.request.Request(url + "/infer", data=body.encode(), method="POST",
    headers={"Content-Type": "application/json", "Authorization": "Bearer " + token})
try:
    print(urllib.request.urlopen(request, timeout=600).read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode(), file=sys.stderr)
    sys.exit(1)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--host-out", type=Path, required=True, help="mounted at /data/out")
    parser.add_argument("--expected", type=Path, required=True, help="in-process prediction")
    parser.add_argument("--user-opt", action="append", default=[])
    args = parser.parse_args()

    runner = container_spec("runner.yaml", "nnunet-bento-runner")
    api = container_spec("api.yaml", "nnunet-bento-api")
    api_args = list(api["args"])
    api_args[api_args.index("--runner-url") + 1] = "http://127.0.0.1:3001"
    names = ("nnunet-bento-test-runner", "nnunet-bento-test-api")
    for name in names:
        podman("rm", "-f", name, check=False)
    started = time.monotonic()
    try:
        podman(
            "run", "-d", "--name", names[0], "--network", "none", "--no-healthcheck",
            *args.user_opt, "-w", runner["workingDir"], args.image, *runner["args"],
        )  # fmt: skip
        podman(
            "run", "-d", "--name", names[1], "--network", f"container:{names[0]}",
            "--no-healthcheck", *args.user_opt, "-w", api["workingDir"],
            "-e", f"NNUNET_BENTO_API_TOKEN={args.token}",
            "-v", f"{REPO / 'examples/study'}:/data/in/study:ro",
            "-v", f"{args.host_out}:/data/out:rw",
            args.image, *api_args,
        )  # fmt: skip
        url = "http://127.0.0.1:3000"
        ready = podman("exec", names[1], "python", "-c", INSIDE, url, "", "ready", check=False)
        if ready.returncode != 0:
            for name in names:
                print(podman("logs", "--tail", "30", name, check=False).stderr, file=sys.stderr)
            raise SystemExit("the two tiers did not become ready")
        print(
            f"  ok: runner and API up as deploy/kubernetes starts them, no network "
            f"({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
        )
        body = {
            "nnunet_id": "organ2d",
            "study_path": "/data/in/study",
            "series_folders": ["T2"],
            "output_dir": "/data/out/tiers",
            "use_folds": [0],
            "tta": True,
        }
        infer = podman(
            "exec", names[1], "python", "-c", INSIDE, url, args.token, json.dumps(body),
            check=False,
        )  # fmt: skip
        if infer.returncode != 0:
            print(infer.stdout, infer.stderr, file=sys.stderr)
            raise SystemExit("/infer through the two tiers failed")
        assert json.loads(infer.stdout)["status"] == "done"
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(args.expected)))
        served = sitk.GetArrayFromImage(
            sitk.ReadImage(str(args.host_out / "tiers" / "stage_0" / "prediction.nii.gz"))
        )
        if expected.shape != served.shape or not np.array_equal(expected, served):
            raise SystemExit("the two tiers' labels differ from in-process predict")
        print("  ok: /infer through API and runner equals in-process predict", file=sys.stderr)
    finally:
        for name in reversed(names):
            podman("rm", "-f", "-t", "5", name, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
