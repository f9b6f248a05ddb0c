"""Environment variables that native libraries read once, when they load: set before the service's
process starts (``python -m backend`` passes them to gunicorn through ``execve``).

* ``MALLOC_ARENA_MAX=2``: glibc keeps fewer per-thread heap arenas for the request threads, so
  freed memory fragments less and resident memory stays near the caches' bounds (see
  :mod:`backend.native_memory`).
* ``OPENBLAS_NUM_THREADS=1``: numpy's OpenBLAS (small products: pooling weights, prototype
  scores) runs on the calling thread. Its default pool of one thread per core busy-waits after each
  product and, on a small CPU, takes cores from torch's own intra-op pool, which does the heavy work
  (a cached click on 2 cores: 120 ms → 68 ms median, measured in process).

A value the user has set is never replaced.
"""

from __future__ import annotations

from collections.abc import Mapping

NATIVE_DEFAULTS: dict[str, str] = {"MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}


def native_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus :data:`NATIVE_DEFAULTS` for every variable it does not set."""
    return {**NATIVE_DEFAULTS, **environ}
