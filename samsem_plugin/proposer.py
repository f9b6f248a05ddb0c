"""SAM mask proposals: a bytes-bounded image-embedding cache, prompt masks and automatic masks.

Coordinates: images are ``(H, W, 3) uint8`` RGB; prompt points are XY pixels, boxes XYXY pixels
(see :class:`~samsem_plugin.prompts.Prompt`); returned masks are ``(N, H, W) bool`` in the image
grid and boxes XYXY pixels with exclusive ``x1, y1`` (:class:`~samsem_plugin.regions.Regions`).

The image encoder runs once per image content: embeddings are cached by
:func:`~samsem_plugin.cache.image_key` in a :class:`~samsem_plugin.cache.ByteLRUCache`, so every
click on the same image, and the automatic masks of it, reuse one encoder pass.

:meth:`SamProposer.generate` returns the same masks as segment-anything's
``SamAutomaticMaskGenerator(sam, ..., output_mode="binary_mask").generate(image)`` with the same
settings (single crop layer), and does less work for them: masks are filtered by predicted IoU
before they are upsampled, never go through COCO RLE, and wait for non-maximum suppression
bit-packed (8 pixels per byte).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
    remove_small_regions,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F
from torchvision.ops.boxes import batched_nms

from samsem_plugin.cache import ByteLRUCache, image_key
from samsem_plugin.embedder import validate_image
from samsem_plugin.prompts import Prompt
from samsem_plugin.regions import Regions
from samsem_plugin.sam_decoder import DecoderImage, decode_prompts
from samsem_plugin.sam_models import use_fused_attention

__all__ = ["AutoMaskSettings", "ImageEmbedding", "SamProposer"]

UPSAMPLE_BYTES = 64 << 20
"""Float logits upsampled at once (at least one mask): SAM upsamples to 1024² first (4 MiB a mask),
then to the image size (48 MiB a mask for a 12 MP photo), whatever ``points_per_batch`` is."""
UPSAMPLE_MAX_MASKS = 16

GRID_DECODER_BATCH = {"cpu": 1, "cuda": 256}
"""Grid prompts per decoder pass by device type: on CPU one prompt at a time keeps its image-token
tensors (4096 x 256 floats) in the caches (ViT-B, factored decoder: 27 ms a prompt vs 35 ms in
batches of 4 or 16, 2 threads); a GPU wants large batches. Other devices use ``points_per_batch``.
Results do not depend on it."""

SMALL_REGION_NMS_THRESH = 0.7
"""SAM's ``crop_nms_thresh`` default: with ``min_mask_region_area > 0`` the stock generator runs a
second NMS at ``max(box_nms_thresh, 0.7)`` after removing small holes and islands."""


@dataclass(frozen=True)
class AutoMaskSettings:
    """Settings of the automatic mask generator (SAM's defaults; one crop layer only).

    Attributes:
        points_per_side: the point grid has ``points_per_side ** 2`` points over the image.
        points_per_batch: grid points handled per step (SAM's setting; results do not depend on
            it). The decoder itself runs :data:`GRID_DECODER_BATCH` prompts at a time on CPU / CUDA.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables).
        stability_score_thresh: keep masks whose stability score is at least this (0 disables).
        stability_score_offset: logit offset of the stability score (SAM: 1.0).
        box_nms_thresh: box IoU above which the lower-scored of two masks is dropped.
        min_mask_region_area: if > 0, fill holes and remove islands smaller than this many
            pixels (OpenCV), then run NMS again, as SAM does.

    SAM's crop layers (``crop_n_layers > 0``) are not supported: the whole image is one crop. The
    field names are ``SamAutomaticMaskGenerator``'s arguments (``dataclasses.asdict`` gives them).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch", "min_mask_region_area"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
        checks = (
            ("points_per_side", self.points_per_side >= 1, "an integer >= 1"),
            ("points_per_batch", self.points_per_batch >= 1, "an integer >= 1"),
            ("pred_iou_thresh", 0.0 <= self.pred_iou_thresh <= 1.0, "a number in [0, 1]"),
            ("stability_score_thresh", 0.0 <= self.stability_score_thresh <= 1.0, "a number in [0, 1]"),
            ("stability_score_offset", self.stability_score_offset > 0.0, "a number > 0"),
            ("box_nms_thresh", 0.0 < self.box_nms_thresh <= 1.0, "a number in (0, 1]"),
            ("min_mask_region_area", self.min_mask_region_area >= 0, "an integer >= 0"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ImageEmbedding:
    """SAM's image-encoder output for one image (what the cache holds).

    Attributes:
        features: ``(1, C, h, w) float32`` on the model's device (C=256, h=w=64 for ViT-B/L/H).
        input_size: ``(H', W')`` of the image resized so its long side is the encoder's input size
            (before padding to a square).
        original_size: ``(H, W)`` of the image in pixels.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.features.element_size() * self.features.nelement())


def _check_prompt(prompt: Prompt, image_size: tuple[int, int]) -> None:
    """Prompt coordinates must lie in the image: ``0 <= x <= W``, ``0 <= y <= H`` (pixels)."""
    if not isinstance(prompt, Prompt):
        raise ValueError(f"prompt: expected a Prompt, got {type(prompt).__name__}")
    h, w = image_size
    corners = prompt.points if prompt.box is None else np.vstack([prompt.points, prompt.box.reshape(2, 2)])
    outside = (corners[:, 0] < 0) | (corners[:, 0] > w) | (corners[:, 1] < 0) | (corners[:, 1] > h)
    if outside.any():
        raise ValueError(
            f"prompt: expected XY pixel coordinates within the {w}x{h} image (0..{w}, 0..{h}), "
            f"got {corners[outside].tolist()} (percent coordinates given as pixels?)"
        )


class SamProposer:
    """SAM masks for prompts and for a point grid, with one cached encoder pass per image.

    Args:
        sam: a segment-anything ``Sam`` (see :func:`samsem_plugin.sam_models.build_sam`); its
            device is used for everything.
        cache_bytes: bound of the embedding cache in bytes (one ViT-B/L/H embedding is 4 MiB);
            0 disables caching.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the encoder and decoder under
            ``torch.autocast`` (outputs are cast back to float32); ``None`` = float32.
        fused_attention: switch ``sam``'s image encoder to fused attention kernels **in place**
            (:func:`~samsem_plugin.sam_models.use_fused_attention`: same function up to float
            rounding, ~1.8x faster encoder passes on CPU).

    Thread-safety: one lock guards every model call and the cache look-up-or-compute, so concurrent
    requests never mix images and the same image is never encoded twice at once. ``generate``
    takes the lock per decoder batch, so interactive prompts can run between its batches.

    Attributes:
        encoder_calls: image-encoder passes so far (metrics, tests).
        cache: the embedding cache (``hits``/``misses``/``evictions``/``nbytes`` for metrics).
    """

    def __init__(
        self,
        sam: Sam,
        cache_bytes: int = 1 << 30,
        autocast_dtype: torch.dtype | None = None,
        fused_attention: bool = True,
    ):
        if not isinstance(sam, Sam):
            raise ValueError(f"sam: expected a segment_anything Sam model, got {type(sam).__name__}")
        if fused_attention:
            use_fused_attention(sam)
        self.sam = sam.eval()
        self.device = sam.device
        self.autocast_dtype = autocast_dtype
        self.cache: ByteLRUCache[ImageEmbedding] = ByteLRUCache(cache_bytes)
        self.encoder_calls = 0
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self._lock = threading.RLock()
        self._decoder_image: tuple[str, DecoderImage] | None = None  # the last image's, see below

    # -- embeddings ---------------------------------------------------------------------------

    def embed_image(self, image: np.ndarray, *, key: str | None = None) -> str:
        """Compute (or find in the cache) the SAM embedding of ``image``; returns its cache key.

        Args:
            image: ``(H, W, 3) uint8`` RGB.
            key: ``image_key(image)`` when the caller has it (saves hashing the image again).

        Raises:
            ValueError: wrong type, shape or dtype.
        """
        return self._embedding(image, key)[0]

    def _embedding(self, image: np.ndarray, key: str | None = None) -> tuple[str, ImageEmbedding]:
        """The image's cache key (``key`` if given: ``image_key(image)`` computed by the caller)
        and its cached or freshly computed embedding."""
        validate_image(image)
        key = image_key(image) if key is None else key
        with self._lock:
            embedding = self.cache.get(key)
            if embedding is None:
                embedding = self._encode(image)
                self.cache.put(key, embedding)
        return key, embedding

    def _model_context(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _encode(self, image: np.ndarray) -> ImageEmbedding:
        """One image-encoder pass, preprocessing exactly as ``SamPredictor.set_image``."""
        resized = self.transform.apply_image(image)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode(), self._model_context():
            features = self.sam.image_encoder(self.sam.preprocess(pixels))
        self.encoder_calls += 1
        return ImageEmbedding(
            features=features.float(),
            input_size=(int(resized.shape[0]), int(resized.shape[1])),
            original_size=(int(image.shape[0]), int(image.shape[1])),
        )

    # -- decoder ------------------------------------------------------------------------------

    def _decoder_image_of(self, key: str, embedding: ImageEmbedding) -> DecoderImage:
        """The prompt-independent decoder tensors of the image ``key`` (kept for the last image
        only: ~36 MiB for ViT-B/L/H; interactive clicks come in runs on one image). Call with the
        lock held, under ``inference_mode`` and the model context; under autocast the decoder is
        not factored (its expanded variances need float32)."""
        if self._decoder_image is None or self._decoder_image[0] != key:
            factored = self.autocast_dtype is None
            self._decoder_image = (key, DecoderImage.of(self.sam, embedding.features, factored=factored))
        return self._decoder_image[1]

    def _decode(
        self,
        key: str,
        embedding: ImageEmbedding,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        box: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder on one embedding; prompts already in the encoder's input frame.

        Args:
            key: the image's cache key.
            points: ``(B, K, 2)`` XY in the resized-image frame, or None; labels ``(B, K)`` int.
            box: ``(B, 4)`` XYXY in the resized-image frame, or None.

        Returns:
            low-res logits ``(B, M, 4h, 4w) float32`` and predicted IoU ``(B, M) float32`` with
            M = 3 (multimask) or 1.
        """
        with self._lock, torch.inference_mode(), self._model_context():
            sparse, _ = self.sam.prompt_encoder(
                points=None if points is None else (points, labels), boxes=box, masks=None
            )
            decoder_image = self._decoder_image_of(key, embedding)
            low_res, iou, _ = decode_prompts(
                self.sam.mask_decoder, decoder_image, sparse, multimask=multimask
            )
        return low_res.float(), iou.float()

    def _upsample(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """``(N, h, w)`` low-res logits → ``(N, H, W)`` logits at the original image size.

        ``Sam.postprocess_masks``: bilinear to the encoder's square input, crop the unpadded part,
        bilinear to the original size. The last step is skipped when the crop already has the
        original size (images whose long side is the encoder's 1024): a same-size bilinear
        resample with ``align_corners=False`` is the identity, so the values are the same."""
        side = self.sam.image_encoder.img_size
        with torch.inference_mode():
            logits = F.interpolate(low_res[:, None], (side, side), mode="bilinear", align_corners=False)
            logits = logits[..., : embedding.input_size[0], : embedding.input_size[1]]
            if tuple(logits.shape[-2:]) != tuple(embedding.original_size):
                logits = F.interpolate(logits, embedding.original_size, mode="bilinear", align_corners=False)
            return logits[:, 0]

    # -- prompts ------------------------------------------------------------------------------

    def predict_prompt(
        self, image: np.ndarray, prompt: Prompt, multimask: bool = True, *, key: str | None = None
    ) -> Regions:
        """SAM's masks for one prompt (points and/or box), reusing the cached image embedding.

        Args:
            image: ``(H, W, 3) uint8`` RGB.
            prompt: XY pixel points with labels 1/0 and/or an XYXY pixel box, all combined into one
                prompt; coordinates must lie within the image.
            multimask: True → SAM's three granularity levels (small part → whole / group); False →
                SAM's single-output mask.
            key: ``image_key(image)`` when the caller has it (saves hashing the image again).

        Returns:
            :class:`Regions` with 3 masks (ids ``"level0"``–``"level2"``, ``extra["level"]`` =
            ``[0, 1, 2]``) or 1 mask (id ``"single"``, level ``-1``); ``proposal_score`` is SAM's
            predicted IoU clipped to [0, 1] (raw value in ``extra["predicted_iou"]``), and
            ``extra["low_res_logits"]`` holds SAM's ``(M, 256, 256) float32`` logits (input for a
            follow-up mask prompt).

        Raises:
            ValueError: bad image, not a Prompt, or coordinates outside the image.
        """
        key, embedding = self._embedding(image, key)
        _check_prompt(prompt, embedding.original_size)
        points = labels = box = None
        if len(prompt.points):
            coords = self.transform.apply_coords(prompt.points, embedding.original_size)
            points = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
            labels = torch.as_tensor(prompt.point_labels, dtype=torch.int32, device=self.device)[None]
        if prompt.box is not None:
            corners = self.transform.apply_boxes(prompt.box[None], embedding.original_size)
            box = torch.as_tensor(corners, dtype=torch.float32, device=self.device)
        low_res, iou = self._decode(key, embedding, points, labels, box, multimask)
        logits = self._upsample(low_res[0], embedding)
        masks = (logits > self.sam.mask_threshold).cpu().numpy()
        predicted_iou = iou[0].cpu().numpy()
        count = len(predicted_iou)
        regions = Regions.from_masks(
            masks,
            proposal_score=np.clip(predicted_iou, 0.0, 1.0),
            ids=[f"level{i}" for i in range(count)] if multimask else ["single"],
        )
        return regions.with_(
            extra={
                "level": np.arange(count) if multimask else np.array([-1]),
                "predicted_iou": predicted_iou,
                "low_res_logits": low_res[0].cpu().numpy(),
            }
        )

    # -- automatic masks ----------------------------------------------------------------------

    def generate(
        self, image: np.ndarray, settings: AutoMaskSettings = AutoMaskSettings(), *, key: str | None = None
    ) -> Regions:
        """Automatic masks from a point grid, as ``SamAutomaticMaskGenerator`` computes them.

        Per grid point SAM's three masks are kept when predicted IoU > ``pred_iou_thresh`` and
        stability >= ``stability_score_thresh``; duplicates are removed by box NMS (scores:
        predicted IoU); optionally small holes/islands are removed (``min_mask_region_area``).
        Reuses the cached image embedding (``key``: ``image_key(image)`` when the caller has it).

        Returns:
            :class:`Regions` in NMS order (best first), ids ``"auto0"``, ``"auto1"``, …;
            ``proposal_score`` = predicted IoU clipped to [0, 1]; ``extra["predicted_iou"]`` (raw),
            ``extra["stability_score"]``, ``extra["point_coords"]`` ``(N, 2) float`` XY pixels of
            the grid point that made each mask.

        Raises:
            ValueError: bad image or settings not an :class:`AutoMaskSettings`.
        """
        if not isinstance(settings, AutoMaskSettings):
            raise ValueError(f"settings: expected AutoMaskSettings, got {type(settings).__name__}")
        key, embedding = self._embedding(image, key)
        h, w = embedding.original_size
        grid = build_point_grid(settings.points_per_side) * np.array([[w, h]], dtype=np.float64)
        with self._lock, torch.inference_mode(), self._model_context():
            decoder_image = self._decoder_image_of(key, embedding)
        batches = [
            self._grid_batch(embedding, decoder_image, points, settings) for points in _chunks(grid, settings)
        ]
        candidates = _Candidates.concatenate(batches, (h, w))
        if len(candidates.scores):
            keep = batched_nms(
                candidates.boxes.float(),
                candidates.scores,
                torch.zeros(len(candidates.scores), dtype=torch.int64),
                iou_threshold=settings.box_nms_thresh,
            ).numpy()
            candidates = candidates.select(keep)
        masks = candidates.unpack()
        if settings.min_mask_region_area > 0 and len(masks):
            masks, keep = _remove_small_regions(masks, settings)
            candidates = candidates.select(keep)
        return _auto_regions(masks, candidates)

    def _grid_batch(
        self,
        embedding: ImageEmbedding,
        decoder_image: DecoderImage,
        points: np.ndarray,
        settings: AutoMaskSettings,
    ) -> _Candidates:
        """Decoder passes for a batch of grid points ``(B, 2)`` XY pixels (float64), SAM's
        predicted-IoU filter, then :meth:`_stable_masks` on the survivors, a few at a time."""
        coords = self.transform.apply_coords(points, embedding.original_size)
        in_points = torch.as_tensor(coords, device=self.device)[:, None, :]  # float64, as SAM
        in_labels = torch.ones(in_points.shape[0], 1, dtype=torch.int, device=self.device)
        step = GRID_DECODER_BATCH.get(self.device.type, settings.points_per_batch)
        low_res_parts, iou_parts, decoded_parts = [], [], []
        for start in range(0, len(points), step):
            with self._lock, torch.inference_mode(), self._model_context():
                sparse, _ = self.sam.prompt_encoder(
                    points=(in_points[start : start + step], in_labels[start : start + step]),
                    boxes=None,
                    masks=None,
                )
                low_res, iou, decoded = decode_prompts(
                    self.sam.mask_decoder, decoder_image, sparse, pred_iou_thresh=settings.pred_iou_thresh
                )
            low_res_parts.append(low_res.float())
            iou_parts.append(iou.float())
            decoded_parts.append(decoded + start)
        low_res, iou = torch.cat(low_res_parts), torch.cat(iou_parts)
        decoded = torch.cat(decoded_parts)
        per_point = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        point_coords = np.repeat(points[decoded.cpu().numpy()], per_point, axis=0)
        if settings.pred_iou_thresh > 0.0:
            keep = iou > settings.pred_iou_thresh
            low_res, iou, point_coords = low_res[keep], iou[keep], point_coords[keep.cpu().numpy()]
        height, width = embedding.original_size
        chunk = max(1, min(UPSAMPLE_MAX_MASKS, UPSAMPLE_BYTES // (4 * max(height * width, 1 << 20))))
        parts = [
            self._stable_masks(
                embedding,
                low_res[start : start + chunk],
                iou[start : start + chunk],
                point_coords[start : start + chunk],
                settings,
            )
            for start in range(0, len(iou), chunk)
        ]
        return _Candidates.concatenate(parts, embedding.original_size)

    def _stable_masks(
        self,
        embedding: ImageEmbedding,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        point_coords: np.ndarray,
        settings: AutoMaskSettings,
    ) -> _Candidates:
        """Upsample ``(n, h, w)`` low-res logits to the image, keep the stable ones, binarise, box
        and bit-pack them (SAM's stability filter on full-resolution logits, as the stock
        generator)."""
        logits = self._upsample(low_res, embedding)
        stability = calculate_stability_score(
            logits, self.sam.mask_threshold, settings.stability_score_offset
        )
        keep = torch.ones_like(stability, dtype=torch.bool)
        if settings.stability_score_thresh > 0.0:
            keep = stability >= settings.stability_score_thresh
        masks = logits[keep] > self.sam.mask_threshold
        return _Candidates(
            packed=np.packbits(masks.cpu().numpy(), axis=-1),
            boxes=batched_mask_to_box(masks).cpu(),
            scores=iou[keep].cpu(),
            stability=stability[keep].cpu(),
            points=point_coords[keep.cpu().numpy()],
            image_size=embedding.original_size,
        )


def _chunks(grid: np.ndarray, settings: AutoMaskSettings) -> Iterator[np.ndarray]:
    for start in range(0, len(grid), settings.points_per_batch):
        yield grid[start : start + settings.points_per_batch]


@dataclass(frozen=True)
class _Candidates:
    """Automatic-mask candidates: bit-packed masks plus SAM's per-mask data.

    Attributes:
        packed: ``(N, H, ceil(W / 8)) uint8`` masks packed along x (``np.packbits``).
        boxes: ``(N, 4)`` SAM boxes XYXY with **inclusive** x1, y1 (SAM's convention, for NMS).
        scores: ``(N,) float32`` predicted IoU (raw).
        stability: ``(N,) float32`` stability scores.
        points: ``(N, 2) float64`` XY pixels of the grid point behind each mask.
        image_size: ``(H, W)``.
    """

    packed: np.ndarray
    boxes: torch.Tensor
    scores: torch.Tensor
    stability: torch.Tensor
    points: np.ndarray
    image_size: tuple[int, int]

    @staticmethod
    def concatenate(parts: list[_Candidates], image_size: tuple[int, int]) -> _Candidates:
        h, w = image_size
        if not parts:
            return _Candidates(
                np.zeros((0, h, (w + 7) // 8), np.uint8),
                torch.zeros(0, 4),
                torch.zeros(0),
                torch.zeros(0),
                np.zeros((0, 2)),
                image_size,
            )
        return _Candidates(
            packed=np.concatenate([p.packed for p in parts]),
            boxes=torch.cat([p.boxes for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            stability=torch.cat([p.stability for p in parts]),
            points=np.concatenate([p.points for p in parts]),
            image_size=image_size,
        )

    def select(self, index: np.ndarray) -> _Candidates:
        index = np.asarray(index, dtype=np.int64)
        return _Candidates(
            packed=self.packed[index],
            boxes=self.boxes[index],
            scores=self.scores[index],
            stability=self.stability[index],
            points=self.points[index],
            image_size=self.image_size,
        )

    def unpack(self) -> np.ndarray:
        """``(N, H, W) bool`` masks."""
        width = self.image_size[1]
        return np.unpackbits(self.packed, axis=-1, count=width).astype(bool)


def _remove_small_regions(masks: np.ndarray, settings: AutoMaskSettings) -> tuple[np.ndarray, np.ndarray]:
    """SAM's small-region post-processing: fill holes and drop islands under
    ``min_mask_region_area`` pixels, then NMS preferring unchanged masks.

    Returns:
        the kept masks ``(K, H, W) bool`` and their indices into ``masks`` (NMS order).
    """
    cleaned, unchanged = [], []
    for mask in masks:
        mask_out, holes_changed = remove_small_regions(mask, settings.min_mask_region_area, mode="holes")
        mask_out, islands_changed = remove_small_regions(
            mask_out, settings.min_mask_region_area, mode="islands"
        )
        cleaned.append(mask_out)
        unchanged.append(float(not (holes_changed or islands_changed)))
    cleaned_masks = np.stack(cleaned)
    boxes = batched_mask_to_box(torch.from_numpy(cleaned_masks))
    keep = batched_nms(
        boxes.float(),
        torch.tensor(unchanged),
        torch.zeros(len(boxes), dtype=torch.int64),
        iou_threshold=max(settings.box_nms_thresh, SMALL_REGION_NMS_THRESH),
    ).numpy()
    return cleaned_masks[keep], keep


def _auto_regions(masks: np.ndarray, candidates: _Candidates) -> Regions:
    predicted_iou = candidates.scores.numpy().astype(np.float32)
    regions = Regions.from_masks(
        masks.reshape(len(masks), *candidates.image_size),
        proposal_score=np.clip(predicted_iou, 0.0, 1.0),
        id_prefix="auto",
    )
    return regions.with_(
        extra={
            "predicted_iou": predicted_iou,
            "stability_score": candidates.stability.numpy().astype(np.float32),
            "point_coords": candidates.points.astype(np.float64).reshape(-1, 2),
        }
    )
