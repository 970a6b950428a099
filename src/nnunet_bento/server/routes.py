"""The app mounted beside BentoML's APIs: the GET form of each API that takes no input, the
upload and job routes, and the OpenAPI document that lists every route.

Its handlers find this worker's SegmentationService with bentoml.get_current_service(). Each
handler's docstring is its operation's description in the OpenAPI document. BentoML adds its
own /docs.json route after the mounted apps, so ours answers (tests/test_openapi.py checks it).
"""

from collections.abc import Awaitable, Callable

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .job_routes import JOB_ROUTES, JobRoutes
from .openapi import openapi_document

Handler = Callable[[Request], Awaitable[Response]]


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
