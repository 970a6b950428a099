"""DICOM nodes: the nodes file, node names in requests, and pull and push against a real Orthanc."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import dciodvfy_errors, dice, highdicom_labels, rtstruct_masks
from orthanc import Orthanc, orthanc
from pydicom.uid import generate_uid

from nnunet_bento.errors import InputNotFoundError, RequestError, SpecError, UpstreamError
from nnunet_bento.io.dicom_seg import write_label_segmentation
from nnunet_bento.io.dicom_series import read_dicom_series
from nnunet_bento.io.dicom_source import AlgorithmIdentity, DicomSource
from nnunet_bento.io.rtstruct import write_rtstruct
from nnunet_bento.io.seg_metadata import SegmentationMetadata
from nnunet_bento.pacs.connect import auth_headers
from nnunet_bento.pacs.nodes import (
    DicomNode,
    DicomWebNode,
    DimseNode,
    load_nodes,
    node_kinds,
    resolve_node,
)
from nnunet_bento.pacs.pull import pull_series
from nnunet_bento.pacs.push import push_files

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "examples" / "dicom" / "ct" / "CT"
T2 = REPO / "examples" / "dicom" / "mr" / "T2"
ADC = REPO / "examples" / "dicom" / "mr" / "ADC"
CT_DESCRIPTION = "CT demo (HU-like)"
TIMEOUT_S = 10
IDENTITY = AlgorithmIdentity("nnU-Net organ", "0.1.0", "organ:k3xq2", "cd" * 32)
NAMES = {1: "liver", 2: "spleen"}

NODES_YAML = """
nodes:
  - name: web
    dicomweb_url: https://pacs.example.org/dicom-web
    auth_env: PACS_TOKEN
  - name: dimse
    host: pacs.example.org
    port: 11112
    ae_title: PACS
  - name: explicit
    kind: dimse
    host: 10.0.0.7
    port: 104
    ae_title: ARCHIVE
    calling_ae_title: SEGMENTER
