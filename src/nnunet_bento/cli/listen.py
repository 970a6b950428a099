"""`nnunet-bento listen --url URL [--token T]`: the DICOM listener on its own, for a Deployment
of its own (deploy/kubernetes/listener.yaml), in front of a server that it reaches over HTTP.

It reads the listener file that NNUNET_BENTO_LISTENER names and listens as `bentoml serve`
would. Each route's work (``pacs/routing.py``) is packed and sent as an upload job
(``POST /jobs/upload``) with the route's request, is_dicom, push_to and notify; the server
checks that request like any other, runs it, pushes the results and calls the webhooks. The
series' files are removed once sent, or once sending failed (logged: send them again). A
series sent again unchanged while the command runs is not sent again. It stops on SIGTERM
or Ctrl-C.
"""

import argparse
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

from ..client import Client, pack_study
from ..errors import SpecError
from ..io.work_folder import WorkBudget, claim_work_folder, prepare_work_folder
from ..pacs.listener import Listener, SeriesRecord
from ..pacs.listener_config import LISTENER_ENV, load_listener_config
from ..pacs.routing import RoutedSeries, SeriesRouter
from ..settings import ServeSettings, load_settings

logger = logging.getLogger("nnunet_bento")
LISTENER_FOLDER = "listener"


class Forwarder:
    """Sends the work of settled series to the server as upload jobs."""

    def __init__(self, client: Client, url: str, work_dir: Path) -> None:
        self.client = client
        self.url = url
        self.work_dir = work_dir
        self.sent: dict[tuple[str, str], str] = {}

    def is_new(self, work: RoutedSeries) -> bool:
        """Whether this content of the series was not sent for the route before."""
        return self.sent.get((work.route.name, work.series_uids[0])) != work.content_hash

    def send(self, work: RoutedSeries) -> str:
        """Pack the work's series and submit them as an upload job; its id."""
        names = [record.folder.name for record in work.series]
        with tempfile.TemporaryDirectory(prefix="listen-", dir=self.work_dir) as folder:
            archive = pack_study(work.study_folder, Path(folder) / "study.zip", names)
            job_id = self.client.submit_upload(archive, work.request_fields())
        self.sent[work.route.name, work.series_uids[0]] = work.content_hash
        return job_id

    def forward(self, work: RoutedSeries) -> None:
        """Send the work, logging the job or why it was not sent (never raises)."""
        series = ", ".join(work.series_uids)
        try:
            job_id = self.send(work)
        except Exception as error:
            logger.error(
                "route %r: series %s could not be sent to %s (%s); send them again",
                work.route.name,
                series,
                self.url,
                error,
            )
            return
        logger.info(
            "route %r: series %s sent to %s: job %s", work.route.name, series, self.url, job_id
        )


def api_token(args: argparse.Namespace, settings: ServeSettings) -> str | None:
    """--token, else NNUNET_BENTO_API_TOKEN."""
    if args.token:
        return args.token
    token = settings.nnunet_bento_api_token
    return token.get_secret_value() if token else None


def listen(args: argparse.Namespace) -> int:
    """The command: listen until SIGTERM or Ctrl-C; 0 then."""
    settings = load_settings()
    if settings.nnunet_bento_listener is None:
        raise SpecError(f"set {LISTENER_ENV} to the listener file (docs/hospital.md)")
    config = load_listener_config(settings.nnunet_bento_listener)
    work_dir = prepare_work_folder(settings.nnunet_bento_work_dir)
    claim, _ = claim_work_folder(work_dir)
    budget = WorkBudget(work_dir, settings.nnunet_bento_max_work_mb)
    root = work_dir / LISTENER_FOLDER
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    try:
        with Client(args.url, token=api_token(args, settings)) as client:
            forwarder = Forwarder(client, args.url, work_dir)
            router = SeriesRouter(config, root, forwarder.is_new)

            def on_settled(record: SeriesRecord) -> None:
                work = router.settled(record)
                if work is not None:
                    forwarder.forward(work)
                    router.finished(work)

            listener = Listener(config, root, on_settled, lambda: budget.measure().left())
            router.start(listener)
            try:
                stopping.wait()
            except KeyboardInterrupt:
                pass
            finally:
                listener.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(claim)
    return 0
