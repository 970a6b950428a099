"""The OpenAPI document served at /docs.json: BentoML's, completed with every route we serve.

BentoML documents its APIs (POST only, with its own error bodies) and its probes. This module
keeps their request bodies and success bodies, and adds the routes of the mounted app (the GET
forms of the APIs, the upload and job routes, this document). Every operation then lists each
status that it can answer, with our error body: those of its own work, declared once per route
name in ANSWERS, and those that any route of a kind can answer (403 for a foreign Origin, 500
for an unexpected error; 401 when a token is set, 421 for a foreign Host when none is, the
probes aside; 400 and 415 for a body). An operation's description is its handler's docstring.
"""

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

import bentoml
from pydantic import BaseModel
from starlette.routing import Route

from .. import __version__
from ..request import InferenceRequest, InferenceResponse
from .guard import OPEN_PATHS, PROBE_PATHS
from .job_routes import JobCreated, JobList, JobQuery, JobState, UploadForm

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
Content = Mapping[str, dict[str, Any]]
DESCRIPTION = (
    "nnU-Net v2 segmentation models served by BentoML. Every error answers "
    '{"status": "failed", "error": message}. A method that a path does not list answers 405 '
    "with an Allow header. When the server has a token (NNUNET_BENTO_API_TOKEN), every route "
    "but the health probes and the metrics needs `Authorization: Bearer <token>`; without a "
    "token, every route but the health probes answers only a loopback Host (localhost, "
    "127.0.0.1, [::1]) or one in NNUNET_BENTO_ALLOWED_HOSTS, and any other Host a 421."
)
AUTHENTICATE = {"WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}}}


class ErrorBody(BaseModel):
    """Every error answer: nnunet_serve's {"status": "failed", "error": message}."""

    status: Literal["failed"]
    error: str


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def json_content(model: type[BaseModel]) -> Content:
    return {"application/json": {"schema": ref(model)}}


TEXT: Content = {"text/plain": {"schema": {"type": "string"}}}
ZIP: Content = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
UPLOAD: Content = {"multipart/form-data": {"schema": ref(UploadForm)}}
COMPONENT_MODELS = (
    (ErrorBody, "validation"),
    (InferenceRequest, "validation"),
    (InferenceResponse, "serialization"),
    (JobCreated, "serialization"),
    (JobState, "serialization"),
    (JobList, "serialization"),
    (UploadForm, "validation"),
)
#: What running a request can answer besides success (the statuses of errors.py).
RUN_ERRORS = (400, 403, 404, 409, 413, 502, 503, 504, 507)
REASONS = {
    400: "The request is malformed or does not fit the model.",
    401: "The bearer token is missing or wrong.",
    403: "A foreign Origin, or a path outside its configured root.",
    404: "An input, a model file or a job does not exist.",
    409: "The request collides with existing results or running work, or the job is not in a "
    "state for this.",
    413: "An input, an upload or a result is past a configured bound.",
    415: "The body is not application/json (or multipart/form-data where an upload is taken).",
    421: "The server has no token and the Host is neither loopback nor in "
    "NNUNET_BENTO_ALLOWED_HOSTS.",
    500: "An unexpected error; the server log has the details.",
    502: "A DICOM node failed or could not be reached.",
    503: "The server is busy or the model runner is unavailable; retry later.",
    504: "The request ran past NNUNET_BENTO_REQUEST_TIMEOUT_S; nothing was written.",
    507: "The output disk is full, or an upload does not fit NNUNET_BENTO_MAX_WORK_MB; nothing "
    "was written.",
}


@dataclass(frozen=True)
class Answers:
    """What one route answers besides the statuses that any route of its kind answers: the
    error statuses of its work, its success status and body by media type (None: BentoML's),
    its request body (None: BentoML's, or none), the routes that take the job_id it answers,
    the success statuses it answers without a body, and the model of its query."""

    errors: tuple[int, ...] = ()
    success: int = 200
    content: Content | None = None
    body: Content | None = None
    links: tuple[str, ...] = ()
    empty: tuple[int, ...] = ()
    query: type[BaseModel] | None = None


ANSWERS = {
    "livez": Answers(content=TEXT),
    "healthz": Answers(content=TEXT),
    "readyz": Answers((503,), content=TEXT),
    "metrics": Answers(content=TEXT),
    "openapi": Answers(content={"application/json": {"schema": {"type": "object"}}}),
    "infer": Answers(RUN_ERRORS, content=json_content(InferenceResponse)),
    "model_info": Answers(),
    "request_params": Answers(),
    "dicom_nodes_info": Answers(),
    "infer_file": Answers(RUN_ERRORS, content=ZIP, body=UPLOAD),
    "submit": Answers(
        (413, 503),
        202,
        json_content(JobCreated),
        json_content(InferenceRequest),
        ("status", "result", "cancel"),
    ),
    "submit_upload": Answers(
        (413, 503, 507), 202, json_content(JobCreated), UPLOAD, ("status", "result", "cancel")
    ),
    "list_jobs": Answers((400,), content=json_content(JobList), query=JobQuery),
    "status": Answers((404,), content=json_content(JobState)),
    "cancel": Answers((404,), content=json_content(JobState), empty=(204,)),
    "result": Answers(RUN_ERRORS, content={**json_content(InferenceResponse), **ZIP}),
}


@dataclass(frozen=True)
class Found:
    """An operation as found on a service: its route name, what is known of it before it is
    completed (BentoML's documentation, or the route's description and parameters), and
    whether it is the GET form of a BentoML API."""

    service: str
    name: str
    base: dict[str, Any]
    get_form: bool = False

    @property
    def operation_id(self) -> str:
        """BentoML's id of an API, <service>__<route name>, for every route; _get for a GET
        form."""
        return operation_id(self.service, self.name) + ("_get" if self.get_form else "")


def operation_id(service: str, name: str) -> str:
    return f"{service}__{name}"


def openapi_document(service: bentoml.Service, token_required: bool) -> dict[str, Any]:
    """The OpenAPI document of ``service``: every route it serves, every status it answers."""
    spec = service.openapi_spec.asdict()
    found = dict(bentoml_operations(service.name, spec["paths"]))
    for route in mounted_routes(service):
        for method in sorted(route.methods - {"HEAD"}):
            found[route.path_format, method.lower()] = mounted_operation(service.name, route, found)
    paths: dict[str, dict[str, Any]] = {}
    for (path, method), operation in found.items():
        paths.setdefault(path, {})[method] = complete(operation, path, method, token_required)
    spec.update(
        openapi=OPENAPI_VERSION,
        info={**spec["info"], "description": DESCRIPTION, "version": __version__},
        paths=paths,
        components=components(spec["components"], token_required),
    )
    return spec


def bentoml_operations(
    service_name: str, paths: dict[str, dict[str, Any]]
) -> Iterator[tuple[tuple[str, str], Found]]:
    """BentoML's operations by (path, method). BentoML names its probes after their paths."""
    for path, item in paths.items():
        for method, operation in item.items():
            name = operation.get("x-bentoml-name", path.strip("/"))
            yield (path, method), Found(service_name, name, operation)


def mounted_routes(service: bentoml.Service) -> Iterator[Route]:
    """The routes of the Starlette apps mounted on ``service``."""
    for app, _path, _name in service.mount_apps:
        yield from (route for route in app.routes if isinstance(route, Route))


def mounted_operation(
    service_name: str, route: Route, found: dict[tuple[str, str], Found]
) -> Found:
    """A mounted route's operation; a GET form takes the success body of its API's POST."""
    base = {"description": inspect.getdoc(route.endpoint) or ""}
    if parameters := path_parameters(route):
        base["parameters"] = parameters
    api = found.get((route.path_format, "post"))
    if api is None or api.name != route.name:
        return Found(service_name, route.name, base)
    get_form = {**base, "responses": api.base["responses"], "tags": api.base["tags"]}
    return Found(service_name, route.name, get_form, get_form=True)


def path_parameters(route: Route) -> list[dict[str, Any]]:
    """The route's path parameters: strings of their convertor's pattern."""
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{convertor.regex}$"},
        }
        for name, convertor in route.param_convertors.items()
    ]


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The query parameters of a route's query model: each field, its description and its
    schema (an optional field's, without null: an absent parameter is null)."""
    schema = model.model_json_schema(ref_template=REF)
    parameters = []
    for name, field_schema in schema["properties"].items():
        options = [option for option in field_schema.get("anyOf", []) if option != {"type": "null"}]
        value = options[0] if options else field_schema
        kept = {key: item for key, item in value.items() if key not in ("title", "description")}
        if field_schema.get("default") is not None:
            kept["default"] = field_schema["default"]
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in schema.get("required", ()),
                "description": field_schema.get("description", ""),
                "schema": kept,
            }
        )
    return parameters


