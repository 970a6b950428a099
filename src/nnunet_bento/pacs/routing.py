"""What a settled series becomes: a route's work, a wait for the other channels of its study,
or nothing. The listener in the server and `nnunet-bento listen` both route with it.

Guarantees:

- A settled series is first moved as a whole out of the folder where the listener stores
  instances, to ``<root>/settled/<StudyInstanceUID>/<SeriesInstanceUID>-<random>``: an
  instance of the same series that arrives later starts a new series folder, and never
  changes the files of work that is running.
- The first route of the file that the series belongs to (``route_of``) decides. A series
  that belongs to none is logged with its SeriesDescription and removed: no work.
- A series of a single-series route is work at once. One of a multi-series route waits, with
  the other settled series of its study, until ``match_study`` finds a series for every
  channel; they then leave the wait together as one work. A series that waits longer than
  ``CHANNEL_WAIT_S`` is removed with a log line (checked as other series settle); a newer
  copy of a waiting series replaces it.
- ``is_new`` decides whether work is new: work whose series were routed before with the same
  content is removed, logged, and not answered.
- ``finished`` removes the series folders of work that ended (run, or refused).
- ``start`` resumes, then starts the listener. ``resume`` removes the settled series that a
  stopped listener left, whose work is gone with it, and tracks the series that were still
  arriving, so that a series sent across a restart settles whole.
- Each outcome is counted: ``routed``, ``waiting``, ``unchanged``, ``unrouted``, ``expired``.
"""

import contextlib
import hashlib
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..io.dicom_inflate import read_header
from ..io.dicom_series import DECODE_ERRORS, DEFER_SIZE
from ..io.work_folder import private_folder
from .listener import (
    HEADER_BYTES,
    INCOMING,
    UID,
    Listener,
    SeriesRecord,
    header_attributes,
    match_study,
    route_of,
)
from .listener_config import LISTENER_ENV, ListenerConfig, Route

logger = logging.getLogger("nnunet_bento")
SETTLED = "settled"
CHANNEL_WAIT_S = 3600.0


@dataclass(frozen=True)
class RoutedSeries:
    """A route's work: the route and its series, in channel order (one for a ``match``)."""

    route: Route
    series: tuple[SeriesRecord, ...]

    @property
    def study_uid(self) -> str:
        return self.series[0].study_uid

    @property
    def series_uids(self) -> tuple[str, ...]:
        return tuple(record.series_uid for record in self.series)

    @property
    def study_folder(self) -> Path:
        """The folder that holds the series folders (the request's study)."""
        return self.series[0].folder.parent

    @property
    def content_hash(self) -> str:
        """The series' content: one series' own hash, else the hash of the channels' hashes."""
        if len(self.series) == 1:
            return self.series[0].content_hash
        return hashlib.sha256(" ".join(r.content_hash for r in self.series).encode()).hexdigest()

    def request_fields(self) -> dict[str, Any]:
        """The route's request with the series as the study's series: every model takes
        them all, in channel order; DICOM in and out, the route's push nodes and webhooks.
        The study and output folders are the caller's to add."""
        names = [record.folder.name for record in self.series]
        models = self.route.request["nnunet_id"]
        cascade = isinstance(models, list) and len(models) > 1
        return {
            **self.route.request,
            "series_folders": [names] * len(models) if cascade else names,
            "is_dicom": True,
            "push_to": list(self.route.push_to),
            "notify": list(self.route.notify),
        }


