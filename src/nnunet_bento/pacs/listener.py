"""The DICOM listener: a pynetdicom storage SCP that receives series and says when each settles.

Guarantees:

- It answers C-ECHO, and C-STORE of the image storage SOP classes (CT, MR and the others
  that pynetdicom lists; not SEG, SR or RT objects) in every transfer syntax that pydicom
  decodes in this installation (``TRANSFER_SYNTAXES``), which are those the series reader
  decodes.
- Only the calling AE titles of ``allowed_calling_ae`` are accepted, and only when they call
  our own AE title; a rejected association is logged with the titles it used.
- An instance lands as ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
  as it was sent, in folders private to the server's user. It is written under
  ``<root>/incoming`` and renamed into place, so a series folder holds whole files only, and
  a second copy of a SOP Instance UID replaces the first. Each UID must be a UID (digits and
  dots, at most 64 characters), so that no instance names a path of its own choosing.
- The header is read within ``HEADER_BYTES`` (a deflated file is never inflated further).
- ``room()`` says how many bytes may still be written. It is asked once per instance, under
  a lock, so that concurrent associations cannot pass it together; it must count what the
  listener wrote (a walk of the folder does). An instance larger than that is answered
  0xA700 (Refused: Out of Resources) and nothing of it is left. A failure to write is 0xA700
  too, a malformed instance 0xC000 (Cannot understand), one whose SOP class or instance
  differs from its request 0xA900. No failure stops the SCP.
- Files left in ``<root>/incoming`` by a stopped listener are removed at ``start()``: one
  listener uses a root at a time.
- Instances are grouped by series across associations. A series *settles* ``settle_s``
  after its last instance; the background thread then calls ``on_settled`` once with a
  ``SeriesRecord`` describing the whole folder, whose ``content_hash`` tells a series sent
  again unchanged from a changed one. An instance that arrives later starts a new report.
- ``stop()`` aborts open associations and waits at most ``STOP_WAIT_S`` for the thread.
  Series not yet settled are not reported; their files stay in the folder.
- A record's ``header`` holds the first instance's text attributes, without those that
  identify the patient (group 0010, but for age, sex, size and weight).
"""

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID as DicomUID
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ..io.dicom_inflate import read_header
from ..io.dicom_series import DECODE_ERRORS, DEFER_SIZE
from ..io.work_folder import private_folder
from ..request import UID_PATTERN
from .listener_config import (
    LISTENER_ENV,
    PATIENT_GROUP,
    PATIENT_KEPT,
    UNMATCHABLE_VRS,
    ListenerConfig,
    Route,
)

logger = logging.getLogger("nnunet_bento")
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # the data set does not match its request's SOP class or instance
CANNOT_UNDERSTAND = 0xC000
HEADER_BYTES = 16 << 20  # what one instance's header may inflate to
VALUE_CHARS = 1024  # a longer text attribute is not kept for matching
STOP_WAIT_S = 5.0
MAX_POLL_S = 1.0
TIMEOUT_S = 60.0  # ACSE, DIMSE and network (idle) timeouts of an association
UID = re.compile(UID_PATTERN)
INCOMING = "incoming"


def _decodable(uid: str) -> bool:
    """Whether pydicom, as installed, decodes pixel data in transfer syntax ``uid``."""
    try:
        return get_decoder(uid).is_available
    except NotImplementedError:
        return False


#: The transfer syntaxes accepted: those that pydicom decodes here (the reader's decoders).
TRANSFER_SYNTAXES = [str(uid) for uid in AllTransferSyntaxes if _decodable(uid)]
#: The image storage SOP classes that pynetdicom lists, radiotherapy images aside.
IMAGE_STORAGE = [
    str(context.abstract_syntax)
    for context in AllStoragePresentationContexts
    if "Image Storage" in DicomUID(context.abstract_syntax).name
    and "RT" not in DicomUID(context.abstract_syntax).name.split()
]


@dataclass(frozen=True)
class SeriesRecord:
    """A settled series: where its files are, what its first instance said, and its content.

    ``content_hash`` is the SHA-256 of the sorted SOP Instance UIDs, each with the SHA-256 of
    its file: equal for a series sent again unchanged, different once anything changed.
    """

    study_uid: str
    series_uid: str
    folder: Path
    instance_count: int
    content_hash: str
    header: Mapping[str, str] = field(repr=False)


@dataclass
class _Pending:
    folder: Path
    header: Mapping[str, str]
    last: float


