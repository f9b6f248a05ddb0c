"""End-to-end SAM mode of ``python -m samsem_plugin.evaluate``: automatic masks → AP50 and edits.

Per seed and per ``k`` (the oracle-mask protocol: image ids shuffled with the seed, the last
``--test-images`` are the test set, the annotations of the first ``k`` images are the memory) every
test image goes through what ``POST /predict`` serves: SAM's automatic masks
(:meth:`~samsem_plugin.proposer.SamProposer.generate`) embedded by the embedder
(:meth:`~samsem_plugin.pipeline.Pipeline.embedded_proposals`), classified by the classifier fitted
on the memory, same-label duplicates removed and capped at ``max_regions``
(:func:`~samsem_plugin.pipeline.deduplicate_same_label`, :func:`~samsem_plugin.pipeline.cap_regions`,
as :meth:`~samsem_plugin.pipeline.Pipeline.predict_auto`). SAM's masks and their embeddings do not
depend on the seed or on ``k``: each distinct test image is proposed and embedded **once** and
reused by every (seed, k) whose test set holds it.

Metrics per (seed, k), over that seed's test images:

* ``ap50``: COCO mask AP at IoU 0.5, class-aware (pycocotools ``COCOeval``, ``iouType="segm"``,
  ``iouThrs=[0.5]``, area range *all*, ``maxDets=[100]``, 101-point interpolated precision)
  averaged over the categories that have ground truth in the test set (others give −1 and are
  left out). Detections: the served **labelled** regions, score = the label's probability
  (``label_score``); unlabelled (rejected) regions are not detections.
* edits an annotator makes to turn the served pre-annotation into the ground truth
  (:func:`count_edits`): served labelled regions are matched one-to-one to ground-truth objects
  greedily, highest score first, each to the still unmatched object of highest mask IoU ≥ 0.5
  (any class). A matched region with the wrong label is a **relabel**; an unmatched labelled
  region is a **deletion**. Then the served unlabelled regions (``unknown_policy="unlabelled"``)
  are matched the same way (by SAM's ``proposal_score``) to the objects still unmatched: each
  such match is a **label** edit (the mask is right, the annotator picks its class). Every object
  still unmatched is a **draw**. Unlabelled regions matching no object are not counted (an
  annotator leaves an unlabelled suggestion alone). ``edits = relabels + deletions + labels +
  draws``; ``objects`` (drawing everything from scratch) is the number to compare it with.
* ``recall50_class_agnostic``: fraction of ground-truth objects with mask IoU ≥ 0.5 to **any** of
  SAM's proposals (before classification, deduplication and the cap): the ceiling the proposer
  sets. It does not depend on ``k`` (repeated in every row).

The plain mean-prototype baseline (no reject option) is scored on the same proposals and
embeddings: label = nearest class mean, score = its cosine. Masks are compared as COCO RLE
(pycocotools): masks ``(N, H, W) bool``, row = y, column = x.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from samsem_plugin.classifier import ClassifierSettings, FittedClassifier, fit_classifier
from samsem_plugin.pipeline import Pipeline, cap_regions, deduplicate_same_label
from samsem_plugin.regions import Regions

if TYPE_CHECKING:
    from samsem_plugin.evaluate import AnnotatedImage
    from samsem_plugin.memory import MemorySnapshot

IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 100
EDIT_KINDS = ("relabels", "deletions", "labels", "draws")
SAM_METRICS = (
    "ap50",
    "edits_per_image",
    *(f"{kind}_per_image" for kind in EDIT_KINDS),
    "labelled_per_image",
    "objects_per_image",
    "recall50_class_agnostic",
)
VARIANTS = ("ours", "baseline_mean_prototype")
_PROPOSAL_INDEX = "proposal_index"


# -- masks as COCO RLE -------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Compressed COCO RLEs (``{"size": [H, W], "counts": bytes}``) of ``(N, H, W) bool`` masks."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {masks.shape}")
    if len(masks) == 0:
        return []
    return list(mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))))


def mask_ious(predicted: Sequence[dict], truth: Sequence[dict]) -> np.ndarray:
    """``(P, G) float64`` mask IoU of every predicted RLE with every ground-truth RLE."""
    from pycocotools import mask as mask_utils

    if not predicted or not truth:
        return np.zeros((len(predicted), len(truth)))
    ious = mask_utils.iou(list(predicted), list(truth), [0] * len(truth))
    return np.asarray(ious, dtype=np.float64).reshape(len(predicted), len(truth))


@dataclass(frozen=True)
class GroundTruthImage:
    """The ground truth of one test image for :func:`mask_ap50`.

    Attributes:
        image_id: unique among the images of one evaluation.
        size: ``(H, W)`` pixels.
        labels: class name of each object.
        rles: compressed COCO RLE of each object's mask (:func:`encode_masks`).
    """

    image_id: int
    size: tuple[int, int]
    labels: tuple[str, ...]
    rles: tuple[dict, ...]


@dataclass(frozen=True)
class Detection:
    """One labelled predicted mask: ``rle`` (compressed COCO RLE) on image ``image_id``."""

    image_id: int
    label: str
    rle: dict
    score: float


def mask_ap50(
    truth: Sequence[GroundTruthImage],
    detections: Sequence[Detection],
    max_detections: int = MAX_DETECTIONS,
) -> float | None:
    """COCO mask AP at IoU 0.5 over the images of ``truth``, averaged over the categories that
    have ground truth there (``None`` if no image has an object).

    pycocotools ``COCOeval`` with explicit parameters: ``iouType="segm"``, ``iouThrs=[0.5]``,
    ``recThrs`` COCO's 101 points, ``areaRng=[[0, 1e10]]`` (all), ``maxDets=[max_detections]``
    per image and category, ``useCats=1``. Categories are the class names met in ``truth`` and
    ``detections``; a category without ground truth gets −1 from ``COCOeval`` and is left out
    (detections of it cost nothing). No detections at all → 0.0.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(image.labels for image in truth):
        return None
    if not detections:
        return 0.0
    names = sorted({label for image in truth for label in image.labels} | {d.label for d in detections})
    category = {name: i + 1 for i, name in enumerate(names)}
    annotations = []
    for image in truth:
        for label, rle in zip(image.labels, image.rles, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval takes id 0 for "unmatched"
                    "image_id": image.image_id,
                    "category_id": category[label],
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    results = [
        {"image_id": d.image_id, "category_id": category[d.label], "segmentation": d.rle, "score": d.score}
        for d in detections
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": [{"id": i.image_id, "height": i.size[0], "width": i.size[1]} for i in truth],
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in category.items()],
        }
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="segm")
        params = evaluation.params
        params.imgIds = [image.image_id for image in truth]
        params.catIds = list(category.values())
        params.iouThrs = np.array([IOU_THRESHOLD])
        params.maxDets = [int(max_detections)]
        params.areaRng = [[0.0, 1e10]]
        params.areaRngLbl = ["all"]
        params.useCats = 1
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, :, 0, 0]  # (recall thresholds, categories)
    present = (precision > -1).all(axis=0)
    return float(precision[:, present].mean(axis=0).mean())