def remove_series(folders: Iterable[Path]) -> None:
    """Remove series folders, and their study folder once it holds no other."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # another series of the study is still there
            folder.parent.rmdir()


class SeriesRouter:
    """Routes the settled series of one listener root (thread-safe)."""

    def __init__(
        self,
        config: ListenerConfig,
        root: Path,
        is_new: Callable[[RoutedSeries], bool],
        count: Callable[[str], None] = lambda outcome: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.root = Path(root)
        self.is_new = is_new
        self.count = count
        self.clock = clock
        self._waiting: dict[str, dict[str, tuple[SeriesRecord, float]]] = {}
        self._lock = threading.Lock()

    def settled(self, record: SeriesRecord) -> RoutedSeries | None:
        """The work that a settled series completes, if any (call it in the listener's
        thread, as its on_settled: it moves and removes folders)."""
        self._expire()
        record = self._snapshot(record)
        description = record.header.get("SeriesDescription", "")
        route = route_of(self.config, record.header)
        if route is None:
            logger.warning(
                "DICOM listener: series %s (%r, %s) matches no route; removed",
                record.series_uid,
                description,
                record.header.get("Modality", ""),
            )
            remove_series([record.folder])
            self.count("unrouted")
            return None
        work = RoutedSeries(route, (record,)) if route.match is not None else self._wait(record)
        if work is None:
            logger.info(
                "DICOM listener: series %s (%r) waits for the other series of route %r in study %s",
                record.series_uid,
                description,
                route.name,
                record.study_uid,
            )
            self.count("waiting")
            return None
        if not self.is_new(work):
            logger.info(
                "DICOM listener: series %s of route %r came again unchanged; no new job",
                ", ".join(work.series_uids),
                work.route.name,
            )
            self.finished(work)
            self.count("unchanged")
            return None
        self.count("routed")
        return work

    def finished(self, work: RoutedSeries) -> None:
        """Remove the series folders of work that ended."""
        remove_series(record.folder for record in work.series)

    def start(self, listener: Listener) -> None:
        """Resume what a stopped listener left (``resume``) and start ``listener``; SpecError
        when it cannot take its address."""
        self.resume(listener)
        try:
            listener.start()
        except OSError as error:
            raise SpecError(
                f"the DICOM listener cannot listen on {self.config.host}:{self.config.port}: "
                f"{error.strerror}; change host or port in the file that {LISTENER_ENV} names"
            ) from None

    def resume(self, listener: Listener) -> None:
        """Before ``listener`` starts: remove the settled series a stopped listener left, and
        track the series folders that were still receiving instances."""
        shutil.rmtree(self.root / SETTLED, ignore_errors=True)
        studies = self.root.iterdir() if self.root.is_dir() else iter(())
        for study in sorted(studies):
            if study.name in (INCOMING, SETTLED) or not UID.match(study.name):
                continue
            for series in sorted(study.iterdir()):
                first = min(series.glob("*.dcm"), default=None)
                if first is None:
                    continue
                try:
                    header = header_attributes(read_header(first, DEFER_SIZE, HEADER_BYTES).dataset)
                except DECODE_ERRORS as error:
                    logger.warning("DICOM listener: %s cannot be read (%s); removed", first, error)
                    remove_series([series])
                    continue
                listener.tracker.add(study.name, series.name, series, header)
                logger.info(
                    "DICOM listener: series %s was still arriving when the listener stopped; "
                    "it settles with what comes next",
                    series.name,
                )

    def _snapshot(self, record: SeriesRecord) -> SeriesRecord:
        """The record, its folder moved to a new folder under ``<root>/settled/<study>``."""
        study = private_folder(private_folder(self.root / SETTLED) / record.study_uid)
        target = study / f"{record.series_uid}-{secrets.token_hex(4)}"
        record.folder.rename(target)
        with contextlib.suppress(OSError):  # another series of the study is arriving
            record.folder.parent.rmdir()
        return replace(record, folder=target)

    def _wait(self, record: SeriesRecord) -> RoutedSeries | None:
        """Add a series of a multi-series route to its study's wait; the work of the first
        multi-series route that the study's waiting series complete."""
        with self._lock:
            study = self._waiting.setdefault(record.study_uid, {})
            earlier = study.pop(record.series_uid, None)
            study[record.series_uid] = (record, self.clock())
            found = match_study(self.config, [item for item, _ in study.values()])
            if found is not None:
                for channel in found[1]:
                    study.pop(channel.series_uid)
                if not study:
                    del self._waiting[record.study_uid]
        if earlier is not None:
            remove_series([earlier[0].folder])
        return None if found is None else RoutedSeries(found[0], tuple(found[1]))

    def _expire(self) -> None:
        """Remove the series that waited longer than CHANNEL_WAIT_S for their channels."""
        cutoff = self.clock() - CHANNEL_WAIT_S
        with self._lock:
            expired = [
                (study_uid, series_uid, record)
                for study_uid, study in self._waiting.items()
                for series_uid, (record, since) in study.items()
                if since < cutoff
            ]
            for study_uid, series_uid, _ in expired:
                del self._waiting[study_uid][series_uid]
                if not self._waiting[study_uid]:
                    del self._waiting[study_uid]
        for _, series_uid, record in expired:
            logger.warning(
                "DICOM listener: series %s waited %g s for the other series of its study; removed",
                series_uid,
                CHANNEL_WAIT_S,
            )
            remove_series([record.folder])
            self.count("expired")