class SeriesTracker:
    """Series that received instances and have not settled yet, by (study, series) UID."""

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self.clock = clock
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()

    def add(self, study_uid: str, series_uid: str, folder: Path, header: Mapping[str, str]) -> None:
        """An instance of the series was stored in ``folder`` now; ``header`` is kept from the
        series' first instance since it last settled."""
        with self._lock:
            pending = self._pending.setdefault(
                (study_uid, series_uid), _Pending(folder, header, 0.0)
            )
            pending.last = self.clock()

    def pending(self) -> int:
        """How many series wait to settle."""
        with self._lock:
            return len(self._pending)

    def settled(self, now: float | None = None) -> list[SeriesRecord]:
        """The series whose last instance is ``settle_s`` old at ``now`` (default: the clock),
        each reported once; a series whose folder is gone is logged and dropped."""
        now = self.clock() if now is None else now
        with self._lock:
            due = [key for key, item in self._pending.items() if now - item.last >= self.settle_s]
            items = [(key, self._pending.pop(key)) for key in due]
        records = []
        for (study_uid, series_uid), item in items:
            count, digest = folder_content(item.folder)
            if not count:
                logger.warning("DICOM listener: series %s settled with no file left", series_uid)
                continue
            records.append(
                SeriesRecord(study_uid, series_uid, item.folder, count, digest, item.header)
            )
        return records


def folder_content(folder: Path) -> tuple[int, str]:
    """The number of instances in a series folder and the hash of their UIDs and contents."""
    lines = []
    for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
        with open(path, "rb") as stream:
            lines.append(f"{path.stem} {hashlib.file_digest(stream, 'sha256').hexdigest()}\n")
    return len(lines), hashlib.sha256("".join(lines).encode()).hexdigest()


def header_attributes(dataset: Dataset) -> dict[str, str]:
    """The text attributes of a header, by keyword, multiple values joined by a backslash:
    no sequence, binary or deferred value, none over ``VALUE_CHARS``, none that identifies
    the patient."""
    attributes = {}
    for tag in list(dataset.keys()):
        keyword = keyword_for_tag(tag)
        raw = dataset.get_item(tag, keep_deferred=True)
        deferred = isinstance(raw, RawDataElement) and raw.value is None and raw.length
        if not keyword or deferred or (tag.group == PATIENT_GROUP and keyword not in PATIENT_KEPT):
            continue
        try:
            element = dataset[tag]
            if element.VR in UNMATCHABLE_VRS:
                continue
            values = element.value if element.VM > 1 else [element.value]
            text = "\\".join("" if value is None else str(value) for value in values)
        except DECODE_ERRORS:
            continue
        if len(text) <= VALUE_CHARS:
            attributes[keyword] = text
    return attributes


def _matches(match: Mapping[str, str], header: Mapping[str, str]) -> bool:
    """Whether each keyword's regex is found (case-insensitive) in the header's value."""
    return all(
        re.search(pattern, header.get(keyword, ""), re.IGNORECASE)
        for keyword, pattern in match.items()
    )


def match_route(config: ListenerConfig, header: Mapping[str, str]) -> Route | None:
    """The first single-series route (``match``) whose every keyword matches the header."""
    return next(
        (
            route
            for route in config.routes
            if route.match is not None and _matches(route.match, header)
        ),
        None,
    )


def route_of(config: ListenerConfig, header: Mapping[str, str]) -> Route | None:
    """The first route, in the file's order, that a series belongs to: a single-series route
    whose ``match`` holds, or a multi-series route with a channel whose match holds."""
    return next(
        (
            route
            for route in config.routes
            if any(_matches(match, header) for match in route.series or [route.match or {}])
        ),
        None,
    )


def match_study(
    config: ListenerConfig, series: Sequence[SeriesRecord]
) -> tuple[Route, list[SeriesRecord]] | None:
    """The first multi-series route that every channel of finds a series for among the settled
    ``series`` of one study, and the series per channel: for each channel, the first series
    in the order given that matches and that no earlier channel took."""
    for route in config.routes:
        if route.series is None:
            continue
        chosen: list[SeriesRecord] = []
        for match in route.series:
            found = next(
                (
                    record
                    for record in series
                    if record not in chosen and _matches(match, record.header)
                ),
                None,
            )
            if found is None:
                break
            chosen.append(found)
        else:
            return route, chosen
    return None


