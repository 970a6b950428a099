"""The HTTP service: SegmentationService (CPU) parses requests and runs the pipeline.

service.py builds the concrete class from this base, with the registry and the ModelRunner
dependency as class attributes.
"""

import logging
import sys
from typing import Any

import anyio
import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..catalog.registry import Registry, build_registry, weights_source
from ..catalog.spec import load_spec
from ..errors import NnunetBentoError, SpecError
from ..io.sandbox import PathRoots
from ..pipeline import SegmentationPipeline
from ..request import InferenceRequest
from ..settings import ServeSettings, allowed_origins, load_settings
from .error_body import error_response
from .runner_service import RemotePredictor

logger = logging.getLogger("nnunet_bento")


def load_registry_or_exit(settings: ServeSettings) -> Registry:
    """The registry of the spec named by MODEL_SERVE_SPEC; a spec error stops start-up."""
    try:
        return build_registry(load_spec(settings.model_serve_spec), weights_source(settings))
    except SpecError as error:
        sys.exit(f"nnunet-bento cannot start: {error}")


def segmentation_config(settings: ServeSettings) -> dict[str, Any]:
    return {
        "name": "SegmentationService",
        "workers": 1,
        "traffic": {"timeout": settings.nnunet_bento_request_timeout_s},
        "http": {"port": settings.nnunet_serve_port, "host": settings.nnunet_serve_host},
    }


def path_roots(settings: ServeSettings) -> PathRoots:
    """The configured input and output roots."""
    return PathRoots.from_settings(
        settings.nnunet_bento_input_roots, settings.nnunet_bento_output_root
    )


def guard_options(settings: ServeSettings) -> dict[str, Any]:
    """RequestGuard's options from the settings."""
    token = settings.nnunet_bento_api_token
    return {
        "token": token.get_secret_value() if token else None,
        "allowed_origins": allowed_origins(settings),
    }


def warn_about_open_doors(settings: ServeSettings) -> None:
    """One start-up warning for each protection that the settings leave off."""
    if settings.nnunet_bento_api_token is None:
        logger.warning(
            "NNUNET_BENTO_API_TOKEN is not set: every route answers without a token; "
            "set it before exposing the port beyond this machine"
        )
    if path_roots(settings).unrestricted:
        logger.warning(
            "NNUNET_BENTO_INPUT_ROOTS and NNUNET_BENTO_OUTPUT_ROOT are not set: requests may "
            "read and write any path this process can; set them before exposing the port"
        )


class SegmentationServiceBase:
    """HTTP entry point: parses requests, runs the pipeline in a thread, answers JSON."""

    registry: Registry
    runner: Any
    get_routes: Starlette

    def __init__(self) -> None:
        self.settings = load_settings()
        warn_about_open_doors(self.settings)
        self.pipeline = SegmentationPipeline(
            self.registry, RemotePredictor(self.runner), roots=path_roots(self.settings)
        )
        self.device: str | None = None
        self.get_routes.state.service = self

    @bentoml.api(input_spec=InferenceRequest)
    async def infer(self, **fields: Any) -> dict[str, Any]:
        """Run one inference request (a model, or a cascade of models)."""
        request = InferenceRequest(**fields)
        try:
            response = await anyio.to_thread.run_sync(self.pipeline.run, request)
        except NnunetBentoError as error:
            logger.warning(
                "request for %s failed: %s", request.nnunet_id, error, exc_info=self.settings.debug
            )
            return error_response(error.status_code, str(error))
        except Exception as error:
            logger.exception("request for %s failed", request.nnunet_id)
            return error_response(
                500,
                f"inference failed: {type(error).__name__} while running model(s) "
                f"{', '.join(request.model_ids)}; the server log has the details",
            )
        return response.model_dump(mode="json")

    @bentoml.api
    async def model_info(self) -> dict[str, Any]:
        """The registry: one record per model id, with the device that runs the models."""
        return await self.describe_models()

    async def describe_models(self) -> dict[str, Any]:
        """The /model_info body; the runner's device is asked once and remembered."""
        if self.device is None:
            self.device = (await self.runner.to_async.device_info())["device"]
        info: dict[str, Any] = {
            model.id: {**model.info(), "available": True, "device": self.device}
            for model in self.registry.models.values()
        }
        for model_id, reason in self.registry.disabled.items():
            info[model_id] = {"id": model_id, "available": False, "error": reason}
        return info

    @bentoml.api(route="/request-params")
    async def request_params(self) -> dict[str, Any]:
        """The JSON schema of the /infer body."""
        return InferenceRequest.model_json_schema()


def build_get_routes() -> Starlette:
    """GET /model_info and GET /request-params, as the seed's curl examples use them."""

    async def model_info(request: Request) -> JSONResponse:
        return JSONResponse(await request.app.state.service.describe_models())

    async def request_params(request: Request) -> JSONResponse:
        return JSONResponse(InferenceRequest.model_json_schema())

    app = Starlette(
        routes=[
            Route("/model_info", model_info, methods=["GET"]),
            Route("/request-params", request_params, methods=["GET"]),
        ]
    )
    app.state.service = None
    return app
