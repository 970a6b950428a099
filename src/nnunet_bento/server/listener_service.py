"""The DICOM listener inside `bentoml serve`: one per server, its settled series made jobs.

- With NNUNET_BENTO_LISTENER set, the API worker that takes an exclusive lock on
  ``<work_dir>/listener.lock`` runs the listener, whatever the number of workers; the others
  do not. It stops with that worker.
- Instances land in ``<work_dir>/listener`` (private), within NNUNET_BENTO_MAX_WORK_MB: the
  room is what a walk of the work folder leaves, as for uploads.
- A settled series is routed (``pacs/routing.py``) in the listener's thread. Work becomes the
  same job as ``POST /jobs`` with is_dicom, made on the event loop captured at start-up: the
  settled series are its study, its outputs are committed under
  ``NNUNET_BENTO_OUTPUT_ROOT/<StudyInstanceUID>/<route>/<SeriesInstanceUID>/`` (the first
  channel's series), which a changed series replaces as a whole; they are pushed to the
  route's nodes and its webhooks are called. The job's source is ``listener``.
- The job store records which content of a series each route made a job of: the same
  content again makes no job while that job is queued, running or done.
- A job's series are removed once it ended.
- Each settled series is counted in /metrics, ``nnunet_bento_listener_series_total`` by
  outcome (routed, waiting, unchanged, unrouted, expired).
"""

import asyncio
import fcntl
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from ..catalog.registry import Registry
from ..errors import RequestError, SpecError
from ..pacs.listener import Listener, SeriesRecord
from ..pacs.listener_config import ListenerConfig
from ..pacs.routing import RoutedSeries, SeriesRouter
from .job_routes import JobOrigin, JobRoutes
from .request_body import parse_request
from .routes import bentoml_metrics

logger = logging.getLogger("nnunet_bento")
LISTENER_FOLDER = "listener"
LOCK_FILE = "listener.lock"
JOB_START_S = 60.0  # the longest the listener's thread waits for the event loop to make a job


def check_route_models(config: ListenerConfig, registry: Registry) -> None:
    """SpecError naming the route and field when a route's model is unknown or does not take
    as many series as the route gives (one for ``match``, one per channel for ``series``)."""
    for route in config.routes:
        names = route.request["nnunet_id"]
        channels = len(route.series or [route.match])
        for name in [names] if isinstance(names, str) else names:
            try:
                model = registry.get(name)
            except RequestError as error:
                field = "field 'request.nnunet_id'"
                raise SpecError(f"route {route.name!r}, {field}: {error}") from None
            expected = model.description.num_channels
            if expected != channels:
                raise SpecError(
                    f"route {route.name!r}, field 'series': model {model.id!r} takes {expected} "
                    f"series, the route gives {channels}"
                )


def listener_lock(work_dir: Path) -> int | None:
    """An exclusive lock on the work folder's listener lock file, held while the descriptor
    stays open; None when another process holds it."""
    descriptor = os.open(work_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


class ListenerService:
    """The listener of one server, making jobs of its work through the worker's JobRoutes."""

    def __init__(
        self,
        config: ListenerConfig,
        job_routes: JobRoutes,
        loop: asyncio.AbstractEventLoop,
        lock: int,
    ) -> None:
        settings = job_routes.settings
        self.job_routes = job_routes
        self.loop = loop
        self.lock = lock
        self.output_root = Path(str(settings.nnunet_bento_output_root))
        root = settings.nnunet_bento_work_dir / LISTENER_FOLDER
        client, _ = bentoml_metrics()
        self.series_total = client.Counter(
            name="nnunet_bento_listener_series",
            documentation="Settled series of the DICOM listener by outcome: routed, waiting "
            "(for the other series of a multi-series route), unchanged, unrouted, expired",
            labelnames=["outcome"],
        )
        self.router = SeriesRouter(config, root, self.is_new, self.count)
        self.listener = Listener(config, root, self.on_settled, self.room)

    @classmethod
    def start(
        cls, config: ListenerConfig, job_routes: JobRoutes, loop: asyncio.AbstractEventLoop
    ) -> "ListenerService | None":
        """The started listener of this server; None when another worker runs it."""
        lock = listener_lock(job_routes.settings.nnunet_bento_work_dir)
        if lock is None:
            logger.info("DICOM listener: another worker of this server runs it")
            return None
        service = cls(config, job_routes, loop, lock)
        try:
            service.router.start(service.listener)
        except SpecError:
            os.close(lock)
            raise
        return service

    def stop(self) -> None:
        """Stop listening, and let another worker or server take the lock."""
        self.listener.stop()
        os.close(self.lock)

    def room(self) -> int:
        """The bytes that the work folder may still take (a walk of it)."""
        return self.job_routes.budget.measure().left()

    def count(self, outcome: str) -> None:
        self.series_total.labels(outcome=outcome).inc()

    def is_new(self, work: RoutedSeries) -> bool:
        """Whether no queued, running or done job of the route was made of this content."""
        found = self.job_routes.jobs.series_job(
            work.route.name, work.series_uids[0], work.content_hash
        )
        return found is None

    def on_settled(self, record: SeriesRecord) -> None:
        """In the listener's thread: route the series, and have the event loop make the job."""
        work = self.router.settled(record)
        if work is None:
            return
        try:
            job_id = asyncio.run_coroutine_threadsafe(self.make_job(work), self.loop).result(
                JOB_START_S
            )
        except Exception:
            logger.exception(
                "DICOM listener: no job could be made of series %s; removed",
                ", ".join(work.series_uids),
            )
            self.router.finished(work)
            return
        logger.info(
            "DICOM listener: route %r made job %s of series %s of study %s",
            work.route.name,
            job_id,
            ", ".join(work.series_uids),
            work.study_uid,
        )

    def request_fields(self, work: RoutedSeries) -> dict[str, Any]:
        """The job's request: the route's, with its series as the study and its outputs under
        the output root, replacing what an earlier job of the series wrote."""
        output = self.output_root / work.study_uid / work.route.name / work.series_uids[0]
        return {
            **work.request_fields(),
            "study_path": str(work.study_folder),
            "output_dir": str(output),
            "overwrite": True,
        }

    async def make_job(self, work: RoutedSeries) -> str:
        """Make and start the job of ``work`` (it waits for a pipeline slot, but for no queue
        place: the listener has no caller to answer 503); its id."""
        inference = parse_request(self.request_fields(work))
        origin = JobOrigin(
            source="listener",
            study_uid=work.study_uid,
            series_uids=work.series_uids,
            on_end=partial(self.router.finished, work),
        )
        routes = self.job_routes
        record = await routes.create_job(
            "infer", inference, None, routes.host.admission.slots, origin
        )
        await anyio.to_thread.run_sync(
            routes.jobs.record_series,
            work.route.name,
            work.series_uids[0],
            work.content_hash,
            record.job_id,
        )
        return record.job_id
