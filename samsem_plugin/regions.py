"""The one interchange type of samsem: N regions on one image, stored as columns.

Coordinate conventions used throughout the library:

* images are ``(H, W, 3) uint8`` RGB arrays, EXIF orientation already applied;
* masks are ``(N, H, W) bool`` arrays in the image's pixel grid (row = y, column = x);
* boxes are ``(N, 4) float32`` **XYXY in pixels**: ``x0, y0`` the top-left corner of the top-left
  pixel, ``x1, y1`` one past the bottom-right pixel (so a single pixel at (x, y) is
  ``[x, y, x + 1, y + 1]``);
* points are ``(K, 2)`` **XY in pixels** (column, row), continuous coordinates.

Every stage takes and returns :class:`Regions`: the proposer creates it, the embedder fills
``embeddings``, the classifier fills ``labels`` and ``label_score``, the Label Studio format code
turns it into results and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

UNKNOWN: None = None
"""The label of a region the classifier refused to name (reject option)."""


def _as_object_array(values: Sequence[Any] | np.ndarray, n: int, name: str) -> np.ndarray:
    array = np.empty(n, dtype=object)
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} entries, got {len(values)}")
    for i, value in enumerate(values):
        array[i] = value
    return array


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight XYXY pixel boxes of ``(N, H, W) bool`` masks, ``(N, 4) float32``.

    An empty mask gets the box ``[0, 0, 0, 0]``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {masks.shape}")
    n = masks.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = x0, y0, x1, y1
    boxes[~nonempty] = 0
    return boxes


@dataclass(frozen=True)
class Regions:
    """N regions on one image of size ``image_size = (H, W)``.

    Attributes:
        masks: ``(N, H, W) bool`` pixel masks.
        boxes: ``(N, 4) float32`` XYXY boxes in pixels (see module docstring).
        proposal_score: ``(N,) float32`` mask quality in [0, 1] (SAM's predicted IoU; 1.0 for
            annotator-drawn regions).
        embeddings: ``(N, D) float32`` L2-normalised mask embeddings, or ``None`` before embedding.
        labels: ``(N,) object`` label strings, ``None`` for unknown / not yet classified.
        label_score: ``(N,) float32`` calibrated probability of ``labels`` (0 where unknown).
        ids: ``(N,) object`` region id strings, unique within the image.
        image_size: ``(H, W)`` in pixels.
    """

    masks: np.ndarray
    boxes: np.ndarray
    proposal_score: np.ndarray
    labels: np.ndarray
    label_score: np.ndarray
    ids: np.ndarray
    image_size: tuple[int, int]
    embeddings: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h, w = (int(v) for v in self.image_size)
        object.__setattr__(self, "image_size", (h, w))
        masks = np.asarray(self.masks)
        if masks.dtype != bool:
            raise ValueError(f"masks: expected dtype bool, got {masks.dtype}")
        if masks.ndim != 3 or masks.shape[1:] != (h, w):
            raise ValueError(f"masks: expected shape (N, {h}, {w}), got {masks.shape}")
        n = masks.shape[0]
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes: expected shape ({n}, 4), got {boxes.shape}")
        proposal_score = np.asarray(self.proposal_score, dtype=np.float32)
        if proposal_score.shape != (n,):
            raise ValueError(f"proposal_score: expected shape ({n},), got {proposal_score.shape}")
        label_score = np.asarray(self.label_score, dtype=np.float32)
        if label_score.shape != (n,):
            raise ValueError(f"label_score: expected shape ({n},), got {label_score.shape}")
        labels = _as_object_array(self.labels, n, "labels")
        ids = _as_object_array(self.ids, n, "ids")
        if len(set(ids.tolist())) != n:
            raise ValueError("ids: region ids must be unique within one image")
        embeddings = self.embeddings
        if embeddings is not None:
            embeddings = np.asarray(embeddings, dtype=np.float32)
            if embeddings.ndim != 2 or embeddings.shape[0] != n:
                raise ValueError(f"embeddings: expected shape ({n}, D), got {embeddings.shape}")
        extra = {}
        for key, value in self.extra.items():
            value = np.asarray(value)
            if value.shape[:1] != (n,):
                raise ValueError(f"extra[{key!r}]: expected first dimension {n}, got {value.shape}")
            extra[key] = value
        for name, value in (
            ("masks", masks),
            ("boxes", boxes),
            ("proposal_score", proposal_score),
            ("label_score", label_score),
            ("labels", labels),
            ("ids", ids),
            ("embeddings", embeddings),
            ("extra", extra),
        ):
            object.__setattr__(self, name, value)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def empty(cls, image_size: tuple[int, int], embedding_dim: int | None = None) -> Regions:
        """No regions on an image of ``image_size = (H, W)``."""
        h, w = image_size
        return cls(
            masks=np.zeros((0, h, w), dtype=bool),
            boxes=np.zeros((0, 4), dtype=np.float32),
            proposal_score=np.zeros(0, dtype=np.float32),
            labels=[],
            label_score=np.zeros(0, dtype=np.float32),
            ids=[],
            image_size=(h, w),
            embeddings=None if embedding_dim is None else np.zeros((0, embedding_dim), np.float32),
        )

    @classmethod
    def from_masks(
        cls,
        masks: np.ndarray,
        proposal_score: np.ndarray | Sequence[float] | None = None,
        ids: Sequence[str] | None = None,
        labels: Sequence[str | None] | None = None,
        label_score: np.ndarray | Sequence[float] | None = None,
        id_prefix: str = "r",
    ) -> Regions:
        """Regions from ``(N, H, W) bool`` masks; boxes are computed, missing fields defaulted.

        Defaults: ``proposal_score`` 1.0, ``labels`` None, ``label_score`` 0.0, ids
        ``f"{id_prefix}{i}"``.
        """
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks: expected shape (N, H, W), got {masks.shape}")
        n = masks.shape[0]
        return cls(
            masks=masks.astype(bool, copy=False),
            boxes=boxes_from_masks(masks),
            proposal_score=np.ones(n, np.float32) if proposal_score is None else proposal_score,
            labels=[None] * n if labels is None else labels,
            label_score=np.zeros(n, np.float32) if label_score is None else label_score,
            ids=[f"{id_prefix}{i}" for i in range(n)] if ids is None else ids,
            image_size=masks.shape[1:],
        )

    # -- access ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def areas(self) -> np.ndarray:
        """``(N,) int64`` mask areas in pixels."""
        return self.masks.sum(axis=(1, 2), dtype=np.int64)

    def __getitem__(self, index: Any) -> Regions:
        """Numpy-style selection (int, slice, bool mask, index array) returning ``Regions``."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        if isinstance(index, np.ndarray) and index.dtype == bool and index.shape != (len(self),):
            raise ValueError(f"boolean index: expected shape ({len(self)},), got {index.shape}")
        return Regions(
            masks=self.masks[index],
            boxes=self.boxes[index],
            proposal_score=self.proposal_score[index],
            labels=self.labels[index],
            label_score=self.label_score[index],
            ids=self.ids[index],
            image_size=self.image_size,
            embeddings=None if self.embeddings is None else self.embeddings[index],
            extra={k: v[index] for k, v in self.extra.items()},
        )

    def with_(self, **changes: Any) -> Regions:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    @staticmethod
    def concatenate(parts: Sequence[Regions]) -> Regions:
        """All regions of ``parts`` (same image size) in order; ids must stay unique."""
        if not parts:
            raise ValueError("concatenate: need at least one Regions")
        sizes = {p.image_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"concatenate: image sizes differ: {sorted(sizes)}")
        with_embeddings = [p.embeddings is not None for p in parts if len(p)]
        embeddings = None
        if with_embeddings and all(with_embeddings):
            embeddings = np.concatenate([p.embeddings for p in parts if len(p)], axis=0)
        extra_keys = set.intersection(*(set(p.extra) for p in parts))
        return Regions(
            masks=np.concatenate([p.masks for p in parts], axis=0),
            boxes=np.concatenate([p.boxes for p in parts], axis=0),
            proposal_score=np.concatenate([p.proposal_score for p in parts]),
            labels=[label for p in parts for label in p.labels],
            label_score=np.concatenate([p.label_score for p in parts]),
            ids=[i for p in parts for i in p.ids],
            image_size=parts[0].image_size,
            embeddings=embeddings,
            extra={k: np.concatenate([p.extra[k] for p in parts]) for k in extra_keys},
        )


def mask_ious(masks: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(N, M) float64`` IoU of every mask of ``masks`` ``(N, H, W) bool`` with every mask of
    ``other`` ``(M, H, W) bool`` (two empty masks have IoU 1)."""
    a = masks.reshape(len(masks), -1).astype(np.float64)
    b = other.reshape(len(other), -1).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
