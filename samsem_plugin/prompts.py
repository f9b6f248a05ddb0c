"""Shared small records: a SAM prompt and annotated / served regions of one image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """An interactive prompt on one image, in **pixels**.

    Attributes:
        points: ``(K, 2) float32`` XY pixel coordinates (column, row); K may be 0.
        point_labels: ``(K,) int32``; 1 = positive (foreground), 0 = negative (background).
        box: ``(4,) float32`` XYXY pixel box, or ``None``.
        label: the label the annotator chose on the smart tool (fallback when the memory is
            unsure), or ``None``.
        control: ``from_name`` of the smart control that sent the prompt, or ``None``.
    """

    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None = None
    label: str | None = None
    control: str | None = None

    def __post_init__(self) -> None:
        points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(self.point_labels, dtype=np.int32).reshape(-1)
        if labels.shape[0] != points.shape[0]:
            raise ValueError(f"point_labels: expected {points.shape[0]} entries, got {labels.shape[0]}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"point_labels: expected only 0 or 1, got {np.unique(labels).tolist()}")
        box = self.box
        if box is not None:
            box = np.asarray(box, dtype=np.float32).reshape(-1)
            if box.shape != (4,):
                raise ValueError(f"box: expected 4 numbers XYXY, got shape {box.shape}")
            if not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"box: expected x1 > x0 and y1 > y0, got {box.tolist()}")
        if points.shape[0] == 0 and box is None:
            raise ValueError("prompt: need at least one point or a box")
        if not np.isfinite(points).all() or (box is not None and not np.isfinite(box).all()):
            raise ValueError("prompt: coordinates must be finite numbers")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "point_labels", labels)
        object.__setattr__(self, "box", box)


@dataclass(frozen=True)
class AnnotatedRegion:
    """One region of a submitted annotation, rasterised to the image grid.

    Attributes:
        region_id: Label Studio region id (string).
        label: the label the annotator gave it.
        mask: ``(H, W) bool`` pixel mask.
        origin: Label Studio's ``origin``: ``"prediction"`` (accepted as served),
            ``"prediction-changed"`` (edited), ``"manual"`` (drawn), or ``None`` (not given, e.g.
            created through the API: treated as manual).
        control: ``from_name`` of the control it came from.
    """

    region_id: str
    label: str
    mask: np.ndarray
    origin: str | None = None
    control: str | None = None


@dataclass(frozen=True)
class ServedRegion:
    """One region of the prediction the annotator saw (what we served).

    Attributes:
        region_id: region id as served.
        label: the label we served, or ``None`` if served unlabelled.
        mask: ``(H, W) bool`` pixel mask.
        control: ``from_name`` of the control.
    """

    region_id: str
    label: str | None
    mask: np.ndarray
    control: str | None = None
