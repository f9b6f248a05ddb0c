"""The allocator settings that keep the service's resident memory near its caches' bounds."""

from __future__ import annotations

import ctypes.util
import sys
from pathlib import Path

import pytest

from backend.native_memory import allocator_environment, release_free_memory

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None


def resident_mib() -> float:
    """This process's ``VmRSS`` in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_allocator_environment_limits_arenas_unless_the_user_set_it():
    assert allocator_environment({"PATH": "/bin"}) == {"PATH": "/bin", "MALLOC_ARENA_MAX": "2"}
    assert allocator_environment({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"


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
