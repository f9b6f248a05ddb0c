"""The few-shot evaluation command (oracle masks, online curve) and its COCO reading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from samsem_plugin.embedder import MULTI_SCALE_SUFFIX
from samsem_plugin.evaluate import (
    AnnotatedImage,
    decode_segmentation,
    evaluate_online,
    label_metrics,
    load_coco,
    main,
    mean_prototype_labels,
    positives_snapshot,
    split_for_seed,
    summarise,
)
from samsem_plugin.memory import MemorySnapshot
from samsem_plugin.scenes import export_coco, make_scene_dataset, mask_to_uncompressed_rle

SHOTS = [1, 2, 3]
SEEDS = 2
ONLINE_IMAGES = 4


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    images, annotations = make_scene_dataset(10, seed=5, size=(96, 128))
    return export_coco(images, annotations, tmp_path_factory.mktemp("coco"), segmentation="mixed")


@pytest.fixture(scope="module")
def results(coco_dataset, tmp_path_factory):
    annotations_path, image_dir = coco_dataset
    out = tmp_path_factory.mktemp("out") / "results.json"
    argv = [
        "--coco", str(annotations_path), "--images", str(image_dir),
        "--embedder-model", "test_vit", "--embedder-weights", "random",
        "--shots", ",".join(map(str, SHOTS)), "--seeds", str(SEEDS), "--test-images", "4",
        "--online-images", str(ONLINE_IMAGES), "--json", str(out), "--no-progress", "--min-margin", "0.05",
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


# -- the command -------------------------------------------------------------------------------------


def test_json_has_the_documented_shape(results):
    assert set(results) >= {"oracle_masks", "baseline_mean_prototype", "online", "settings"}
    for table in (results["oracle_masks"], results["baseline_mean_prototype"]):
        assert list(table) == [str(k) for k in SHOTS]
        for row in table.values():
            assert set(row) == {"accuracy", "precision", "coverage"}
            for summary in row.values():
                assert set(summary) == {"mean", "std", "per_seed"} and len(summary["per_seed"]) == SEEDS
    settings = results["settings"]
    assert settings["embedder_id"] == "test_vit@random"
    assert settings["classifier"]["min_margin"] == 0.05  # classifier flags reach the settings
    assert settings["annotated_images"] == 10 and settings["test_images"] == 4


def test_metrics_are_consistent_per_seed(results):
    for table in (results["oracle_masks"], results["baseline_mean_prototype"]):
        for row in table.values():
            for seed in range(SEEDS):
                accuracy, coverage = row["accuracy"]["per_seed"][seed], row["coverage"]["per_seed"][seed]
                precision = row["precision"]["per_seed"][seed]
                assert 0 <= accuracy <= coverage <= 1
                if precision is None:
                    assert coverage == 0 and accuracy == 0
                else:
                    assert accuracy == pytest.approx(precision * coverage)
            values = row["accuracy"]["per_seed"]
            assert row["accuracy"]["mean"] == pytest.approx(np.mean(values))
            assert row["accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))
    for row in results["baseline_mean_prototype"].values():  # no reject option
        assert row["coverage"]["per_seed"] == [1.0] * SEEDS
        assert row["precision"]["per_seed"] == row["accuracy"]["per_seed"]


def test_online_curves_are_consistent(results):
    online = results["online"]
    assert online["images"] == ONLINE_IMAGES
    mean = {name: np.array(online[name]["mean"]) for name in online if name != "images"}
    assert all(len(curve) == ONLINE_IMAGES for curve in mean.values())
    np.testing.assert_allclose(mean["edits"], mean["relabels"] + mean["rejections"])
    np.testing.assert_allclose(mean["cumulative_edits"], np.cumsum(mean["edits"]))
    assert (mean["edits"] <= mean["objects"]).all()
    # nothing is known before the first image: every object of it needs an edit
    assert mean["edit_rate"][0] == 1.0 and mean["rejections"][0] == mean["objects"][0]


def test_multi_scale_and_centring_flags_reach_the_embedder_and_classifier(coco_dataset, tmp_path):
    annotations_path, image_dir = coco_dataset
    out = tmp_path / "multi_scale.json"
    argv = [
        "--coco", str(annotations_path), "--images", str(image_dir),
        "--embedder-model", "test_efficientnet", "--embedder-weights", "random", "--multi-scale",
        "--shots", "2", "--seeds", "1", "--test-images", "4", "--online-images", "0",
        "--centring", "none", "--impostor-quantile", "0", "--json", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["multi_scale"] is True
    assert settings["embedder_id"] == "test_efficientnet@random" + MULTI_SCALE_SUFFIX
    assert settings["classifier"]["centring"] == "none" and settings["classifier"]["impostor_quantile"] == 0
    with pytest.raises(SystemExit):  # a ViT has no half-stride stage: a clear usage error
        main([*argv[:4], "--embedder-model", "test_vit", "--multi-scale", "--shots", "2", "--seeds", "1",
              "--test-images", "4", "--online-images", "0", "--no-progress"])  # fmt: skip


def test_cli_entry_point_reports_bad_splits(coco_dataset):
    annotations_path, image_dir = coco_dataset
    completed = subprocess.run(
        [sys.executable, "-m", "samsem_plugin.evaluate", "--coco", str(annotations_path), "--images",
         str(image_dir), "--embedder-model", "test_vit", "--test-images", "10", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "test images: expected 0 < n_test < 10" in completed.stderr


def test_shots_larger_than_the_memory_pool_are_refused(coco_dataset, capsys):
    annotations_path, image_dir = coco_dataset
    with pytest.raises(SystemExit):
        main(["--coco", str(annotations_path), "--images", str(image_dir), "--embedder-model", "test_vit",
              "--shots", "7", "--test-images", "4", "--no-progress"])  # fmt: skip
    assert "shots: expected 1 .. 6 (non-test images), got [7]" in capsys.readouterr().err


# -- COCO reading --------------------------------------------------------------------------------------


def test_polygon_rle_and_uncompressed_rle_decode_to_the_same_pixels():
    # uncompressed RLE, column-major runs starting with zeros: 1 zero, 2 ones, 3 zeros, 1 one, 5 zeros
    literal = {"size": [3, 4], "counts": [1, 2, 3, 1, 5]}
    expected = np.zeros((3, 4), bool)
    expected[1, 0] = expected[2, 0] = expected[0, 2] = True
    np.testing.assert_array_equal(decode_segmentation(literal, 3, 4), expected)
    from pycocotools import mask as mask_utils

    square = np.zeros((20, 30), bool)
    square[4:14, 6:21] = True
    compressed = mask_utils.encode(np.asfortranarray(square.astype(np.uint8)))
    as_text = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    np.testing.assert_array_equal(decode_segmentation(compressed, 20, 30), square)
    np.testing.assert_array_equal(decode_segmentation(as_text, 20, 30), square)
    np.testing.assert_array_equal(decode_segmentation(mask_to_uncompressed_rle(square), 20, 30), square)
    polygon = [[6.0, 4.0, 21.0, 4.0, 21.0, 14.0, 6.0, 14.0]]  # the square's outline in pixel corners
    decoded = decode_segmentation(polygon, 20, 30)
    assert (decoded & square).sum() / (decoded | square).sum() > 0.85
    with pytest.raises(ValueError, match="size"):
        decode_segmentation(literal, 4, 3)
    with pytest.raises(ValueError, match="polygons or an RLE"):
        decode_segmentation("oops", 3, 4)


def _write_coco(tmp_path, coco: dict) -> None:
    (tmp_path / "annotations.json").write_text(json.dumps(coco))


def test_loader_skips_crowds_and_empty_images_and_checks_categories(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "a.png")
    segmentation = {"size": [3, 4], "counts": [1, 2, 9]}
    coco = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 3, "width": 4},
            {"id": 8, "file_name": "b.png", "height": 3, "width": 4},
        ],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": segmentation, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": segmentation, "iscrowd": 1},
            {"id": 3, "image_id": 8, "category_id": 1, "segmentation": segmentation, "iscrowd": 1},
        ],
    }
    _write_coco(tmp_path, coco)
    loaded = load_coco(tmp_path / "annotations.json", tmp_path)
    assert [image.image_id for image in loaded] == [7] and loaded[0].labels == ("thing",)
    assert loaded[0].masks().shape == (1, 3, 4) and loaded[0].masks().sum() == 2
    coco["images"][0]["height"] = 5
    _write_coco(tmp_path, coco)
    with pytest.raises(ValueError, match="a.png"):
        load_coco(tmp_path / "annotations.json", tmp_path)[0].read()
    coco["annotations"][0]["category_id"] = 99
    _write_coco(tmp_path, coco)
    with pytest.raises(ValueError, match="category_id 99"):
        load_coco(tmp_path / "annotations.json", tmp_path)


# -- protocol pieces -------------------------------------------------------------------------------------


def test_label_metrics_and_summaries():
    metrics = label_metrics(["a", None, "b", "a"], ["a", "a", "a", "a"])
    assert metrics == {"accuracy": 0.5, "precision": pytest.approx(2 / 3), "coverage": 0.75}
    assert label_metrics([None, None], ["a", "b"])["precision"] is None
    summary = summarise([0.5, None, 1.0])
    assert summary["mean"] == 0.75 and summary["std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert summarise([0.4])["std"] == 0.0 and summarise([None])["mean"] is None


def test_split_is_a_seeded_partition():
    memory, test = split_for_seed(10, seed=3, n_test=4)
    assert len(test) == 4 and sorted([*memory, *test]) == list(range(10))
    again_memory, again_test = split_for_seed(10, seed=3, n_test=4)
    assert list(again_memory) == list(memory) and list(again_test) == list(test)
    assert list(split_for_seed(10, seed=4, n_test=4)[1]) != list(test)
    with pytest.raises(ValueError, match="n_test"):
        split_for_seed(10, seed=0, n_test=0)


def _unit(rng: np.random.Generator, axis: int, dim: int = 8, noise: float = 0.05) -> np.ndarray:
    vector = np.eye(dim)[axis] + rng.normal(0, noise, dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _synthetic_images(n: int, classes: list[str]) -> tuple[list[AnnotatedImage], dict[int, np.ndarray]]:
    """Images of 2 objects each (tiny masks) whose vectors are near one axis per class."""
    rng = np.random.default_rng(0)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    images, vectors = [], {}
    for image_id in range(n):
        labels = tuple(classes[(image_id + j) % len(classes)] for j in range(2))
        images.append(
            AnnotatedImage(image_id, None, (4, 4), labels, (mask_to_uncompressed_rle(mask),) * 2)  # type: ignore[arg-type]
        )
        vectors[image_id] = np.stack([_unit(rng, classes.index(label)) for label in labels])
    return images, vectors


def test_mean_prototype_baseline_picks_the_nearest_class_mean():
    images, vectors = _synthetic_images(6, ["a", "b", "c"])
    snapshot = positives_snapshot(images[:3], vectors)
    queries = np.concatenate([vectors[i] for i in range(3, 6)])
    truth = [label for image in images[3:] for label in image.labels]
    assert mean_prototype_labels(snapshot, queries).tolist() == truth
    assert mean_prototype_labels(MemorySnapshot.empty(8), queries).tolist() == [None] * len(truth)


def test_online_edits_fall_once_every_class_has_been_seen():
    from samsem_plugin.classifier import ClassifierSettings

    images, vectors = _synthetic_images(14, ["a", "b", "c"])
    settings = ClassifierSettings()
    online = evaluate_online(
        images, vectors, seeds=[0, 1], n_test=2, settings=settings, max_images=12, progress=False
    )
    rate = np.array(online["edit_rate"]["mean"])
    assert rate[0] == 1.0
    assert rate[-4:].mean() < 0.25 * rate[:2].mean()
    cumulative = np.array(online["cumulative_edit_rate"]["mean"])
    assert cumulative[-1] < cumulative[0]
