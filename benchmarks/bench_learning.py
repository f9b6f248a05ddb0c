"""Figure 5: learning from annotation webhooks through the HTTP service.

One service (``--quick``: tiny models; default: SAM ViT-B and DINOv2 ViT-S/14, random weights),
eight 1024x768 task images on local disk. ``ANNOTATION_CREATED`` webhooks, each with two brush
regions (Label Studio brush RLE) and the task's data, are sent by 8 concurrent clients:

* **accepted per second**: webhooks answered ``200 queued`` per second of sending (the request
  only parses and queues; learning runs in the background queue);
* **processed per second**: webhooks whose exemplars are stored, per second from the first send
  until the queue has finished them all;
* **none lost**: finished learning jobs and stored positive exemplars are counted on
  ``/metrics`` and must equal what was sent;
* **webhook → updated memory**: one more webhook at a time on an idle service, until ``/setup``
  reports the new model version (the memory's revision), polled every 5 ms.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.fixtures import distinct_images, model_choice, sam_checkpoint, scene_image, work_dir
from benchmarks.harness import BenchmarkResult, Figure, Timing
from benchmarks.service import LABEL_CONFIG, LABELS, PROJECT, Service, model_env, write_images
from samsem_plugin.brush_rle import rle_encode

WEBHOOKS_PER_SECOND_TARGET = 100.0
IMAGE_SIZE = (768, 1024)
IMAGES = 8
CLIENTS = 8
LATENCY_REPEATS = 5
POLL_S = 0.005
DRAIN_TIMEOUT_S = 600.0


def _brush_result(region_id: str, rle: list[int], label: str) -> dict:
    height, width = IMAGE_SIZE
    return {
        "id": region_id,
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def webhook(annotation_id: int, task_id: int, url: str, rles: list[list[int]]) -> dict:
    """An ``ANNOTATION_CREATED`` body with one brush region per RLE (labels cycle Cat, Dog, ...)."""
    results = [
        _brush_result(f"a{annotation_id}r{i}", rle, LABELS[(annotation_id + i) % 2])
        for i, rle in enumerate(rles)
    ]
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": int(PROJECT), "label_config": LABEL_CONFIG},
        "annotation": {
            "id": annotation_id,
            "task": task_id,
            "result": results,
            "was_cancelled": False,
            "updated_at": "2026-01-01T00:00:00.000000Z",
        },
        "task": {"id": task_id, "data": {"image": url}},
    }


def quadrant_masks(size: tuple[int, int]) -> list:
    """Four disjoint ``(H, W) bool`` ellipses, one per image quadrant (annotated objects)."""
    height, width = size
    rows, cols = np.mgrid[:height, :width]
    masks = []
    for cy, cx in ((0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
        masks.append(((rows / height - cy) / 0.2) ** 2 + ((cols / width - cx) / 0.15) ** 2 < 1.0)
    return masks


def _learnt(service: Service) -> float:
    return service.metric("samsem_learn_jobs_total", {"kind": "annotation"})


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL_S)
    return False


def run(quick: bool) -> BenchmarkResult:
    models = model_choice(quick)
    count = 100 if quick else 600
    result = BenchmarkResult(
        "learning", info={"sam": models.sam, "embedder": models.embedder, "webhooks": count}
    )
    root = work_dir() / "learning_images"
    urls = write_images(distinct_images(scene_image(IMAGE_SIZE, seed=4), IMAGES, seed=2), root)
    rles = [rle_encode(mask) for mask in quadrant_masks(IMAGE_SIZE)]
    env = {
        **model_env(models.sam, sam_checkpoint(models.sam), models.embedder),
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "MODEL_DIR": str(work_dir() / "learning_model_dir"),
        "THREADS": str(CLIENTS),
    }
    bodies = [
        webhook(k + 1, k % IMAGES + 1, urls[k % IMAGES], [rles[k % 4], rles[(k + 1) % 4]])
        for k in range(count)
    ]
    with Service(env, work_dir() / "learning.log") as service:
        service.setup()
        warm = webhook(10**6, 1, urls[0], rles[:1])  # builds the models outside the measurement
        service.post("/webhook", warm)
        if not _wait_for(lambda: _learnt(service) >= 1, DRAIN_TIMEOUT_S):
            raise RuntimeError(f"the warm-up webhook was not learnt: {service.log_tail()}")
        learnt_before = _learnt(service)
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda body: service.post("/webhook", body), bodies))
        sent = time.perf_counter() - started
        drained = _wait_for(lambda: _learnt(service) - learnt_before >= count, DRAIN_TIMEOUT_S)
        processed = time.perf_counter() - started
        queued = sum(answer.get("status") == "queued" for answer in answers)
        jobs_ok = service.metric("samsem_learn_jobs_total", {"kind": "annotation", "outcome": "ok"}) - 1
        jobs_failed = service.metric("samsem_learn_jobs_total", {"kind": "annotation", "outcome": "error"})
        positives = service.metric("samsem_exemplars", {"project": PROJECT}) - 1  # minus the warm-up's
        latency = Timing("webhook → new model version")
        for repeat in range(LATENCY_REPEATS):
            version = service.setup()
            body = webhook(2 * 10**6 + repeat, 1, urls[repeat % IMAGES], rles[:2])
            start = time.perf_counter()
            service.post("/webhook", body)
            if not _wait_for(lambda version=version: service.setup() != version, 60.0):
                raise RuntimeError("the memory did not change within 60 s of a webhook")
            latency.seconds.append(time.perf_counter() - start)
    lost = count - queued
    result.figures += [
        Figure(
            "webhooks accepted per second",
            queued / sent,
            "1/s",
            WEBHOOKS_PER_SECOND_TARGET,
            detail=f"{queued}/{count} answered 'queued' in {sent:.2f} s by {CLIENTS} clients",
        ),
        Figure(
            "webhooks learnt per second",
            count / processed if drained else 0.0,
            "1/s",
            detail=f"all learnt after {processed:.1f} s: {drained}; "
            f"ok {jobs_ok:.0f}, errors {jobs_failed:.0f}",
        ),
        Figure(
            "webhooks lost",
            float(lost + (count - jobs_ok) + (2 * count - positives)),
            "",
            0.0,
            higher_is_better=False,
            detail=f"queued {queued}/{count}, learnt {jobs_ok:.0f}/{count}, "
            f"exemplars {positives:.0f}/{2 * count}",
        ),
        Figure(
            "webhook → updated memory (median)",
            latency.median * 1e3,
            "ms",
            detail=f"min {latency.minimum * 1e3:.0f} ms of {LATENCY_REPEATS}; idle service, cached features",
        ),
    ]
    result.info["latency_s"] = latency.seconds
    return result
