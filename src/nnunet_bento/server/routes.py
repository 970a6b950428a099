"""The app mounted beside BentoML's APIs: the GET form of each API that takes no input, the
upload and job routes, the OpenAPI document that lists every route, and the metrics.

Its handlers find this worker's SegmentationService with bentoml.get_current_service(). Each
handler's docstring is its operation's description in the OpenAPI document. BentoML adds its
own /docs.json route after the mounted apps, so ours answers (tests/test_openapi.py checks it).

BentoML's HTTP instrument labels each request with its raw path: every job id polled and every
path a caller makes up would be a series of its own in /metrics. So SegmentationService runs
with BentoML's metrics off (METRICS_CONFIG), and RouteMetrics runs BentoML's instrument with the
route template as the path it sees, beside our /metrics, which answers what BentoML's does.
"""

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .guard import route_template
from .job_routes import JOB_ROUTES, JobRoutes
from .openapi import openapi_document

Handler = Callable[[Request], Awaitable[Response]]
#: SegmentationService's `metrics` config: BentoML's instrument and /metrics off, for ours.
METRICS_CONFIG: dict[str, Any] = {"enabled": False}
#: The scope key that keeps a request's own path while the instrument sees its template.
REQUEST_PATH = "nnunet_bento.request_path"


def build_routes(service: bentoml.Service) -> Starlette:
    """The app to mount on ``service`` at "/"."""
    return Starlette(
        routes=[
            *get_forms(service),
            *(
                Route(spec.path, job_handler(spec.name), methods=[spec.method], name=spec.name)
                for spec in JOB_ROUTES
            ),
            Route("/docs.json", openapi_json, methods=["GET"], name="openapi"),
            Route("/metrics", metrics, methods=["GET"], name="metrics"),
        ]
    )


def get_forms(service: bentoml.Service) -> list[Route]:
    """A GET route for each API without inputs (nnunet_serve's curl examples use GET)."""
    return [
        Route(api.route, get_form(name, api.doc), methods=["GET"], name=name)
        for name, api in service.apis.items()
        if not api.input_spec.model_fields
    ]


def get_form(name: str, doc: str | None) -> Handler:
    """A GET handler that answers what the API ``name`` answers to a POST: it calls the same
    method of the service, in this process (``local``) as BentoML's POST route does."""

    async def handle(request: Request) -> Response:
        return JSONResponse(await getattr(bentoml.get_current_service(), name).local())

    handle.__doc__ = doc
    return handle


def job_handler(name: str) -> Handler:
    """The handler that calls the JobRoutes method ``name`` of this worker's service."""

    async def handle(request: Request) -> Response:
        return await getattr(bentoml.get_current_service().job_routes, name)(request)

    handle.__doc__ = getattr(JobRoutes, name).__doc__
    return handle


async def openapi_json(request: Request) -> JSONResponse:
    """This document: every route, the statuses each answers, and the error body."""
    instance = bentoml.get_current_service()
    token_required = instance.settings.nnunet_bento_api_token is not None
    return JSONResponse(openapi_document(instance.bento_service, token_required))


def bentoml_metrics() -> tuple[Any, Callable[[ASGIApp], ASGIApp]]:
    """BentoML's metrics client and its HTTP instrument (bound to the configured namespace):
    the one place that reaches into BentoML's private metrics modules."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    namespace = BentoMLContainer.api_server_config.metrics.namespace.get()
    return BentoMLContainer.metrics_client.get(), lambda app: RunnerTrafficMetricsMiddleware(
        app, namespace=namespace
    )


async def metrics(request: Request) -> Response:
    """The Prometheus metrics of every process of the server; each request's `endpoint` label
    is its route template (`/jobs/{job_id}`), or `unknown` for a path that no route serves."""
    client, _ = bentoml_metrics()
    body = await anyio.to_thread.run_sync(client.generate_latest)
    return Response(body, media_type=client.CONTENT_TYPE_LATEST)


class RouteMetrics:
    """BentoML's HTTP instrument (requests, durations and requests in progress by endpoint
    and status), shown the route template of each request as its path; the app behind it
    gets the request's own path back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        _, instrument = bentoml_metrics()
        self.instrument = instrument(self.with_request_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        template = route_template(getattr(scope.get("app"), "routes", ()), scope)
        await self.instrument(
            {**scope, "path": template, REQUEST_PATH: scope["path"]}, receive, send
        )

    async def with_request_path(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app behind the instrument, called with the request's own path."""
        await self.app({**scope, "path": scope[REQUEST_PATH]}, receive, send)
