"""/infer with a real Orthanc: series pulled by DICOMweb, SEG pushed by STOW-RS and RT Struct by
C-STORE, read back from Orthanc into the source study; node errors answered before any work."""

import shutil
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, bentoml_serve, free_port
from dicom_checks import dciodvfy_errors, highdicom_labels
from orthanc import orthanc
from test_pacs import renumbered_copy

from nnunet_bento.io.dicom_series import read_dicom_series

pytestmark = pytest.mark.slow

MR = REPO / "examples" / "dicom" / "mr"


def first_uid(folder: Path, keyword: str) -> str:
    return str(pydicom.dcmread(min(folder.glob("*.dcm")), stop_before_pixels=True)[keyword].value)


STUDY_UID = first_uid(MR / "T2", "StudyInstanceUID")
T2_UID = first_uid(MR / "T2", "SeriesInstanceUID")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload([*(MR / "T2").glob("*.dcm"), *(MR / "ADC").glob("*.dcm")])
        yield server


@pytest.fixture(scope="module")
def served(imported_models, pacs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs-serve")
    nodes = {
        "nodes": [
            {"name": "pacs-web", "dicomweb_url": pacs.dicomweb_url},
            {"name": "pacs-dimse", "host": "127.0.0.1", "port": pacs.dicom_port},
            {"name": "gone", "host": "127.0.0.1", "port": free_port(), "ae_title": "GONE"},
        ]
    }
    nodes["nodes"][1]["ae_title"] = "ORTHANC"
    (folder / "nodes.yaml").write_text(yaml.safe_dump(nodes))
    shutil.copy(REPO / "model-serve-spec.yaml", folder / "spec.yaml")
    env = {"NNUNET_BENTO_DICOM_NODES": str(folder / "nodes.yaml")}
    with bentoml_serve(folder / "spec.yaml", folder / "serve.log", env=env) as server:
        yield server


def infer(served, **fields) -> httpx.Response:
    return httpx.post(f"{served.url}/infer", json=fields, timeout=300)


def test_dicom_nodes_lists_names_and_kinds_only(served, pacs):
    response = httpx.get(f"{served.url}/dicom-nodes")
    assert response.json() == [
        {"name": "pacs-web", "kind": "dicomweb"},
        {"name": "pacs-dimse", "kind": "dimse"},
        {"name": "gone", "kind": "dimse"},
    ]
    assert str(pacs.dicom_port) not in response.text


def test_pull_infer_push_puts_seg_rt_struct_and_sr_into_the_source_study(served, pacs, tmp_path):
    before = {item["ID"] for item in pacs.study_instances(STUDY_UID)}
    response = infer(
        served,
        nnunet_id="organ",
        dicom_source={"node": "pacs-web", "study_uid": STUDY_UID},
        series_folders=["T2 axial"],
        output_dir=str(tmp_path / "out"),
        save_rt_struct_output=True,
        save_dicom_sr=True,
        push_to=["pacs-web", "pacs-dimse"],
    )
    assert response.status_code == 200, response.text
    result = response.json()
    (seg,) = result["dicom_segmentation"]
    (struct,) = result["dicom_struct"]
    assert {(r["node"], Path(r["file"]).name, r["status"]) for r in result["push"]} == {
        (node, name, "stored")
        for node in ("pacs-web", "pacs-dimse")
        for name in ("prediction.dcm", "struct.dcm", "measurements.dcm")
    }
    assert result["request"]["dicom_source"]["node"] == "pacs-web", "the request is echoed"
    assert not list((Path("/tmp") / "nnunet-bento" / "pulls").glob("*")), "pulled series removed"
    stored = [i for i in pacs.study_instances(STUDY_UID) if i["ID"] not in before]
    sop_uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in stored}
    assert sop_uids == {r["sop_instance_uid"] for r in result["push"]}
    source = read_dicom_series(MR / "T2")
    with httpx.Client(base_url=pacs.url) as client:
        for instance in stored:
            data = client.get(f"/instances/{instance['ID']}/file").raise_for_status().content
            path = tmp_path / f"{instance['ID']}.dcm"
            path.write_bytes(data)
            assert dciodvfy_errors(path) == []
            dataset = pydicom.dcmread(path)
            assert dataset.StudyInstanceUID == STUDY_UID
            if dataset.Modality == "SR":
                evidence = {
                    sop.ReferencedSOPInstanceUID
                    for study in dataset.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence
                    for sop in series.ReferencedSOPSequence
                }
                assert pydicom.dcmread(seg).SOPInstanceUID in evidence, "the SR cites the SEG"
            if dataset.Modality == "SEG":
                labels = highdicom_labels(path, source, {"prostate": 1, "bladder": 2})
                nifti = sitk.ReadImage(result["nifti_prediction"][0])
                np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(nifti))
    assert Path(seg).is_file() and Path(struct).is_file()


def test_a_push_to_a_node_that_is_down_keeps_the_outputs(served, tmp_path):
    response = infer(
        served,
        nnunet_id="organ",
        dicom_source={"node": "pacs-web", "study_uid": STUDY_UID},
        series_folders=[T2_UID],
        output_dir=str(tmp_path / "out"),
        push_to=["gone"],
    )
    assert response.status_code == 200, response.text
    (push,) = response.json()["push"]
    assert push["status"] == "failed" and "refused" in push["reason"]
    assert Path(response.json()["dicom_segmentation"][0]).is_file()


@pytest.mark.parametrize(
    ("source", "push_to", "status", "message"),
    [
        ({"node": "nope", "study_uid": STUDY_UID}, None, 400, "unknown DICOM node 'nope'"),
        (
            {"node": "http://10.0.0.1/dicom-web", "study_uid": STUDY_UID},
            None,
            400,
            "not an address",
        ),
        ({"node": "pacs-web", "study_uid": STUDY_UID}, ["127.0.0.1:104"], 400, "push_to[0]"),
        ({"node": "pacs-web", "study_uid": "1.2.3.4.5"}, None, 404, "1.2.3.4.5"),
    ],
    ids=["unknown node", "URL as node", "host as push node", "missing study"],
)
def test_node_errors_come_before_any_work(served, tmp_path, source, push_to, status, message):
    response = infer(
        served,
        nnunet_id="organ",
        dicom_source=source,
        series_folders=[T2_UID],
        output_dir=str(tmp_path / "out"),
        push_to=push_to,
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert not (tmp_path / "out").exists()


def test_a_description_with_two_matches_is_400_listing_the_series(served, pacs, tmp_path):
    pacs.upload(renumbered_copy(MR / "T2"))
    response = infer(
        served,
        nnunet_id="organ",
        dicom_source={"node": "pacs-dimse", "study_uid": STUDY_UID},
        series_folders=["T2 axial"],
        output_dir=str(tmp_path / "out"),
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "T2 axial" in error and T2_UID in error and "ADC" in error
