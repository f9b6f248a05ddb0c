"""Few-shot evaluation of the exemplar memory on a COCO instances export.

``python -m samsem_plugin.evaluate --coco ANNOTATIONS.json --images DIR --embedder-model NAME
--embedder-weights FILE [--multi-scale] --shots 1,2,3,5,10 --seeds 5 --test-images 20 --json OUT.json
[--sam-model-type vit_b|vit_l|vit_h|tiny-random --sam-checkpoint FILE [--points-per-side 32 ...]]``

Every :class:`~samsem_plugin.classifier.ClassifierSettings` field is a flag too (``--centring none``,
``--min-probability 0.5``, ``--no-reject-below-threshold``, ...), to compare options on one dataset.

Oracle-mask mode (ground-truth masks, isolates embedding + memory + classifier). Per seed: the
annotated images are shuffled with that seed; the last ``--test-images`` are the test set; for each
``k`` in ``--shots`` the annotations of the first ``k`` images are the memory (positives only) and
the ground-truth masks of the test images are classified. Metrics over all test objects:

* ``accuracy`` = correct / all objects (a rejected object is not correct);
* ``coverage`` = labelled / all objects;
* ``precision`` = correct / labelled (``null`` for a seed that labelled nothing), so
  ``accuracy = precision × coverage`` per seed.

Reported per ``k`` as mean and sample standard deviation over seeds (``std`` 0 for one seed), with
the per-seed values, for our classifier (``"oracle_masks"``) and for a plain mean-prototype
classifier without reject option (``"baseline_mean_prototype"``, coverage 1).

Online mode (``"online"``): per seed, the non-test images are walked in order; each image's objects
are predicted from the memory learnt so far, the annotator's edits are counted (relabels + rejected
objects), then the annotation is learnt through the real corrections rules (accepted → positive,
relabelled A → B → positive B + negative A). Per image and cumulative curves, mean/std over seeds.

Every image is embedded once (one backbone pass per image, all its masks pooled at once) and reused
across seeds and shots. Crowd annotations (``iscrowd = 1``) and images without annotations are
skipped. Segmentations: polygons, compressed RLE and uncompressed RLE (via pycocotools).

End-to-end SAM mode (``"sam"``, only with ``--sam-model-type``; ``--sam-checkpoint`` is needed for
``vit_b/l/h``): same split and memories as oracle-mask mode, but the test images go through the
service's automatic pipeline: SAM's automatic masks (every ``AutoMaskSettings`` field is a flag,
e.g. ``--points-per-side``, ``--min-mask-region-area``), the embedder, the classifier, same-label
de-duplication and ``--max-regions``. Each test image is proposed and embedded once for all seeds
and shots. Per ``k``: mask AP50 (COCOeval), the edits an annotator makes per image (relabels,
deletions, labels, draws) next to the objects per image, and the class-agnostic recall of SAM's
proposals at IoU 0.5, for our classifier and the mean-prototype baseline; see
:mod:`samsem_plugin.evaluate_sam`. A missing or unusable checkpoint is a usage error (exit code 2,
the :class:`~samsem_plugin.errors.WeightsError` message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from samsem_plugin.backbones import DEFAULT_EMBEDDER
from samsem_plugin.classifier import ClassifierSettings, fit_classifier
from samsem_plugin.corrections import ORIGIN_ACCEPTED, ORIGIN_EDITED, plan_exemplars, to_exemplars
from samsem_plugin.embedder import MaskEmbedder
from samsem_plugin.errors import WeightsError
from samsem_plugin.memory import POSITIVE, Exemplar, MemorySnapshot, base_region
from samsem_plugin.pipeline import Pipeline
from samsem_plugin.prompts import AnnotatedRegion, ServedRegion
from samsem_plugin.proposer import AutoMaskSettings, SamProposer
from samsem_plugin.sam_models import SAM_MODEL_TYPES, build_sam

METRICS = ("accuracy", "precision", "coverage")
ONLINE_CURVES = (
    "edits",
    "relabels",
    "rejections",
    "objects",
    "edit_rate",
    "cumulative_edits",
    "cumulative_edit_rate",
)
GROUND_TRUTH_ANNOTATION = "gt"

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


# -- the dataset -----------------------------------------------------------------------------------


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """``(H, W) bool`` mask of a COCO segmentation: polygons ``[[x, y, ...], ...]`` (pixels),
    uncompressed RLE ``{"counts": [int, ...], "size": [H, W]}`` or compressed RLE (``counts`` str)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"segmentation: expected size [{height}, {width}], got {segmentation['size']}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"segmentation: expected polygons or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