"""


def write_nodes(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    return path


# The nodes file and node names in requests


def test_nodes_file_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_TOKEN", "s3cret")
    nodes = load_nodes(write_nodes(tmp_path, NODES_YAML))
    assert list(nodes) == ["web", "dimse", "explicit"]
    assert isinstance(nodes["web"], DicomWebNode)
    assert isinstance(nodes["dimse"], DimseNode)
    assert nodes["dimse"].calling_ae_title == "NNUNET_BENTO"
    assert nodes["explicit"].calling_ae_title == "SEGMENTER"
    assert node_kinds(nodes) == [
        {"name": "web", "kind": "dicomweb"},
        {"name": "dimse", "kind": "dimse"},
        {"name": "explicit", "kind": "dimse"},
    ]
    listed = json.dumps(node_kinds(nodes))
    assert not any(secret in listed for secret in ("example.org", "10.0.0.7", "PACS_TOKEN"))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{name: pacs, host: h, port: x, ae_title: A}", "node 'pacs', field 'port'"),
        ("{name: pacs, host: h, port: 70000, ae_title: A}", "node 'pacs', field 'port'"),
        ("{name: pacs, host: h, port: 104}", "node 'pacs', field 'ae_title'"),
        ("{name: pacs, host: h, port: 104, ae_title: A_TITLE_LONGER_THAN_16}", "'ae_title'"),
        ("{name: pacs, dicomweb_url: 'not a url'}", "node 'pacs', field 'dicomweb_url'"),
        ("{name: pacs, dicomweb_url: 'http://h/', auth_env: UNSET_VAR}", "field 'auth_env'"),
        ("{name: pacs, dicomweb_url: 'http://h/', port: 104}", "node 'pacs', field 'port'"),
        ("{name: pacs, ae_title: A}", "node 'pacs', field 'kind'"),
        ("{name: pacs.local, host: h, port: 104, ae_title: A}", "field 'name'"),
        ("{host: h, port: 104, ae_title: A}", "node #1, field 'name'"),
    ],
)
def test_nodes_file_error_names_node_and_field(tmp_path: Path, entry: str, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        load_nodes(write_nodes(tmp_path, f"nodes:\n  - {entry}\n"))


def test_duplicate_node_names_refused(tmp_path: Path) -> None:
    text = "nodes:\n" + "  - {name: pacs, host: h, port: 104, ae_title: A}\n" * 2
    with pytest.raises(SpecError, match="node 'pacs', field 'name': used by two nodes"):
        load_nodes(write_nodes(tmp_path, text))


def test_missing_nodes_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="NNUNET_BENTO_DICOM_NODES"):
        load_nodes(tmp_path / "absent.yaml")


def test_auth_env_gives_bearer_or_basic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_TOKEN", "t0ken")
    monkeypatch.setenv("PACS_LOGIN", "user:pass")
    bearer = DicomWebNode(name="a", dicomweb_url="http://h/", auth_env="PACS_TOKEN")
    basic = DicomWebNode(name="b", dicomweb_url="http://h/", auth_env="PACS_LOGIN", auth="basic")
    assert auth_headers(bearer) == {"Authorization": "Bearer t0ken"}
    assert auth_headers(basic) == {"Authorization": "Basic dXNlcjpwYXNz"}
    assert "t0ken" not in repr(bearer)


def configured() -> dict[str, DicomNode]:
    return {"pacs": DimseNode(name="pacs", host="10.1.2.3", port=104, ae_title="PACS")}


def test_resolve_node_gives_the_configured_node() -> None:
    assert resolve_node("push_to", "pacs", configured()).port == 104


def test_resolve_node_refuses_an_unknown_name_listing_the_known() -> None:
    with pytest.raises(RequestError, match=r"push_to: unknown DICOM node 'archive'.*pacs") as error:
        resolve_node("push_to", "archive", configured())
    assert error.value.status_code == 400


@pytest.mark.parametrize(
    "address",
    [
        "http://10.1.2.3:8042/dicom-web",
        "pacs.hospital.org",
        "pacs:104",
        "10.1.2.3",
        "::1",
        "[::1]:104",
        "localhost",
        "PACS@10.1.2.3",
    ],
)
def test_resolve_node_refuses_an_address(address: str) -> None:
    with pytest.raises(RequestError, match=r"dicom_source\.node: .*not an address") as error:
        resolve_node("dicom_source.node", address, configured())
    assert error.value.status_code == 400


# Against a real Orthanc


def renumbered_copy(folder: Path) -> list[bytes]:
    """The series in ``folder`` as a new series of the same study: new Series and SOP UIDs."""
    series_uid = generate_uid()
    copies = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        copies.append(buffer.getvalue())
    return copies


class Pacs:
    """The module's Orthanc, holding the demo CT and MR studies, seen as two nodes."""

    def __init__(self, server: Orthanc) -> None:
        self.server = server
        self.web = DicomWebNode(name="orthanc-web", dicomweb_url=server.dicomweb_url)
        self.dimse = DimseNode(
            name="orthanc-dimse", host="127.0.0.1", port=server.dicom_port, ae_title="ORTHANC"
        )

    def node(self, kind: str) -> DicomNode:
        return self.web if kind == "dicomweb" else self.dimse


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload([*CT.glob("*.dcm"), *T2.glob("*.dcm"), *ADC.glob("*.dcm")])
        server.upload(renumbered_copy(T2))
        yield Pacs(server)


@pytest.fixture(scope="module")
def ct() -> DicomSource:
    return read_dicom_series(CT)


