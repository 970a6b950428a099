"""Giving the memory that a step freed back to the operating system.

glibc keeps freed heap memory for reuse; a long-lived process that ran a large case then
holds it while the other service of the server reaches its own peak, and an idle server
holds the memory of its largest case. ``malloc_trim`` returns it. Elsewhere (no glibc)
this does nothing.
"""

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the operating system (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
