"""samsem_plugin.pipeline: glue of proposer, embedder and classifier on the tiny real models."""

from __future__ import annotations

import numpy as np
import pytest

from samsem_plugin.classifier import Classification, fit_classifier
from samsem_plugin.memory import NEGATIVE, POSITIVE, MemorySnapshot
from samsem_plugin.pipeline import (
    cap_regions,
    deduplicate_same_label,
    levels_containing_clicks,
    region_scores,
)
from samsem_plugin.prompts import AnnotatedRegion, Prompt, ServedRegion
from samsem_plugin.regions import Regions
from tests.conftest import scene_image

H, W = 48, 64


def box(x0, y0, x1, y1, size=(H, W)):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def empty_classifier():
    return fit_classifier(MemorySnapshot.empty())


class FixedClassifier:
    """A stand-in classifier answering ``label`` with ``probability`` for every embedding."""

    def __init__(self, label, probability=0.9):
        self.label = label
        self.probability = probability
        self.allowed_seen = []

    def classify(self, embeddings, allowed_labels=None):
        self.allowed_seen.append(allowed_labels)
        n = len(embeddings)
        ok = self.label is not None and (allowed_labels is None or self.label in allowed_labels)
        label = self.label if ok else None
        return Classification(
            labels=np.full(n, label, dtype=object),
            probability=np.full(n, self.probability, np.float32),
            best_label=np.full(n, self.label, dtype=object),
            reason=np.full(n, "" if ok else "below_threshold", dtype=object),
            probs=np.zeros((n, 1), np.float32),
            scores=np.zeros((n, 1), np.float32),
        )

    def choose_granularity(self, regions, allowed_labels=None):
        return int(np.argmax(regions.proposal_score))


# -- pure helpers --------------------------------------------------------------------------------


def test_region_scores_multiply_label_probability_only_for_labelled_regions():
    regions = Regions.from_masks(
        np.stack([box(0, 0, 4, 4), box(5, 5, 9, 9)]),
        proposal_score=[0.8, 0.6],
        labels=["Cat", None],
        label_score=[0.5, 0.9],
    )
    np.testing.assert_allclose(region_scores(regions), [0.4, 0.6], rtol=1e-6)


def test_deduplicate_drops_contained_and_overlapping_same_label_regions_only():
    masks = np.stack(
        [
            box(0, 0, 30, 30),  # 0 Cat, best
            box(5, 5, 15, 15),  # 1 Cat, inside 0 → dropped (containment)
            box(1, 0, 30, 30),  # 2 Cat, IoU ~0.97 with 0 → dropped
            box(5, 5, 15, 15),  # 3 Dog, inside 0 but another label → kept
            box(5, 5, 15, 15),  # 4 unlabelled → kept
            box(40, 30, 60, 45),  # 5 Cat, disjoint → kept
        ]
    )
    regions = Regions.from_masks(
        masks,
        proposal_score=[0.9, 0.8, 0.85, 0.7, 0.95, 0.5],
        labels=["Cat", "Cat", "Cat", "Dog", None, "Cat"],
        label_score=[1.0, 1.0, 1.0, 1.0, 0.0, 1.0],
    )
    kept = deduplicate_same_label(regions, iou_threshold=0.5, containment_threshold=0.8)
    assert sorted(kept.ids.tolist()) == ["r0", "r3", "r4", "r5"]
    scores = region_scores(kept)
    assert np.all(np.diff(scores) <= 0), "survivors come in decreasing score order"


def test_deduplicate_keeps_partial_overlap_below_thresholds():
    regions = Regions.from_masks(
        np.stack([box(0, 0, 20, 20), box(10, 0, 30, 20)]),  # IoU 1/3, half of each inside the other
        labels=["Cat", "Cat"],
        label_score=[1.0, 0.9],
    )
    assert len(deduplicate_same_label(regions, iou_threshold=0.5, containment_threshold=0.8)) == 2
    assert len(deduplicate_same_label(regions, iou_threshold=0.3, containment_threshold=0.8)) == 1


@pytest.mark.parametrize("bad", [{"iou_threshold": 0.0}, {"containment_threshold": 1.5}])
def test_deduplicate_rejects_bad_thresholds(bad):
    regions = Regions.from_masks(np.stack([box(0, 0, 2, 2)]))
    with pytest.raises(ValueError, match="expected a value in"):
        deduplicate_same_label(regions, **bad)


def test_cap_keeps_labelled_regions_first_then_by_score():
    masks = np.stack([box(i * 6, 0, i * 6 + 5, 5) for i in range(5)])
    regions = Regions.from_masks(
        masks,
        proposal_score=[0.99, 0.2, 0.5, 0.98, 0.4],
        labels=[None, "Cat", "Dog", None, "Cat"],
        label_score=[0, 0.9, 0.9, 0, 0.5],
    )
    assert cap_regions(regions, 3).ids.tolist() == ["r2", "r4", "r1"]  # scores 0.45, 0.2, 0.18
    assert cap_regions(regions, 4).ids.tolist() == ["r2", "r4", "r1", "r0"]
    assert len(cap_regions(regions, 0)) == 0


