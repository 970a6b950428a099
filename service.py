"""BentoML entry point: `bentoml serve` (from the repository root) serves SegmentationService."""

import bentoml

from nnunet_bento.server.error_body import ErrorBodyMiddleware
from nnunet_bento.server.guard import RequestGuard
from nnunet_bento.server.routes import RouteMetrics, build_routes
from nnunet_bento.server.runner_service import (
    ModelRunnerBase,
    bento_model_attributes,
    runner_config,
)
from nnunet_bento.server.services import (
    SegmentationServiceBase,
    guard_options,
    load_dicom_nodes_or_exit,
    load_listener_or_exit,
    load_registry_or_exit,
    load_webhooks_or_exit,
    prepare_work_folder_or_exit,
    segmentation_config,
)
from nnunet_bento.settings import load_settings

SETTINGS = load_settings()
prepare_work_folder_or_exit(SETTINGS)
REGISTRY = load_registry_or_exit(SETTINGS)
DICOM_NODES = load_dicom_nodes_or_exit(SETTINGS)
WEBHOOKS = load_webhooks_or_exit(SETTINGS)
LISTENER = load_listener_or_exit(SETTINGS, REGISTRY, DICOM_NODES, WEBHOOKS)

ModelRunner = bentoml.service(**runner_config(SETTINGS))(
    type(
        "ModelRunner",
        (ModelRunnerBase,),
        {"registry": REGISTRY, **bento_model_attributes(REGISTRY)},
    )
)
SegmentationService = bentoml.service(**segmentation_config(SETTINGS))(
    type(
        "SegmentationService",
        (SegmentationServiceBase,),
        {
            "registry": REGISTRY,
            "dicom_nodes": DICOM_NODES,
            "webhooks": WEBHOOKS,
            "listener_config": LISTENER,
            "runner": bentoml.depends(ModelRunner),
        },
    )
)
SegmentationService.mount_asgi_app(build_routes(SegmentationService), path="/")
SegmentationService.add_asgi_middleware(RouteMetrics)
SegmentationService.add_asgi_middleware(ErrorBodyMiddleware)
SegmentationService.add_asgi_middleware(RequestGuard, **guard_options(SETTINGS))