def count_edits(
    iou: np.ndarray,
    labels: Sequence[str | None],
    scores: Sequence[float],
    truth: Sequence[str],
    threshold: float = IOU_THRESHOLD,
) -> dict[str, int]:
    """Edits that turn one image's served regions into its ground truth (rules: module docstring).

    Args:
        iou: ``(P, G)`` mask IoU of the P served regions with the G ground-truth objects.
        labels: ``(P,)`` served label of each region, ``None`` for an unlabelled one.
        scores: ``(P,)`` matching order, highest first, within the labelled and then within the
            unlabelled regions (label probability / SAM's predicted IoU).
        truth: ``(G,)`` class name of each object.

    Returns:
        ``{"relabels", "deletions", "labels", "draws", "edits", "objects"}`` counts.
    """
    iou = np.asarray(iou, dtype=np.float64).reshape(len(labels), len(truth))
    scores = np.asarray(scores, dtype=np.float64)
    labelled = np.array([label is not None for label in labels], dtype=bool)
    matched = np.zeros(len(truth), dtype=bool)
    counts = dict.fromkeys(EDIT_KINDS, 0)
    for group in (labelled, ~labelled):
        rows = np.flatnonzero(group)
        for row in rows[np.argsort(-scores[rows], kind="stable")]:
            candidates = np.where(~matched & (iou[row] >= threshold), iou[row], -1.0)
            if len(truth) and candidates.max() >= 0:
                best = int(np.argmax(candidates))
                matched[best] = True
                if labels[row] is None:
                    counts["labels"] += 1
                elif labels[row] != truth[best]:
                    counts["relabels"] += 1
            elif labels[row] is not None:
                counts["deletions"] += 1
    counts["draws"] = int((~matched).sum())
    return {**counts, "edits": sum(counts.values()), "objects": len(truth)}


