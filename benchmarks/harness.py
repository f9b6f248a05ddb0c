"""Honest timing on noisy shared machines: warm-up, interleaved A/B repeats, median and spread,
ratios measured in the same run, and the machine facts every figure needs beside it."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Timing:
    """Seconds of several repeats of one operation."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """Max minus min over the repeats, seconds."""
        return max(self.seconds) - min(self.seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.minimum,
            "spread_s": self.spread,
            "repeats": len(self.seconds),
        }


@dataclass
class Comparison:
    """Ours vs a baseline measured interleaved in one run; ``ratio`` = baseline / ours (medians)."""

    name: str
    ours: Timing
    baseline: Timing
    target_ratio: float | None = None
    check: str = ""  # equivalence evidence next to the speed claim (bytes equal, IoU, allclose...)

    @property
    def ratio(self) -> float:
        return self.baseline.median / self.ours.median if self.ours.median > 0 else float("inf")

    @property
    def meets_target(self) -> bool | None:
        return None if self.target_ratio is None else self.ratio >= self.target_ratio

    def summary(self) -> dict[str, Any]:
        return {
            "ours": {"name": self.ours.name, **self.ours.summary()},
            "baseline": {"name": self.baseline.name, **self.baseline.summary()},
            "ratio": self.ratio,
            "target_ratio": self.target_ratio,
            "meets_target": self.meets_target,
            "check": self.check,
        }


def time_once(function: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call and its result."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def compare_interleaved(
    name: str,
    ours: tuple[str, Callable[[], Any]],
    baseline: tuple[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    target_ratio: float | None = None,
) -> Comparison:
    """Run ours and the baseline A B A B ... after ``warmup`` rounds of each; median ratio."""
    for _ in range(warmup):
        ours[1]()
        baseline[1]()
    a, b = Timing(ours[0]), Timing(baseline[0])
    for _ in range(repeats):
        a.seconds.append(time_once(ours[1])[0])
        b.seconds.append(time_once(baseline[1])[0])
    return Comparison(name, a, b, target_ratio)


def matmul_ceiling(dtype_name: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Measured torch matmul throughput on this machine, GFLOP/s (best of ``repeats``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        seconds, _ = time_once(lambda: torch.matmul(a, b))
        best = min(best, seconds)
    return 2 * size**3 / best / 1e9


def machine_facts() -> dict[str, Any]:
    """Versions, threads and CPU flags to record beside every figure."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
        facts["cuda"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    for module in ("timm", "segment_anything", "label_studio_sdk", "numpy"):
        try:
            facts[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            facts[module] = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
        facts["cpu_flags"] = [f for f in wanted if f" {f}" in flags]
    except OSError:
        facts["cpu_flags"] = []
    return facts


def print_table(comparisons: list[Comparison], stream=None) -> None:
    """A fixed-width table: name, ours median, baseline median, ratio, target, check."""
    header = f"{'benchmark':38} {'ours (s)':>10} {'baseline (s)':>12} {'ratio':>8} {'target':>7}  check"
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for c in comparisons:
        target = "" if c.target_ratio is None else f"≥{c.target_ratio:g}"
        mark = "" if c.meets_target is None else (" ok" if c.meets_target else " MISS")
        print(
            f"{c.name:38} {c.ours.median:10.4f} {c.baseline.median:12.4f} {c.ratio:8.1f}"
            f" {target:>7}{mark}  {c.check}",
            file=stream,
        )


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(
            payload,
            handle,
            indent=2,
            default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o),
        )