def test_levels_containing_clicks_prefers_masks_with_every_positive_click():
    levels = Regions.from_masks(np.stack([box(0, 0, 10, 10), box(0, 0, 30, 30), box(20, 20, 40, 40)]))
    one_click = Prompt(points=[[5.5, 5.5]], point_labels=[1])
    assert levels_containing_clicks(levels, one_click).tolist() == [True, True, False]
    two_clicks = Prompt(points=[[5.5, 5.5], [25.0, 25.0]], point_labels=[1, 1])
    assert levels_containing_clicks(levels, two_clicks).tolist() == [False, True, False]
    negative_only_far = Prompt(points=[[5.5, 5.5], [60.0, 45.0]], point_labels=[0, 1])
    assert levels_containing_clicks(levels, negative_only_far).tolist() == [True, True, True]
    box_only = Prompt(points=np.zeros((0, 2)), point_labels=[], box=[0, 0, 10, 10])
    assert levels_containing_clicks(levels, box_only).tolist() == [True, True, True]


# -- on the tiny real models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    return scene_image(11)


def test_predict_auto_with_empty_memory_proposes_only_unlabelled_masks(tiny_models, image):
    pipeline = tiny_models.pipeline
    regions = pipeline.predict_auto(image, empty_classifier(), ["Cat", "Dog"])
    assert 1 <= len(regions) <= pipeline.max_regions
    assert regions.image_size == (H, W)
    assert all(label is None for label in regions.labels)
    assert regions.ids.tolist() == [f"auto{i}" for i in range(len(regions))]
    assert regions.embeddings is not None and regions.embeddings.shape[0] == len(regions)
    assert regions.areas.min() > 0


def test_predict_auto_labels_a_remembered_mask_and_respects_allowed_labels(tiny_models, image):
    pipeline = tiny_models.pipeline
    proposals = pipeline.predict_auto(image, empty_classifier(), None)
    target = proposals.masks[0]
    exemplars = pipeline.plan_learning(
        image, [AnnotatedRegion("a1", "Cat", target, origin="manual")], [], task="7", annotation="70"
    )
    classifier = fit_classifier(MemorySnapshot.from_exemplars(exemplars))
    labelled = pipeline.predict_auto(image, classifier, ["Cat", "Dog"])
    same = [i for i in range(len(labelled)) if np.array_equal(labelled.masks[i], target)]
    labels_of_same = {labelled.labels[i] for i in same}
    # the remembered mask itself is named (or removed as a duplicate of a better-scored Cat mask)
    assert labels_of_same <= {"Cat"} and "Cat" in set(labelled.labels.tolist())
    restricted = pipeline.predict_auto(image, classifier, ["Dog"])
    assert "Cat" not in set(restricted.labels.tolist())


def test_predict_auto_caps_regions(tiny_models, image):
    from samsem_plugin.pipeline import Pipeline

    small = Pipeline(
        tiny_models.proposer,
        tiny_models.embedder,
        auto_settings=tiny_models.pipeline.auto_settings,
        max_regions=2,
    )
    assert len(small.predict_auto(image, empty_classifier(), None)) <= 2


class CountingProposer:
    """Wraps the real proposer, counting automatic-mask runs."""

    def __init__(self, proposer):
        self.proposer = proposer
        self.generate_calls = 0

    def generate(self, image, settings, *, key=None):
        self.generate_calls += 1
        return self.proposer.generate(image, settings, key=key)


@pytest.mark.parametrize(("cache_bytes", "runs"), [(64 << 20, 1), (0, 2)])
def test_automatic_proposals_are_cached_across_memory_changes(tiny_models, image, cache_bytes, runs):
    from samsem_plugin.pipeline import Pipeline

    counting = CountingProposer(tiny_models.proposer)
    pipeline = Pipeline(
        counting,
        tiny_models.embedder,
        auto_settings=tiny_models.pipeline.auto_settings,
        max_regions=50,
        proposal_cache_bytes=cache_bytes,
    )
    first = pipeline.predict_auto(image, empty_classifier(), None)
    exemplars = pipeline.plan_learning(image, [AnnotatedRegion("a", "Cat", first.masks[0])], [], "1", "2")
    second = pipeline.predict_auto(image, fit_classifier(MemorySnapshot.from_exemplars(exemplars)), None)
    assert counting.generate_calls == runs
    assert "Cat" in set(second.labels.tolist()), "the cached proposals are classified afresh"
    assert all(label is None for label in first.labels)


def test_predict_prompt_returns_one_region_containing_the_click(tiny_models, image):
    pipeline = tiny_models.pipeline
    prompt = Prompt(points=[[19.5, 17.5]], point_labels=[1], label="Cat")
    regions = pipeline.predict_prompt(image, prompt, empty_classifier(), ["Cat", "Dog"])
    assert len(regions) == 1 and regions.ids.tolist() == ["prompt0"]
    assert regions.masks.shape == (1, H, W)
    assert regions.masks[0, 17, 19], "the mask contains the clicked pixel"
    assert regions.labels[0] == "Cat" and regions.extra["label_source"][0] == "prompt"
    assert regions.label_score[0] == 1.0


