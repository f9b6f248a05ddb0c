"""Honest timing on noisy shared machines: warm-up, interleaved A/B repeats, median and spread,
ratios measured in the same run, and the machine facts every figure needs beside it.

Every timed call records wall-clock seconds and the CPU seconds of this process (all threads):
on a machine shared with other jobs the wall clock stretches while CPU time mostly does not, so the
two together tell load from real cost.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from backend.native_environment import NATIVE_DEFAULTS


@dataclass
class Timing:
    """Seconds of several repeats of one operation.

    Attributes:
        name: what was timed.
        seconds: wall-clock seconds per repeat.
        cpu_seconds: CPU seconds (user + system, all threads of this process) per repeat.
    """

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

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
        summary: dict[str, Any] = {
            "median_s": self.median,
            "min_s": self.minimum,
            "spread_s": self.spread,
            "repeats": len(self.seconds),
            "seconds": list(self.seconds),
        }
        if self.cpu_seconds:
            summary["cpu_median_s"] = statistics.median(self.cpu_seconds)
        return summary


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
    def ratio_of_minimums(self) -> float:
        return self.baseline.minimum / self.ours.minimum if self.ours.minimum > 0 else float("inf")

    @property
    def cpu_ratio(self) -> float | None:
        """Baseline / ours on median CPU seconds (less sensitive to other jobs than wall time)."""
        if not (self.ours.cpu_seconds and self.baseline.cpu_seconds):
            return None
        ours = statistics.median(self.ours.cpu_seconds)
        return statistics.median(self.baseline.cpu_seconds) / ours if ours > 0 else float("inf")

    @property
    def meets_target(self) -> bool | None:
        return None if self.target_ratio is None else self.ratio >= self.target_ratio

    def summary(self) -> dict[str, Any]:
        return {
            "ours": {"name": self.ours.name, **self.ours.summary()},
            "baseline": {"name": self.baseline.name, **self.baseline.summary()},
            "ratio": self.ratio,
            "ratio_of_minimums": self.ratio_of_minimums,
            "cpu_ratio": self.cpu_ratio,
            "target_ratio": self.target_ratio,
            "meets_target": self.meets_target,
            "check": self.check,
        }


@dataclass
class Figure:
    """A measured quantity that is not a speed ratio (throughput, memory, a fraction of a floor).

    Attributes:
        name: what it is.
        value: the measured value in ``unit``.
        unit: e.g. ``"webhooks/s"``, ``"MiB"``, ``"%"``.
        target: the value to reach, or ``None``.
        higher_is_better: True when ``value >= target`` meets the target, False for ``<=``.
        detail: how it was measured and the evidence beside it.
    """

    name: str
    value: float
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    detail: str = ""

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def summary(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "target_is": None if self.target is None else (">=" if self.higher_is_better else "<="),
            "meets_target": self.meets_target,
            "detail": self.detail,
        }


@dataclass
class BenchmarkResult:
    """What one benchmark measured: comparisons, figures and free-form facts (JSON-ready)."""

    name: str
    comparisons: list[Comparison] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "comparisons": {c.name: c.summary() for c in self.comparisons},
            "figures": {f.name: f.summary() for f in self.figures},
            "info": self.info,
            "seconds": self.seconds,
        }


def time_once(function: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call and its result."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _timed(timing: Timing, function: Callable[[], Any]) -> Any:
    cpu_start = time.process_time()
    seconds, result = time_once(function)
    timing.seconds.append(seconds)
    timing.cpu_seconds.append(time.process_time() - cpu_start)
    return result


def _noop() -> None:
    return None


def compare_interleaved(
    name: str,
    ours: tuple[str, Callable[[], Any]],
    baseline: tuple[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    target_ratio: float | None = None,
    *,
    setup_ours: Callable[[], Any] = _noop,
    setup_baseline: Callable[[], Any] = _noop,
    baseline_repeats: int | None = None,
) -> Comparison:
    """Run ours and the baseline A B A B ... after ``warmup`` rounds of each; median ratio.

    Args:
        setup_ours, setup_baseline: called (untimed) before every call of ours / the baseline,
            e.g. to empty caches so that each repeat does the full work.
        baseline_repeats: repeats of the baseline when it is much slower than ours (default
            ``repeats``); the rounds stay interleaved, the extra repeats of ours come last.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    baseline_repeats = repeats if baseline_repeats is None else baseline_repeats
    for _ in range(warmup):
        setup_ours()
        ours[1]()
        setup_baseline()
        baseline[1]()
    a, b = Timing(ours[0]), Timing(baseline[0])
    for round_index in range(max(repeats, baseline_repeats)):
        if round_index < repeats:
            setup_ours()
            _timed(a, ours[1])
        if round_index < baseline_repeats:
            setup_baseline()
            _timed(b, baseline[1])
    return Comparison(name, a, b, target_ratio)


