"""Push DICOM files (our SEG and RT Struct outputs) to a node: STOW-RS or C-STORE.

A push never raises for the node: each file comes back stored or failed with the node's
reason (connection refused, an HTTP status, a DIMSE status), and the files stay where they
are, so the caller can report the outcome and push again later.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.association import Association

from .connect import (
    DEFAULT_TIMEOUT_S,
    NodeError,
    associate,
    dicomweb_client,
    http_reason,
)
from .nodes import DicomNode, DicomWebNode, DimseNode

logger = logging.getLogger("nnunet_bento")
STORE_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
NO_RESPONSE = "no C-STORE response (timed out, or the connection was lost)"


@dataclass(frozen=True)
class PushResult:
    """What one node did with one file; ``reason`` says why it failed, or warns."""

    node: str
    file: str
    sop_instance_uid: str
    status: Literal["stored", "failed"]
    reason: str | None = None


@dataclass(frozen=True)
class _Outgoing:
    """A file to push and the header fields that address it."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def push_files(
    node: DicomNode, files: Sequence[Path], *, timeout: float = DEFAULT_TIMEOUT_S
) -> list[PushResult]:
    """Send ``files`` to ``node``, STOW-RS or C-STORE; one result per file, in order.

    Never raises for the node: a file that the node refuses, or that cannot reach it, comes
    back failed with the reason. ``timeout`` bounds each network operation.
    """
    headers = [_header(node, Path(path)) for path in files]
    outgoing = [header for header in headers if isinstance(header, _Outgoing)]
    send = _stow if isinstance(node, DicomWebNode) else _c_store
    sent = iter(send(node, outgoing, timeout) if outgoing else [])
    ordered = [next(sent) if isinstance(h, _Outgoing) else h for h in headers]
    for result in ordered:
        log = logger.info if result.status == "stored" else logger.warning
        log(
            "push of %s to node %s: %s %s",
            result.file,
            node.name,
            result.status,
            result.reason or "",
        )
    return ordered


def _header(node: DicomNode, path: Path) -> _Outgoing | PushResult:
    """The addressing fields of ``path``, or a failed result when it is no readable DICOM file."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return _Outgoing(
            path, UID(ds.SOPClassUID), str(ds.SOPInstanceUID), UID(ds.file_meta.TransferSyntaxUID)
        )
    except (OSError, InvalidDicomError, AttributeError) as error:
        reason = f"not a readable DICOM file: {type(error).__name__}"
        return PushResult(node.name, str(path), "", "failed", reason)


def _result(node: DicomNode, item: _Outgoing, stored: bool, reason: str | None) -> PushResult:
    status: Literal["stored", "failed"] = "stored" if stored else "failed"
    return PushResult(node.name, str(item.path), item.sop_instance_uid, status, reason)


# DICOMweb: STOW-RS, one request per file so that each file has its own outcome


def _stow(node: DicomWebNode, outgoing: list[_Outgoing], timeout: float) -> list[PushResult]:
    """STOW-RS each file; once the node is unreachable, the rest fail without a try."""
    client = dicomweb_client(node, timeout)
    results = []
    unreachable: str | None = None
    for item in outgoing:
        if unreachable is not None:
            results.append(_result(node, item, False, unreachable))
            continue
        try:
            response = client.store_instances([pydicom.dcmread(item.path)])
        except requests.RequestException as error:
            reason = http_reason(error, timeout)
            unreachable = None if error.response is not None else reason
            results.append(_result(node, item, False, reason))
            continue
        results.append(_stow_result(node, item, response))
    return results


def _stow_result(node: DicomWebNode, item: _Outgoing, response: Dataset) -> PushResult:
    """Our instance's outcome in a STOW-RS response (PS3.18 Table 10.5.3-1)."""
    for failed in response.get("FailedSOPSequence", []):
        if failed.get("ReferencedSOPInstanceUID") == item.sop_instance_uid:
            code = int(failed.get("FailureReason", 0x0110))
            return _result(node, item, False, f"STOW-RS failure reason 0x{code:04X}")
    for stored in response.get("ReferencedSOPSequence", []):
        if stored.get("ReferencedSOPInstanceUID") == item.sop_instance_uid:
            warning = stored.get("WarningReason")
            reason = None if warning is None else f"STOW-RS warning reason 0x{int(warning):04X}"
            return _result(node, item, True, reason)
    return _result(node, item, True, "the STOW-RS response does not list the instance")


# DIMSE: C-STORE, all files over one association


def _contexts(outgoing: list[_Outgoing]) -> list:
    """A context per SOP class and transfer syntax; uncompressed files may also be converted."""
    wanted = {(item.sop_class_uid, item.transfer_syntax_uid) for item in outgoing}
    return [
        build_context(sop_class, [syntax, *([] if syntax.is_compressed else UNCOMPRESSED)])
        for sop_class, syntax in sorted(wanted)
    ]


def _c_store(node: DimseNode, outgoing: list[_Outgoing], timeout: float) -> list[PushResult]:
    """C-STORE each file over one association; once it is gone, the rest fail without a try."""
    try:
        association = associate(node, _contexts(outgoing), timeout)
    except NodeError as error:
        return [_result(node, item, False, error.reason) for item in outgoing]
    results: list[PushResult] = []
    for item in outgoing:
        if (results and results[-1].reason == NO_RESPONSE) or not association.is_established:
            results.append(_result(node, item, False, "the association ended before this file"))
        else:
            results.append(_c_store_one(node, association, item))
    if association.is_established:
        association.abort() if results[-1].reason == NO_RESPONSE else association.release()
    return results


def _c_store_one(node: DimseNode, association: Association, item: _Outgoing) -> PushResult:
    """One C-STORE and its status."""
    try:
        status = association.send_c_store(item.path)
    except ValueError:
        reason = (
            f"the node accepted no presentation context for SOP class {item.sop_class_uid} "
            f"in transfer syntax {item.transfer_syntax_uid}"
        )
        return _result(node, item, False, reason)
    except (RuntimeError, OSError) as error:
        return _result(node, item, False, f"C-STORE failed: {type(error).__name__}")
    if "Status" not in status:
        return _result(node, item, False, NO_RESPONSE)
    value = int(status.Status)
    comment = str(status.get("ErrorComment", "")).strip()
    reason = f"C-STORE status 0x{value:04X} {comment}".rstrip()
    if value == 0x0000:
        return _result(node, item, True, None)
    return _result(node, item, value in STORE_WARNINGS, reason)