@dataclass(frozen=True)
class AnnotatedImage:
    """One COCO image with its (non-crowd) instance annotations.

    Attributes:
        image_id: COCO image id.
        path: the image file.
        size: ``(H, W)`` pixels, from the COCO file.
        labels: class name of each annotation.
        segmentations: the COCO segmentation of each annotation (decoded by :meth:`masks`).
    """

    image_id: int
    path: Path
    size: tuple[int, int]
    labels: tuple[str, ...]
    segmentations: tuple[Any, ...]

    def masks(self) -> np.ndarray:
        """``(N, H, W) bool`` instance masks."""
        height, width = self.size
        if not self.segmentations:
            return np.zeros((0, height, width), bool)
        return np.stack([decode_segmentation(s, height, width) for s in self.segmentations])

    def read(self) -> np.ndarray:
        """``(H, W, 3) uint8`` RGB pixels (EXIF orientation applied), checked against :attr:`size`."""
        with Image.open(self.path) as opened:
            image = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        if image.shape[:2] != self.size:
            raise ValueError(
                f"{self.path}: expected {self.size[0]}x{self.size[1]} (COCO), got {image.shape[:2]}"
            )
        return image


def load_coco(annotations_path: str | Path, images_dir: str | Path) -> list[AnnotatedImage]:
    """Annotated images of a COCO instances file, in COCO image order (crowd annotations and
    images without annotations skipped)."""
    coco = json.loads(Path(annotations_path).read_text())
    names = {category["id"]: str(category["name"]) for category in coco.get("categories", [])}
    by_image: dict[int, list[dict]] = {}
    for annotation in coco.get("annotations", []):
        if annotation.get("iscrowd", 0):
            continue
        if annotation["category_id"] not in names:
            raise ValueError(
                f"annotation {annotation.get('id')}: unknown category_id {annotation['category_id']}"
            )
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = []
    for entry in coco.get("images", []):
        annotations = by_image.get(entry["id"], [])
        if not annotations:
            continue
        images.append(
            AnnotatedImage(
                image_id=int(entry["id"]),
                path=Path(images_dir) / entry["file_name"],
                size=(int(entry["height"]), int(entry["width"])),
                labels=tuple(names[a["category_id"]] for a in annotations),
                segmentations=tuple(a["segmentation"] for a in annotations),
            )
        )
    return images


def embed_images(
    images: Sequence[AnnotatedImage], embedder: MaskEmbedder, progress: bool = True
) -> dict[int, np.ndarray]:
    """``image_id → (N, D) float32`` embeddings of each image's instance masks (one pass each)."""
    vectors = {}
    for image in tqdm(images, desc="embedding images", unit="img", file=sys.stderr, disable=not progress):
        vectors[image.image_id] = embedder.embed(image.read(), image.masks())
    return vectors


# -- protocol ----------------------------------------------------------------------------------------