def test_predict_prompt_label_comes_from_memory_then_prompt_then_none(tiny_models, image):
    pipeline = tiny_models.pipeline
    prompt = Prompt(points=[[19.5, 17.5]], point_labels=[1], label="Cat")
    confident = pipeline.predict_prompt(image, prompt, FixedClassifier("Dog", 0.8), ["Cat", "Dog"])
    assert confident.labels[0] == "Dog" and confident.extra["label_source"][0] == "memory"
    assert confident.label_score[0] == pytest.approx(0.8)
    unsure = pipeline.predict_prompt(image, prompt, FixedClassifier(None), ["Cat", "Dog"])
    assert unsure.labels[0] == "Cat" and unsure.extra["label_source"][0] == "prompt"
    not_allowed = pipeline.predict_prompt(image, prompt, FixedClassifier(None), ["Dog"])
    assert not_allowed.labels[0] is None and not_allowed.extra["label_source"][0] == "none"
    assert not_allowed.label_score[0] == 0.0


def test_clicks_on_a_warmed_image_reuse_the_cached_encodings(tiny_models):
    pipeline = tiny_models.pipeline
    fresh = scene_image(12345)
    sam_before, backbone_before = tiny_models.proposer.encoder_calls, tiny_models.embedder.forward_calls
    pipeline.warm(fresh)
    assert tiny_models.proposer.encoder_calls == sam_before + 1
    assert tiny_models.embedder.forward_calls == backbone_before + 1
    for x in (10.0, 40.0):
        pipeline.predict_prompt(fresh, Prompt(points=[[x, 20.0]], point_labels=[1]), empty_classifier(), None)
    assert tiny_models.proposer.encoder_calls == sam_before + 1
    assert tiny_models.embedder.forward_calls == backbone_before + 1


def test_plan_learning_embeds_corrections_into_keyed_exemplars(tiny_models, image):
    pipeline = tiny_models.pipeline
    relabelled = box(5, 5, 25, 25)
    annotated = [
        AnnotatedRegion("r1", "Dog", relabelled, origin="prediction-changed"),
        AnnotatedRegion("r2", "Cat", box(30, 20, 50, 40), origin="manual"),
    ]
    served = [ServedRegion("r1", "Cat", relabelled)]
    exemplars = pipeline.plan_learning(image, annotated, served, task="3", annotation="30")
    kinds = {(e.region, e.label, e.kind) for e in exemplars}
    assert kinds == {("r1", "Dog", POSITIVE), ("r1#neg", "Cat", NEGATIVE), ("r2", "Cat", POSITIVE)}
    assert all(e.task == "3" and e.annotation == "30" for e in exemplars)
    vectors = np.stack([e.vector for e in exemplars])
    assert vectors.shape == (3, tiny_models.embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_plan_learning_of_an_empty_annotation_touches_no_model(tiny_models):
    fresh = scene_image(999)
    before = tiny_models.embedder.forward_calls
    assert tiny_models.pipeline.plan_learning(fresh, [], [], task="1", annotation="2") == []
    assert tiny_models.embedder.forward_calls == before


@pytest.mark.parametrize(
    "bad",
    [np.zeros((H, W), np.uint8), np.zeros((H, W, 3), np.float32), np.zeros((H, W, 4), np.uint8), [[1, 2, 3]]],
)
def test_pipeline_rejects_images_that_are_not_hw3_uint8(tiny_models, bad):
    with pytest.raises(ValueError, match=r"image: expected"):
        tiny_models.pipeline.predict_auto(bad, empty_classifier(), None)


def test_a_click_an_automatic_prediction_and_a_warm_up_hash_the_image_once(tiny_models, image, monkeypatch):
    from samsem_plugin import cache, embedder, pipeline, proposer

    calls = []

    def counting_key(array):
        calls.append(array.shape)
        return cache.image_key(array)

    for module in (embedder, pipeline, proposer):
        monkeypatch.setattr(module, "image_key", counting_key)
    fresh = image.copy()
    fresh[0, 0] ^= 1  # not yet in any cache
    prompt = Prompt(points=[[19.5, 17.5]], point_labels=[1])
    clicked = tiny_models.pipeline.predict_prompt(fresh, prompt, empty_classifier())
    assert len(calls) == 1 and clicked.masks[0, 17, 19]
    tiny_models.pipeline.predict_auto(fresh, empty_classifier(), None)
    assert len(calls) == 2
    tiny_models.pipeline.warm(fresh)
    assert len(calls) == 3
    sam_key = cache.image_key(fresh)
    assert sam_key in tiny_models.pipeline.proposer.cache and sam_key in tiny_models.pipeline.embedder.cache
