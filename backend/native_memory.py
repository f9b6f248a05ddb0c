"""Returning freed native (C heap) memory to the operating system.

Batch predictions allocate and free hundreds of MiB of arrays (upsampled logits, masks, features).
glibc keeps freed heap memory mapped in per-thread arenas, so the service's resident memory would
drift above what its bounded caches hold. Two measures, both glibc-only (no-ops elsewhere):

* ``python -m backend`` starts gunicorn with ``MALLOC_ARENA_MAX=2`` unless it is set (fewer arenas
  for the request threads, less fragmentation): :mod:`backend.native_environment`;
* after every batch prediction the service calls ``malloc_trim(0)``: :func:`release_free_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` or ``None`` (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the OS (``malloc_trim(0)``); False where unsupported."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