def split_for_seed(n_images: int, seed: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """``(memory order, test indices)``: a permutation of ``range(n_images)`` by ``seed``; the last
    ``n_test`` are the test set, the others (in permuted order) feed the memory."""
    if not 0 < n_test < n_images:
        raise ValueError(f"test images: expected 0 < n_test < {n_images} (annotated images), got {n_test}")
    order = np.random.default_rng(seed).permutation(n_images)
    return order[: n_images - n_test], order[n_images - n_test :]


def check_protocol(n_images: int, shots: Sequence[int], n_test: int) -> None:
    """``ValueError`` unless ``0 < n_test < n_images`` and every k in ``shots`` fits the non-test images."""
    split_for_seed(n_images, 0, n_test)
    if not shots or min(shots) < 1 or max(shots) > n_images - n_test:
        raise ValueError(f"shots: expected 1 .. {n_images - n_test} (non-test images), got {list(shots)}")


def positives_snapshot(images: Sequence[AnnotatedImage], vectors: dict[int, np.ndarray]) -> MemorySnapshot:
    """A memory holding every annotation of ``images`` as a positive exemplar."""
    exemplars = [
        Exemplar(str(image.image_id), GROUND_TRUTH_ANNOTATION, str(j), label, POSITIVE, vector)
        for image in images
        for j, (label, vector) in enumerate(zip(image.labels, vectors[image.image_id], strict=True))
        if np.linalg.norm(vector) > 0
    ]
    return MemorySnapshot.from_exemplars(exemplars)


def mean_prototype_scores(snapshot: MemorySnapshot, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: ``(N,) object`` label of the nearest class mean of the positives (cosine to the
    renormalised mean), never rejecting, and ``(N,) float32`` that cosine (0 with no class)."""
    positive = snapshot.kinds == POSITIVE
    classes = sorted(set(snapshot.labels[positive].tolist()))
    if not classes or len(queries) == 0:
        return np.full(len(queries), None, dtype=object), np.zeros(len(queries), np.float32)
    means = np.stack([snapshot.vectors[positive & (snapshot.labels == c)].mean(axis=0) for c in classes])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    cosines = queries @ means.T
    best = np.argmax(cosines, axis=1)
    return np.array(classes, dtype=object)[best], cosines[np.arange(len(best)), best].astype(np.float32)


def mean_prototype_labels(snapshot: MemorySnapshot, queries: np.ndarray) -> np.ndarray:
    """Baseline: ``(N,) object`` label of the nearest class mean (:func:`mean_prototype_scores`)."""
    return mean_prototype_scores(snapshot, queries)[0]


def label_metrics(predicted: Sequence[str | None], truth: Sequence[str]) -> dict[str, float | None]:
    """``accuracy``, ``precision`` (None when nothing labelled) and ``coverage`` of predictions."""
    predicted, truth = list(predicted), list(truth)
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"predictions: expected {len(truth)} (> 0) entries, got {len(predicted)}")
    labelled = sum(p is not None for p in predicted)
    correct = sum(p is not None and p == t for p, t in zip(predicted, truth, strict=True))
    return {
        "accuracy": correct / len(truth),
        "precision": correct / labelled if labelled else None,
        "coverage": labelled / len(truth),
    }


def summarise(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "per_seed"}`` over the non-None values (sample std; 0 for one value)."""
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    mean = float(present.mean()) if present.size else None
    std = float(present.std(ddof=1)) if present.size > 1 else (0.0 if present.size else None)
    return {"mean": mean, "std": std, "per_seed": list(values)}


def evaluate_oracle(
    images: Sequence[AnnotatedImage],
    vectors: dict[int, np.ndarray],
    shots: Sequence[int],
    seeds: Sequence[int],
    n_test: int,
    settings: ClassifierSettings,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Oracle-mask learning curves: ``(ours, baseline)``, each ``{str(k): {metric: summary}}``."""
    check_protocol(len(images), shots, n_test)
    ours: dict[int, list[dict]] = {k: [] for k in shots}
    baseline: dict[int, list[dict]] = {k: [] for k in shots}
    for seed in tqdm(seeds, desc="oracle-mask seeds", unit="seed", file=sys.stderr, disable=not progress):
        memory_order, test = split_for_seed(len(images), seed, n_test)
        queries = np.concatenate([vectors[images[i].image_id] for i in test])
        truth = [label for i in test for label in images[i].labels]
        for k in shots:
            snapshot = positives_snapshot([images[i] for i in memory_order[:k]], vectors)
            ours[k].append(label_metrics(fit_classifier(snapshot, settings).classify(queries).labels, truth))
            baseline[k].append(label_metrics(mean_prototype_labels(snapshot, queries), truth))

    def table(runs: dict[int, list[dict]]) -> dict[str, dict]:
        return {str(k): {m: summarise([r[m] for r in runs[k]]) for m in METRICS} for k in shots}

    return table(ours), table(baseline)


def _online_step(
    image: AnnotatedImage, vectors: np.ndarray, predicted: np.ndarray
) -> tuple[list[Exemplar], int, int]:
    """Learn one image after predicting ``predicted`` labels for its objects: ``(exemplars,
    relabels, rejections)``; exemplars follow the corrections rules."""
    masks = image.masks()
    served = [ServedRegion(str(j), predicted[j], masks[j]) for j in range(len(masks))]
    annotated = [
        AnnotatedRegion(str(j), label, masks[j], ORIGIN_ACCEPTED if predicted[j] == label else ORIGIN_EDITED)
        for j, label in enumerate(image.labels)
    ]
    plan = plan_exemplars(annotated, served)
    plan_vectors = np.stack([vectors[int(base_region(p.region))] for p in plan]) if plan else vectors[:0]
    keep = np.linalg.norm(plan_vectors, axis=1) > 0
    exemplars = to_exemplars(
        [p for p, k in zip(plan, keep, strict=True) if k],
        plan_vectors[keep],
        task=str(image.image_id),
        annotation=GROUND_TRUTH_ANNOTATION,
    )
    relabels = sum(p is not None and p != t for p, t in zip(predicted, image.labels, strict=True))
    rejections = sum(p is None for p in predicted)
    return exemplars, relabels, rejections


def evaluate_online(
    images: Sequence[AnnotatedImage],
    vectors: dict[int, np.ndarray],
    seeds: Sequence[int],
    n_test: int,
    settings: ClassifierSettings,
    max_images: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict-then-learn curves over the first ``max_images`` non-test images of each seed."""
    steps = min(max_images, len(images) - n_test)
    curves: dict[str, list[list[float]]] = {name: [] for name in ONLINE_CURVES}
    for seed in tqdm(seeds, desc="online seeds", unit="seed", file=sys.stderr, disable=not progress):
        memory_order, _ = split_for_seed(len(images), seed, n_test)
        exemplars: list[Exemplar] = []
        run: dict[str, list[float]] = {name: [] for name in ONLINE_CURVES}
        for i in memory_order[:steps]:
            image = images[i]
            classifier = fit_classifier(MemorySnapshot.from_exemplars(exemplars), settings)
            predicted = classifier.classify(vectors[image.image_id]).labels
            learnt, relabels, rejections = _online_step(image, vectors[image.image_id], predicted)
            exemplars.extend(learnt)
            run["relabels"].append(relabels)
            run["rejections"].append(rejections)
            run["edits"].append(relabels + rejections)
            run["objects"].append(len(image.labels))
            run["edit_rate"].append((relabels + rejections) / len(image.labels))
        run["cumulative_edits"] = np.cumsum(run["edits"]).tolist()
        run["cumulative_edit_rate"] = (np.cumsum(run["edits"]) / np.cumsum(run["objects"])).tolist()
        for name in ONLINE_CURVES:
            curves[name].append(run[name])
    result: dict[str, Any] = {"images": steps}
    for name in ONLINE_CURVES:
        table = np.array(curves[name], dtype=np.float64)  # (seeds, steps)
        std = table.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(steps)
        result[name] = {"mean": table.mean(axis=0).tolist(), "std": std.tolist()}
    return result


# -- command line ------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def _add_settings_flags(parser: argparse.ArgumentParser, settings_type: type, title: str) -> None:
    """One flag per field of the dataclass ``settings_type`` (``--knn-k``, ``--points-per-side``,
    ...); an unset flag keeps the dataclass default."""
    group = parser.add_argument_group(title)
    for field in fields(settings_type):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(field.default, (int, float, str)):
            value_type = type(field.default)
            group.add_argument(
                flag, dest=field.name, type=value_type, default=None, metavar=value_type.__name__
            )


def _chosen_settings(args: argparse.Namespace, settings_type: type) -> dict[str, Any]:
    """The flags of ``settings_type``'s fields that were given."""
    return {
        f.name: getattr(args, f.name)
        for f in fields(settings_type)
        if getattr(args, f.name, None) is not None
    }


def _classifier_settings(args: argparse.Namespace) -> ClassifierSettings:
    return ClassifierSettings(**_chosen_settings(args, ClassifierSettings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m samsem_plugin.evaluate",
        description="Few-shot evaluation of the exemplar memory on a COCO instances export "
        "(oracle masks, online curve, optionally end-to-end with SAM's automatic masks).",
    )
    parser.add_argument("--coco", required=True, type=Path, help="COCO instances JSON file")
    parser.add_argument("--images", required=True, type=Path, help="directory of the images (file_name)")
    parser.add_argument("--embedder-model", default=DEFAULT_EMBEDDER, help="timm model name")
    parser.add_argument(
        "--embedder-weights", default="random", help="weights file, or 'random' (meaningless)"
    )
    parser.add_argument("--long-side", type=int, default=None, help="backbone input long side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="run the backbone under bfloat16 autocast")
    parser.add_argument(
        "--multi-scale",
        action="store_true",
        help="CNN backbones: also pool the 1/2- and 1/4-stride stages (MaskEmbedder multi_scale)",
    )
    parser.add_argument("--shots", type=_int_list, default=[1, 2, 3, 5, 10], help="memory sizes in images")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0 .. N-1)")
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--online-images", type=int, default=30, help="images walked in online mode (0: off)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    _add_settings_flags(parser, ClassifierSettings, "classifier settings (defaults: ClassifierSettings)")
    sam = parser.add_argument_group("end-to-end SAM mode (off unless --sam-model-type is given)")
    sam.add_argument(
        "--sam-model-type",
        choices=SAM_MODEL_TYPES,
        default=None,
        help="run SAM's automatic masks on the test images (tiny-random: untrained, for tests)",
    )
    sam.add_argument(
        "--sam-checkpoint", type=Path, default=None, help="SAM checkpoint file (needed for vit_b/l/h)"
    )
    sam.add_argument(
        "--max-regions", type=int, default=None, help="most regions served per image (Pipeline default)"
    )
    _add_settings_flags(parser, AutoMaskSettings, "SAM automatic masks (defaults: AutoMaskSettings)")
    return parser


def _sam_model(args: argparse.Namespace) -> tuple[Sam, AutoMaskSettings] | None:
    """SAM and its automatic-mask settings for the SAM mode, or None when ``--sam-model-type`` is
    not given (then no SAM flag may be given). Raises ValueError / WeightsError for bad flags or a
    missing / unreadable / mismatched checkpoint."""
    auto = _chosen_settings(args, AutoMaskSettings)
    if args.sam_model_type is None:
        given = ["--" + name.replace("_", "-") for name in auto]
        others = {"--sam-checkpoint": args.sam_checkpoint, "--max-regions": args.max_regions}
        given += [flag for flag, value in others.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: the SAM mode needs --sam-model-type")
        return None
    auto_settings = AutoMaskSettings(**auto)
    try:
        sam = build_sam(args.sam_model_type, args.sam_checkpoint, device=args.device)
    except WeightsError as error:  # its text names the service setting; say which flag it is here
        raise WeightsError(f"{error} Here: --sam-checkpoint FILE.") from error
    return sam, auto_settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation described in the module docstring; returns the JSON-able results."""
    settings = _classifier_settings(args)
    progress = not args.no_progress
    images = load_coco(args.coco, args.images)
    seeds = list(range(args.seeds))
    if not seeds:
        raise ValueError(f"seeds: expected >= 1, got {args.seeds}")
    check_protocol(len(images), args.shots, args.test_images)  # before the slow part
    sam = _sam_model(args)
    started = time.perf_counter()
    embedder = MaskEmbedder.from_timm(
        args.embedder_model,
        args.embedder_weights,
        long_side=args.long_side,
        cache_bytes=0,
        device=args.device,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        multi_scale=args.multi_scale,
    )
    pipeline = None
    if sam is not None:
        serving = {} if args.max_regions is None else {"max_regions": args.max_regions}
        # no caches: evaluate_sam proposes and embeds each test image once and keeps the results
        pipeline = Pipeline(
            SamProposer(sam[0], cache_bytes=0),
            embedder,
            auto_settings=sam[1],
            proposal_cache_bytes=0,
            **serving,
        )
    vectors = embed_images(images, embedder, progress)
    embedded = time.perf_counter()
    ours, baseline = evaluate_oracle(images, vectors, args.shots, seeds, args.test_images, settings, progress)
    online = None
    if args.online_images > 0:
        online = evaluate_online(
            images, vectors, seeds, args.test_images, settings, args.online_images, progress
        )
    sam_results = None
    if pipeline is not None:
        from samsem_plugin.evaluate_sam import evaluate_sam

        sam_results = evaluate_sam(
            images, vectors, pipeline, args.shots, seeds, args.test_images, settings, progress
        )
    finished = time.perf_counter()
    objects = Counter(label for image in images for label in image.labels)
    sam_settings = None
    if pipeline is not None:
        sam_settings = {
            "model_type": args.sam_model_type,
            "checkpoint": None if args.sam_checkpoint is None else str(args.sam_checkpoint),
            "auto_masks": asdict(pipeline.auto_settings),
            "max_regions": pipeline.max_regions,
            "dedup_iou": pipeline.dedup_iou,
            "dedup_containment": pipeline.dedup_containment,
        }
    return {
        "oracle_masks": ours,
        "baseline_mean_prototype": baseline,
        "online": online,
        "sam": sam_results,
        "settings": {
            "coco": str(args.coco),
            "images_dir": str(args.images),
            "embedder_id": embedder.embedder_id,
            "long_side": embedder.long_side,
            "bf16": bool(args.bf16),
            "multi_scale": bool(args.multi_scale),
            "shots": list(args.shots),
            "seeds": seeds,
            "test_images": args.test_images,
            "online_images": args.online_images,
            "classifier": asdict(settings),
            "sam": sam_settings,
            "annotated_images": len(images),
            "objects_per_class": dict(sorted(objects.items())),
        },
        "timing_seconds": {
            "embedding": round(embedded - started, 3),
            "per_image_embedding": round((embedded - started) / len(images), 4),
            "evaluation": round(finished - embedded, 3),
        },
    }


def _cells(values: Sequence[float | None]) -> str:
    return "  ".join("  n/a" if v is None else f"{v:.3f}" for v in values)


def _format_table(results: dict[str, Any]) -> str:
    lines = ["k  ours: accuracy  precision  coverage | mean-prototype accuracy"]
    for k, row in results["oracle_masks"].items():
        cells = [row[m]["mean"] for m in METRICS] + [
            results["baseline_mean_prototype"][k]["accuracy"]["mean"]
        ]
        lines.append(f"{k:>2}  " + _cells(cells))
    sam = results.get("sam")
    if sam:
        lines.append(
            "SAM mode: k  ours: AP50  edits/img (relabels deletions labels draws) | "
            "mean-prototype AP50  edits/img | objects/img  recall50 (class-agnostic)"
        )
        for k, row in sam["ours"].items():
            base = sam["baseline_mean_prototype"][k]
            names = ["ap50", "edits_per_image", "relabels_per_image", "deletions_per_image"]
            names += ["labels_per_image", "draws_per_image"]
            cells = [row[name]["mean"] for name in names] + [base["ap50"]["mean"]]
            cells += [base["edits_per_image"]["mean"], row["objects_per_image"]["mean"]]
            cells += [row["recall50_class_agnostic"]["mean"]]
            lines.append(f"{k:>12}  " + _cells(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except (ValueError, WeightsError) as error:
        parser.error(str(error))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(_format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