def complete(found: Found, path: str, method: str, token_required: bool) -> dict[str, Any]:
    """One operation with its parameters, request body, responses and security."""
    answers = ANSWERS[found.name]
    guarded = token_required and path not in OPEN_PATHS
    host_checked = not token_required and path not in PROBE_PATHS
    kept = ("tags", "x-bentoml-name", "parameters")
    operation: dict[str, Any] = {
        **{key: found.base[key] for key in kept if key in found.base},
        **({"parameters": query_parameters(answers.query)} if answers.query else {}),
        "operationId": found.operation_id,
        "description": found.base.get("description", ""),
        "responses": {
            **success_response(answers, found),
            **error_responses(answers, method, guarded, host_checked),
        },
    }
    if method == "post":
        body = answers.body or found.base["requestBody"]["content"]
        operation["requestBody"] = {"required": True, "content": body}
    if token_required:
        operation["security"] = [{"bearer": []}] if guarded else []
    return operation


def success_response(answers: Answers, found: Found) -> dict[str, Any]:
    """The success answers: the one with a body, by media type, and links to the routes that
    take its job_id; and those without a body."""
    known = {str(status): answer for status, answer in found.base.get("responses", {}).items()}
    content = answers.content or known.get("200", {}).get("content")
    response: dict[str, Any] = {"description": HTTPStatus(answers.success).phrase}
    if content:
        response["content"] = content
    if answers.links:
        response["links"] = {
            name: {
                "operationId": operation_id(found.service, name),
                "parameters": {"job_id": "$response.body#/job_id"},
            }
            for name in answers.links
        }
    empty = {str(status): {"description": HTTPStatus(status).phrase} for status in answers.empty}
    return {str(answers.success): response, **empty}


def error_responses(
    answers: Answers, method: str, guarded: bool, host_checked: bool
) -> dict[str, Any]:
    """Each error status the operation can answer, with our error body."""
    statuses = {*answers.errors, 403, 500}
    if guarded:
        statuses.add(401)
    if host_checked:
        statuses.add(421)
    if method == "post":
        statuses |= {400, 415}
    return {
        str(status): {
            "description": REASONS[status],
            "content": json_content(ErrorBody),
            **({"headers": AUTHENTICATE} if status == 401 else {}),
        }
        for status in sorted(statuses)
    }


def components(bentoml_components: dict[str, Any], token_required: bool) -> dict[str, Any]:
    """BentoML's schemas, ours, and the bearer scheme when a token is set."""
    schemas = dict(bentoml_components.get("schemas", {}))
    for model, mode in COMPONENT_MODELS:
        schema = model.model_json_schema(ref_template=REF, mode=mode)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    result = {**bentoml_components, "schemas": schemas}
    if token_required:
        result["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return result
