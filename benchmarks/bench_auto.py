"""Figure 4: automatic pre-annotation of one image, end to end, vs a naive pipeline.

Both arms take a 1024x768 scene and return Label Studio brush results, labelled by a classifier
fitted on exemplars of another scene:

* **ours**: ``Pipeline.predict_auto`` (``SamProposer.generate`` → one backbone pass + pooling →
  classifier → same-label de-duplication → cap) then ``regions_to_results`` (numpy brush RLE);
  every cache is emptied before each repeat.
* **naive**: segment-anything's ``SamAutomaticMaskGenerator`` on the stock model, each mask's crop
  encoded by the backbone (:class:`benchmarks.bench_embed.CropEncoder`), the same classifier
  logic, de-duplication and cap, and ``label_studio_sdk``'s ``brush.mask2rle`` per region.

Same SAM weights (ViT-B, random; ``--quick``: tiny), same backbone (DINOv2 ViT-S/14, random;
``--quick``: ``test_vit``), same generator settings. Evidence: the proposals of both arms are
matched one-to-one, each pair with mask IoU >= 0.99 (float32).

Random ViT-B weights predict IoUs near 0 and stabilities of 0, so SAM's 0.88 / 0.95 thresholds
would keep nothing: the predicted-IoU threshold here is 0.03 (about a quarter of the 768
candidates pass, ~190, each upsampled, scored and boxed by both arms) and stability is not
filtered. Their masks cover most of the image, so NMS leaves one region: this figure is the SAM
path (encoder, 256 decoder prompts, candidate post-processing); the per-region costs of the naive
pipeline (a backbone pass per crop, the SDK's RLE) are measured by the ``embed`` and ``rle``
benchmarks. ``--quick`` runs the tiny SAM at SAM's default thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
from label_studio_sdk.converter import brush
from segment_anything import SamAutomaticMaskGenerator

from benchmarks.bench_embed import CropEncoder
from benchmarks.fixtures import model_choice, our_sam, random_backbone, scene_image, stock_sam
from benchmarks.harness import BenchmarkResult, Comparison, Timing, compare_interleaved, time_once
from samsem_plugin.classifier import FittedClassifier, fit_classifier
from samsem_plugin.embedder import MaskEmbedder
from samsem_plugin.label_config import ControlSpec, parse_label_config
from samsem_plugin.ls_format import regions_to_results
from samsem_plugin.memory import POSITIVE, MemorySnapshot
from samsem_plugin.pipeline import Pipeline, cap_regions, deduplicate_same_label
from samsem_plugin.proposer import AutoMaskSettings, SamProposer
from samsem_plugin.regions import Regions, mask_ious
from samsem_plugin.scenes import DEFAULT_CLASSES, make_scene

TARGET = 3.0
IMAGE_SIZE = (768, 1024)
MAX_REGIONS = 50
REAL_SETTINGS = AutoMaskSettings(points_per_side=16, pred_iou_thresh=0.03, stability_score_thresh=0.0)
TINY_SETTINGS = AutoMaskSettings(points_per_side=16)
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in DEFAULT_CLASSES)
    + "</BrushLabels></View>"
)


def same_masks(ours: np.ndarray, theirs: np.ndarray, min_iou: float = 0.99) -> tuple[bool, float]:
    """Whether the two mask sets match one-to-one with IoU >= ``min_iou``, and the worst IoU."""
    if len(ours) != len(theirs):
        return False, 0.0
    if len(ours) == 0:
        return True, 1.0
    ious = mask_ious(ours, theirs)
    best = ious.max(axis=1)
    one_to_one = len(set(ious.argmax(axis=1).tolist())) == len(theirs)
    return bool(one_to_one and (best >= min_iou).all()), float(best.min())


def fit_on_scene(embed: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> FittedClassifier:
    """A classifier fitted on the labelled objects of two other scenes, embedded with ``embed``."""
    vectors, labels, keys = [], [], []
    for index in (1, 2):
        image, regions = make_scene(index, 11, IMAGE_SIZE)
        vectors.append(embed(image, regions.masks))
        labels += list(regions.labels)
        keys += [(str(index), "a", f"r{i}") for i in range(len(regions))]
    snapshot = MemorySnapshot(np.concatenate(vectors), labels, [POSITIVE] * len(labels), keys)
    return fit_classifier(snapshot)


def naive_results(regions: Regions, control: ControlSpec) -> list[dict]:
    """Label Studio brush results written with the SDK's encoder."""
    results = []
    for index in range(len(regions)):
        label = regions.labels[index]
        rle = brush.mask2rle(regions.masks[index].astype(np.uint8) * 255)
        value = {"format": "rle", "rle": list(rle), "brushlabels": [] if label is None else [label]}
        results.append(
            {"id": f"naive{index}", "from_name": control.name, "type": "brushlabels", "value": value}
        )
    return results


