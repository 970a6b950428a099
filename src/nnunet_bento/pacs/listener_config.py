"""The DICOM listener's configuration: the YAML file that NNUNET_BENTO_LISTENER names.

Guarantees:

- The whole file is validated at start-up; an error names the route and the field at fault
  (``route 'prostate-t2', field 'match.Modality': ...``) or the top-level field.
- A route's ``match`` (one series) or ``series`` (one match per channel, exactly one of the
  two) maps DICOM keywords from pydicom's dictionary to regular expressions that compile.
  Identifying patient attributes are never matched on, so they need never be kept.
- A route's ``request`` is a valid /infer request once the listener adds the study and the
  output folder; it names no path or folder field (``LISTENER_SET_FIELDS``), no push node
  and no webhook (``push_to`` and ``notify`` belong to the route).
- ``push_to`` and ``notify`` are names only; ``check_route_names`` checks them against the
  configured DICOM nodes and webhooks.
"""

import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydicom.datadict import dictionary_VR, tag_for_keyword

from ..config_file import read_config_file
from ..errors import SpecError
from ..request import SERVER_SET_FIELDS, InferenceRequest
from ..webhooks import WEBHOOKS_ENV
from .nodes import NODES_ENV, AeTitle, NodeName

LISTENER_ENV = "NNUNET_BENTO_LISTENER"
#: Request fields that the listener sets itself: a route may not give them.
LISTENER_SET_FIELDS = tuple(
    dict.fromkeys((*SERVER_SET_FIELDS, "series_folders", "tmp_dir", "push_to", "notify"))
)
#: Patient attributes (group 0010) that are kept for matching; the others identify.
PATIENT_GROUP = 0x0010
PATIENT_KEPT = frozenset({"PatientAge", "PatientSex", "PatientSize", "PatientWeight"})
#: Value representations that hold no text to match: sequences and binary data.
UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PLACEHOLDER = "."  # study_path and output_dir while a route's request is validated


def _dicom_keyword(keyword: str) -> str:
    """A keyword of pydicom's dictionary whose value is text that a route may match."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. Modality, SeriesDescription)")
    if dictionary_VR(tag) in UNMATCHABLE_VRS:
        raise ValueError(f"{keyword} is a sequence or binary data; match a text attribute")
    if tag >> 16 == PATIENT_GROUP and keyword not in PATIENT_KEPT:
        raise ValueError(
            f"{keyword} identifies the patient and is never kept for matching; of the patient "
            f"attributes, only {', '.join(sorted(PATIENT_KEPT))} may be matched"
        )
    return keyword


def _regex(pattern: str) -> str:
    """A regular expression that compiles (it is searched case-insensitively)."""
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise ValueError(f"not a regular expression: {error}") from None
    return pattern


DicomKeyword = Annotated[str, AfterValidator(_dicom_keyword)]
Regex = Annotated[str, AfterValidator(_regex)]
Match = Annotated[dict[DicomKeyword, Regex], Field(min_length=1)]


class Route(BaseModel):
    """Which series start which request, and where the results go.

    ``match`` selects one series: every keyword's regex must be found (case-insensitive
    search) in the series' value, an absent attribute reading as empty. ``series`` selects
    one series per input channel of a multi-channel model, in channel order, from one study.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NodeName
    match: Match | None = None
    series: Annotated[list[Match], Field(min_length=1, max_length=16)] | None = Field(
        None, validate_default=True
    )
    request: dict[str, Any]
    push_to: Annotated[list[NodeName], Field(max_length=8)] = []
    notify: Annotated[list[NodeName], Field(max_length=8)] = []

    @field_validator("series")
    @classmethod
    def _match_or_series(
        cls, series: list[dict[str, str]] | None, info: ValidationInfo
    ) -> list[dict[str, str]] | None:
        if (series is None) == (info.data.get("match") is None) and "match" in info.data:
            raise ValueError(
                "give exactly one of match (one series) and series (one match per channel)"
            )
        return series

    @field_validator("request")
    @classmethod
    def _request_without_paths(cls, request: dict[str, Any]) -> dict[str, Any]:
        """A valid /infer request once the listener adds its fields; ValidationError with
        each field at fault under ``request``."""
        given = [field for field in LISTENER_SET_FIELDS if field in request]
        if given:
            reason = (
                "set by the listener, not by a route: the study and output folders come "
                "from the listener, push nodes and webhooks from the route's push_to and notify"
            )
            raise ValidationError.from_exception_data(
                "request",
                [
                    {
                        "type": "value_error",
                        "loc": (field,),
                        "input": request[field],
                        "ctx": {"error": reason},
                    }
                    for field in given
                ],
            )
        InferenceRequest.model_validate(
            {**request, "study_path": PLACEHOLDER, "output_dir": PLACEHOLDER}
        )
        return request


class ListenerConfig(BaseModel):
    """The DICOM listener: its address, the peers it accepts, settling and routes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: AeTitle = "NNUNET_BENTO"
    port: int = Field(11112, ge=0, le=65535, description="0: any free port.")
    host: str = Field("127.0.0.1", min_length=1, description="0.0.0.0: every interface.")
    allowed_calling_ae: Annotated[list[AeTitle], Field(min_length=1)]
    settle_s: float = Field(30.0, gt=0, le=86400)
    routes: list[Route] = []


def load_listener_config(path: Path) -> ListenerConfig:
    """Read and validate the listener file (YAML); SpecError names the route and field."""
    raw = read_config_file(path, "DICOM listener file", LISTENER_ENV)
    return parse_listener_config(raw, str(path))


def parse_listener_config(raw: Any, source: str) -> ListenerConfig:
    """Validate a loaded listener document: every field, every route, no route name twice."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping with ae_title, port, ..., routes")
    try:
        config = ListenerConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{_where(problem['loc'], raw)}: {problem['msg'].removeprefix('Value error, ')}"
            for problem in error.errors()
        )
        raise SpecError(f"{source}: {problems}") from None
    names = [route.name for route in config.routes]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SpecError(f"{source}: route {twice[0]!r}, field 'name': used by two routes")
    return config


def _where(loc: tuple[int | str, ...], raw: dict) -> str:
    """'route 'x', field 'match.Modality'' for a route's field, else 'field 'port''."""
    parts = [str(part) for part in loc if part != "[key]"]
    routes = raw.get("routes")
    if len(loc) > 1 and loc[0] == "routes" and isinstance(loc[1], int) and isinstance(routes, list):
        entry = routes[loc[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"route {name!r}" if isinstance(name, str) and name else f"route #{loc[1] + 1}"
        return f"{label}, field {'.'.join(parts[2:])!r}" if len(parts) > 2 else label
    return f"field {'.'.join(parts)!r}"


def check_route_names(
    config: ListenerConfig, nodes: Collection[str], webhooks: Collection[str]
) -> None:
    """SpecError naming the route and field when a push_to node or notify webhook is unknown."""
    for route in config.routes:
        for field, names, kind, env in (
            ("push_to", nodes, "DICOM node", NODES_ENV),
            ("notify", webhooks, "webhook", WEBHOOKS_ENV),
        ):
            unknown = [name for name in getattr(route, field) if name not in names]
            if unknown:
                known = f"known: {', '.join(sorted(names))}" if names else f"none is in {env}"
                raise SpecError(
                    f"route {route.name!r}, field {field!r}: unknown {kind} "
                    f"{unknown[0]!r} ({known})"
                )
