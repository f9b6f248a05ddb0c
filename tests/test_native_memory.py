"""The native libraries' settings: resident memory near the caches' bounds, one BLAS pool."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.native_environment import native_environment
from backend.native_memory import release_free_memory

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None


def resident_mib() -> float:
    """This process's ``VmRSS`` in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_native_environment_sets_defaults_unless_the_user_set_them():
    assert native_environment({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "MALLOC_ARENA_MAX": "2",
        "OPENBLAS_NUM_THREADS": "1",
    }
    assert native_environment({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"
    assert native_environment({"OPENBLAS_NUM_THREADS": "4"})["OPENBLAS_NUM_THREADS"] == "4"


THREADS_AFTER_A_NUMPY_PRODUCT = (
    "import os, numpy; a = numpy.ones((512, 512)); a @ a; print(len(os.listdir('/proc/self/task')))"
)


def _threads_after_numpy_product(environ: dict[str, str]) -> int:
    """Threads of a fresh python process after one numpy matrix product (OpenBLAS pool + main)."""
    output = subprocess.run(
        [sys.executable, "-c", THREADS_AFTER_A_NUMPY_PRODUCT], env=environ, capture_output=True, check=True
    )
    return int(output.stdout)


PROC_TASKS = Path("/proc/self/task").is_dir()


@pytest.mark.skipif(not PROC_TASKS or (os.cpu_count() or 1) < 2, reason="needs /proc and 2 CPUs")
def test_native_environment_keeps_numpy_blas_on_the_calling_thread():
    user = {key: value for key, value in os.environ.items() if key != "OPENBLAS_NUM_THREADS"}
    assert _threads_after_numpy_product({**user, "OPENBLAS_NUM_THREADS": "2"}) == 2, "the probe sees a pool"
    assert _threads_after_numpy_product(native_environment(user)) == 1


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_free_memory_returns_freed_heap_pages_to_the_os():
    chunks = [bytearray(64 << 10) for _ in range(3200)]  # 200 MiB below the mmap threshold: heap
    pin = bytearray(64 << 10)  # allocated last: the heap's top stays in use, so free() keeps pages
    del chunks
    before = resident_mib()
    assert release_free_memory() is True
    after = resident_mib()
    assert before - after > 150, f"RSS {before:.0f} MiB before malloc_trim, {after:.0f} MiB after"
    del pin
