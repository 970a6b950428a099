"""The HTTP service: SegmentationService (CPU) parses requests and runs the pipeline.

service.py builds the concrete class from this base, with the registry and the ModelRunner
dependency as class attributes.
"""

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import bentoml
import httpx
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse

from ..catalog.registry import Registry, build_registry, weights_source
from ..catalog.spec import load_spec
from ..errors import DeviceUnavailableError, NnunetBentoError, SpecError, WorkFolderError
from ..io.path_roots import PathRoots
from ..io.staging import remove_stale_staging
from ..io.work_folder import claim_work_folder, prepare_work_folder, sweep_work_folder
from ..job_store import JobStore
from ..pacs.listener_config import ListenerConfig, check_route_names, load_listener_config
from ..pacs.nodes import DicomNode, load_nodes, node_kinds
from ..pipeline import SegmentationPipeline, StepCallback
from ..request import InferenceRequest, InferenceResponse
from ..settings import ServeSettings, allowed_hosts, allowed_origins, load_settings
from ..webhooks import Webhook, load_webhooks
from .admission import Admission, deadline_check
from .error_body import error_response
from .job_routes import UPLOAD_PATHS, JobRoutes, answered_at_once, refusal
from .listener_service import ListenerService, check_route_models
from .request_body import StrictInferenceRequest, parse_request
from .routes import METRICS_CONFIG
from .runner_service import RunnerServicePredictor

logger = logging.getLogger("nnunet_bento")
DEVICE_QUERY_S = 0.5


def load_registry_or_exit(settings: ServeSettings) -> Registry:
    """The registry of the spec named by MODEL_SERVE_SPEC; a spec error stops start-up."""
    try:
        return build_registry(load_spec(settings.model_serve_spec), weights_source(settings))
    except SpecError as error:
        sys.exit(f"nnunet-bento cannot start: {error}")


def load_dicom_nodes_or_exit(settings: ServeSettings) -> dict[str, DicomNode]:
    """The DICOM nodes of NNUNET_BENTO_DICOM_NODES (none when unset); an error stops start-up."""
    if settings.nnunet_bento_dicom_nodes is None:
        return {}
    try:
        return load_nodes(settings.nnunet_bento_dicom_nodes)
    except SpecError as error:
        sys.exit(f"nnunet-bento cannot start: {error}")


def load_webhooks_or_exit(settings: ServeSettings) -> dict[str, Webhook]:
    """The webhooks of NNUNET_BENTO_WEBHOOKS (none when unset); an error stops start-up."""
    if settings.nnunet_bento_webhooks is None:
        return {}
    try:
        return load_webhooks(settings.nnunet_bento_webhooks)
    except SpecError as error:
        sys.exit(f"nnunet-bento cannot start: {error}")


def load_listener_or_exit(
    settings: ServeSettings,
    registry: Registry,
    nodes: dict[str, DicomNode],
    webhooks: dict[str, Webhook],
) -> ListenerConfig | None:
    """The DICOM listener of NNUNET_BENTO_LISTENER (None when unset), its routes checked
    against the models, nodes and webhooks; a problem stops start-up in one line that names
    the file, the route and the field."""
    path = settings.nnunet_bento_listener
    if path is None:
        return None
    if settings.nnunet_bento_output_root is None:
        sys.exit(
            "nnunet-bento cannot start: NNUNET_BENTO_LISTENER needs NNUNET_BENTO_OUTPUT_ROOT, "
            "the folder under which the listener's jobs commit their outputs"
        )
    try:
        config = load_listener_config(path)
    except SpecError as error:
        sys.exit(f"nnunet-bento cannot start: {error}")
    try:
        check_route_names(config, nodes, webhooks)
        check_route_models(config, registry)
    except SpecError as error:
        sys.exit(f"nnunet-bento cannot start: {path}: {error}")
    return config


def segmentation_config(settings: ServeSettings) -> dict[str, Any]:
    return {
        "name": "SegmentationService",
        "workers": 1,
        "traffic": {"timeout": settings.nnunet_bento_request_timeout_s},
        "http": {"port": settings.nnunet_serve_port, "host": settings.nnunet_serve_host},
        "metrics": METRICS_CONFIG,
    }


