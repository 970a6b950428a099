"""Memory that a step freed goes back to the operating system."""

import subprocess
import sys

FRAGMENTED_HEAP = """
import sys
from nnunet_bento.runners.memory import return_freed_memory

def rss() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096

chunks = [bytearray(60_000) for _ in range(6000)]  # 360 MB below glibc's mmap threshold
for chunk in chunks:
    chunk[::4096] = b"x" * len(chunk[::4096])
kept = chunks[-1]  # the top of the heap stays in use: free() alone cannot shrink it
del chunks[-1]
chunks.clear()
freed = rss()
return_freed_memory()
print((freed - rss()) // 2**20)
"""


def test_freed_heap_memory_goes_back_to_the_system():
    """glibc keeps freed heap chunks below the heap's top; the runner and the API hand them
    back after each step so that one service's leftovers do not add to the other's peak."""
    run = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) > 250, f"only {run.stdout.strip()} MiB returned"
