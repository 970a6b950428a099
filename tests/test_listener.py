"""The DICOM listener against real peers (dcmtk's echoscu, storescu and dcmcjpeg, and a
pynetdicom SCU), its series tracker, its routes and its configuration file."""

import os
import queue
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage

from nnunet_bento.errors import SpecError
from nnunet_bento.io.dicom_series import read_dicom_series
from nnunet_bento.pacs.listener import (
    CANNOT_UNDERSTAND,
    TRANSFER_SYNTAXES,
    Listener,
    SeriesRecord,
    SeriesTracker,
    folder_content,
    header_attributes,
    match_route,
    match_study,
)
from nnunet_bento.pacs.listener_config import (
    ListenerConfig,
    check_route_names,
    load_listener_config,
    parse_listener_config,
)

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "examples" / "dicom" / "ct" / "CT"
T2 = REPO / "examples" / "dicom" / "mr" / "T2"
ADC = REPO / "examples" / "dicom" / "mr" / "ADC"
CT_FILES = sorted(CT.iterdir())
OUR_AE, PEER_AE = "NNUNET_BENTO", "ORTHANC"
SETTLE_S = 0.5
WAIT_S = 30  # the longest a test waits for an event that must come
# dcmtk waits for the peer's delayed ACK before each message without it (about 40 ms each)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
LISTENER_YAML = """
ae_title: NNUNET_BENTO
port: 11112
host: 127.0.0.1
allowed_calling_ae: [ORTHANC]
settle_s: 30
routes:
  - name: prostate-t2
    match: {Modality: MR, SeriesDescription: t2.*ax}
    request: {nnunet_id: prostate, save_rt_struct_output: true}
    push_to: [pacs]
    notify: [ris]
  - name: any-mr
    match: {Modality: mr}
    request: {nnunet_id: organ}
  - name: lesion
    series: [{SeriesDescription: t2}, {SeriesDescription: adc}]
    request: {nnunet_id: lesion}
"""


def requires_dcmtk() -> None:
    """Skip without dcmtk (scripts/install-orthanc installs it); under CI, fail instead."""
    if all(shutil.which(tool) for tool in ("echoscu", "storescu", "dcmcjpeg")):
        return
    message = "dcmtk (echoscu, storescu, dcmcjpeg) is not installed: run scripts/install-orthanc"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Running:
    """A started listener, the records it reported and the room it is given."""

    listener: Listener
    records: "queue.Queue[SeriesRecord]"
    room: list[int]

    @property
    def port(self) -> str:
        return str(self.listener.port)

    def next_record(self) -> SeriesRecord:
        return self.records.get(timeout=WAIT_S)


