"""Give freed memory back to the system after big work.

After a 300k-row file or a refused bomb the idle server held 6.5 GB: the allocators
(glibc's malloc for numpy and pandas, Arrow's mimalloc pool) keep what they freed for
reuse, and a container's memory limit counts it. Trimming both after a big request costs
a few milliseconds and returns the pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import pyarrow as pa

BIG_ROWS = 10_000  # requests at least this big are followed by a trim

_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


def give_back() -> None:
    """Return the allocators' free memory to the system (glibc and Arrow's pool)."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:  # glibc only (musl has no malloc_trim)
        _MALLOC_TRIM(0)


_pending = threading.Lock()


def give_back_soon(delay: float = 1.0) -> None:
    """give_back() in `delay` seconds, once the request's objects are gone (its handler
    still holds them now); calls while one is pending share it."""
    if not _pending.acquire(blocking=False):
        return

    def run() -> None:
        try:
            give_back()
        finally:
            _pending.release()

    timer = threading.Timer(delay, run)
    timer.daemon = True
    timer.start()