def repeat_timed(
    name: str, function: Callable[[], Any], repeats: int, setup: Callable[[], Any] = _noop
) -> Timing:
    """``repeats`` timed calls of ``function`` (``setup`` untimed before each)."""
    timing = Timing(name)
    for _ in range(repeats):
        setup()
        _timed(timing, function)
    return timing


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


def _cpu_flash_attention_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _inplace_addmm_flops(bias: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(function: Callable[[], Any]) -> int:
    """FLOPs of one call of ``function`` (torch's ``FlopCounterMode``, 1 MAC = 2 FLOP, under
    ``inference_mode``), including what torch's table lacks: the CPU fused-attention kernel and
    the in-place ``addmm_`` (our encoder blocks accumulate proj / MLP-out GEMMs into the residual)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
        torch.ops.aten.addmm_: _inplace_addmm_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.inference_mode():
        function()
    return int(counter.get_total_flops())


def machine_facts() -> dict[str, Any]:
    """Versions, threads, CPU flags and load average to record beside every figure."""
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
            lines = cpuinfo.readlines()
        flags = next((line for line in lines if line.startswith("flags")), "")
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
        facts["cpu_flags"] = [f for f in wanted if f" {f}" in flags]
        facts["cpu_model"] = model
    except OSError:
        facts["cpu_flags"] = []
    facts["environment"] = {name: os.environ.get(name, "unset") for name in NATIVE_DEFAULTS}
    facts["load_average"] = load_average()
    return facts


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other jobs on this machine), or ``[]``."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def print_table(results: list[BenchmarkResult], stream: TextIO | None = None) -> None:
    """Fixed-width tables: comparisons (ours / baseline median and min wall-clock time, ratio of
    medians, ratio of median CPU seconds, target, check), then figures (value, target, detail)."""
    comparisons = [c for r in results for c in r.comparisons]
    figures = [f for r in results for f in r.figures]
    if comparisons:
        header = (
            f"{'comparison':44} {'ours med':>9} {'ours min':>9} {'base med':>9} {'base min':>9} "
            f"{'ratio':>7} {'cpu':>6} {'target':>7}      check"
        )
        print(header, file=stream)
        print("-" * len(header), file=stream)
        for c in comparisons:
            target = "" if c.target_ratio is None else f"≥{c.target_ratio:g}"
            mark = "" if c.meets_target is None else (" ok  " if c.meets_target else " MISS")
            cpu = "" if c.cpu_ratio is None else f"{c.cpu_ratio:.1f}"
            print(
                f"{c.name:44} {_format_seconds(c.ours.median):>9} {_format_seconds(c.ours.minimum):>9} "
                f"{_format_seconds(c.baseline.median):>9} {_format_seconds(c.baseline.minimum):>9} "
                f"{c.ratio:7.1f} {cpu:>6} {target:>7}{mark:5} {c.check}",
                file=stream,
            )
    if figures:
        print(file=stream)
        header = f"{'figure':44} {'value':>14} {'target':>12}      detail"
        print(header, file=stream)
        print("-" * len(header), file=stream)
        for f in figures:
            target = ""
            if f.target is not None:
                target = f"{'≥' if f.higher_is_better else '≤'}{f.target:g}"
            mark = "" if f.meets_target is None else (" ok  " if f.meets_target else " MISS")
            print(f"{f.name:44} {f.value:>9.4g} {f.unit:4} {target:>12}{mark:5} {f.detail}", file=stream)


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=_json_default)