def path_roots(settings: ServeSettings) -> PathRoots:
    """The configured input and output roots, and our work folder (pulled series, uploads)."""
    return PathRoots.from_settings(
        settings.nnunet_bento_input_roots,
        settings.nnunet_bento_output_root,
        work_roots=[settings.nnunet_bento_work_dir],
    )


def guard_options(settings: ServeSettings) -> dict[str, Any]:
    """RequestGuard's options from the settings."""
    token = settings.nnunet_bento_api_token
    return {
        "token": token.get_secret_value() if token else None,
        "allowed_origins": allowed_origins(settings),
        "allowed_hosts": allowed_hosts(settings),
        "multipart_paths": UPLOAD_PATHS,
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


def prepare_work_folder_or_exit(settings: ServeSettings) -> Path:
    """The work folder, checked and private (prepare_work_folder); a refusal stops start-up.

    Called before the service's process starts (at import, like load_registry_or_exit), a
    refusal stops `bentoml serve` in one line; in a worker it stops that worker."""
    try:
        return prepare_work_folder(settings.nnunet_bento_work_dir)
    except WorkFolderError as error:
        sys.exit(f"nnunet-bento cannot start: {error}")


def open_work_folder(settings: ServeSettings) -> tuple[int, JobStore]:
    """Check the work folder, claim it for this process's life and open the job store; the
    descriptor of the claim (kept open) and the store. The only server using the folder
    cleans up after stopped ones: the jobs they left running are failed, and the uploads and
    pulled series that no job holds are removed."""
    work_dir = prepare_work_folder_or_exit(settings)
    claim, alone = claim_work_folder(work_dir)
    jobs = JobStore(work_dir / "jobs.sqlite", settings.nnunet_bento_job_ttl_s)
    if alone:
        for record in jobs.fail_interrupted():
            logger.warning("job %s was running when the server stopped; it failed", record.job_id)
        for folder in sweep_work_folder(work_dir, jobs.folders_in_use()):
            logger.warning("removed %s, which no job holds, left by a stopped server", folder)
    for folder in remove_stale_staging(work_dir, settings.nnunet_bento_request_timeout_s):
        logger.warning("removed the staging folder %s of an interrupted request", folder)
    return claim, jobs


def given_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of an /infer body as BentoML hands them, without those at their default.

    BentoML passes every field, with its default where the body gave none. Leaving those out
    makes the request's fields_set the fields that the body gave a value of their own (tmp_dir,
    for one, is answered with a warning only when given).
    """
    declared = StrictInferenceRequest.model_fields
    return {name: value for name, value in fields.items() if value != declared[name].default}


def is_runner_unavailable(error: Exception) -> bool:
    """Whether ``error`` is the BentoML client failing to reach the ModelRunner."""
    return isinstance(
        error, httpx.TransportError | aiohttp.ClientError | BentoMLException
    ) and not isinstance(error, NnunetBentoError)


class SegmentationServiceBase:
    """HTTP entry point: parses requests, runs the pipeline in a thread, answers JSON."""

    registry: Registry
    dicom_nodes: dict[str, DicomNode]
    webhooks: dict[str, Webhook]
    listener_config: ListenerConfig | None
    runner: Any

    def __init__(self) -> None:
        self.settings = load_settings()
        warn_about_open_doors(self.settings)
        self.work_claim, jobs = open_work_folder(self.settings)
        self.pipeline = SegmentationPipeline(
            self.registry,
            RunnerServicePredictor(self.runner, self.registry),
            roots=path_roots(self.settings),
            settings=self.settings,
            dicom_nodes=self.dicom_nodes,
            webhooks=self.webhooks,
        )
        self.admission = Admission(
            self.settings.nnunet_bento_max_pipelines, self.settings.nnunet_bento_max_queue
        )
        self.device: str | None = None
        self.device_query: asyncio.Future | None = None
        self.job_routes = JobRoutes(self, jobs)
        self.listener: ListenerService | None = None

    @bentoml.on_startup
    async def start_listener(self) -> None:
        """With NNUNET_BENTO_LISTENER, run the DICOM listener (in one worker of the server);
        a port that cannot be taken stops the worker in one line."""
        if self.listener_config is None:
            return
        try:
            self.listener = ListenerService.start(
                self.listener_config, self.job_routes, asyncio.get_running_loop()
            )
        except SpecError as error:
            sys.exit(f"nnunet-bento cannot start: {error}")

    @bentoml.on_shutdown
    async def stop_listener(self) -> None:
        """Stop the DICOM listener, if this worker runs it (in a worker thread: a series that
        settles meanwhile still needs the event loop to become a job)."""
        if self.listener is not None:
            await anyio.to_thread.run_sync(self.listener.stop)
            self.listener = None

    @bentoml.api(input_spec=StrictInferenceRequest)
    async def infer(self, **fields: Any) -> dict[str, Any]:
        """Run one inference request (a model, or a cascade of models)."""
        try:
            request = answered_at_once(parse_request(given_fields(fields)))
            response = await self.run_pipeline(request)
        except Exception as error:
            return self.failure_for(fields.get("nnunet_id"), error)
        return response.model_dump(mode="json")

    async def run_pipeline(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse:
        """Run the request once a pipeline slot is free."""
        async with self.admission.slot():
            return await self.run_admitted(request, on_step, check)

    async def run_admitted(
        self,
        request: InferenceRequest,
        on_step: StepCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> InferenceResponse:
        """Run the request, which holds a pipeline slot, in a worker thread with a deadline
        and ``check`` (e.g. a job's cancellation) at each step boundary."""
        deadline = deadline_check(self.settings.nnunet_bento_request_timeout_s)

        def checks() -> None:
            deadline()
            if check is not None:
                check()

        return await anyio.to_thread.run_sync(self.pipeline.run, request, on_step, checks)

    def failure_for(self, nnunet_id: Any, error: Exception) -> JSONResponse:
        """The error response for a failed request; details of unexpected errors go to the log."""
        if is_runner_unavailable(error):
            logger.warning("request for %s: the model runner is unavailable: %s", nnunet_id, error)
            error = DeviceUnavailableError(
                "the model runner stopped or is restarting during the request; retry"
            )
        if isinstance(error, NnunetBentoError):
            logger.warning(
                "request for %s failed: %s", nnunet_id, error, exc_info=self.settings.debug
            )
            return refusal(error)
        logger.error("request for %s failed", nnunet_id, exc_info=error)
        return error_response(
            500,
            f"inference failed: {type(error).__name__} while running {nnunet_id}; the server "
            "log has the details",
        )

    @bentoml.api
    async def model_info(self) -> dict[str, Any]:
        """The registry: one record per model id, with the device that runs the models.

        The runner's device is asked once, waiting half a second at most: a runner busy with a
        first inference answers later, and until then the device is "unknown"."""
        if self.device is None and (self.device_query is None or self.device_query.done()):
            self.device_query = asyncio.ensure_future(self.query_device())
            await asyncio.wait({self.device_query}, timeout=DEVICE_QUERY_S)
        info: dict[str, Any] = {
            model.id: {**model.info(), "available": True, "device": self.device or "unknown"}
            for model in self.registry.models.values()
        }
        for model_id, reason in self.registry.disabled.items():
            info[model_id] = {"id": model_id, "available": False, "error": reason}
        return info

    async def query_device(self) -> None:
        """Ask the runner which device runs the models (it may be busy for a while)."""
        try:
            self.device = (await self.runner.to_async.device_info())["device"]
        except Exception as error:
            logger.warning("cannot ask the model runner for its device: %s", error)

    @bentoml.api(route="/dicom-nodes")
    async def dicom_nodes_info(self) -> list[dict[str, str]]:
        """The configured DICOM nodes: name and kind, never an address or a credential."""
        return node_kinds(self.dicom_nodes)

    @bentoml.api(route="/request-params")
    async def request_params(self) -> dict[str, Any]:
        """The JSON schema of the /infer body."""
        return InferenceRequest.model_json_schema()