class NaivePipeline:
    """SamAutomaticMaskGenerator + crop-and-encode per mask + classification + SDK encoding."""

    def __init__(self, sam, backbone: torch.nn.Module, settings: AutoMaskSettings, control: ControlSpec):
        self.generator = SamAutomaticMaskGenerator(sam, **asdict(settings), output_mode="binary_mask")
        self.encoder = CropEncoder(backbone)
        self.control = control
        self.classifier = fit_on_scene(self.encoder.encode)
        self.last_masks: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> list[dict]:
        records = self.generator.generate(image)
        masks = (
            np.stack([r["segmentation"] for r in records])
            if records
            else np.zeros((0, *image.shape[:2]), bool)
        )
        self.last_masks = masks
        if not len(masks):
            return []
        scores = np.clip([r["predicted_iou"] for r in records], 0, 1)
        regions = Regions.from_masks(masks, proposal_score=scores, id_prefix="auto")
        regions = regions.with_(embeddings=self.encoder.encode(image, masks))
        classified = self.classifier.classify_regions(regions, self.control.labels)
        return naive_results(cap_regions(deduplicate_same_label(classified), MAX_REGIONS), self.control)


class OurPipeline:
    """``Pipeline.predict_auto`` + ``regions_to_results``, caches emptied by :meth:`forget`."""

    def __init__(
        self, sam, backbone: torch.nn.Module, embedder_id: str, settings: AutoMaskSettings, control, dtype
    ):
        proposer = SamProposer(sam, autocast_dtype=dtype)
        embedder = MaskEmbedder(backbone, embedder_id=embedder_id, autocast_dtype=dtype)
        self.pipeline = Pipeline(proposer, embedder, auto_settings=settings, max_regions=MAX_REGIONS)
        self.control = control
        self.classifier = fit_on_scene(embedder.embed)

    def forget(self) -> None:
        self.pipeline.proposer.cache.clear()
        self.pipeline.embedder.cache.clear()
        self.pipeline.proposal_cache.clear()

    def proposals(self, image: np.ndarray) -> np.ndarray:
        return self.pipeline.embedded_proposals(image).masks

    def __call__(self, image: np.ndarray) -> list[dict]:
        regions = self.pipeline.predict_auto(image, self.classifier, self.control.labels)
        return regions_to_results(regions, self.control, id_prefix="t1-")


def run(quick: bool) -> BenchmarkResult:
    models = model_choice(quick)
    settings = REAL_SETTINGS if models.is_real else TINY_SETTINGS
    result = BenchmarkResult(
        "auto", info={"sam": models.sam, "embedder": models.embedder, "settings": repr(settings)}
    )
    image = scene_image(IMAGE_SIZE, seed=3)
    control = parse_label_config(LABEL_CONFIG).output_controls[0]
    backbone = random_backbone(models.embedder)
    naive = NaivePipeline(stock_sam(models.sam), backbone, settings, control)
    ours = OurPipeline(our_sam(models.sam), backbone, f"{models.embedder}@random", settings, control, None)
    comparison = compare_interleaved(
        "auto pre-annotation fp32 vs naive",
        ("Pipeline.predict_auto + encode", lambda: ours(image)),
        ("generator + crops + SDK RLE", lambda: naive(image)),
        repeats=2,
        baseline_repeats=1 if models.is_real else 2,
        warmup=0,
        setup_ours=ours.forget,
        target_ratio=TARGET if models.is_real else None,
    )
    ours_masks = ours.proposals(image)  # from the proposal cache of the last timed run
    identical, worst = same_masks(ours_masks, naive.last_masks)
    comparison.check = (
        f"{len(naive.last_masks)} proposals, one-to-one IoU>=0.99: {identical} (min {worst:.4f})"
    )
    result.comparisons.append(comparison)
    result.info["proposals"] = int(len(naive.last_masks))
    if models.is_real and not quick:
        fast = OurPipeline(
            our_sam(models.sam), backbone, f"{models.embedder}@random", settings, control, torch.bfloat16
        )
        fast_timing = Timing("Pipeline.predict_auto bf16 + encode")
        fast.forget()
        fast_timing.seconds.append(time_once(lambda: fast(image))[0])
        bf16_masks = fast.proposals(image)
        ious = mask_ious(bf16_masks, naive.last_masks) if len(bf16_masks) and len(naive.last_masks) else None
        matched = 0.0 if ious is None else float((ious.max(axis=1) >= 0.9).mean())
        result.comparisons.append(
            Comparison(
                "auto pre-annotation bf16 vs naive fp32",
                fast_timing,
                comparison.baseline,
                None,
                f"{len(bf16_masks)} vs {len(naive.last_masks)} proposals; {matched:.0%} match at IoU>=0.9",
            )
        )
    return result