def uid_of_file(path: Path, keyword: str) -> str:
    """A UID attribute of one DICOM file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


def uid_of(folder: Path, keyword: str) -> str:
    """A UID of the first file in a series folder."""
    return uid_of_file(min(folder.glob("*.dcm")), keyword)


def assert_same_series(pulled: Path, original: DicomSource) -> None:
    """Same file names (SOP Instance UIDs), voxels and geometry as the series read locally."""
    assert sorted(path.name for path in pulled.iterdir()) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in original.datasets
    )
    image = read_dicom_series(pulled).image
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original.image)
    )
    assert image.GetSpacing() == original.image.GetSpacing()
    assert image.GetOrigin() == original.image.GetOrigin()
    assert image.GetDirection() == original.image.GetDirection()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pull_by_series_uid(pacs: Pacs, ct: DicomSource, tmp_path: Path, kind: str) -> None:
    study = str(ct.datasets[0].StudyInstanceUID)
    folders = pull_series(
        pacs.node(kind), study, [ct.series_instance_uid], tmp_path / "in", timeout=TIMEOUT_S
    )
    assert folders == [tmp_path / "in" / "0"]
    assert_same_series(folders[0], ct)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pull_by_series_description(pacs: Pacs, tmp_path: Path, kind: str) -> None:
    ct_study = uid_of(CT, "StudyInstanceUID")
    (ct_folder,) = pull_series(pacs.node(kind), ct_study, [CT_DESCRIPTION], tmp_path / "ct")
    assert uid_of(ct_folder, "SeriesInstanceUID") == uid_of(CT, "SeriesInstanceUID")
    mr_study = uid_of(T2, "StudyInstanceUID")
    t2_uid = uid_of(T2, "SeriesInstanceUID")
    folders = pull_series(pacs.node(kind), mr_study, [t2_uid, "ADC", t2_uid], tmp_path / "mr")
    assert folders == [tmp_path / "mr" / "0", tmp_path / "mr" / "1", tmp_path / "mr" / "0"]
    assert uid_of(folders[1], "SeriesInstanceUID") == uid_of(ADC, "SeriesInstanceUID")
    assert_same_series(folders[1], read_dicom_series(ADC))


def ct_mask(source: DicomSource) -> np.ndarray:
    """Two boxes on the CT grid, label 1 and label 2."""
    mask = np.zeros(sitk.GetArrayViewFromImage(source.image).shape, np.uint8)
    mask[4:12, 10:24, 8:20] = 1
    mask[14:20, 26:40, 28:42] = 2
    return mask


def organ_metadata() -> SegmentationMetadata:
    return SegmentationMetadata.from_inline(
        {"algorithm_name": "nnU-Net organ", "segment_names": NAMES}
    )


def write_outputs(source: DicomSource, mask: np.ndarray, folder: Path) -> tuple[Path, Path]:
    """A BINARY SEG and an RT Struct of ``mask``, as the pipeline writes them."""
    seg, struct = folder / "prediction.dcm", folder / "struct.dcm"
    assert write_label_segmentation(mask, source, organ_metadata(), IDENTITY, seg)
    assert write_rtstruct(mask, source, NAMES, IDENTITY, struct)
    return seg, struct


@pytest.mark.slow
def test_push_seg_over_stow_and_rtstruct_over_c_store(
    pacs: Pacs, ct: DicomSource, tmp_path: Path
) -> None:
    mask = ct_mask(ct)
    seg, struct = write_outputs(ct, mask, tmp_path)
    study = str(ct.datasets[0].StudyInstanceUID)
    (seg_result,) = push_files(pacs.web, [seg], timeout=TIMEOUT_S)
    (struct_result,) = push_files(pacs.dimse, [struct], timeout=TIMEOUT_S)
    seg_uid, struct_uid = uid_of_file(seg, "SOPInstanceUID"), uid_of_file(struct, "SOPInstanceUID")
    assert (seg_result.status, seg_result.sop_instance_uid, seg_result.reason) == (
        "stored",
        seg_uid,
        None,
    )
    assert (struct_result.status, struct_result.sop_instance_uid) == ("stored", struct_uid)
    assert seg_result.node == "orthanc-web" and seg_result.file == str(seg)

    in_study = {
        item["MainDicomTags"]["SOPInstanceUID"] for item in pacs.server.study_instances(study)
    }
    assert {seg_uid, struct_uid} <= in_study
    assert {ds.SOPInstanceUID for ds in ct.datasets} <= in_study

    seg_series = uid_of_file(seg, "SeriesInstanceUID")
    (seg_back,) = pull_series(pacs.web, study, [seg_series], tmp_path / "seg")
    seg_file = seg_back / f"{seg_uid}.dcm"
    assert seg_file.read_bytes() == seg.read_bytes()
    np.testing.assert_array_equal(highdicom_labels(seg_file, ct, {"liver": 1, "spleen": 2}), mask)
    struct_series = uid_of_file(struct, "SeriesInstanceUID")
    (struct_back,) = pull_series(pacs.dimse, study, [struct_series], tmp_path / "struct")
    struct_file = struct_back / f"{struct_uid}.dcm"
    masks = rtstruct_masks(struct_file, ct)
    assert dice(masks["liver"], mask == 1) > 0.9
    assert dice(masks["spleen"], mask == 2) > 0.9
    assert dciodvfy_errors(seg_file) == []
    assert dciodvfy_errors(struct_file) == []


@pytest.mark.slow
def test_c_store_refusal_fails_that_file_only(pacs: Pacs, ct: DicomSource, tmp_path: Path) -> None:
    """Orthanc 1.10 (DCMTK 3.6.7) does not know Label Map Segmentation Storage over DIMSE."""
    labelmap = tmp_path / "labelmap.dcm"
    write_label_segmentation(
        ct_mask(ct), ct, organ_metadata(), IDENTITY, labelmap, segmentation_type="labelmap"
    )
    seg, _ = write_outputs(ct, ct_mask(ct), tmp_path)
    refused, stored = push_files(pacs.dimse, [labelmap, seg], timeout=TIMEOUT_S)
    assert refused.status == "failed"
    label_map_seg, explicit_little_endian = "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.1.2.1"
    assert f"no presentation context for SOP class {label_map_seg}" in refused.reason
    assert f"in transfer syntax {explicit_little_endian}" in refused.reason
    assert (stored.status, stored.reason) == ("stored", None)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_missing_study_is_404_naming_it(pacs: Pacs, tmp_path: Path, kind: str) -> None:
    study = generate_uid()
    with pytest.raises(InputNotFoundError, match=f"study {study} is not on DICOM node") as error:
        pull_series(pacs.node(kind), study, ["1.2.3"], tmp_path)
    assert error.value.status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_missing_series_is_404_naming_it(pacs: Pacs, tmp_path: Path, kind: str) -> None:
    series = generate_uid()
    with pytest.raises(InputNotFoundError, match=f"series {series} is not in study"):
        pull_series(pacs.node(kind), uid_of(CT, "StudyInstanceUID"), [series], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_description_with_two_matches_is_400_listing_the_series(
    pacs: Pacs, tmp_path: Path, kind: str
) -> None:
    with pytest.raises(RequestError) as error:
        pull_series(pacs.node(kind), uid_of(T2, "StudyInstanceUID"), ["T2 axial"], tmp_path)
    message = str(error.value)
    assert "2 series of study" in message
    assert uid_of(T2, "SeriesInstanceUID") in message
    assert uid_of(ADC, "SeriesInstanceUID") in message and "'ADC'" in message
    assert message.count("'T2 axial'") == 3  # the entry, then the two series
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_unknown_description_is_400(pacs: Pacs, tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="'DWI': no series of study"):
        pull_series(pacs.web, uid_of(T2, "StudyInstanceUID"), ["DWI"], tmp_path)


@pytest.fixture(params=["dicomweb", "dimse"])
def closed_node(request: pytest.FixtureRequest) -> Iterator[DicomNode]:
    """A node on a loopback port that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if request.param == "dicomweb":
            yield DicomWebNode(name="gone", dicomweb_url=f"http://127.0.0.1:{port}/dicom-web")
        else:
            yield DimseNode(name="gone", host="127.0.0.1", port=port, ae_title="GONE")


