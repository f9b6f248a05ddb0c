"""Glue between the stages: SAM proposes, the embedder embeds, the memory's classifier names.

:class:`Pipeline` takes image arrays and returns :class:`~samsem_plugin.regions.Regions`; it knows
nothing of HTTP, Label Studio JSON or the environment. Conventions (see ``regions.py``): images
``(H, W, 3) uint8`` RGB with EXIF orientation applied, masks ``(N, H, W) bool``, boxes XYXY pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from samsem_plugin.cache import ByteLRUCache, image_key, nbytes_of
from samsem_plugin.corrections import plan_exemplars, to_exemplars
from samsem_plugin.embedder import validate_image
from samsem_plugin.prompts import AnnotatedRegion, Prompt, ServedRegion
from samsem_plugin.regions import Regions

if TYPE_CHECKING:
    from samsem_plugin.classifier import FittedClassifier
    from samsem_plugin.embedder import MaskEmbedder
    from samsem_plugin.memory import Exemplar
    from samsem_plugin.proposer import AutoMaskSettings, SamProposer

LABEL_SOURCE_MEMORY = "memory"
LABEL_SOURCE_PROMPT = "prompt"
LABEL_SOURCE_NONE = "none"

StageTimer = Callable[[str], AbstractContextManager]
"""``timer(stage)`` → a context manager timing that stage (``"sam"``, ``"embed"``, ``"classify"``)."""


def _no_timer(stage: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def region_scores(regions: Regions) -> np.ndarray:
    """``(N,) float32`` ranking score of each region.

    Labelled regions: ``label_score * proposal_score`` (P(label) times SAM's predicted IoU);
    unlabelled regions: ``proposal_score``. This is the per-region ``score`` served to Label Studio.
    """
    labelled = np.array([label is not None for label in regions.labels], dtype=bool)
    return np.where(labelled, regions.label_score * regions.proposal_score, regions.proposal_score).astype(
        np.float32
    )


def _overlap_in_box(mask_a: np.ndarray, box_a: np.ndarray, mask_b: np.ndarray, box_b: np.ndarray) -> int:
    """Pixels shared by two ``(H, W) bool`` masks, counted only inside their boxes' intersection."""
    x0 = int(max(box_a[0], box_b[0]))
    y0 = int(max(box_a[1], box_b[1]))
    x1 = int(min(box_a[2], box_b[2]))
    y1 = int(min(box_a[3], box_b[3]))
    if x1 <= x0 or y1 <= y0:
        return 0
    return int(np.count_nonzero(mask_a[y0:y1, x0:x1] & mask_b[y0:y1, x0:x1]))


def deduplicate_same_label(
    regions: Regions, *, iou_threshold: float = 0.5, containment_threshold: float = 0.8
) -> Regions:
    """Drop labelled regions that repeat a better-scored region of the same label.

    Greedy in decreasing :func:`region_scores` order: a labelled region is dropped when, against a
    kept region with the same label, IoU ≥ ``iou_threshold`` or the intersection covers
    ≥ ``containment_threshold`` of the smaller mask (a part inside its whole). Unlabelled regions
    are all kept (a part and its whole are different granularities, both useful to an annotator).
    Returns the survivors in decreasing score order.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in (0, 1], got {iou_threshold}")
    if not 0.0 < containment_threshold <= 1.0:
        raise ValueError(f"containment_threshold: expected a value in (0, 1], got {containment_threshold}")
    order = np.argsort(-region_scores(regions), kind="stable")
    areas = regions.areas
    kept: list[int] = []
    for index in order:
        label = regions.labels[index]
        duplicate = False
        if label is not None:
            for other in kept:
                if regions.labels[other] != label:
                    continue
                shared = _overlap_in_box(
                    regions.masks[index], regions.boxes[index], regions.masks[other], regions.boxes[other]
                )
                if shared == 0:
                    continue
                union = areas[index] + areas[other] - shared
                smaller = max(1, min(areas[index], areas[other]))
                if shared / union >= iou_threshold or shared / smaller >= containment_threshold:
                    duplicate = True
                    break
        if not duplicate:
            kept.append(int(index))
    return regions[np.asarray(kept, dtype=np.int64)]


def cap_regions(regions: Regions, max_regions: int) -> Regions:
    """At most ``max_regions`` regions: labelled ones first, each group by decreasing score."""
    if max_regions < 0:
        raise ValueError(f"max_regions: expected >= 0, got {max_regions}")
    labelled = np.array([label is not None for label in regions.labels], dtype=bool)
    order = np.lexsort((-region_scores(regions), ~labelled))
    return regions[order[:max_regions]]


def _regions_nbytes(regions: Regions) -> int:
    return nbytes_of([regions.masks, regions.boxes, regions.embeddings, regions.proposal_score]) + 64 * len(
        regions
    )


def levels_containing_clicks(levels: Regions, prompt: Prompt) -> np.ndarray:
    """``(N,) bool``: which masks contain the pixel of every positive click of ``prompt``.

    A click at continuous pixel coordinates ``(x, y)`` lies in pixel ``(floor(x), floor(y))``
    (clipped to the image). All True when the prompt has no positive click or no mask contains
    them all (nothing to prefer).
    """
    positives = prompt.points[prompt.point_labels == 1]
    if len(levels) == 0 or len(positives) == 0:
        return np.ones(len(levels), dtype=bool)
    height, width = levels.image_size
    cols = np.clip(np.floor(positives[:, 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.floor(positives[:, 1]).astype(np.int64), 0, height - 1)
    contains = levels.masks[:, rows, cols].all(axis=1)
    return contains if contains.any() else np.ones(len(levels), dtype=bool)


class Pipeline:
    """Automatic and interactive prediction, and learning, on one image at a time.

    Args:
        proposer: the SAM mask proposer (owns the bytes-bounded SAM image-embedding cache).
        embedder: the mask embedder (owns the bytes-bounded backbone feature cache).
        auto_settings: SAM automatic mask generator settings for :meth:`predict_auto`.
        max_regions: most regions :meth:`predict_auto` returns.
        dedup_iou: same-label regions overlapping at least this IoU are duplicates.
        dedup_containment: same-label regions whose intersection covers at least this fraction of
            the smaller mask are duplicates.
        timer: ``timer(stage)`` context manager wrapped around each stage (``"sam"``, ``"embed"``,
            ``"classify"``), e.g. a metrics histogram; default: no timing.
        proposal_cache_bytes: bound of the cache of embedded automatic proposals per image
            content (0 disables it). SAM's masks do not depend on the memory, so re-predicting an
            image after the memory changed (a new model version) only re-classifies.

    Thread-safety: the proposer and the embedder guard their own models and caches; the proposal
    cache is thread-safe (two concurrent first requests for one image may both compute it).
    """

    def __init__(
        self,
        proposer: SamProposer,
        embedder: MaskEmbedder,
        *,
        auto_settings: AutoMaskSettings,
        max_regions: int = 50,
        dedup_iou: float = 0.5,
        dedup_containment: float = 0.8,
        timer: StageTimer = _no_timer,
        proposal_cache_bytes: int = 256 << 20,
    ) -> None:
        if max_regions < 1:
            raise ValueError(f"max_regions: expected >= 1, got {max_regions}")
        self.proposer = proposer
        self.embedder = embedder
        self.auto_settings = auto_settings
        self.max_regions = int(max_regions)
        self.dedup_iou = float(dedup_iou)
        self.dedup_containment = float(dedup_containment)
        self.timer = timer
        self.proposal_cache: ByteLRUCache[Regions] = ByteLRUCache(
            proposal_cache_bytes, sizeof=_regions_nbytes
        )

    def predict_auto(
        self,
        image: np.ndarray,
        classifier: FittedClassifier,
        allowed_labels: Collection[str] | None = None,
    ) -> Regions:
        """Pre-annotate a whole image.

        SAM automatic masks → embeddings (one backbone pass) → classification restricted to
        ``allowed_labels`` (unknowns kept unlabelled or dropped, per the classifier's
        ``unknown_policy``) → same-label duplicates removed (IoU and containment) → at most
        ``max_regions`` regions, labelled first, by decreasing :func:`region_scores`.

        With an empty memory every mask stays unlabelled (no class is ever invented). Region ids
        are ``"auto0"``, ``"auto1"``, … in output order.
        """
        validate_image(image)
        embedded = self.embedded_proposals(image)
        if len(embedded) == 0:
            return embedded
        with self.timer("classify"):
            classified = classifier.classify_regions(embedded, allowed_labels)
            unique = deduplicate_same_label(
                classified, iou_threshold=self.dedup_iou, containment_threshold=self.dedup_containment
            )
            capped = cap_regions(unique, self.max_regions)
        return capped.with_(ids=[f"auto{i}" for i in range(len(capped))])

    def embedded_proposals(self, image: np.ndarray) -> Regions:
        """SAM's automatic masks of ``image`` with their embeddings (unlabelled), cached per
        image content and automatic-mask settings. The arrays are shared and read-only."""
        content = image_key(image)  # hashed once, passed down
        key = f"{content}/{self.auto_settings!r}"
        cached = self.proposal_cache.get(key)
        if cached is not None:
            return cached
        with self.timer("sam"):
            proposals = self.proposer.generate(image, self.auto_settings, key=content)
        if len(proposals):
            with self.timer("embed"):
                proposals = self.embedder.embed_regions(image, proposals, key=content)
        for array in (proposals.masks, proposals.boxes, proposals.proposal_score, proposals.embeddings):
            if array is not None:
                array.flags.writeable = False
        self.proposal_cache.put(key, proposals)
        return proposals

    def predict_prompt(
        self,
        image: np.ndarray,
        prompt: Prompt,
        classifier: FittedClassifier,
        allowed_labels: Collection[str] | None = None,
    ) -> Regions:
        """Exactly one region for an interactive prompt (points and/or box, pixels).

        SAM's three granularity levels are embedded and the classifier picks the level that best
        matches a known class (SAM's predicted IoU when the memory is empty), among the levels
        whose mask contains every positive click (all levels if none does). Label: the memory's
        when it is confident; else ``prompt.label`` (the annotator's choice on the smart tool) when
        it is in ``allowed_labels``; else unlabelled. ``label_score`` is the calibrated probability
        for a memory label, 1.0 for the annotator's own label, 0 when unlabelled;
        ``extra["label_source"]`` says which (``"memory"``, ``"prompt"``, ``"none"``) and
        ``extra["level"]`` which SAM level was chosen. The region id is ``"prompt0"``.
        """
        validate_image(image)
        content = image_key(image)  # hashed once, passed down
        with self.timer("sam"):
            levels = self.proposer.predict_prompt(image, prompt, key=content)
        with self.timer("embed"):
            levels = self.embedder.embed_regions(image, levels, key=content)
        with self.timer("classify"):
            candidates = np.flatnonzero(levels_containing_clicks(levels, prompt))
            best = int(candidates[int(classifier.choose_granularity(levels[candidates], allowed_labels))])
            chosen = levels[best]
            decision = classifier.classify(chosen.embeddings, allowed_labels)
        label = decision.labels[0]
        score = float(decision.probability[0]) if label is not None else 0.0
        source = LABEL_SOURCE_MEMORY
        if label is None:
            fallback = prompt.label
            if fallback is not None and (allowed_labels is None or fallback in allowed_labels):
                label, score, source = fallback, 1.0, LABEL_SOURCE_PROMPT
            else:
                source = LABEL_SOURCE_NONE
        return Regions(
            masks=chosen.masks,
            boxes=chosen.boxes,
            proposal_score=chosen.proposal_score,
            labels=[label],
            label_score=[score],
            ids=["prompt0"],
            image_size=chosen.image_size,
            embeddings=chosen.embeddings,
            extra={"label_source": np.array([source], dtype=object), "level": np.array([best])},
        )

    def plan_learning(
        self,
        image: np.ndarray,
        annotated: Sequence[AnnotatedRegion],
        served: Sequence[ServedRegion],
        task: str,
        annotation: str,
    ) -> list[Exemplar]:
        """Exemplars to store for one submitted annotation of ``image``.

        Corrections are planned from the annotation's regions and the prediction we served
        (accepted / relabelled / deleted / drawn), every planned mask is embedded in one batch
        (one backbone pass, cached), and the vectors are turned into exemplars keyed by
        ``(task, annotation, region)``. An empty plan gives ``[]`` without touching the models.
        """
        validate_image(image)
        plan = plan_exemplars(annotated, served)
        if not plan:
            return []
        masks = np.stack([planned.mask for planned in plan]).astype(bool, copy=False)
        if masks.shape[1:] != image.shape[:2]:
            raise ValueError(f"planned masks: expected size {image.shape[:2]}, got {masks.shape[1:]}")
        with self.timer("embed"):
            vectors = self.embedder.embed(image, masks)
        return to_exemplars(plan, vectors, task, annotation)

    def warm(self, image: np.ndarray) -> None:
        """Compute and cache the SAM image embedding and the backbone features of ``image``.

        Used to prefetch at batch-predict time so that the first interactive click is fast.
        """
        validate_image(image)
        content = image_key(image)  # hashed once, passed down
        with self.timer("sam"):
            self.proposer.embed_image(image, key=content)
        with self.timer("embed"):
            self.embedder.features(image, key=content)
