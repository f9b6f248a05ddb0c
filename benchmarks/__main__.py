"""``python -m benchmarks [--quick] [--only NAME,...] [--json OUT]``: samsem's performance figures.

Every figure is measured against its baseline in the same run (interleaved, after a warm-up) and
printed as a table (median and minimum of the repeats, ratio = baseline / ours on medians, the
target and the equivalence check), plus JSON with every repeat and the machine's facts.

Benchmarks (``--only`` names): see :data:`BENCHMARKS`. ``--quick`` (about 1–3 minutes) uses the
tiny SAM and timm's ``test_vit`` where the real architectures cost minutes, and fewer repeats; the
default run (about 10 minutes on 2 CPU cores) uses SAM ViT-B and DINOv2 ViT-S/14 with random
weights. Targets are judged on the default run.

The command runs with the service's native-library settings (``MALLOC_ARENA_MAX``,
``OPENBLAS_NUM_THREADS``; :mod:`backend.native_environment`): it re-executes itself with them
unless they are set, so in-process figures see the same thread setup as the service.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from backend.native_environment import native_environment
from benchmarks.harness import BenchmarkResult, load_average, machine_facts, print_table, write_json

BENCHMARKS: dict[str, str] = {
    "click": "interactive click through the HTTP service: cached vs first vs re-embedding per click",
    "embed": "mask embedding: one backbone pass + pooling of 100 masks vs encoding each crop",
    "rle": "brush RLE encode/decode vs label_studio_sdk, byte-identical",
    "auto": "automatic pre-annotation of one image vs SamAutomaticMaskGenerator + crop-encode",
    "learning": "webhooks accepted per second, none lost; webhook-to-memory latency",
    "memory": "peak RSS of the service over 200 distinct images vs its cache bounds",
    "floor": "FLOPs of SAM encoder and backbone, fraction of the matmul ceiling, bf16 cost",
}


def _parse_only(text: str | None) -> list[str]:
    if not text:
        return list(BENCHMARKS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; expected names from {list(BENCHMARKS)}")
    return names


def run_benchmarks(names: list[str], quick: bool) -> list[BenchmarkResult]:
    """Run the named benchmarks in order; each prints its own table as soon as it is done."""
    results = []
    for name in names:
        print(f"\n== {name}: {BENCHMARKS[name]} (load average {load_average()})", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        started = time.perf_counter()
        result: BenchmarkResult = module.run(quick)
        result.seconds = time.perf_counter() - started
        print_table([result])
        print(f"({name} took {result.seconds:.0f} s)", flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, fewer repeats (1–3 minutes)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--json", metavar="OUT", help="write every figure and repeat as JSON to OUT")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args(argv)
    names = _parse_only(args.only)
    logging.basicConfig(level=logging.ERROR)  # random-weight warnings are expected here
    from benchmarks.fixtures import work_dir

    facts = machine_facts()
    print("machine:", json.dumps(facts), flush=True)
    started = time.perf_counter()
    try:
        results = run_benchmarks(names, args.quick)
    finally:
        if not args.keep:
            shutil.rmtree(work_dir(), ignore_errors=True)
    print(f"\n== summary ({'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s)")
    print_table(results)
    payload: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "machine": facts,
        "load_average_end": load_average(),
        "benchmarks": {result.name: result.summary() for result in results},
    }
    if args.json:
        write_json(args.json, payload)
        print(f"JSON written to {args.json}")
    return 0


def _with_native_environment() -> None:
    """Re-execute ``python -m benchmarks ...`` with the service's native settings if any is unset."""
    environ = native_environment(os.environ)
    if environ != dict(os.environ):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], environ)


if __name__ == "__main__":
    _with_native_environment()
    sys.exit(main())
