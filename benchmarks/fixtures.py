"""Inputs of the benchmarks: scene images, masks, and random-weight models of the real architectures.

Nothing is downloaded. SAM ViT-B is segment-anything's own architecture with its random
initialisation, saved once per run as a checkpoint file so that our loader (``build_sam``), the
stock loader (``sam_model_registry``) and the HTTP service all read the same weights. The mask
embedder is timm's DINOv2 ViT-S/14 (with registers), randomly initialised. ``--quick`` runs use the
tiny SAM and timm's ``test_vit`` instead (same code paths, seconds instead of minutes).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from samsem_plugin.scenes import SceneSettings, make_scene

REAL_SAM = "vit_b"
TINY_SAM = "tiny-random"
REAL_EMBEDDER = "vit_small_patch14_reg4_dinov2"
TINY_EMBEDDER = "test_vit"


@dataclass(frozen=True)
class ModelChoice:
    """Which architectures a run uses (``sam``: a ``build_sam`` model type; ``embedder``: timm name)."""

    sam: str
    embedder: str

    @property
    def is_real(self) -> bool:
        return self.sam == REAL_SAM


def model_choice(quick: bool) -> ModelChoice:
    """Tiny models for ``--quick``, the real architectures (random weights) otherwise."""
    return ModelChoice(TINY_SAM, TINY_EMBEDDER) if quick else ModelChoice(REAL_SAM, REAL_EMBEDDER)


@cache
def work_dir() -> Path:
    """A temporary directory for this run (checkpoints, images, service state)."""
    return Path(tempfile.mkdtemp(prefix="samsem-bench-"))


def scene_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A ``(H, W, 3) uint8`` photo-like scene (real textures and objects, see ``samsem_plugin.scenes``)."""
    image, _ = make_scene(0, seed, size, settings=SceneSettings(min_objects=3, max_objects=5))
    return image


def distinct_images(base: np.ndarray, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` images that differ in content (a per-image shift and brightness offset of ``base``)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        shifted = np.roll(base, shift=(int(rng.integers(0, 64)), int(rng.integers(0, 64))), axis=(0, 1))
        offset = np.int16(index % 7 - 3)
        images.append(np.clip(shifted.astype(np.int16) + offset, 0, 255).astype(np.uint8))
    return images


def ellipse_masks(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``(count, H, W) bool`` ellipses, centres anywhere, semi-axes 2–30 % of the image side
    (a spread of object sizes like SAM's automatic masks)."""
    height, width = size
    rng = np.random.default_rng(seed)
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    masks = np.empty((count, height, width), dtype=bool)
    for index in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.02, 0.3) * height, rng.uniform(0.02, 0.3) * width
        masks[index] = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1.0
    return masks


def blob_mask(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """One ``(H, W) bool`` annotation-like mask: a large smooth star-shaped blob."""
    height, width = size
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    dy, dx = rows - height / 2, cols - width / 2
    angle = np.arctan2(dy, dx)
    radius = 0.3 * min(height, width) * (1 + 0.15 * np.sin(5 * angle + rng.uniform(0, 6.28)))
    return np.hypot(dy, dx) < radius


def speckled_mask(size: tuple[int, int], seed: int = 0, spots: int = 400) -> np.ndarray:
    """One ``(H, W) bool`` mask with many runs: ``spots`` small discs (a worst case for RLE)."""
    height, width = size
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    radius = max(2, min(height, width) // 80)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = yy**2 + xx**2 <= radius**2
    for _ in range(spots):
        y = int(rng.integers(0, height - 2 * radius - 1))
        x = int(rng.integers(0, width - 2 * radius - 1))
        mask[y : y + 2 * radius + 1, x : x + 2 * radius + 1] |= disc
    return mask


@cache
def sam_checkpoint(model_type: str) -> Path | None:
    """A checkpoint file of segment-anything's ``model_type`` with its random initialisation
    (seed 0), written once per run; ``None`` for the tiny model (built from its seed)."""
    if model_type == TINY_SAM:
        return None
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = sam_model_registry[model_type](checkpoint=None)
    path = work_dir() / f"random_sam_{model_type}.pth"
    torch.save(sam.state_dict(), path)
    return path


def our_sam(model_type: str):
    """SAM through our loader (``samsem_plugin.sam_models.build_sam``), as the service builds it."""
    from samsem_plugin.sam_models import build_sam

    return build_sam(model_type, sam_checkpoint(model_type))


def stock_sam(model_type: str):
    """The same weights through segment-anything's own constructor (what a naive user runs)."""
    if model_type == TINY_SAM:
        from samsem_plugin.sam_models import build_tiny_sam

        return build_tiny_sam()
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=str(sam_checkpoint(model_type))).eval()


def random_backbone(name: str, seed: int = 0) -> torch.nn.Module:
    """timm ``name`` with its random initialisation (seeded), eval mode, no classifier head."""
    from samsem_plugin.backbones import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_backbone(name, "random")
