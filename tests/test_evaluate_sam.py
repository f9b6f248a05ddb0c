"""The end-to-end SAM mode of the evaluation command: detection metrics, wiring, the CLI."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from samsem_plugin import evaluate_sam as sam_module
from samsem_plugin.cache import image_key
from samsem_plugin.evaluate import AnnotatedImage, load_coco, main, split_for_seed
from samsem_plugin.evaluate_sam import (
    EDIT_KINDS,
    SAM_METRICS,
    VARIANTS,
    Detection,
    GroundTruthImage,
    count_edits,
    encode_masks,
    evaluate_sam,
    mask_ap50,
    mask_ious,
)
from samsem_plugin.pipeline import Pipeline
from samsem_plugin.proposer import AutoMaskSettings, SamProposer
from samsem_plugin.regions import Regions
from samsem_plugin.scenes import export_coco, make_scene_dataset, mask_to_uncompressed_rle

# -- hand-made masks -----------------------------------------------------------------------------------

SIZE = (40, 40)


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[y0:y1, x0:x1] = True
    return mask


A1, A2, B1 = _rect(2, 12, 2, 12), _rect(2, 12, 20, 30), _rect(25, 35, 5, 15)
SPURIOUS = _rect(30, 38, 30, 38)
TRUTH_MASKS = np.stack([A1, A2, B1])
TRUTH_LABELS = ("A", "A", "B")


def _edits(masks: list[np.ndarray], labels: list[str | None], scores: list[float]) -> dict[str, int]:
    iou = mask_ious(encode_masks(np.stack(masks)), encode_masks(TRUTH_MASKS))
    return count_edits(iou, labels, scores, TRUTH_LABELS)


def _ap50(masks: list[np.ndarray], labels: list[str], scores: list[float], **kwargs) -> float | None:
    truth = [GroundTruthImage(7, SIZE, TRUTH_LABELS, tuple(encode_masks(TRUTH_MASKS)))]
    rles = encode_masks(np.stack(masks)) if masks else []
    detections = [Detection(7, label, rle, s) for label, rle, s in zip(labels, rles, scores, strict=True)]
    return mask_ap50(truth, detections, **kwargs)


def _expected(**counts: int) -> dict[str, int]:
    full = {kind: counts.get(kind, 0) for kind in EDIT_KINDS}
    return {**full, "edits": sum(full.values()), "objects": 3}


def test_perfect_predictions_give_ap50_one_and_no_edits():
    masks, labels, scores = [A1, A2, B1], ["A", "A", "B"], [0.9, 0.8, 0.7]
    assert _edits(masks, labels, scores) == _expected()
    assert _ap50(masks, labels, scores) == 1.0


def test_each_kind_of_edit_is_counted_once():
    scores = [0.9, 0.8, 0.7, 0.6]
    assert _edits([A1, A2, B1], ["A", "A", "A"], scores[:3]) == _expected(relabels=1)
    assert _edits([A1, A2, B1, SPURIOUS], ["A", "A", "B", "B"], scores) == _expected(deletions=1)
    assert _edits([A1, B1], ["A", "B"], scores[:2]) == _expected(draws=1)
    # a rejected (unlabelled) proposal with the right mask: the annotator only picks the label
    assert _edits([A1, A2, B1], ["A", None, "B"], scores[:3]) == _expected(labels=1)
    # an unlabelled proposal matching nothing costs nothing; one too far off (IoU 0.4) is a draw
    assert _edits([A1, A2, B1, SPURIOUS], ["A", "A", "B", None], scores) == _expected()
    assert _edits([A1, A2, _rect(25, 35, 5, 9)], ["A", "A", None], scores[:3]) == _expected(draws=1)
    # one-to-one: a second labelled copy of an object is a deletion
    assert _edits([A1, A1, A2, B1], ["A", "A", "A", "B"], scores) == _expected(deletions=1)
    # greedy, highest score first: the wrongly labelled copy takes the object, the right one is deleted
    assert _edits([B1, B1, A1, A2], ["A", "B", "A", "A"], scores) == _expected(relabels=1, deletions=1)
    assert _edits([B1, B1, A1, A2], ["B", "A", "A", "A"], scores) == _expected(deletions=1)
    nothing = count_edits(np.zeros((0, 3)), [], [], TRUTH_LABELS)
    assert nothing == _expected(draws=3)


def test_ap50_matches_a_hand_computed_two_class_case():
    # class A: hit (0.9), false positive (0.8), hit (0.7): precision 1 up to recall 0.5, then 2/3
    # (101-point interpolation: 51 points at 1, 50 at 2/3); class B: one hit, AP 1
    masks, labels, scores = [A1, SPURIOUS, A2, B1], ["A", "A", "A", "B"], [0.9, 0.8, 0.7, 0.6]
    expected = ((51 + 50 * 2 / 3) / 101 + 1.0) / 2
    assert _ap50(masks, labels, scores) == pytest.approx(expected, abs=1e-9)
    # the false positive ranked last costs nothing
    assert _ap50(masks, labels, [0.9, 0.5, 0.7, 0.6]) == pytest.approx(1.0)
    # maxDets is applied per image and category: one A detection → A recall 0.5
    perfect = ([A1, A2, B1], ["A", "A", "B"], [0.9, 0.8, 0.7])
    assert _ap50(*perfect, max_detections=1) == pytest.approx((51 / 101 + 1.0) / 2)


def test_ap50_ignores_classes_without_ground_truth_and_handles_empty_inputs():
    masks, labels, scores = [A1, A2, B1, SPURIOUS], ["A", "A", "B", "C"], [0.9, 0.8, 0.7, 0.95]
    assert _ap50(masks, labels, scores) == 1.0  # C has no ground truth here: -1, left out
    assert _ap50([A1, A2], ["A", "A"], [0.9, 0.8]) == pytest.approx(0.5)  # B present, never found
    assert _ap50([], [], []) == 0.0
    assert mask_ap50([GroundTruthImage(1, SIZE, (), ())], []) is None


# -- the mode with the proposer replaced by the ground truth -------------------------------------------

CLASSES = ("a", "b", "c")
GRID = (24, 36)


def _synthetic(n: int) -> tuple[list[AnnotatedImage], dict[int, np.ndarray]]:
    """Images with one object of each class (disjoint squares), vectors near one axis per class."""
    rng = np.random.default_rng(0)
    images, vectors = [], {}
    for image_id in range(1, n + 1):
        masks = []
        for j in range(len(CLASSES)):
            mask = np.zeros(GRID, bool)
            top, left = 2 + image_id % 5, 1 + 11 * j + image_id % 3  # positions differ per image
            mask[top : top + 10, left : left + 9] = True
            masks.append(mask)
        segmentations = tuple(mask_to_uncompressed_rle(m) for m in masks)
        images.append(AnnotatedImage(image_id, None, GRID, CLASSES, segmentations))  # type: ignore[arg-type]
        rows = np.eye(8)[: len(CLASSES)] + rng.normal(0, 0.03, (len(CLASSES), 8))
        vectors[image_id] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return images, vectors


@pytest.mark.parametrize(
    ("proposals", "expected"),
    [
        ("truth", {"ap50": 1.0, "edits_per_image": 0.0, "recall50_class_agnostic": 1.0}),
        (
            "truth without object 0",  # class "a" is never proposed: AP (0 + 1 + 1) / 3
            {"ap50": 2 / 3, "draws_per_image": 1.0, "edits_per_image": 1.0, "recall50_class_agnostic": 2 / 3},
        ),
        (
            "truth with shifted embeddings",  # every mask gets the next object's vector: wrong labels
            {"ap50": 0.0, "relabels_per_image": 3.0, "edits_per_image": 3.0, "recall50_class_agnostic": 1.0},
        ),
        (
            "nothing",  # SAM finds nothing: every object is drawn
            {"ap50": 0.0, "draws_per_image": 3.0, "edits_per_image": 3.0, "recall50_class_agnostic": 0.0},
        ),
    ],
)
def test_ground_truth_proposals_are_matched_to_the_real_ground_truth(monkeypatch, proposals, expected):
    images, vectors = _synthetic(8)
    calls: list[int] = []

    def propose(pipeline, image):
        calls.append(image.image_id)
        regions = Regions.from_masks(image.masks(), proposal_score=np.full(3, 0.9), id_prefix="auto")
        embeddings = vectors[image.image_id]
        if proposals == "nothing":
            return Regions.empty(image.size)
        if proposals == "truth without object 0":
            return regions[1:].with_(embeddings=embeddings[1:])
        if proposals == "truth with shifted embeddings":
            embeddings = np.roll(embeddings, 1, axis=0)
        return regions.with_(embeddings=embeddings)

    monkeypatch.setattr(sam_module, "propose_image", propose)
    from samsem_plugin.classifier import ClassifierSettings

    pipeline = Pipeline(None, None, auto_settings=AutoMaskSettings())  # type: ignore[arg-type]
    seeds, shots = [0, 1], [1, 3]
    results = evaluate_sam(images, vectors, pipeline, shots, seeds, 3, ClassifierSettings(), progress=False)
    tests = {int(i) for seed in seeds for i in split_for_seed(len(images), seed, 3)[1]}
    assert sorted(calls) == sorted(images[i].image_id for i in tests)  # once per image, not per seed/k
    assert results["images_proposed"] == len(tests)
    for k in map(str, shots):
        row = results["ours"][k]
        assert row["objects_per_image"]["per_seed"] == [3.0, 3.0]
        for name, value in expected.items():
            assert row[name]["per_seed"] == pytest.approx([value, value]), (k, name)


# -- the command with the tiny untrained SAM ------------------------------------------------------------

SEEDS = 2
SHOTS = [1, 2]
TEST_IMAGES = 2


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    images, annotations = make_scene_dataset(8, seed=5, size=(96, 128))
    return export_coco(images, annotations, tmp_path_factory.mktemp("coco"), segmentation="mixed")


def _argv(coco_dataset, *extra: str) -> list[str]:
    annotations_path, image_dir = coco_dataset
    return [
        "--coco", str(annotations_path), "--images", str(image_dir),
        "--embedder-model", "test_vit", "--embedder-weights", "random",
        "--shots", ",".join(map(str, SHOTS)), "--seeds", str(SEEDS), "--test-images", str(TEST_IMAGES),
        "--online-images", "0", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sam_run(coco_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "results.json"
    generated: list[tuple[str, AutoMaskSettings]] = []
    original = SamProposer.generate

    def counting(self, image, settings=AutoMaskSettings(), *, key=None):
        generated.append((image_key(image), settings))
        return original(self, image, settings, key=key)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(SamProposer, "generate", counting)
        argv = _argv(
            coco_dataset, "--sam-model-type", "tiny-random", "--points-per-side", "4",
            "--stability-score-thresh", "0.8", "--max-regions", "20", "--json", str(out),
        )  # fmt: skip
        assert main(argv) == 0
    return json.loads(out.read_text()), generated, printed.getvalue()


def test_sam_mode_json_shape_and_ranges(sam_run, coco_dataset):
    results = sam_run[0]
    sam = results["sam"]
    assert set(sam) == {*VARIANTS, "proposals_per_image", "images_proposed", "timing_seconds"}
    images = load_coco(*coco_dataset)
    for variant in VARIANTS:
        assert list(sam[variant]) == [str(k) for k in SHOTS]
        for row in sam[variant].values():
            assert set(row) == set(SAM_METRICS)
            for summary in row.values():
                assert set(summary) == {"mean", "std", "per_seed"} and len(summary["per_seed"]) == SEEDS
            for seed in range(SEEDS):
                value = {name: row[name]["per_seed"][seed] for name in SAM_METRICS}
                assert 0.0 <= value["ap50"] <= 1.0 and 0.0 <= value["recall50_class_agnostic"] <= 1.0
                parts = sum(value[f"{kind}_per_image"] for kind in EDIT_KINDS)
                assert value["edits_per_image"] == pytest.approx(parts)
                # every object a served region matched was matched by some proposal
                found = 1 - value["draws_per_image"] / value["objects_per_image"]
                assert value["recall50_class_agnostic"] >= found - 1e-9
                test = split_for_seed(len(images), seed, TEST_IMAGES)[1]
                objects = np.mean([len(images[i].labels) for i in test])
                assert value["objects_per_image"] == pytest.approx(objects)
                assert value["labelled_per_image"] <= 20  # --max-regions
            recall = row["recall50_class_agnostic"]["per_seed"]
            assert recall == sam["ours"][str(SHOTS[0])]["recall50_class_agnostic"]["per_seed"]
    settings = results["settings"]["sam"]
    assert settings["model_type"] == "tiny-random" and settings["checkpoint"] is None
    assert settings["auto_masks"]["points_per_side"] == 4 and settings["auto_masks"]["box_nms_thresh"] == 0.7
    assert settings["auto_masks"]["stability_score_thresh"] == 0.8 and settings["max_regions"] == 20


def test_sam_runs_once_per_test_image(sam_run, coco_dataset):
    results, generated, _ = sam_run
    images = load_coco(*coco_dataset)
    tests = {int(i) for seed in range(SEEDS) for i in split_for_seed(len(images), seed, TEST_IMAGES)[1]}
    keys = [key for key, _ in generated]
    assert len(keys) == len(set(keys)) == len(tests) == results["sam"]["images_proposed"]
    assert all(settings.points_per_side == 4 for _, settings in generated)


def test_table_has_sam_rows_and_pycocotools_stays_quiet(sam_run):
    printed = sam_run[2]
    assert "SAM mode" in printed and "Loading and preparing" not in printed and "DONE" not in printed
    lines = printed.strip().splitlines()
    assert len(lines) == 2 * (1 + len(SHOTS))  # oracle header + rows, SAM header + rows
    sam_rows = [line.split() for line in lines[len(SHOTS) + 2 :]]
    assert [row[0] for row in sam_rows] == [str(k) for k in SHOTS] and all(len(r) == 11 for r in sam_rows)


def test_missing_checkpoint_and_stray_sam_flags_are_usage_errors(coco_dataset, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(coco_dataset, "--sam-model-type", "vit_b", "--sam-checkpoint", str(tmp_path / "no.pth")))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "SAM vit_b checkpoint: file not found" in err and "sam_vit_b_01ec64.pth" in err
    assert "Here: --sam-checkpoint FILE." in err
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(coco_dataset, "--points-per-side", "8"))
    assert exit_info.value.code == 2
    assert "--points-per-side: the SAM mode needs --sam-model-type" in capsys.readouterr().err
