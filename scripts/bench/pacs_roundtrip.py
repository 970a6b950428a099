"""Pull + infer + push through a real Orthanc against /infer on the same series from a folder.

Orthanc (scripts/install-orthanc) starts on loopback ports holding the demo MR study; the
server gets it as a DICOMweb node. The same request (organ on T2, DICOM out) runs warm by
folder and by `dicom_source` + `push_to`, interleaved; prints the medians and their ratio.

    .venv/bin/python scripts/bench/pacs_roundtrip.py [--repeats 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
MR = REPO / "examples" / "dicom" / "mr"


def infer(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/infer", json=body, timeout=600)
    response.raise_for_status()
    return response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-store-"))
    from conftest import bentoml_serve, import_demo_models
    from orthanc import orthanc

    import_demo_models()
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    first = pydicom.dcmread(min((MR / "T2").glob("*.dcm")), stop_before_pixels=True)
    common = {"nnunet_id": "organ", "is_dicom": True, "overwrite": True}
    with orthanc(work / "orthanc") as pacs:
        pacs.upload(list((MR / "T2").glob("*.dcm")))
        nodes = {"nodes": [{"name": "pacs", "dicomweb_url": pacs.dicomweb_url}]}
        (work / "nodes.yaml").write_text(yaml.safe_dump(nodes))
        os.environ["NNUNET_BENTO_DICOM_NODES"] = str(work / "nodes.yaml")
        runs = {
            "folder": common
            | {"study_path": str(MR), "series_folders": ["T2"], "output_dir": str(work / "a")},
            "pull + push": common
            | {
                "dicom_source": {"node": "pacs", "study_uid": first.StudyInstanceUID},
                "series_folders": [first.SeriesInstanceUID],
                "push_to": ["pacs"],
                "output_dir": str(work / "b"),
            },
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        with bentoml_serve(REPO / "model-serve-spec.yaml", work / "serve.log") as served:
            for body in runs.values():
                infer(served.url, body)
            for _ in range(args.repeats):
                for name, body in runs.items():
                    started = time.perf_counter()
                    response = infer(served.url, body)
                    times[name].append(time.perf_counter() - started)
                    assert all(p["status"] == "stored" for p in response["push"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name}: median {median:.3f} s over {args.repeats} runs")
    ratio = medians["pull + push"] / medians["folder"]
    print(f"pull + infer + push / infer from a folder: {ratio:.2f}")


if __name__ == "__main__":
    main()
