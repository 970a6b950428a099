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
    slot; a request past that is refused at once rather than piling up in memory."""

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

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.full():
            raise ServerBusyError(self.busy_message())
        self.admitted += 1
        try:
            async with self.slots:
                yield
        finally:
            self.admitted -= 1


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
