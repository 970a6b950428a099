"""Clients for a configured node, built on dicomweb-client and pynetdicom, and failure reasons.

A reason names what went wrong, never the node's URL or host: it reaches HTTP clients.
"""

import base64
import os
import re

import requests
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE
from pynetdicom.association import Association

from .nodes import DicomWebNode, DimseNode

DEFAULT_TIMEOUT_S = 30.0
ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def dicomweb_client(node: DicomWebNode, timeout: float) -> DICOMwebClient:
    """A DICOMweb client for ``node``, with its credentials and ``timeout`` on every request."""
    return DICOMwebClient(
        str(node.dicomweb_url).rstrip("/"), headers=auth_headers(node), timeout=timeout
    )


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


def associate(node: DimseNode, contexts: list, timeout: float, **options: object) -> Association:
    """An association with ``node`` proposing ``contexts``; check ``is_established``."""
    ae = AE(ae_title=node.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = contexts
    return ae.associate(node.host, node.port, ae_title=node.ae_title, **options)


def association_reason(association: Association, node: DimseNode) -> str:
    """Why no association came up with ``node``."""
    if association.is_rejected:
        return (
            f"association rejected: check that the node's AE title is {node.ae_title} and "
            f"that it accepts our calling AE title {node.calling_ae_title}"
        )
    if association.is_aborted:
        return "association aborted by the node"
    return "no association: connection refused or timed out"
