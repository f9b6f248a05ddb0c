"""Figure 6: peak resident memory of the service over 200 distinct images vs its cache bounds.

One service with the tiny models (200 SAM ViT-B encoder passes would take over an hour on 2 CPU
cores; the caches' bounds are what is measured, and they are per byte whatever the model) and
small cache bounds, so that 200 images overflow every cache many times: 1024x768 images are
2.4 MB decoded (200 of them: 470 MB). Each image is pre-annotated with one batch ``/predict``.

Measured: the service's resident memory (``VmRSS``) after a warm-up of ``WARMUP`` images and its
peak (``VmHWM``) at the end, summed over the gunicorn processes, and every cache's bytes from
``/metrics``. The peak growth after the warm-up must stay within the configured bounds
(``IMAGE_CACHE_MB + SAM_CACHE_MB + EMBED_CACHE_MB + PROPOSAL_CACHE_MB``) plus the working memory of
one request; and the resident memory must stop growing (second half of the images).
"""

from __future__ import annotations

from benchmarks.fixtures import TINY_EMBEDDER, TINY_SAM, distinct_images, scene_image, work_dir
from benchmarks.harness import BenchmarkResult, Figure
from benchmarks.service import Service, batch_body, model_env, task, write_images

IMAGE_SIZE = (768, 1024)
CACHE_MB = {"IMAGE_CACHE_MB": 32, "SAM_CACHE_MB": 4, "EMBED_CACHE_MB": 4, "PROPOSAL_CACHE_MB": 256}
METRIC_CACHES = ("image", "sam", "embedder", "proposals")
"""The ``cache`` label of each of those caches in ``samsem_cache_bytes``."""
WARMUP = 20
WORKING_SET_MB = 64  # one 1024x768 request: 16 upsampled float logits (48 MiB) + masks and arrays
PLATEAU_MB = 32
SAMPLE_EVERY = 20


def run(quick: bool) -> BenchmarkResult:
    count = 40 if quick else 200
    result = BenchmarkResult("memory", info={"sam": TINY_SAM, "embedder": TINY_EMBEDDER, "images": count})
    root = work_dir() / "memory_images"
    urls = write_images(distinct_images(scene_image(IMAGE_SIZE, seed=6), count, seed=3), root)
    env = {
        **model_env(TINY_SAM, None, TINY_EMBEDDER),
        **{name: str(value) for name, value in CACHE_MB.items()},
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "MODEL_DIR": str(work_dir() / "memory_model_dir"),
        "AUTO_POINTS_PER_SIDE": "4",
        "AUTO_STABILITY_SCORE_THRESH": "0",  # ~20 regions an image: the proposal cache fills early
    }
    samples: list[dict[str, float]] = []
    regions = 0
    with Service(env, work_dir() / "memory.log") as service:
        service.setup()
        start = service.memory_mib()
        for index, url in enumerate(urls):
            answer = service.post("/predict", batch_body([task(index + 1, url)]))
            regions += len(answer["results"][0]["result"])
            if index + 1 == WARMUP:
                after_warmup = service.memory_mib()
            if (index + 1) % SAMPLE_EVERY == 0:
                samples.append({"images": index + 1, **service.memory_mib()})
        end = service.memory_mib()
        caches = {
            name: {
                "bytes": service.metric("samsem_cache_bytes", {"cache": name}),
                "capacity": service.metric("samsem_cache_capacity_bytes", {"cache": name}),
            }
            for name in METRIC_CACHES
        }
    configured = sum(CACHE_MB.values())
    halfway = next(sample for sample in samples if sample["images"] >= count // 2)
    late_growth = end["rss"] - halfway["rss"]
    within = all(c["bytes"] <= c["capacity"] for c in caches.values())
    result.figures += [
        Figure(
            f"peak RSS over {count} images",
            end["peak"],
            "MiB",
            detail=f"no models {start['rss']:.0f} MiB, after {WARMUP} images {after_warmup['rss']:.0f} "
            f"MiB, at the end {end['rss']:.0f} MiB",
        ),
        Figure(
            f"peak RSS above the {WARMUP}-image level",
            end["peak"] - after_warmup["rss"],
            "MiB",
            float(configured + WORKING_SET_MB),
            higher_is_better=False,
            detail=f"bound: caches {configured} MiB ({', '.join(f'{k}={v}' for k, v in CACHE_MB.items())}) "
            f"+ one request {WORKING_SET_MB} MiB",
        ),
        Figure(
            f"RSS growth, image {halfway['images']} to {count}",
            late_growth,
            "MiB",
            None if quick else float(PLATEAU_MB),  # 40 images do not fill the proposal cache
            higher_is_better=False,
            detail="bounded caches: memory stops growing once they are full",
        ),
        Figure(
            "caches within their bounds",
            float(within),
            "",
            1.0,
            detail="; ".join(
                f"{name} {c['bytes'] / 2**20:.1f}/{c['capacity'] / 2**20:.0f} MiB"
                for name, c in caches.items()
            ),
        ),
    ]
    result.info.update({"samples_mib": samples, "caches": caches, "regions_predicted": regions})
    return result