@pytest.fixture
def start_listener(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start a listener on a free loopback port (stopped at the end of the test)."""
    started: list[Listener] = []

    def start(clock: Callable[[], float] = time.monotonic) -> Running:
        requires_dcmtk()
        config = ListenerConfig(port=0, allowed_calling_ae=[PEER_AE], settle_s=SETTLE_S)
        records: queue.Queue[SeriesRecord] = queue.Queue()
        room = [1 << 40]
        listener = Listener(config, tmp_path / "listener", records.put, lambda: room[0], clock)
        listener.start()
        started.append(listener)
        return Running(listener, records, room)

    yield start
    for listener in started:
        listener.stop()


def dcmtk(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=WAIT_S,
        check=False,
    )


def store(port: str, files: list[Path], *options: str) -> subprocess.CompletedProcess:
    """storescu from our peer's AE title, in one association."""
    return dcmtk(
        "storescu", "-v", *options, "-aet", PEER_AE, "-aec", OUR_AE, "127.0.0.1", port, *files
    )


def stored(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def ct_uids() -> tuple[str, str]:
    first = pydicom.dcmread(CT_FILES[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


# Associations: C-ECHO, AE titles


def test_echo_is_answered_and_unknown_ae_titles_are_rejected(start_listener):
    running = start_listener()
    echo = ("echoscu", "127.0.0.1", running.port)
    assert dcmtk(*echo, "-aet", PEER_AE, "-aec", OUR_AE).returncode == 0
    assert dcmtk(*echo, "-aet", "OTHER", "-aec", OUR_AE).returncode != 0
    assert dcmtk(*echo, "-aet", PEER_AE, "-aec", "NOT_OURS").returncode != 0


def test_image_classes_are_accepted_and_seg_is_not(start_listener):
    running = start_listener()
    ae = AE(ae_title=PEER_AE)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(SegmentationStorage)
    association = ae.associate("127.0.0.1", running.listener.port, ae_title=OUR_AE)
    try:
        accepted = {context.abstract_syntax for context in association.accepted_contexts}
    finally:
        association.release()
    assert accepted == {CTImageStorage}
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"):
        assert syntax in TRANSFER_SYNTAXES


# Series: storing, settling, content


def test_a_series_in_two_associations_settles_once(start_listener, tmp_path):
    clock = ManualClock()
    running = start_listener(clock)
    root = running.listener.root
    study_uid, series_uid = ct_uids()
    assert store(running.port, CT_FILES[:10]).returncode == 0
    assert store(running.port, CT_FILES[10:]).returncode == 0
    folder = root / study_uid / series_uid
    assert stored(root) == sorted(folder.iterdir())
    assert len(stored(root)) == len(CT_FILES)
    assert running.listener.tracker.pending() == 1

    clock.advance(SETTLE_S)
    record = running.next_record()
    assert (record.study_uid, record.series_uid, record.folder) == (study_uid, series_uid, folder)
    assert record.instance_count == len(CT_FILES)
    assert record.header["Modality"] == "CT"
    assert "PatientName" not in record.header and "PatientID" not in record.header
    assert running.listener.tracker.pending() == 0 and running.records.empty()  # once

    assert store(running.port, CT_FILES).returncode == 0
    clock.advance(SETTLE_S)
    assert running.next_record().content_hash == record.content_hash

    changed = pydicom.dcmread(CT_FILES[3])
    changed.WindowCenter = 40
    changed.save_as(tmp_path / "changed.dcm")
    assert store(running.port, [tmp_path / "changed.dcm"]).returncode == 0
    clock.advance(SETTLE_S)
    again = running.next_record()
    assert again.instance_count == len(CT_FILES)
    assert again.content_hash != record.content_hash


def test_jpeg_lossless_series_reads_as_the_uncompressed_one(start_listener, tmp_path):
    running = start_listener()
    compressed = tmp_path / "jpeg"
    compressed.mkdir()
    for path in CT_FILES:
        assert dcmtk("dcmcjpeg", path, compressed / path.name).returncode == 0
    assert store(running.port, sorted(compressed.iterdir()), "-xs").returncode == 0
    record = running.next_record()
    while record.instance_count < len(CT_FILES):  # a busy machine paused the sender
        record = running.next_record()
    syntaxes = {pydicom.dcmread(path).file_meta.TransferSyntaxUID for path in stored(record.folder)}
    assert syntaxes == {"1.2.840.10008.1.2.4.70"}
    received = sitk.GetArrayFromImage(read_dicom_series(record.folder).image)
    original = sitk.GetArrayFromImage(read_dicom_series(CT).image)
    np.testing.assert_array_equal(received, original)


def test_a_full_work_folder_refuses_with_out_of_resources(start_listener):
    running = start_listener()
    running.room[0] = 0
    refused = store(running.port, CT_FILES[:1])
    assert refused.returncode != 0
    assert "OutOfResources" in refused.stderr + refused.stdout
    assert stored(running.listener.root) == []
    assert list((running.listener.root / "incoming").iterdir()) == []
    assert running.listener.tracker.pending() == 0

    running.room[0] = 1 << 40
    assert store(running.port, CT_FILES[:1]).returncode == 0
    assert len(stored(running.listener.root)) == 1


def test_an_aborted_association_keeps_what_was_stored(start_listener):
    clock = ManualClock()
    running = start_listener(clock)
    ae = AE(ae_title=PEER_AE)
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", running.listener.port, ae_title=OUR_AE)
    assert association.is_established
    for path in CT_FILES[:5]:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    association.abort()
    assert len(stored(running.listener.root)) == 5

    assert store(running.port, CT_FILES[5:]).returncode == 0
    clock.advance(SETTLE_S)
    assert running.next_record().instance_count == len(CT_FILES)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_instance_whose_uid_is_a_path_is_refused(start_listener):
    running = start_listener()
    ae = AE(ae_title=PEER_AE)
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", running.listener.port, ae_title=OUR_AE)
    try:
        for keyword, value in (("SeriesInstanceUID", "../../escape"), ("StudyInstanceUID", "")):
            dataset = pydicom.dcmread(CT_FILES[0])
            setattr(dataset, keyword, value)
            assert association.send_c_store(dataset).Status == CANNOT_UNDERSTAND
    finally:
        association.release()
    assert stored(running.listener.root) == []
    assert list((running.listener.root / "incoming").iterdir()) == []


def test_stop_aborts_open_associations(start_listener):
    running = start_listener()
    ae = AE(ae_title=PEER_AE)
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", running.listener.port, ae_title=OUR_AE)
    assert association.is_established
    port = running.port
    running.listener.stop()
    association.join(WAIT_S)  # its thread ends once the listener's A-ABORT arrives
    assert association.is_aborted
    assert dcmtk("echoscu", "-aet", PEER_AE, "-aec", OUR_AE, "127.0.0.1", port).returncode != 0


# The tracker, with a clock of its own


def test_the_tracker_settles_a_series_once_settle_s_after_its_last_instance(tmp_path):
    folder = tmp_path / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    (folder / "1.2.3.4.dcm").write_bytes(b"one")
    clock = ManualClock()
    tracker = SeriesTracker(10.0, clock)
    tracker.add("1.2", "1.2.3", folder, {"Modality": "CT"})
    clock.advance(6)
    tracker.add("1.2", "1.2.3", folder, {"Modality": "other"})
    assert tracker.settled(15.9) == []
    (record,) = tracker.settled(16.0)
    assert (record.instance_count, record.header) == (1, {"Modality": "CT"})
    assert record.content_hash == folder_content(folder)[1]
    assert tracker.settled(100.0) == []
    (folder / "1.2.3.4.dcm").write_bytes(b"two")
    assert folder_content(folder)[1] != record.content_hash


# Routes


def config() -> ListenerConfig:
    return parse_listener_config(yaml.safe_load(LISTENER_YAML), "listener.yaml")


def series_record(folder: Path) -> SeriesRecord:
    header = header_attributes(
        pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    )
    return SeriesRecord(
        header["StudyInstanceUID"], header["SeriesInstanceUID"], folder, 1, "", header
    )


def test_route_matching_is_a_case_insensitive_search_first_route_winning():
    routes = config()
    assert match_route(routes, {"Modality": "MR", "SeriesDescription": "T2 AXIAL"}).name == (
        "prostate-t2"
    )
    assert match_route(routes, {"Modality": "MR", "SeriesDescription": "ADC"}).name == "any-mr"
    assert match_route(routes, {"Modality": "CT", "SeriesDescription": "t2 axial"}) is None
    assert match_route(routes, {"SeriesDescription": "t2 axial"}) is None  # no Modality


def test_the_multi_series_route_resolves_once_both_series_settled_in_either_order():
    routes = config()
    t2, adc = series_record(T2), series_record(ADC)
    assert match_study(routes, [t2]) is None
    assert match_study(routes, [adc]) is None
    for settled in ([t2, adc], [adc, t2]):
        route, channels = match_study(routes, settled)
        assert route.name == "lesion"
        assert channels == [t2, adc]


# The configuration file


def test_the_listener_file_loads(tmp_path):
    path = tmp_path / "listener.yaml"
    path.write_text(LISTENER_YAML)
    loaded = load_listener_config(path)
    assert loaded.allowed_calling_ae == ["ORTHANC"]
    assert [route.name for route in loaded.routes] == ["prostate-t2", "any-mr", "lesion"]
    check_route_names(loaded, {"pacs"}, {"ris"})
    with pytest.raises(SpecError, match="route 'prostate-t2', field 'push_to': unknown DICOM node"):
        check_route_names(loaded, set(), {"ris"})
    with pytest.raises(
        SpecError, match="route 'prostate-t2', field 'notify': unknown webhook 'ris'"
    ):
        check_route_names(loaded, {"pacs"}, {"other"})
    with pytest.raises(SpecError, match="NNUNET_BENTO_LISTENER"):
        load_listener_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ("{name: r, match: {Modality: MR}}", "route 'r', field 'request'"),
        (
            "{name: r, match: {Modalty: MR}, request: {nnunet_id: m}}",
            "route 'r', field 'match.Modalty': 'Modalty' is not a DICOM keyword",
        ),
        (
            "{name: r, match: {Modality: '('}, request: {nnunet_id: m}}",
            "route 'r', field 'match.Modality': not a regular expression",
        ),
        (
            "{name: r, match: {PatientName: x}, request: {nnunet_id: m}}",
            "route 'r', field 'match.PatientName': PatientName identifies the patient",
        ),
        (
            "{name: r, request: {nnunet_id: m}}",
            "route 'r', field 'series': give exactly one of match",
        ),
        (
            "{name: r, match: {Modality: MR}, series: [{Modality: MR}], request: {nnunet_id: m}}",
            "route 'r', field 'series'",
        ),
        (
            "{name: r, series: [{SeriesDescriptio: t2}], request: {nnunet_id: m}}",
            "route 'r', field 'series.0.SeriesDescriptio'",
        ),
        (
            "{name: r, match: {Modality: MR}, request: {nnunet_id: m, output_dir: /x}}",
            "route 'r', field 'request.output_dir': set by the listener",
        ),
        (
            "{name: r, match: {Modality: MR}, request: {nnunet_id: m, series_folders: [a]}}",
            "route 'r', field 'request.series_folders'",
        ),
        (
            "{name: r, match: {Modality: MR}, request: {nnunet_id: m, push_to: [pacs]}}",
            "route 'r', field 'request.push_to'",
        ),
        (
            "{name: r, match: {Modality: MR}, request: {nnunet_id: m, colour: red}}",
            "route 'r', field 'request.colour'",
        ),
        (
            "{name: r, match: {Modality: MR}, request: {nnunet_id: m}, push_to: ['http://x']}",
            "route 'r', field 'push_to.0'",
        ),
        ("{match: {Modality: MR}, request: {nnunet_id: m}}", "route #1, field 'name'"),
    ],
)
def test_config_errors_name_the_route_and_the_field(route, expected):
    raw = {"allowed_calling_ae": ["ORTHANC"], "routes": [yaml.safe_load(route)]}
    with pytest.raises(SpecError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        parse_listener_config(raw, "listener.yaml")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"allowed_calling_ae": []}, "field 'allowed_calling_ae'"),
        ({"allowed_calling_ae": ["A_TITLE_LONGER_THAN_16"]}, "field 'allowed_calling_ae.0'"),
        ({"allowed_calling_ae": ["A"], "port": 70000}, "field 'port'"),
        ({"allowed_calling_ae": ["A"], "settle_s": 0}, "field 'settle_s'"),
        ({"allowed_calling_ae": ["A"], "colour": 1}, "field 'colour'"),
    ],
)
def test_config_errors_name_the_top_level_field(fields, expected):
    with pytest.raises(SpecError, match=expected):
        parse_listener_config(fields, "listener.yaml")


def test_two_routes_with_one_name_are_refused():
    route = {"name": "r", "match": {"Modality": "MR"}, "request": {"nnunet_id": "m"}}
    raw = {"allowed_calling_ae": ["A"], "routes": [route, route]}
    with pytest.raises(SpecError, match="route 'r', field 'name': used by two routes"):
        parse_listener_config(raw, "listener.yaml")
