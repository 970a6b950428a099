"""DICOM nodes (PACS) named in the NNUNET_BENTO_DICOM_NODES file, and their names in requests.

A request names a node, never an address: only the server's configuration says where a node
is, so no caller can make the server connect anywhere else.
"""

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator

from ..config_file import read_config_file
from ..errors import RequestError, SpecError

NODES_ENV = "NNUNET_BENTO_DICOM_NODES"
NodeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
AeTitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]+$")]
ADDRESS_MARKS = ("://", "/", "\\", ":", "@")
DOTTED_HOST = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\.?$")


class DicomWebNode(BaseModel):
    """A DICOMweb server: QIDO-RS and WADO-RS to pull, STOW-RS to push.

    ``auth_env`` names an environment variable whose value is sent as credentials: a bearer
    token (``auth: bearer``, the default) or ``user:password`` (``auth: basic``). The file
    never holds the secret itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dicomweb"] = "dicomweb"
    name: NodeName
    dicomweb_url: HttpUrl
    auth_env: str | None = Field(None, min_length=1)
    auth: Literal["bearer", "basic"] = "bearer"

    @field_validator("auth_env")
    @classmethod
    def _auth_env_set(cls, name: str | None) -> str | None:
        if name is not None and not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set")
        return name


class DimseNode(BaseModel):
    """A DIMSE peer (DICOM upper layer): C-FIND and C-GET to pull, C-STORE to push."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dimse"] = "dimse"
    name: NodeName
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    ae_title: AeTitle
    calling_ae_title: AeTitle = "NNUNET_BENTO"

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _not_blank(cls, title: str) -> str:
        if not title.strip():
            raise ValueError("an AE title must not be blank")
        return title


DicomNode = DicomWebNode | DimseNode
NODE_CLASSES: dict[str, type[DicomNode]] = {"dicomweb": DicomWebNode, "dimse": DimseNode}


def load_nodes(path: Path) -> dict[str, DicomNode]:
    """Read and validate a nodes file (YAML, ``nodes:`` a list); SpecError names node and field."""
    return parse_nodes(read_config_file(path, "DICOM nodes file", NODES_ENV), str(path))


def parse_nodes(raw: Any, source: str) -> dict[str, DicomNode]:
    """Validate a loaded nodes document: every entry, and no name twice."""
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list):
        raise SpecError(f"{source}: expected a mapping with a 'nodes' list")
    unknown = sorted(set(raw) - {"nodes"})
    if unknown:
        raise SpecError(f"{source}: unknown top-level field(s) {unknown}; expected only 'nodes'")
    nodes: dict[str, DicomNode] = {}
    for index, entry in enumerate(raw["nodes"]):
        node = _parse_node(entry, index, source)
        if node.name in nodes:
            raise SpecError(f"{source}: node {node.name!r}, field 'name': used by two nodes")
        nodes[node.name] = node
    return nodes


def _label(entry: Any, index: int) -> str:
    """'node 'pacs'' by its name, or 'node #3' for an entry without a usable name."""
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"node {name!r}" if isinstance(name, str) and name else f"node #{index + 1}"


def _node_class(entry: dict, label: str, source: str) -> type[DicomNode]:
    """The node kind: ``kind`` when given, else dicomweb_url (DICOMweb) or host (DIMSE)."""
    kind = entry.get("kind") or ("dicomweb" if "dicomweb_url" in entry else None)
    kind = kind or ("dimse" if "host" in entry else None)
    if kind not in NODE_CLASSES:
        raise SpecError(
            f"{source}: {label}, field 'kind': give dicomweb_url (DICOMweb) or host, port and "
            f"ae_title (DIMSE), or kind: dicomweb | dimse"
        )
    return NODE_CLASSES[kind]


def _parse_node(entry: Any, index: int, source: str) -> DicomNode:
    """One validated entry; an error names the node and each field at fault."""
    label = _label(entry, index)
    if not isinstance(entry, dict):
        raise SpecError(f"{source}: {label}: expected a mapping, got {type(entry).__name__}")
    try:
        return _node_class(entry, label, source).model_validate(entry)
    except ValidationError as error:
        problems = "; ".join(
            f"{label}, field {'.'.join(map(str, problem['loc']))!r}: {problem['msg']}"
            for problem in error.errors()
        )
        raise SpecError(f"{source}: {problems}") from None


def node_kinds(nodes: Mapping[str, DicomNode]) -> list[dict[str, str]]:
    """Name and kind of each node, for GET /dicom-nodes: no URL, host or credentials."""
    return [{"name": node.name, "kind": node.kind} for node in nodes.values()]


def _looks_like_address(value: str) -> bool:
    """Whether a node name given by a request is a URL, a host, a host:port or an IP."""
    if any(mark in value for mark in ADDRESS_MARKS) or value.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return bool(DOTTED_HOST.match(value))
    return True


def resolve_node(field: str, name: str, nodes: Mapping[str, DicomNode]) -> DicomNode:
    """The configured node that a request field names; RequestError (400) naming the field."""
    if name in nodes:
        return nodes[name]
    if _looks_like_address(name):
        raise RequestError(
            f"{field}: {name!r} looks like an address; give a node name from {NODES_ENV}, "
            f"not an address ({_known(nodes)})"
        )
    raise RequestError(f"{field}: unknown DICOM node {name!r} ({_known(nodes)})")


def _known(nodes: Mapping[str, DicomNode]) -> str:
    return f"known nodes: {', '.join(nodes)}" if nodes else f"no node is configured in {NODES_ENV}"