class _Refused(Exception):
    """An instance that is answered with a failure ``status``; the message says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _uid(dataset: Dataset, keyword: str) -> str:
    """A UID attribute of the instance, refused unless it is a UID (it names a path of ours)."""
    value = str(dataset.get(keyword, "") or "").strip("\0 ")
    if len(value) > 64 or not UID.match(value):
        raise _Refused(CANNOT_UNDERSTAND, f"its {keyword} {value[:80]!r} is not a UID")
    return value


class Listener:
    """The storage SCP, its series tracker and the thread that reports settled series."""

    def __init__(
        self,
        config: ListenerConfig,
        root: Path,
        on_settled: Callable[[SeriesRecord], None],
        room: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.root = Path(root)
        self.on_settled = on_settled
        self.room = room
        self.tracker = SeriesTracker(config.settle_s, clock)
        self._store_lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the DICOM listener is not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Prepare the work folder, listen, and start reporting settled series."""
        incoming = private_folder(private_folder(self.root) / INCOMING)
        for leftover in incoming.iterdir():
            leftover.unlink(missing_ok=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        ae.add_supported_context(Verification)
        for sop_class in IMAGE_STORAGE:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self._stopping.clear()
        self._server = ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, _on_rejected)],
        )
        self._thread = threading.Thread(
            target=self._report_settled, name="dicom-listener-settle", daemon=True
        )
        self._thread.start()
        logger.info(
            "DICOM listener %s on %s:%d: accepts calling AE titles %s; a series settles %g s "
            "after its last instance",
            self.config.ae_title,
            self.config.host,
            self.port,
            ", ".join(self.config.allowed_calling_ae),
            self.config.settle_s,
        )

    def stop(self) -> None:
        """Abort open associations, close the port and stop reporting (bounded waits)."""
        self._stopping.set()
        if self._server is not None:
            self._server.ae.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                logger.warning("DICOM listener: on_settled still runs %g s after stop", STOP_WAIT_S)
            self._thread = None

    def _report_settled(self) -> None:
        """Call on_settled for each settled series until stopped; a failing call is logged."""
        poll_s = min(self.config.settle_s / 4, MAX_POLL_S)
        while not self._stopping.wait(poll_s):
            for record in self.tracker.settled():
                logger.info(
                    "DICOM listener: series %s of study %s settled (%d instances)",
                    record.series_uid,
                    record.study_uid,
                    record.instance_count,
                )
                try:
                    self.on_settled(record)
                except Exception:  # the thread must go on for the other series
                    logger.exception(
                        "DICOM listener: on_settled failed for series %s", record.series_uid
                    )

    def _on_store(self, event: Event) -> int:
        """C-STORE: store the instance, or answer the failure status and leave nothing."""
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        try:
            study_uid, series_uid, folder, header = self._store(event)
        except _Refused as refusal:
            logger.warning(
                "DICOM listener: refused instance %s from %s (status 0x%04X): %s",
                sop_uid[:80],
                event.assoc.requestor.ae_title,
                refusal.status,
                refusal,
            )
            return refusal.status
        self.tracker.add(study_uid, series_uid, folder, header)
        return SUCCESS

    def _store(self, event: Event) -> tuple[str, str, Path, dict[str, str]]:
        """Write the instance as sent to a temporary file, check it, and rename it into its
        series folder: its study and series UIDs, folder and header attributes."""
        data = event.encoded_dataset()
        with self._store_lock:
            room = self.room()
            if len(data) > room:
                raise _Refused(
                    OUT_OF_RESOURCES,
                    f"{len(data)} bytes do not fit in the work folder ({max(room, 0)} left)",
                )
            temporary = self._write_temporary(data)
        try:
            return self._place(event, temporary)
        finally:
            temporary.unlink(missing_ok=True)

    def _write_temporary(self, data: bytes) -> Path:
        """``data`` written and synced to a new file under the incoming folder."""
        name = None
        try:
            descriptor, name = tempfile.mkstemp(suffix=".part", dir=self.root / INCOMING)
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as error:
            if name is not None:
                Path(name).unlink(missing_ok=True)
            raise _Refused(OUT_OF_RESOURCES, f"cannot write it: {error.strerror}") from None
        return Path(name)

    def _place(self, event: Event, temporary: Path) -> tuple[str, str, Path, dict[str, str]]:
        """Check the written instance against its request and move it into its folder."""
        try:
            dataset = read_header(temporary, DEFER_SIZE, HEADER_BYTES).dataset
        except DECODE_ERRORS as error:
            raise _Refused(CANNOT_UNDERSTAND, f"cannot read its header: {error}") from None
        study_uid, series_uid, sop_uid = (
            _uid(dataset, keyword)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
        request = event.request
        if (str(dataset.get("SOPClassUID", "")), sop_uid) != (
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
        ):
            raise _Refused(
                DOES_NOT_MATCH, "its SOP Class or Instance UID differs from its C-STORE request"
            )
        header = header_attributes(dataset)
        try:
            folder = private_folder(private_folder(self.root / study_uid) / series_uid)
            os.replace(temporary, folder / f"{sop_uid}.dcm")
        except OSError as error:
            raise _Refused(OUT_OF_RESOURCES, f"cannot store it: {error.strerror}") from None
        return study_uid, series_uid, folder, header


def _on_rejected(event: Event) -> None:
    """Log a rejected association with the titles that it used."""
    requestor = event.assoc.requestor
    logger.warning(
        "DICOM listener: rejected an association from %s:%s calling AE title %r to called AE "
        "title %r; allowed_calling_ae and ae_title in %s say which are accepted",
        requestor.address,
        requestor.port,
        requestor.ae_title,
        requestor.primitive.called_ae_title if requestor.primitive else "",
        LISTENER_ENV,
    )
