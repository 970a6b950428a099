"""Upload round trip against /infer by path, on the demo study, measured in one run.

The same request (organ, T2) runs warm by path (the server reads and writes the shared
disk) and through /infer_file (pack, upload, run, zip, download, extract), interleaved.
Prints the median of each and the ratio upload / by path.

    .venv/bin/python scripts/bench/upload.py [--repeats 5]
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
STUDY = REPO / "examples" / "study"
FIELDS = {"nnunet_id": "organ", "series_folders": ["T2"], "use_folds": [0]}


def by_path(url: str, output: Path) -> None:
    body = FIELDS | {"study_path": str(STUDY), "output_dir": str(output)}
    httpx.post(f"{url}/infer", json=body, timeout=600).raise_for_status()


def by_upload(url: str, output: Path) -> None:
    from nnunet_bento.client import pack_study

    archive = pack_study(STUDY, output.with_suffix(".zip"), ["T2"])
    response = httpx.post(
        f"{url}/infer_file",
        files={"archive": (archive.name, archive.read_bytes(), "application/zip")},
        data={"request": json.dumps(FIELDS)},
        timeout=600,
    )
    response.raise_for_status()
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-store-"))
    from conftest import bentoml_serve, import_demo_models

    import_demo_models()
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    times: dict[str, list[float]] = {"by path": [], "upload": []}
    with bentoml_serve(REPO / "model-serve-spec.yaml", work / "serve.log") as served:
        by_path(served.url, work / "warm")
        for repeat in range(args.repeats):
            for name, run in (("by path", by_path), ("upload", by_upload)):
                started = time.perf_counter()
                run(served.url, work / f"{name.replace(' ', '-')}-{repeat}")
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name}: median {median:.3f} s over {args.repeats} runs")
    print(f"upload round trip / by path: {medians['upload'] / medians['by path']:.2f}")


if __name__ == "__main__":
    main()