# -- the mode ----------------------------------------------------------------------------------------


def propose_image(pipeline: Pipeline, image: AnnotatedImage) -> Regions:
    """SAM's automatic masks of ``image`` with their embeddings, unlabelled
    (:meth:`Pipeline.embedded_proposals`: ``SamProposer.generate`` → ``MaskEmbedder.embed_regions``)."""
    return pipeline.embedded_proposals(image.read())


def serve(classified: Regions, pipeline: Pipeline) -> Regions:
    """What :meth:`Pipeline.predict_auto` serves from classified proposals: same-label duplicates
    removed with the pipeline's thresholds, then at most ``max_regions``, labelled first."""
    if len(classified) == 0:  # as predict_auto (Regions.areas cannot reshape zero masks)
        return classified
    unique = deduplicate_same_label(
        classified, iou_threshold=pipeline.dedup_iou, containment_threshold=pipeline.dedup_containment
    )
    return cap_regions(unique, pipeline.max_regions)


def _baseline_regions(proposals: Regions, snapshot: MemorySnapshot) -> Regions:
    from samsem_plugin.evaluate import mean_prototype_scores

    labels, cosine = mean_prototype_scores(snapshot, proposals.embeddings)
    return proposals.with_(labels=labels, label_score=cosine)


@dataclass
class _Run:
    """What one (variant, seed, k) accumulates over its test images."""

    detections: list[Detection] = field(default_factory=list)
    edits: list[dict[str, int]] = field(default_factory=list)

    def add(
        self, image: GroundTruthImage, served: Regions, proposal_ious: np.ndarray, proposal_rles: list[dict]
    ) -> None:
        """Score one image's ``served`` regions; ``proposal_ious`` ``(P, G)`` and ``proposal_rles``
        are of all its proposals (``served.extra["proposal_index"]`` points into them)."""
        rows = served.extra[_PROPOSAL_INDEX]
        labelled = np.array([label is not None for label in served.labels], dtype=bool)
        order = np.where(labelled, served.label_score, served.proposal_score)
        self.edits.append(count_edits(proposal_ious[rows], served.labels, order, image.labels))
        self.detections.extend(
            Detection(image.image_id, str(label), proposal_rles[row], float(score))
            for row, label, score in zip(rows, served.labels, served.label_score, strict=True)
            if label is not None
        )


