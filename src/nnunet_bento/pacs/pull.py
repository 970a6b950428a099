"""Pull series of a study from a DICOM node into local folders, one folder per series.

DICOMweb nodes: QIDO-RS lists the study's series, WADO-RS retrieves them. DIMSE nodes:
C-FIND lists them, C-GET retrieves them over the same association. C-MOVE is not used: it
would need a storage SCP of ours that the node can connect back to, and an AE entry for it in
the node; C-GET needs neither. Instances arrive uncompressed (Explicit or Implicit VR Little
Endian), which every reader decodes; the node transcodes what it stores compressed.
"""

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND_MODEL
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET_MODEL

from ..errors import InputNotFoundError, RequestError
from .connect import (
    DEFAULT_TIMEOUT_S,
    NodeError,
    associate,
    dicomweb_client,
    http_reason,
)
from .nodes import DicomNode, DicomWebNode, DimseNode

logger = logging.getLogger("nnunet_bento")
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
PENDING = (0xFF00, 0xFF01)
SUBOPERATIONS_FAILED = 0xB000  # C-GET warning: some sub-operations failed
SERIES_KEYS = ("SeriesInstanceUID", "SeriesDescription", "Modality", "SeriesNumber")
MAX_STORAGE_CONTEXTS = 127  # 128 presentation contexts at most, one of them for C-GET


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as the node lists it."""

    uid: str
    description: str
    modality: str

    def __str__(self) -> str:
        return f"{self.uid} {self.description!r} ({self.modality or 'no modality'})"


def pull_series(
    node: DicomNode,
    study_uid: str,
    series: Sequence[str],
    target: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[Path]:
    """Retrieve each named series of ``study_uid`` into ``target/<index>/<SOPInstanceUID>.dcm``.

    An entry is a SeriesInstanceUID of the study, else a SeriesDescription that exactly one of
    its series has. The entry at index i lands in ``target/i``; an entry naming a series that
    an earlier entry named shares that entry's folder. ``timeout`` bounds each network
    operation. Raises InputNotFoundError (404: study or series UID not on the node),
    RequestError (400: a description with no or several matches, listing the study's series)
    and NodeError (an UpstreamError, 502: the node is unreachable or fails).
    """
    listed = list_series(node, study_uid, timeout=timeout)
    folders: dict[str, Path] = {}
    pulled = []
    for index, entry in enumerate(series):
        uid = _match(entry, listed, study_uid, node.name)
        if uid not in folders:
            folders[uid] = Path(target) / str(index)
            folders[uid].mkdir(parents=True)
            count = _retrieve(node, study_uid, uid, folders[uid], timeout)
            logger.info("pulled series %s (%d instances) from node %s", uid, count, node.name)
        pulled.append(folders[uid])
    return pulled


def list_series(
    node: DicomNode, study_uid: str, *, timeout: float = DEFAULT_TIMEOUT_S
) -> list[SeriesInfo]:
    """The series of ``study_uid`` on ``node``; InputNotFoundError when it has none."""
    if isinstance(node, DicomWebNode):
        found = _qido_series(node, study_uid, timeout)
    else:
        query = _query("SERIES", StudyInstanceUID=study_uid, **dict.fromkeys(SERIES_KEYS, ""))
        found = _c_find(node, query, timeout)
    listed = [
        SeriesInfo(
            uid=str(ds.get("SeriesInstanceUID", "")),
            description=str(ds.get("SeriesDescription", "")).strip(),
            modality=str(ds.get("Modality", "")),
        )
        for ds in found
    ]
    if not listed:
        raise InputNotFoundError(f"study {study_uid} is not on DICOM node {node.name!r}")
    return listed


def _match(entry: str, listed: list[SeriesInfo], study_uid: str, node: str) -> str:
    """The SeriesInstanceUID that ``entry`` names: a UID of the study or a unique description."""
    if any(info.uid == entry for info in listed):
        return entry
    matches = [info for info in listed if info.description == entry.strip()]
    if len(matches) == 1:
        return matches[0].uid
    listing = "; ".join(map(str, listed))
    if not matches and UID.match(entry):
        raise InputNotFoundError(
            f"series {entry} is not in study {study_uid} on DICOM node {node!r}; "
            f"the study holds: {listing}"
        )
    found = "no series" if not matches else f"{len(matches)} series"
    raise RequestError(
        f"series {entry!r}: {found} of study {study_uid} on DICOM node {node!r} has this "
        f"SeriesDescription; name the series by SeriesInstanceUID: {listing}"
    )


def _retrieve(
    node: DicomNode, study_uid: str, series_uid: str, folder: Path, timeout: float
) -> int:
    """Write every instance of one series into ``folder``; the number written."""
    if isinstance(node, DicomWebNode):
        return _wado_series(node, study_uid, series_uid, folder, timeout)
    return _c_get_series(node, study_uid, series_uid, folder, timeout)


def _file_name(node: DicomNode, sop_instance_uid: str) -> str:
    """``<SOPInstanceUID>.dcm``, refusing a UID that is not one (it names a file of ours)."""
    if not UID.match(sop_instance_uid) or len(sop_instance_uid) > 64:
        raise NodeError(
            node.name,
            f"sent an instance whose SOPInstanceUID {sop_instance_uid[:80]!r} is not a UID",
        )
    return f"{sop_instance_uid}.dcm"


# DICOMweb: QIDO-RS and WADO-RS


def _qido_series(node: DicomWebNode, study_uid: str, timeout: float) -> list[Dataset]:
    """The study's series by QIDO-RS; none when the node answers 404 for the study."""
    client = dicomweb_client(node, timeout)
    try:
        found = client.search_for_series(
            study_instance_uid=study_uid, fields=list(SERIES_KEYS), get_remaining=True
        )
    except requests.HTTPError as error:
        if error.response is not None and error.response.status_code == 404:
            return []
        raise NodeError(node.name, http_reason(error, timeout)) from None
    except requests.RequestException as error:
        raise NodeError(node.name, http_reason(error, timeout)) from None
    return [Dataset.from_json(item) for item in found]


def _wado_series(
    node: DicomWebNode, study_uid: str, series_uid: str, folder: Path, timeout: float
) -> int:
    """Retrieve one series by WADO-RS, streamed, one file per instance."""
    client = dicomweb_client(node, timeout)
    count = 0
    try:
        for ds in client.iter_series(study_uid, series_uid):
            ds.save_as(folder / _file_name(node, str(ds.SOPInstanceUID)), enforce_file_format=True)
            count += 1
    except requests.HTTPError as error:
        if error.response is not None and error.response.status_code == 404:
            raise InputNotFoundError(
                f"series {series_uid} of study {study_uid} is not on DICOM node {node.name!r}"
            ) from None
        raise NodeError(
            node.name, f"WADO-RS of series {series_uid}: {http_reason(error, timeout)}"
        ) from None
    except requests.RequestException as error:
        raise NodeError(
            node.name, f"WADO-RS of series {series_uid}: {http_reason(error, timeout)}"
        ) from None
    if not count:
        raise NodeError(node.name, f"WADO-RS of series {series_uid} returned no instance")
    return count


# DIMSE: C-FIND and C-GET


def _query(level: str, **keys: str) -> Dataset:
    """A Study Root query identifier at ``level`` with ``keys`` (empty: return this key)."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def _check_status(node: DimseNode, what: str, status: Dataset, *also: int) -> int:
    """The status value of a response; NodeError for none (timeout, abort) or a failure.

    Success and pending are fine, and so are the values in ``also``.
    """
    if "Status" not in status:
        raise NodeError(node.name, f"{what}: no response (timed out or aborted)")
    value = int(status.Status)
    if value not in (0x0000, *PENDING, *also):
        comment = status.get("ErrorComment", "")
        raise NodeError(node.name, f"{what}: status 0x{value:04X} {comment}".rstrip())
    return value


def _c_find(node: DimseNode, query: Dataset, timeout: float) -> list[Dataset]:
    """Every identifier that a Study Root C-FIND returns."""
    association = associate(node, [build_context(FIND_MODEL)], timeout)
    found = []
    try:
        for status, identifier in association.send_c_find(query, FIND_MODEL):
            if _check_status(node, "C-FIND", status) in PENDING and identifier is not None:
                found.append(identifier)
    finally:
        association.release()
    return found


def _storage_contexts(sop_classes: Iterable[str]) -> list:
    """Contexts to receive ``sop_classes`` uncompressed; pynetdicom's list when none is known."""
    known = sorted(set(sop_classes))
    if not known:
        known = [context.abstract_syntax for context in StoragePresentationContexts]
    return [build_context(uid, UNCOMPRESSED) for uid in known[:MAX_STORAGE_CONTEXTS]]


def _c_get_series(
    node: DimseNode, study_uid: str, series_uid: str, folder: Path, timeout: float
) -> int:
    """Retrieve one series by C-GET: the node sends its instances back on our association."""
    instances = _c_find(
        node,
        _query(
            "IMAGE",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            SOPInstanceUID="",
            SOPClassUID="",
        ),
        timeout,
    )
    storage = _storage_contexts(str(ds.SOPClassUID) for ds in instances if ds.get("SOPClassUID"))
    association = associate(
        node,
        [build_context(GET_MODEL), *storage],
        timeout,
        ext_neg=[build_role(context.abstract_syntax, scp_role=True) for context in storage],
        evt_handlers=[(evt.EVT_C_STORE, _store_instance, [node, folder])],
    )
    what = f"C-GET of series {series_uid}"
    query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
    final = Dataset()
    try:
        for status, _ in association.send_c_get(query, GET_MODEL):
            _check_status(node, what, status, SUBOPERATIONS_FAILED)
            final = status
    finally:
        association.release()
    failed = int(final.get("NumberOfFailedSuboperations") or 0)
    written = len(list(folder.glob("*.dcm")))
    if failed or not written:
        raise NodeError(node.name, f"{what}: {written} instances received, {failed} failed")
    return written


def _store_instance(event: Event, node: DimseNode, folder: Path) -> int:
    """C-STORE sub-operation of our C-GET: write the instance as it came; 0xC000 to refuse."""
    try:
        name = _file_name(node, str(event.request.AffectedSOPInstanceUID))
    except NodeError:
        return 0xC000
    (folder / name).write_bytes(event.encoded_dataset())
    return 0x0000
