"""Clients for a configured node, built on dicomweb-client and pynetdicom, and failure reasons.

A reason names what went wrong, never the node's URL or host: it reaches HTTP clients.
"""

import base64
import logging
import os
import re
import socket
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from ..errors import UpstreamError
from .nodes import DicomWebNode, DimseNode

logger = logging.getLogger("nnunet_bento")
DEFAULT_TIMEOUT_S = 30.0
HTTP_ATTEMPTS = 3  # dicomweb-client retries failed connections and HTTP 408, 429, 503, 504
HTTP_RETRY_WAIT_MS = 250  # then waits 0.5 s, 1 s, ...
ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def dicomweb_client(node: DicomWebNode, timeout: float) -> DICOMwebClient:
    """A DICOMweb client for ``node``, with its credentials and ``timeout`` on every request."""
    client = DICOMwebClient(
        str(node.dicomweb_url).rstrip("/"), headers=auth_headers(node), timeout=timeout
    )
    client.set_http_retry_params(
        max_attempts=HTTP_ATTEMPTS, wait_exponential_multiplier=HTTP_RETRY_WAIT_MS
    )
    return client


def auth_headers(node: DicomWebNode) -> dict[str, str]:
    """The Authorization header that ``node.auth_env`` holds the secret for."""
    if node.auth_env is None:
        return {}
    secret = os.environ.get(node.auth_env, "")
    if node.auth == "basic":
        return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}
    return {"Authorization": f"Bearer {secret}"}


def http_reason(error: requests.RequestException, timeout: float) -> str:
    """What a DICOMweb request failure was: an HTTP status, a timeout or a refused connection."""
    response = error.response
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}".rstrip()
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s"
    found = ERRNO_TEXT.search(str(error))
    return (
        found.group(1).strip().lower() if found else f"connection failed ({type(error).__name__})"
    )


class NodeError(UpstreamError):
    """A node could not be reached or failed (HTTP 502); ``reason`` is the message's cause."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"DICOM node {node!r}: {reason}")
        self.reason = reason
        logger.warning("DICOM node %s failed: %s", node, reason)


def associate(node: DimseNode, contexts: list, timeout: float, **options: Any) -> Association:
    """An established association with ``node`` proposing ``contexts``, else NodeError.

    Our socket sends without delay (TCP_NODELAY): with Nagle's algorithm on, each small
    DIMSE message waits for the peer's delayed ACK (about 40 ms per C-STORE).
    """
    opened: list[bool] = []

    def on_open(event: Event) -> None:
        opened.append(True)
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=node.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = contexts
    handlers = [*options.pop("evt_handlers", []), (evt.EVT_CONN_OPEN, on_open)]
    association = ae.associate(
        node.host, node.port, ae_title=node.ae_title, evt_handlers=handlers, **options
    )
    if association.is_established:
        return association
    if not opened:
        raise NodeError(node.name, f"connection refused or no answer within {timeout:g} s")
    if association.is_rejected:
        logger.warning(
            "node %s rejected the association: called AE title %s, calling AE title %s",
            node.name,
            node.ae_title,
            node.calling_ae_title,
        )
        raise NodeError(
            node.name,
            "association rejected: check the node's AE title and our calling AE title in "
            "NNUNET_BENTO_DICOM_NODES against the node's configuration (the server log names them)",
        )
    raise NodeError(node.name, "association aborted by the node")
