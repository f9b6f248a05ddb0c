"""Prometheus metrics of one service instance (its own ``CollectorRegistry``), for ``GET /metrics``.

Series (times in seconds, sizes in bytes):

* ``samsem_exemplars{project,label}``: stored positive exemplars per label;
* ``samsem_exemplars_by_kind{project,kind}``: stored exemplars per kind (positive, negative,
  background);
* ``samsem_model_version_info{project,model_version}``: 1 for the version last served;
* ``samsem_learn_queue_length``: learning jobs waiting (callback);
* ``samsem_learn_jobs_total{kind,outcome}``: finished learning jobs (outcome ok | error);
* ``samsem_prediction_lookups_total{outcome}``: reads of a task's predictions from Label Studio
  to find the prediction an annotator corrected (outcome ok | error);
* ``samsem_requests_total{route,status}`` and ``samsem_request_seconds{route}`` (histogram);
* ``samsem_stage_seconds{stage}`` (histogram; stages in :data:`STAGES`);
* ``samsem_cache_bytes{cache}``, ``samsem_cache_capacity_bytes{cache}``,
  ``samsem_cache_hits_total{cache}``, ``samsem_cache_misses_total{cache}`` (callbacks);
* ``samsem_encoder_passes_total{model}``: SAM image-encoder / embedder forward passes (callbacks).

Callbacks are read at scrape time; one that raises is skipped (logged at debug), never a failed
scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

STAGES = ("load", "fetch", "sam", "embed", "classify", "encode", "learn")
"""Stage names accepted by :meth:`Metrics.observe_stage` (``load`` = building the models)."""

SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Histogram buckets: milliseconds (cached clicks) to minutes (CPU automatic masks)."""


def _read(source: Callable[[], Any], what: str) -> Any:
    try:
        return source()
    except Exception as error:  # a metrics callback must never break a scrape
        logger.debug("metrics callback for %s failed: %s", what, error)
        return None