def test_unreachable_node_is_502_naming_the_node(closed_node: DicomNode, tmp_path: Path) -> None:
    with pytest.raises(UpstreamError, match="DICOM node 'gone'") as error:
        pull_series(closed_node, "1.2.3", ["1.2.4"], tmp_path, timeout=TIMEOUT_S)
    assert error.value.status_code == 502
    assert "127.0.0.1" not in str(error.value)
    assert "refused" in str(error.value)


def test_push_to_unreachable_node_fails_each_file(closed_node: DicomNode, tmp_path: Path) -> None:
    files = sorted(CT.glob("*.dcm"))[:2]
    results = push_files(closed_node, [*files, tmp_path / "absent.dcm"], timeout=TIMEOUT_S)
    assert [result.status for result in results] == ["failed"] * 3
    assert all("refused" in result.reason for result in results[:2])
    assert results[0].sop_instance_uid == uid_of(CT, "SOPInstanceUID")
    assert "not a readable DICOM file" in results[2].reason


def seg_copies(seg: Path, folder: Path, count: int) -> list[Path]:
    """``count`` copies of a SEG, each with its own SOP Instance UID."""
    ds = pydicom.dcmread(seg)
    folder.mkdir()
    paths = []
    for index in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"seg{index:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_orthanc_stopped_mid_push(ct: DicomSource, tmp_path: Path, kind: str) -> None:
    seg, _ = write_outputs(ct, ct_mask(ct), tmp_path)
    files = seg_copies(seg, tmp_path / "copies", 200)
    with orthanc(tmp_path / "orthanc") as server:
        node = Pacs(server).node(kind)
        killer = threading.Thread(target=stop_after_two_instances, args=(server,))
        killer.start()
        results = push_files(node, files, timeout=3)  # pynetdicom may wait this long (a race)
        killer.join()
    statuses = [result.status for result in results]
    assert "stored" in statuses and "failed" in statuses
    assert statuses == sorted(statuses, reverse=True)  # stored first, then failed
    assert all(result.reason for result in results if result.status == "failed")
    assert all(path.is_file() for path in files)


def stop_after_two_instances(server: Orthanc) -> None:
    """Kill Orthanc once it holds two instances: the first one's answer has reached us."""
    deadline = time.monotonic() + 30
    while server.instance_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    server.stop()