def evaluate_sam(
    images: Sequence[AnnotatedImage],
    vectors: dict[int, np.ndarray],
    pipeline: Pipeline,
    shots: Sequence[int],
    seeds: Sequence[int],
    n_test: int,
    settings: ClassifierSettings,
    progress: bool = True,
) -> dict[str, Any]:
    """The SAM mode (module docstring).

    Args:
        images: the annotated images (COCO order).
        vectors: ``image_id → (N, D)`` embeddings of each image's ground-truth masks (the memory).
        pipeline: proposer + embedder + serving settings (``max_regions``, ``dedup_*``).
        shots, seeds, n_test: the oracle-mask protocol.
        settings: the classifier's settings.

    Returns:
        ``{"ours": {str(k): {metric: summary}}, "baseline_mean_prototype": {...},
        "proposals_per_image": summary, "images_proposed": int, "timing_seconds": {...}}``, metrics
        :data:`SAM_METRICS`, summaries as :func:`~samsem_plugin.evaluate.summarise` over seeds.
    """
    from samsem_plugin.evaluate import check_protocol, positives_snapshot, split_for_seed, summarise

    check_protocol(len(images), shots, n_test)
    splits = {seed: split_for_seed(len(images), seed, n_test) for seed in seeds}
    memories: dict[tuple[int, int], tuple[FittedClassifier, MemorySnapshot]] = {}
    seeds_of: dict[int, list[int]] = {}
    for seed, (memory_order, test) in splits.items():
        for k in shots:
            snapshot = positives_snapshot([images[i] for i in memory_order[:k]], vectors)
            memories[seed, k] = (fit_classifier(snapshot, settings), snapshot)
        for index in test:
            seeds_of.setdefault(int(index), []).append(seed)
    runs = {(variant, seed, k): _Run() for variant in VARIANTS for seed in seeds for k in shots}
    truth: dict[int, GroundTruthImage] = {}
    found: dict[int, int] = {}  # objects with IoU >= 0.5 to some proposal
    proposed: dict[int, int] = {}
    started = time.perf_counter()
    proposing = 0.0
    for index in tqdm(
        sorted(seeds_of), desc="SAM proposals", unit="img", file=sys.stderr, disable=not progress
    ):
        image = images[index]
        before = time.perf_counter()
        proposals = propose_image(pipeline, image)  # once per image: seeds and k reuse it
        proposing += time.perf_counter() - before
        truth[index] = GroundTruthImage(
            image.image_id, image.size, image.labels, tuple(encode_masks(image.masks()))
        )
        rles = encode_masks(proposals.masks)
        ious = mask_ious(rles, truth[index].rles)
        found[index] = int((ious >= IOU_THRESHOLD).any(axis=0).sum())
        proposed[index] = len(proposals)
        proposals = proposals.with_(extra={**proposals.extra, _PROPOSAL_INDEX: np.arange(len(proposals))})
        for seed in seeds_of[index]:
            for k in shots:
                classifier, snapshot = memories[seed, k]
                classified = {variant: proposals for variant in VARIANTS}
                if len(proposals):
                    classified["ours"] = classifier.classify_regions(proposals)
                    classified["baseline_mean_prototype"] = _baseline_regions(proposals, snapshot)
                for variant, regions in classified.items():
                    runs[variant, seed, k].add(truth[index], serve(regions, pipeline), ious, rles)
    scoring_started = time.perf_counter()

    def seed_metrics(run: _Run, test: np.ndarray) -> dict[str, float | None]:
        n_images = len(test)
        totals = {name: sum(edits[name] for edits in run.edits) for name in (*EDIT_KINDS, "edits", "objects")}
        return {
            "ap50": mask_ap50([truth[int(i)] for i in test], run.detections),
            "edits_per_image": totals["edits"] / n_images,
            **{f"{kind}_per_image": totals[kind] / n_images for kind in EDIT_KINDS},
            "labelled_per_image": len(run.detections) / n_images,
            "objects_per_image": totals["objects"] / n_images,
            "recall50_class_agnostic": sum(found[int(i)] for i in test) / max(1, totals["objects"]),
        }

    results: dict[str, Any] = {}
    for variant in VARIANTS:
        table = {}
        for k in shots:
            per_seed = [seed_metrics(runs[variant, seed, k], splits[seed][1]) for seed in seeds]
            table[str(k)] = {name: summarise([m[name] for m in per_seed]) for name in SAM_METRICS}
        results[variant] = table
    results["proposals_per_image"] = summarise(
        [float(np.mean([proposed[int(i)] for i in splits[seed][1]])) for seed in seeds]
    )
    results["images_proposed"] = len(seeds_of)
    results["timing_seconds"] = {
        "proposals": round(proposing, 3),
        "per_image_proposals": round(proposing / max(1, len(seeds_of)), 4),
        "classify_and_match": round(scoring_started - started - proposing, 3),
        "coco_eval": round(time.perf_counter() - scoring_started, 3),
    }
    return results
