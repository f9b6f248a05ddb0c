"""Corrections are data: a submitted annotation plus the prediction served → exemplars to store.

Pure logic, no embedding: :func:`plan_exemplars` says which masks to remember as what; the
pipeline embeds every planned mask in one batch and :func:`to_exemplars` keys the vectors.

Rules (``origin`` is Label Studio's, per annotated region):

* ``"prediction"`` (accepted as served), ``"manual"`` / ``None`` (drawn by the annotator) →
  positive for its label; ``"prediction-changed"`` with only the geometry changed → positive;
* a served region relabelled A → B (same region id, not drawn) → positive for B and a hard
  negative for A on the same mask;
* a served region whose id is absent from the annotation (deleted):

  - if at least ``COVERED_FRACTION`` of its mask lies inside one annotated region, it was a part
    or a poor outline of an annotated object: nothing if the labels agree (a geometry fix), a
    negative for the served label if they differ (relabelled by redrawing); never background;
  - otherwise a negative for its served label (if it had one) and a background example;

* unreviewed predictions are never learnt: only what the submitted annotation holds, plus
  deletions relative to what was served. Regions without a label or with an empty mask are
  skipped (there is nothing to learn from them).

Exemplar keys are unique within an annotation: ``"{id}"`` (positive), ``"{id}#neg"``,
``"{id}#bg"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from samsem_plugin.memory import (
    BACKGROUND,
    KINDS,
    NEGATIVE,
    POSITIVE,
    REGION_SUFFIX_SEPARATOR,
    Exemplar,
)
from samsem_plugin.prompts import AnnotatedRegion, ServedRegion

ORIGIN_ACCEPTED = "prediction"
ORIGIN_EDITED = "prediction-changed"
ORIGIN_MANUAL = "manual"

COVERED_FRACTION = 0.5
"""A deleted served mask at least this much inside one annotated region was not background."""

NEGATIVE_SUFFIX = f"{REGION_SUFFIX_SEPARATOR}neg"
BACKGROUND_SUFFIX = f"{REGION_SUFFIX_SEPARATOR}bg"


@dataclass(frozen=True)
class PlannedExemplar:
    """One mask to embed and remember.

    Attributes:
        region: exemplar key within the annotation (``"{id}"``, ``"{id}#neg"``, ``"{id}#bg"``).
        mask: ``(H, W) bool`` pixel mask.
        label: the class (``None`` for background).
        kind: one of :data:`~samsem_plugin.memory.KINDS`.
    """

    region: str
    mask: np.ndarray = field(repr=False)
    label: str | None
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")


def _mask_of(region: AnnotatedRegion | ServedRegion, what: str) -> np.ndarray:
    mask = np.asarray(region.mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} {region.region_id!r}: expected an (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _unique_by_id(regions: Sequence[AnnotatedRegion | ServedRegion], what: str) -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}
    for region in regions:
        if not isinstance(region.region_id, str) or not region.region_id:
            raise ValueError(f"{what}: expected a non-empty string region_id, got {region.region_id!r}")
        if REGION_SUFFIX_SEPARATOR in region.region_id:
            raise ValueError(
                f"{what} {region.region_id!r}: region ids must not contain {REGION_SUFFIX_SEPARATOR!r}"
            )
        if region.region_id in masks:
            raise ValueError(f"{what}: region id {region.region_id!r} appears twice")
        masks[region.region_id] = _mask_of(region, what)
    return masks


def _covering_label(
    mask: np.ndarray, annotated: Sequence[AnnotatedRegion], masks: dict[str, np.ndarray]
) -> tuple[bool, str | None]:
    """``(True, label)`` of the annotated region holding ≥ ``COVERED_FRACTION`` of ``mask``
    (the one holding most), else ``(False, None)``."""
    area = int(mask.sum())
    best_share, best_label = 0.0, None
    for region in annotated:
        share = int(np.count_nonzero(mask & masks[region.region_id])) / max(area, 1)
        if share > best_share:
            best_share, best_label = share, region.label
    if best_share >= COVERED_FRACTION:
        return True, best_label
    return False, None


def plan_exemplars(
    annotated: Sequence[AnnotatedRegion], served: Sequence[ServedRegion]
) -> list[PlannedExemplar]:
    """Exemplars to learn from one submitted annotation, given the prediction that was served.

    Args:
        annotated: the annotation's regions (rasterised ``(H, W) bool`` masks, one image).
        served: the regions of the prediction the annotator saw (empty if none was served).

    Returns the plan in a deterministic order: annotated regions in the given order (each
    positive followed by its hard negative), then deleted served regions in the given order.
    Raises ``ValueError`` on repeated or malformed region ids, non-2-D masks or masks of
    different sizes.
    """
    annotated_masks = _unique_by_id(annotated, "annotated region")
    served_masks = _unique_by_id(served, "served region")
    shapes = {mask.shape for mask in (*annotated_masks.values(), *served_masks.values())}
    if len(shapes) > 1:
        raise ValueError(f"masks: expected one image size for all regions, got {sorted(shapes)}")
    served_by_id = {region.region_id: region for region in served}
    plan: list[PlannedExemplar] = []
    for region in annotated:
        mask = annotated_masks[region.region_id]
        if not region.label or not mask.any():
            continue
        plan.append(PlannedExemplar(region.region_id, mask, region.label, POSITIVE))
        was_served = served_by_id.get(region.region_id)
        relabelled = (
            was_served is not None
            and region.origin != ORIGIN_MANUAL
            and was_served.label is not None
            and was_served.label != region.label
        )
        if relabelled:
            plan.append(PlannedExemplar(region.region_id + NEGATIVE_SUFFIX, mask, was_served.label, NEGATIVE))
    kept = [region for region in annotated if region.label and annotated_masks[region.region_id].any()]
    for region in served:
        mask = served_masks[region.region_id]
        if region.region_id in annotated_masks or not mask.any():
            continue
        covered, covering_label = _covering_label(mask, kept, annotated_masks)
        wrong_label = region.label is not None and region.label != covering_label
        if wrong_label:
            plan.append(PlannedExemplar(region.region_id + NEGATIVE_SUFFIX, mask, region.label, NEGATIVE))
        if not covered:
            plan.append(PlannedExemplar(region.region_id + BACKGROUND_SUFFIX, mask, None, BACKGROUND))
    return plan


def to_exemplars(
    plan: Sequence[PlannedExemplar], vectors: np.ndarray, task: str, annotation: str
) -> list[Exemplar]:
    """Key the embedded plan: ``vectors`` is ``(len(plan), D) float32``, L2-normalised, row i
    the embedding of ``plan[i].mask``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(plan):
        raise ValueError(f"vectors: expected shape ({len(plan)}, D), got {vectors.shape}")
    return [
        Exemplar(task, annotation, planned.region, planned.label, planned.kind, vector)
        for planned, vector in zip(plan, vectors, strict=True)
    ]
