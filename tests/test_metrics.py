"""Metrics: per-instance registry, gauges that follow the memory, callbacks, histograms, render."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.metrics import STAGES, Metrics
from samsem_plugin.cache import ByteLRUCache


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` parsed back from the rendered text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    parsed = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_instances_have_separate_registries():
    first, second = Metrics(), Metrics()
    first.set_exemplar_counts("1", {"cat": 3})
    assert value(first, "samsem_exemplars", project="1", label="cat") == 3
    assert value(second, "samsem_exemplars", project="1", label="cat") is None


def test_exemplar_counts_follow_the_memory_and_drop_vanished_labels():
    metrics = Metrics()
    metrics.set_exemplar_counts("1", {"cat": 3, "dog": 2})
    metrics.set_exemplar_counts("2", {"cat": 7})
    metrics.set_exemplar_counts("1", {"dog": 5})
    assert value(metrics, "samsem_exemplars", project="1", label="cat") is None
    assert value(metrics, "samsem_exemplars", project="1", label="dog") == 5
    assert value(metrics, "samsem_exemplars", project="2", label="cat") == 7
    metrics.set_exemplar_kind_counts("1", {"positive": 5, "negative": 1})
    metrics.set_exemplar_kind_counts("1", {"positive": 4})
    assert value(metrics, "samsem_exemplars_by_kind", project="1", kind="positive") == 4
    assert value(metrics, "samsem_exemplars_by_kind", project="1", kind="negative") is None


def test_model_version_info_keeps_only_the_latest_version_per_project():
    metrics = Metrics()
    metrics.set_model_version("1", "samsem-a-1")
    metrics.set_model_version("1", "samsem-a-2")
    metrics.set_model_version("2", "samsem-a-1")
    assert value(metrics, "samsem_model_version_info", project="1", model_version="samsem-a-1") is None
    assert value(metrics, "samsem_model_version_info", project="1", model_version="samsem-a-2") == 1
    assert value(metrics, "samsem_model_version_info", project="2", model_version="samsem-a-1") == 1


def test_forget_project_removes_its_series_only():
    metrics = Metrics()
    for project in ("1", "2"):
        metrics.set_exemplar_counts(project, {"cat": 1})
        metrics.set_exemplar_kind_counts(project, {"positive": 1})
        metrics.set_model_version(project, "v")
    metrics.forget_project("1")
    parsed = samples(metrics)
    assert not [key for key in parsed if ("project", "1") in key[1]]
    assert value(metrics, "samsem_exemplars", project="2", label="cat") == 1


def test_callbacks_are_read_at_scrape_time_and_failures_are_skipped():
    metrics = Metrics()
    waiting = [3]
    metrics.track_queue(lambda: waiting[0])
    cache: ByteLRUCache = ByteLRUCache(max_bytes=1000)
    cache.put("a", np.zeros(100, dtype=np.uint8))
    cache.get("a")
    cache.get("missing")
    metrics.track_cache("image", lambda: cache)
    metrics.track_cache("sam", lambda: None)  # models not loaded yet
    metrics.track_cache("broken", lambda: 1 / 0)
    passes = [0]
    metrics.track_encoder("sam", lambda: passes[0])
    assert value(metrics, "samsem_learn_queue_length") == 3
    waiting[0], passes[0] = 0, 4
    parsed = samples(metrics)
    assert parsed[("samsem_learn_queue_length", ())] == 0
    assert parsed[("samsem_cache_bytes", (("cache", "image"),))] == 100
    assert parsed[("samsem_cache_capacity_bytes", (("cache", "image"),))] == 1000
    assert parsed[("samsem_cache_hits_total", (("cache", "image"),))] == 1
    assert parsed[("samsem_cache_misses_total", (("cache", "image"),))] == 1
    assert parsed[("samsem_cache_bytes", (("cache", "sam"),))] == 0
    assert parsed[("samsem_cache_bytes", (("cache", "broken"),))] == 0
    assert parsed[("samsem_encoder_passes_total", (("model", "sam"),))] == 4


def test_counters_and_histograms():
    metrics = Metrics()
    metrics.count_learn_job("ANNOTATION_CREATED", "ok")
    metrics.count_learn_job("ANNOTATION_CREATED", "ok")
    metrics.count_learn_job("START_TRAINING", "error")
    metrics.observe_request("predict", 200, 0.5)
    metrics.observe_request("predict", 200, 1.5)
    metrics.observe_request("predict", 422, 0.1)
    parsed = samples(metrics)
    assert parsed[("samsem_learn_jobs_total", (("kind", "ANNOTATION_CREATED"), ("outcome", "ok")))] == 2
    assert parsed[("samsem_learn_jobs_total", (("kind", "START_TRAINING"), ("outcome", "error")))] == 1
    assert parsed[("samsem_requests_total", (("route", "predict"), ("status", "200")))] == 2
    assert parsed[("samsem_requests_total", (("route", "predict"), ("status", "422")))] == 1
    assert parsed[("samsem_request_seconds_count", (("route", "predict"),))] == 3
    assert parsed[("samsem_request_seconds_sum", (("route", "predict"),))] == pytest.approx(2.1)
    assert parsed[("samsem_request_seconds_bucket", (("le", "1.0"), ("route", "predict")))] == 2


def test_observe_stage_records_even_when_the_block_raises_and_rejects_unknown_stages():
    metrics = Metrics()
    with metrics.observe_stage("sam"):
        pass
    with pytest.raises(RuntimeError), metrics.observe_stage("embed"):
        raise RuntimeError("model failed")
    metrics.observe_stage_seconds("learn", 2.0)
    parsed = samples(metrics)
    for stage in ("sam", "embed", "learn"):
        assert parsed[("samsem_stage_seconds_count", (("stage", stage),))] == 1
    assert parsed[("samsem_stage_seconds_sum", (("stage", "learn"),))] == 2.0
    with pytest.raises(ValueError, match="stage"), metrics.observe_stage("nap"):
        pass
    with pytest.raises(ValueError, match="stage"):
        metrics.observe_stage_seconds("nap", 1.0)
    assert set(STAGES) >= {"fetch", "sam", "embed", "classify", "encode", "learn"}
