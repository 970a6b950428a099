"""The hospital flow's latency: from the last instance of the demo CT series received by the
DICOM listener to its SEG stored in Orthanc, settle time excluded, against /infer with
push_to on the same series from a folder.

Orthanc (scripts/install-orthanc) starts on loopback ports; `bentoml serve` listens with a
route that runs the organ model on CT and pushes to Orthanc over DICOMweb. Each run sends a
copy of the series with new UIDs (a new study, so a new job) from a pynetdicom SCU, takes the
time of the last C-STORE response, and polls Orthanc for the study's SEG. /infer by path with
push_to runs interleaved, warm. Prints the medians and their ratio.

    .venv/bin/python scripts/bench/listener_roundtrip.py [--repeats 5] [--settle-s 1]
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
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
CT = REPO / "examples" / "dicom" / "ct" / "CT"
REQUEST = {"nnunet_id": "organ", "use_folds": [0], "tta": False}
POLL_S = 0.01
WAIT_S = 300


def renumbered(folder: Path) -> list[pydicom.Dataset]:
    """The series as a new series of a new study."""
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = []
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(dataset)
    return datasets


def send(datasets: list[pydicom.Dataset], port: int) -> float:
    """C-STORE the instances in one association; the time of the last one's response."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, str(datasets[0].file_meta.TransferSyntaxUID))
    association = ae.associate("127.0.0.1", port, ae_title="NNUNET_BENTO")
    if not association.is_established:
        raise RuntimeError("the listener refused the association")
    try:
        for dataset in datasets:
            status = association.send_c_store(dataset)
            if status.Status != 0:
                raise RuntimeError(f"C-STORE answered 0x{status.Status:04X}")
        return time.perf_counter()
    finally:
        association.release()


def seg_stored(pacs_url: str, study_uid: str) -> bool:
    """Whether Orthanc holds a SEG series in the study."""
    with httpx.Client(base_url=pacs_url, timeout=30) as client:
        found = client.post("/tools/lookup", content=study_uid).json()
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        if not studies:
            return False
        series = client.get(f"/studies/{studies[0]}/series").json()
    return any(item["MainDicomTags"].get("Modality") == "SEG" for item in series)


def listener_run(pacs_url: str, port: int, settle_s: float) -> float:
    """Seconds from the last instance received to the SEG stored, less settle_s."""
    datasets = renumbered(CT)
    last = send(datasets, port)
    deadline = last + WAIT_S
    while not seg_stored(pacs_url, datasets[0].StudyInstanceUID):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no SEG in Orthanc {WAIT_S} s after the series was sent")
        time.sleep(POLL_S)
    return time.perf_counter() - last - settle_s


def infer_run(url: str, body: dict) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/infer", json=body, timeout=600)
    response.raise_for_status()
    assert all(item["status"] == "stored" for item in response.json()["push"])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settle-s", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-store-"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from conftest import bentoml_serve, free_port, import_demo_models
    from orthanc import orthanc

    import_demo_models()
    work = Path(tempfile.mkdtemp(prefix="bench-listener-"))
    port = free_port()
    route = {
        "name": "ct-organ",
        "match": {"Modality": "CT"},
        "request": REQUEST,
        "push_to": ["pacs"],
    }
    listener = {
        "port": port,
        "allowed_calling_ae": ["MODALITY"],
        "settle_s": args.settle_s,
        "routes": [route],
    }
    (work / "listener.yaml").write_text(yaml.safe_dump(listener))
    with orthanc(work / "orthanc") as pacs:
        nodes = {"nodes": [{"name": "pacs", "dicomweb_url": pacs.dicomweb_url}]}
        (work / "nodes.yaml").write_text(yaml.safe_dump(nodes))
        env = {
            "NNUNET_BENTO_DICOM_NODES": str(work / "nodes.yaml"),
            "NNUNET_BENTO_LISTENER": str(work / "listener.yaml"),
            "NNUNET_BENTO_OUTPUT_ROOT": str(work / "out"),
            "NNUNET_BENTO_WORK_DIR": str(work / "work"),
        }
        body = REQUEST | {
            "study_path": str(CT.parent),
            "series_folders": [CT.name],
            "is_dicom": True,
            "push_to": ["pacs"],
            "overwrite": True,
            "output_dir": str(work / "out" / "by-path"),
        }
        times: dict[str, list[float]] = {"listener": [], "infer + push": []}
        spec = REPO / "model-serve-spec.yaml"
        with bentoml_serve(spec, work / "serve.log", env=env) as served:
            served.client.model_info()
            infer_run(served.url, body)  # warm
            listener_run(pacs.url, port, args.settle_s)
            for _ in range(args.repeats):
                times["listener"].append(listener_run(pacs.url, port, args.settle_s))
                times["infer + push"].append(infer_run(served.url, body))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        runs = ", ".join(f"{value:.3f}" for value in values)
        print(f"{name}: median {medians[name]:.3f} s over {args.repeats} runs ({runs})")
    ratio = medians["listener"] / medians["infer + push"]
    print(
        "last instance received -> SEG stored in Orthanc (settle time excluded) / "
        f"/infer + push_to from a folder: {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