class _CallbackCollector:
    """Cache and encoder series computed from callbacks at scrape time."""

    def __init__(self) -> None:
        self.caches: dict[str, Callable[[], Any]] = {}
        self.encoders: dict[str, Callable[[], int]] = {}

    def _families(self) -> dict[str, Metric]:
        return {
            "bytes": GaugeMetricFamily("samsem_cache_bytes", "Bytes held by a cache.", labels=["cache"]),
            "capacity": GaugeMetricFamily(
                "samsem_cache_capacity_bytes", "Byte bound of a cache.", labels=["cache"]
            ),
            "hits": CounterMetricFamily("samsem_cache_hits", "Cache lookups that hit.", labels=["cache"]),
            "misses": CounterMetricFamily(
                "samsem_cache_misses", "Cache lookups that missed.", labels=["cache"]
            ),
            "passes": CounterMetricFamily(
                "samsem_encoder_passes", "Image encoder forward passes.", labels=["model"]
            ),
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        for name, source in list(self.caches.items()):
            cache = _read(source, f"cache {name}")
            families["bytes"].add_metric([name], float(getattr(cache, "nbytes", 0) or 0))
            families["capacity"].add_metric([name], float(getattr(cache, "max_bytes", 0) or 0))
            families["hits"].add_metric([name], float(getattr(cache, "hits", 0) or 0))
            families["misses"].add_metric([name], float(getattr(cache, "misses", 0) or 0))
        for model, source in list(self.encoders.items()):
            families["passes"].add_metric([model], float(_read(source, f"encoder {model}") or 0))
        yield from families.values()


class Metrics:
    """All metrics of one app instance; render with :meth:`render`. Thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._label_sets: dict[tuple[str, str], set[str]] = {}
        self._versions: dict[str, str] = {}
        self.exemplars = Gauge(
            "samsem_exemplars",
            "Stored positive exemplars per label.",
            ["project", "label"],
            registry=self.registry,
        )
        self.exemplars_by_kind = Gauge(
            "samsem_exemplars_by_kind",
            "Stored exemplars per kind.",
            ["project", "kind"],
            registry=self.registry,
        )
        self.model_version_info = Gauge(
            "samsem_model_version_info",
            "1 for the model version last served per project.",
            ["project", "model_version"],
            registry=self.registry,
        )
        self.learn_queue_length = Gauge(
            "samsem_learn_queue_length", "Learning jobs waiting.", registry=self.registry
        )
        self.learn_jobs = Counter(
            "samsem_learn_jobs", "Finished learning jobs.", ["kind", "outcome"], registry=self.registry
        )
        self.prediction_lookups = Counter(
            "samsem_prediction_lookups",
            "Reads of a task's predictions from Label Studio.",
            ["outcome"],
            registry=self.registry,
        )
        self.requests = Counter(
            "samsem_requests", "HTTP requests answered.", ["route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "samsem_request_seconds",
            "HTTP request duration.",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "samsem_stage_seconds",
            "Duration of a processing stage.",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._callbacks = _CallbackCollector()
        self.registry.register(self._callbacks)

    # ------------------------------------------------------------------ memory gauges

    def set_exemplar_counts(self, project: str, counts: Mapping[str, int]) -> None:
        """Set ``samsem_exemplars{project,label}``; labels of ``project`` absent from ``counts``
        are removed."""
        self._set_counts(self.exemplars, "label", project, counts)

    def set_exemplar_kind_counts(self, project: str, counts: Mapping[str, int]) -> None:
        """Set ``samsem_exemplars_by_kind{project,kind}``; kinds absent from ``counts`` are removed."""
        self._set_counts(self.exemplars_by_kind, "kind", project, counts)

    def _set_counts(self, gauge: Gauge, dimension: str, project: str, counts: Mapping[str, int]) -> None:
        project = str(project)
        with self._lock:
            previous = self._label_sets.get((dimension, project), set())
            for stale in previous - set(counts):
                gauge.remove(project, stale)
            for name, count in counts.items():
                gauge.labels(project, str(name)).set(count)
            self._label_sets[(dimension, project)] = {str(name) for name in counts}

    def set_model_version(self, project: str, model_version: str) -> None:
        """``samsem_model_version_info{project,model_version} = 1``, replacing the project's
        previous version."""
        project = str(project)
        with self._lock:
            previous = self._versions.get(project)
            if previous is not None and previous != model_version:
                self.model_version_info.remove(project, previous)
            self.model_version_info.labels(project, model_version).set(1)
            self._versions[project] = model_version

    def forget_project(self, project: str) -> None:
        """Remove every per-project series of ``project``."""
        project = str(project)
        with self._lock:
            for dimension, gauge in (("label", self.exemplars), ("kind", self.exemplars_by_kind)):
                for name in self._label_sets.pop((dimension, project), set()):
                    gauge.remove(project, name)
            version = self._versions.pop(project, None)
            if version is not None:
                self.model_version_info.remove(project, version)

    # ------------------------------------------------------------------ callbacks

    def track_queue(self, length: Callable[[], int]) -> None:
        """``samsem_learn_queue_length`` reads ``length()`` at scrape time."""
        self.learn_queue_length.set_function(lambda: float(_read(length, "queue length") or 0))

    def track_cache(self, name: str, cache: Callable[[], Any]) -> None:
        """Cache series for ``name`` read from ``cache()`` at scrape time: an object with
        ``nbytes``, ``max_bytes``, ``hits``, ``misses`` (e.g. ``ByteLRUCache``), or None (zeros)."""
        self._callbacks.caches[name] = cache

    def track_encoder(self, model: str, passes: Callable[[], int]) -> None:
        """``samsem_encoder_passes_total{model}`` reads ``passes()`` at scrape time."""
        self._callbacks.encoders[model] = passes

    # ------------------------------------------------------------------ events

    def count_learn_job(self, kind: str, outcome: str) -> None:
        """One finished learning job of ``kind`` with ``outcome`` ("ok" or "error")."""
        self.learn_jobs.labels(kind, outcome).inc()

    def count_prediction_lookup(self, outcome: str) -> None:
        """One read of a task's predictions from Label Studio with ``outcome`` ("ok" or "error")."""
        self.prediction_lookups.labels(outcome).inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One answered request: ``route`` is the route name (not the raw path), ``status`` the HTTP
        status code, ``seconds`` its duration."""
        self.requests.labels(route, str(int(status))).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_stage_seconds(self, stage: str, seconds: float) -> None:
        """Record ``seconds`` spent in ``stage`` (one of :data:`STAGES`)."""
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {list(STAGES)}, got {stage!r}")
        self.stage_seconds.labels(stage).observe(seconds)

    @contextmanager
    def observe_stage(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block as ``stage`` (recorded also when the block raises)."""
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {list(STAGES)}, got {stage!r}")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ exposition

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition format 0.0.4."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
