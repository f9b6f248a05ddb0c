"""Synthetic scenes of real photographic content with known instance masks (tests, evaluation demo).

Each scene is a tinted real texture (scikit-image's brick, grass or gravel) with 2–5 objects pasted
on it. An object of class ``c`` is a random crop of the real photo region of ``c`` (scikit-image's
cat, coffee cup, astronaut, motorcycle, coins, retina, ...), randomly scaled, flipped, rotated and
colour-jittered, cut out by a random shape (ellipse or smooth star-shaped blob). Objects overlap
little; later objects occlude earlier ones and the masks are the visible parts. Everything is drawn
from ``numpy.random.default_rng([seed, image_index])``: image ``i`` of a dataset does not depend on
how many images are made.

:func:`export_coco` writes a dataset as PNG files plus a COCO instances file (polygons, compressed
RLE or uncompressed RLE) that ``python -m samsem_plugin.evaluate`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from samsem_plugin.regions import Regions

SEGMENTATION_FORMATS = ("polygon", "rle", "uncompressed_rle", "mixed")
"""COCO segmentation encodings :func:`export_coco` can write (``"mixed"`` cycles the other three)."""


@dataclass(frozen=True)
class ContentSource:
    """Where the pixels of one class come from.

    Attributes:
        loader: name of the ``skimage.data`` function returning the photo.
        rows: ``(first, last)`` pixel rows of the content region (exclusive end).
        cols: ``(first, last)`` pixel columns of the content region (exclusive end).
    """

    loader: str
    rows: tuple[int, int]
    cols: tuple[int, int]


CONTENT_SOURCES: dict[str, ContentSource] = {
    "cat": ContentSource("chelsea", (0, 300), (60, 400)),
    "coffee": ContentSource("coffee", (10, 390), (90, 490)),
    "astronaut": ContentSource("astronaut", (10, 500), (30, 350)),
    "motorcycle": ContentSource("stereo_motorcycle", (130, 460), (60, 690)),
    "coins": ContentSource("coins", (0, 303), (0, 384)),
    "retina": ContentSource("retina", (250, 1150), (250, 1150)),
    "cameraman": ContentSource("camera", (60, 512), (110, 400)),
    "tissue": ContentSource("immunohistochemistry", (0, 512), (0, 512)),
}
"""Real photo regions usable as object classes (class name → source)."""

DEFAULT_CLASSES = ("cat", "coffee", "astronaut", "motorcycle", "coins", "retina")
BACKGROUND_TEXTURES = ("brick", "grass", "gravel")


@dataclass(frozen=True)
class SceneSettings:
    """How scenes are drawn (sizes in pixels, fractions of the image's shorter side).

    Attributes:
        min_objects, max_objects: objects attempted per image (inclusive range).
        min_size, max_size: object long side as a fraction of the image's shorter side.
        max_overlap: most of an object's visible area a later object may cover, and most of a new
            object that may fall on earlier ones (placements breaking this are retried).
        max_rotation: rotation range in degrees (uniform in ±max_rotation).
        min_visible_pixels: objects with fewer visible pixels are dropped from the annotations.
    """

    min_objects: int = 2
    max_objects: int = 5
    min_size: float = 0.3
    max_size: float = 0.6
    max_overlap: float = 0.25
    max_rotation: float = 25.0
    min_visible_pixels: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                "objects: expected 1 <= min_objects <= max_objects, "
                f"got {self.min_objects}, {self.max_objects}"
            )
        if not 0 < self.min_size <= self.max_size <= 1:
            raise ValueError(
                f"size: expected 0 < min_size <= max_size <= 1, got {self.min_size}, {self.max_size}"
            )
        if not 0 <= self.max_overlap < 1:
            raise ValueError(f"max_overlap: expected a value in [0, 1), got {self.max_overlap}")


_PLACEMENT_ATTEMPTS = 30


@cache
def _photo(loader: str) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB photo from ``skimage.data`` (grayscale replicated, read-only)."""
    from skimage import data

    photo = getattr(data, loader)()
    if isinstance(photo, tuple):  # stereo_motorcycle returns (left, right, disparity)
        photo = photo[0]
    photo = np.asarray(photo)
    if photo.dtype == bool:
        photo = photo.astype(np.uint8) * 255
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    photo = np.ascontiguousarray(photo[:, :, :3].astype(np.uint8))
    photo.setflags(write=False)
    return photo


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` resized to ``size = (rows, columns)`` (bilinear)."""
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR))


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A tinted random crop of a real texture, ``(H, W, 3) uint8``."""
    height, width = size
    texture = _photo(BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))])
    crop_side = int(rng.integers(min(texture.shape[:2]) // 2, min(texture.shape[:2]) + 1))
    y = int(rng.integers(0, texture.shape[0] - crop_side + 1))
    x = int(rng.integers(0, texture.shape[1] - crop_side + 1))
    crop = texture[y : y + crop_side, x : x + crop_side]
    scene = _resized(crop, (height, width)).astype(np.float32)
    tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32)
    return np.clip(scene * tint, 0, 255).astype(np.uint8)


def _colour_jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [0.8, 1.2]."""
    values = pixels.astype(np.float32)
    brightness, contrast, saturation = rng.uniform(0.8, 1.2, size=3)
    values = (values - values.mean()) * contrast + values.mean()
    grey = values.mean(axis=2, keepdims=True)
    values = (grey + (values - grey) * saturation) * brightness
    return np.clip(values, 0, 255).astype(np.uint8)


def _shape_mask(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``(h, w) bool``: an ellipse or a smooth star-shaped blob filling most of the box."""
    height, width = size
    rows = (np.arange(height) + 0.5) / height * 2 - 1  # -1 .. 1
    cols = (np.arange(width) + 0.5) / width * 2 - 1
    y, x = np.meshgrid(rows, cols, indexing="ij")
    radius = np.hypot(x, y)
    if rng.random() < 0.5:
        return radius <= rng.uniform(0.85, 1.0)
    angle = np.arctan2(y, x)
    outline = np.full_like(angle, 0.8)
    for harmonic in (2, 3, 4):
        outline += rng.uniform(0.0, 0.15 / harmonic * 2) * np.cos(
            harmonic * angle + rng.uniform(0, 2 * np.pi)
        )
    return radius <= np.minimum(outline, 1.0)


def _object(label: str, long_side: int, settings: SceneSettings, rng: np.random.Generator):
    """One object of class ``label``: ``(pixels (h, w, 3) uint8, mask (h, w) bool)``."""
    source = CONTENT_SOURCES[label]
    photo = _photo(source.loader)
    (r0, r1), (c0, c1) = source.rows, source.cols
    fraction = rng.uniform(0.55, 1.0)
    crop_h, crop_w = max(8, int((r1 - r0) * fraction)), max(8, int((c1 - c0) * fraction))
    y = r0 + int(rng.integers(0, r1 - r0 - crop_h + 1))
    x = c0 + int(rng.integers(0, c1 - c0 - crop_w + 1))
    crop = photo[y : y + crop_h, x : x + crop_w]
    scale = long_side / max(crop_h, crop_w)
    size = (max(8, round(crop_h * scale)), max(8, round(crop_w * scale)))
    pixels = _colour_jitter(_resized(crop, size), rng)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    alpha = _shape_mask(size, rng).astype(np.uint8) * 255
    rgba = Image.fromarray(np.dstack([pixels, alpha]))
    rgba = rgba.rotate(
        rng.uniform(-settings.max_rotation, settings.max_rotation), Image.BILINEAR, expand=True
    )
    rotated = np.asarray(rgba)
    return np.ascontiguousarray(rotated[:, :, :3]), rotated[:, :, 3] > 127


def _place(
    object_mask: np.ndarray,
    visible: list[np.ndarray],
    size: tuple[int, int],
    settings: SceneSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int, int] | None:
    """A random position of ``object_mask`` respecting ``max_overlap``: ``(full-image mask, top row,
    left column)``, or None when no attempt fits."""
    height, width = size
    h, w = object_mask.shape
    if h > height or w > width:
        return None
    occupied = np.any(visible, axis=0) if visible else np.zeros(size, bool)
    area = int(object_mask.sum())
    for _ in range(_PLACEMENT_ATTEMPTS):
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        placed = np.zeros(size, bool)
        placed[y : y + h, x : x + w] = object_mask
        if (placed & occupied).sum() > settings.max_overlap * area:
            continue
        if all((placed & other).sum() <= settings.max_overlap * other.sum() for other in visible):
            return placed, y, x
    return None


def make_scene(
    index: int,
    seed: int,
    size: tuple[int, int] = (192, 256),
    classes: Sequence[str] = DEFAULT_CLASSES,
    settings: SceneSettings | None = None,
) -> tuple[np.ndarray, Regions]:
    """Scene ``index`` of the dataset ``seed``: ``(image (H, W, 3) uint8 RGB, Regions)``.

    The regions hold the visible ``(N, H, W) bool`` instance masks, their class names in ``labels``
    and ids ``"obj0"``, ``"obj1"``, ... (N may be smaller than the objects attempted when one
    could not be placed).
    """
    settings = SceneSettings() if settings is None else settings
    unknown = [label for label in classes if label not in CONTENT_SOURCES]
    if unknown or not classes:
        raise ValueError(
            f"classes: expected a non-empty subset of {sorted(CONTENT_SOURCES)}, got {list(classes)}"
        )
    height, width = size
    rng = np.random.default_rng([seed, index])
    scene = _background((height, width), rng)
    visible: list[np.ndarray] = []
    labels: list[str] = []
    for _ in range(int(rng.integers(settings.min_objects, settings.max_objects + 1))):
        label = classes[int(rng.integers(len(classes)))]
        long_side = round(rng.uniform(settings.min_size, settings.max_size) * min(height, width))
        pixels, object_mask = _object(label, long_side, settings, rng)
        placement = _place(object_mask, visible, (height, width), settings, rng)
        if placement is None:
            continue
        placed, top, left = placement
        patch = scene[top : top + object_mask.shape[0], left : left + object_mask.shape[1]]
        patch[object_mask] = pixels[object_mask]
        visible = [other & ~placed for other in visible]
        visible.append(placed)
        labels.append(label)
    keep = [i for i, mask in enumerate(visible) if mask.sum() >= settings.min_visible_pixels]
    masks = np.stack([visible[i] for i in keep]) if keep else np.zeros((0, height, width), bool)
    regions = Regions.from_masks(
        masks, labels=[labels[i] for i in keep], ids=[f"obj{i}" for i in range(len(keep))]
    )
    return scene, regions


def make_scene_dataset(
    n_images: int,
    seed: int,
    size: tuple[int, int] = (192, 256),
    classes: Sequence[str] = DEFAULT_CLASSES,
    settings: SceneSettings | None = None,
) -> tuple[list[np.ndarray], list[Regions]]:
    """``n_images`` scenes (see :func:`make_scene`): images ``(H, W, 3) uint8`` RGB and, per image,
    :class:`Regions` with instance masks and class names (``size = (H, W)`` in pixels)."""
    if n_images < 0:
        raise ValueError(f"n_images: expected >= 0, got {n_images}")
    scenes = [make_scene(i, seed, size, classes, settings) for i in range(n_images)]
    return [image for image, _ in scenes], [regions for _, regions in scenes]


# -- COCO export ----------------------------------------------------------------------------------


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixel coordinates, through pixel centres)
    of the outer outlines of an ``(H, W) bool`` mask; holes are not represented."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = [(contour.reshape(-1, 2) + 0.5).ravel().tolist() for contour in contours]
    return [polygon for polygon in polygons if len(polygon) >= 6]


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE ``{"size": [H, W], "counts": str}`` of an ``(H, W) bool`` mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE ``{"size": [H, W], "counts": [int, ...]}``: run lengths of the mask in
    column-major order, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


_ENCODERS = {"polygon": mask_to_polygons, "rle": mask_to_rle, "uncompressed_rle": mask_to_uncompressed_rle}


def export_coco(
    images: Sequence[np.ndarray],
    annotations: Sequence[Regions],
    out_dir: str | Path,
    segmentation: str = "polygon",
) -> tuple[Path, Path]:
    """Write ``images`` as PNG files and their ``annotations`` as a COCO instances file.

    Args:
        images: ``(H, W, 3) uint8`` RGB arrays.
        annotations: per image, :class:`Regions` whose ``labels`` are class names.
        out_dir: created if needed; receives ``images/000000.png ...`` and ``annotations.json``.
        segmentation: one of :data:`SEGMENTATION_FORMATS` (``"mixed"`` cycles polygon, RLE,
            uncompressed RLE over the annotations). Every annotation has ``iscrowd = 0``.

    Returns:
        ``(annotations.json path, images directory)``.
    """
    if segmentation not in SEGMENTATION_FORMATS:
        raise ValueError(f"segmentation: expected one of {SEGMENTATION_FORMATS}, got {segmentation!r}")
    if len(images) != len(annotations):
        raise ValueError(
            f"annotations: expected one Regions per image ({len(images)}), got {len(annotations)}"
        )
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({str(label) for regions in annotations for label in regions.labels if label is not None})
    category_ids = {name: i + 1 for i, name in enumerate(names)}
    formats = list(_ENCODERS) if segmentation == "mixed" else [segmentation]
    coco_images, coco_annotations = [], []
    for image_id, (image, regions) in enumerate(zip(images, annotations, strict=True), start=1):
        if regions.image_size != tuple(image.shape[:2]):
            raise ValueError(
                f"image {image_id}: regions of size {regions.image_size}, image {image.shape[:2]}"
            )
        file_name = f"{image_id:06d}.png"
        Image.fromarray(image).save(image_dir / file_name)
        coco_images.append(
            {"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
        )
        for mask, label, box in zip(regions.masks, regions.labels, regions.boxes, strict=True):
            if label is None or not mask.any():
                continue
            encode = _ENCODERS[formats[len(coco_annotations) % len(formats)]]
            x0, y0, x1, y1 = (float(v) for v in box)
            coco_annotations.append(
                {
                    "id": len(coco_annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[str(label)],
                    "segmentation": encode(mask),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [{"id": i, "name": name} for name, i in category_ids.items()],
    }
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco))
    return path, image_dir
