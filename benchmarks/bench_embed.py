"""Figure 2: mask embedding, one backbone pass + area-weighted pooling vs encoding each mask's crop.

Backbone: DINOv2 ViT-S/14 with registers (random weights) in both arms, the same module object.

* **ours**: ``MaskEmbedder.embed(image, masks)`` with its feature cache disabled: one forward of the
  1024² image resized to 518² (37 x 37 patches), then all masks pooled at once.
* **baseline**: per mask, its bounding-box crop with the pixels outside the mask set to the image
  mean, resized to 224² and encoded (pooled output of the backbone), 25 crops per forward.

FLOPs of both are counted with ``torch.utils.flop_counter.FlopCounterMode`` (1 MAC = 2 FLOP).
"""

from __future__ import annotations

import numpy as np
import timm
import torch
from torch.nn import functional as F

from benchmarks.fixtures import REAL_EMBEDDER, ellipse_masks, random_backbone, scene_image
from benchmarks.harness import BenchmarkResult, Figure, compare_interleaved, count_flops, repeat_timed
from samsem_plugin.embedder import MaskEmbedder, cell_coverage, pool_normalised
from samsem_plugin.regions import boxes_from_masks

TARGET = 10.0
MASKS = 100
QUICK_MASKS = 25
IMAGE_SIZE = (1024, 1024)
CROP_SIZE = 224
CROPS_PER_FORWARD = 25


class CropEncoder:
    """The baseline: encode each mask's crop (masked to the mean colour) at ``CROP_SIZE``²."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = timm.data.resolve_model_data_config(model)
        self.model = model
        self.mean = torch.tensor(config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def crops(self, image: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """``(N, 3, 224, 224)`` normalised crops."""
        mean_colour = image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
        crops = []
        for mask, (x0, y0, x1, y1) in zip(masks, boxes_from_masks(masks).astype(int), strict=True):
            crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], mean_colour)
            pixels = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
            crops.append(
                F.interpolate(pixels, size=(CROP_SIZE, CROP_SIZE), mode="bicubic", antialias=True).clamp(0, 1)
            )
        return (torch.cat(crops) - self.mean) / self.std

    def encode(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """``(N, D)`` L2-normalised pooled embeddings of the crops."""
        crops = self.crops(image, masks)
        with torch.inference_mode():
            outputs = [
                self.model(crops[s : s + CROPS_PER_FORWARD]) for s in range(0, len(crops), CROPS_PER_FORWARD)
            ]
        return F.normalize(torch.cat(outputs), dim=1).numpy()


def run(quick: bool) -> BenchmarkResult:
    count = QUICK_MASKS if quick else MASKS
    result = BenchmarkResult("embed", info={"backbone": REAL_EMBEDDER, "masks": count})
    model = random_backbone(REAL_EMBEDDER)
    embedder = MaskEmbedder(model, embedder_id=f"{REAL_EMBEDDER}@random", cache_bytes=0)
    baseline = CropEncoder(model)
    image = scene_image(IMAGE_SIZE, seed=5)
    masks = ellipse_masks(count, IMAGE_SIZE, seed=5)
    ours_vectors = embedder.embed(image, masks)
    crop_vectors = baseline.encode(image, masks[:CROPS_PER_FORWARD])  # warm-up of the baseline
    one_pass = count_flops(lambda: embedder.features(image))
    per_crop = count_flops(lambda: model(baseline.crops(image, masks[:1])))
    comparison = compare_interleaved(
        f"embed {count} masks: 1 pass+pool vs crops",
        ("backbone pass + pooling", lambda: embedder.embed(image, masks)),
        ("encode each crop", lambda: baseline.encode(image, masks)),
        repeats=2 if quick else 5,
        baseline_repeats=1 if quick else 2,
        warmup=0,
        target_ratio=None if quick else TARGET,
    )
    flop_ratio = count * per_crop / one_pass
    comparison.check = (
        f"FLOP ratio {flop_ratio:.1f}x ({one_pass / 1e9:.0f} vs {count * per_crop / 1e9:.0f} GFLOP); "
        f"unit-norm {np.allclose(np.linalg.norm(ours_vectors, axis=1), 1, atol=1e-5)}"
    )
    result.comparisons.append(comparison)
    grid = embedder.features(image)  # cache is off: one more forward, to time pooling alone
    pooling = repeat_timed(
        "cell coverage + pooled matmul",
        lambda: pool_normalised(
            cell_coverage(masks, grid.shape[:2]).reshape(count, -1), grid.reshape(-1, grid.shape[2])
        ),
        repeats=5,
    )
    result.figures.append(
        Figure(
            f"pooling alone, {count} masks (median)",
            pooling.median * 1e3,
            "ms",
            detail=f"integer block sums on bool masks + one (N, P) @ (P, D) matmul, grid {grid.shape[:2]}",
        )
    )
    result.info.update(
        {
            "backbone_pass_gflop": one_pass / 1e9,
            "crop_gflop": per_crop / 1e9,
            "flop_ratio": flop_ratio,
            "feature_grid": list(grid.shape),
            "baseline_embedding_dim": int(crop_vectors.shape[1]),
        }
    )
    return result
