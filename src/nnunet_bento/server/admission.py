"""Bounds on the work an API worker takes on: pipeline slots, a queue, and a deadline."""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from ..errors import DeviceUnavailableError, RequestTimeoutError

RETRY_AFTER_S = 10


class ServerBusyError(DeviceUnavailableError):
    """Every pipeline slot and queue place is taken (HTTP 503 with Retry-After)."""


class Admission:
    """At most ``running`` requests run their pipeline at once and ``queued`` more wait for a
    slot; a request past that is refused at once rather than piling up in memory.

    A request counts from the moment it is admitted: an upload is admitted before its body is
    read, so that uploads in flight count against the bound too."""

    def __init__(self, running: int, queued: int) -> None:
        self.slots = anyio.Semaphore(running)
        self.limit = running + queued
        self.admitted = 0

    def full(self) -> bool:
        return self.admitted >= self.limit

    def busy_message(self) -> str:
        return (
            f"the server is busy: {self.limit} requests are running or queued "
            "(NNUNET_BENTO_MAX_PIPELINES + NNUNET_BENTO_MAX_QUEUE); retry later"
        )

    def admit(self) -> "Place":
        """Take a place among the running and queued requests now; ServerBusyError when every
        place is taken."""
        if self.full():
            raise ServerBusyError(self.busy_message())
        self.admitted += 1
        return Place(self)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Admit a request and hold a pipeline slot while it runs."""
        async with self.admit().slot():
            yield


class Place:
    """An admitted request's place: held until ``release``, or the end of ``slot``."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = True

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        if self.held:
            self.held = False
            self.admission.admitted -= 1

    def hand_over(self) -> "Place":
        """The place for a new owner (a job's task, say); this object no longer holds it."""
        if not self.held:
            raise RuntimeError("a place that is not held cannot be handed over")
        self.held = False
        return Place(self.admission)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a pipeline slot and hold it; the place is given back at the end."""
        try:
            async with self.admission.slots:
                yield
        finally:
            self.release()


def deadline_check(timeout_s: float) -> Callable[[], None]:
    """A check for the pipeline's step boundaries that stops the request after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s

    def check() -> None:
        if time.monotonic() > deadline:
            raise RequestTimeoutError(
                f"the request ran past NNUNET_BENTO_REQUEST_TIMEOUT_S ({timeout_s:g} s) and was "
                "stopped; nothing was written"
            )

    return check
