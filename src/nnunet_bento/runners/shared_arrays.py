"""Arrays handed between processes of one host through POSIX shared memory, by name.

The owner creates a segment (registered with multiprocessing's resource tracker, which
removes it should the owner die) and unlinks it when the exchange is over, error or not.
Whoever writes a segment reserves its pages first, so that a full /dev/shm (a container's
64 MiB default, for one) is an exception to handle rather than a SIGBUS at the first
write; until then a segment takes no memory.
The other process maps it by its path under /dev/shm; a name it cannot open means that it
runs on another host, and the arrays must travel inline.
"""

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
PREFIX = "nnunet_bento_"
NAME = re.compile(rf"{PREFIX}[0-9a-f]{{16}}")


class SharedArrayMissing(Exception):
    """A named segment is not on this host."""


class SharedMemoryFull(Exception):
    """/dev/shm has no room for a segment."""


@dataclass(frozen=True)
class SharedArrayRef:
    """What crosses instead of the array: the segment's name, the shape and the dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def path(self) -> Path:
        """The segment's file; only names that shared_empty makes are accepted."""
        if not NAME.fullmatch(self.name):
            raise ValueError(f"{self.name!r} is not the name of one of our shared memory segments")
        return SHM_DIR / self.name

    @property
    def nbytes(self) -> int:
        """The segment's size: the array's bytes, at least one (POSIX wants a size)."""
        return max(int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize, 1)


def shared_memory_available() -> bool:
    """Whether this host maps POSIX shared memory as files (Linux)."""
    return SHM_DIR.is_dir()


@contextmanager
def shared_empty(shape: tuple[int, ...], dtype: np.dtype | str) -> Iterator[SharedArrayRef]:
    """A zero-filled segment for an array of ``shape`` and ``dtype``, unlinked on exit; no
    pages are reserved."""
    name = f"{PREFIX}{secrets.token_hex(8)}"
    ref = SharedArrayRef(name, tuple(int(n) for n in shape), np.dtype(dtype).str)
    segment = SharedMemory(name, create=True, size=ref.nbytes)
    segment.close()
    try:
        yield ref
    finally:
        segment.unlink()


def reserve(ref: SharedArrayRef) -> None:
    """Allocate every page of a segment now; SharedMemoryFull when /dev/shm is too small."""
    descriptor = os.open(ref.path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, ref.nbytes)
    except OSError as error:
        raise SharedMemoryFull(
            f"{SHM_DIR} has no room for {ref.nbytes / 2**20:.0f} MiB ({error.strerror}); give the "
            "container more (docker run --shm-size, a memory-backed emptyDir on Kubernetes)"
        ) from None
    finally:
        os.close(descriptor)


@contextmanager
def shared_copy(array: np.ndarray) -> Iterator[SharedArrayRef]:
    """A segment holding a copy of ``array``, unlinked on exit; the caller may drop its own."""
    with shared_empty(array.shape, array.dtype) as ref:
        reserve(ref)
        np.copyto(attach(ref, "r+"), array)
        del array
        yield ref


def release(ref: SharedArrayRef) -> None:
    """Free a segment's pages now, once its receiver has unmapped it; the owner still
    unlinks the (empty) segment."""
    with suppress(FileNotFoundError):
        os.truncate(ref.path, 0)


def attach(ref: SharedArrayRef, mode: str = "c") -> np.ndarray:
    """The array in a segment, mapped without a copy: ``c`` copy-on-write, ``r+`` to write.

    The mapping lives as long as the array (and views of it); unlinking does not end it.
    """
    try:
        return np.memmap(ref.path, dtype=np.dtype(ref.dtype), mode=mode, shape=ref.shape)
    except FileNotFoundError:
        raise SharedArrayMissing(f"no shared memory segment {ref.name} on this host") from None
