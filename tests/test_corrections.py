"""Corrections → exemplars: a table of annotation / served-prediction cases, then keying."""

import numpy as np
import pytest

from samsem_plugin.corrections import PlannedExemplar, plan_exemplars, to_exemplars
from samsem_plugin.memory import ExemplarMemory
from samsem_plugin.prompts import AnnotatedRegion, ServedRegion

H, W = 12, 12


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


MASKS = {
    "left": box(0, 0, 4, 4),
    "left-grown": box(0, 0, 5, 5),
    "right": box(8, 0, 12, 4),
    "bottom": box(0, 8, 4, 12),
    "corner": box(8, 8, 12, 12),
    "corner-big": box(7, 7, 12, 12),
    "inside-corner": box(9, 9, 11, 11),
    "empty": np.zeros((H, W), bool),
}

SERVED = [
    ServedRegion("s1", "cat", MASKS["left"]),
    ServedRegion("s2", "dog", MASKS["right"]),
    ServedRegion("s3", None, MASKS["bottom"]),
]


def annotated(region_id: str, label: str, mask: str, origin: str | None) -> AnnotatedRegion:
    return AnnotatedRegion(region_id, label, MASKS[mask], origin)


def kept_as_served() -> list[AnnotatedRegion]:
    """s2 and s3 cannot simply vanish in most cases below: keep s2 accepted, s3 labelled."""
    return [annotated("s2", "dog", "right", "prediction"), annotated("s3", "bird", "bottom", "prediction")]


BASE = [("s2", "dog", "positive", "right"), ("s3", "bird", "positive", "bottom")]

CASES = {
    "accepted": (
        [annotated("s1", "cat", "left", "prediction"), *kept_as_served()],
        [("s1", "cat", "positive", "left"), *BASE],
    ),
    "relabelled": (
        [annotated("s1", "dog", "left", "prediction-changed"), *kept_as_served()],
        [("s1", "dog", "positive", "left"), ("s1#neg", "cat", "negative", "left"), *BASE],
    ),
    "geometry-only edit": (
        [annotated("s1", "cat", "left-grown", "prediction-changed"), *kept_as_served()],
        [("s1", "cat", "positive", "left-grown"), *BASE],
    ),
    "deleted labelled": (
        kept_as_served(),
        [*BASE, ("s1#neg", "cat", "negative", "left"), ("s1#bg", None, "background", "left")],
    ),
    "deleted unlabelled": (
        [annotated("s1", "cat", "left", "prediction"), annotated("s2", "dog", "right", "prediction")],
        [
            ("s1", "cat", "positive", "left"),
            ("s2", "dog", "positive", "right"),
            ("s3#bg", None, "background", "bottom"),
        ],
    ),
    "drawn": (
        [
            annotated("s1", "cat", "left", "prediction"),
            *kept_as_served(),
            annotated("m1", "cat", "corner", "manual"),
            annotated("m2", "fox", "inside-corner", None),
        ],
        [
            ("s1", "cat", "positive", "left"),
            *BASE,
            ("m1", "cat", "positive", "corner"),
            ("m2", "fox", "positive", "inside-corner"),
        ],
    ),
    "empty annotation: everything served was wrong": (
        [],
        [
            ("s1#neg", "cat", "negative", "left"),
            ("s1#bg", None, "background", "left"),
            ("s2#neg", "dog", "negative", "right"),
            ("s2#bg", None, "background", "right"),
            ("s3#bg", None, "background", "bottom"),
        ],
    ),
    "deleted and redrawn with the same label: a geometry fix, not background": (
        [annotated("m1", "cat", "left-grown", "manual"), *kept_as_served()],
        [("m1", "cat", "positive", "left-grown"), *BASE],
    ),
    "deleted and redrawn with another label: negative only": (
        [annotated("m1", "lynx", "left-grown", "manual"), *kept_as_served()],
        [("m1", "lynx", "positive", "left-grown"), *BASE, ("s1#neg", "cat", "negative", "left")],
    ),
    "label-less and empty regions teach nothing": (
        [
            annotated("s1", "cat", "left", "prediction"),
            *kept_as_served(),
            annotated("m1", "", "corner", "manual"),
            annotated("m2", "cat", "empty", "manual"),
        ],
        [("s1", "cat", "positive", "left"), *BASE],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_table(case):
    regions, expected = CASES[case]
    plan = plan_exemplars(regions, SERVED)
    got = [(p.region, p.label, p.kind) for p in plan]
    assert got == [(region, label, kind) for region, label, kind, _ in expected]
    for planned, (_, _, _, mask) in zip(plan, expected, strict=True):
        np.testing.assert_array_equal(planned.mask, MASKS[mask])
        assert planned.mask.dtype == bool


def test_nothing_served_nothing_annotated_plans_nothing():
    assert plan_exemplars([], []) == []


def test_unlabelled_served_region_inside_an_annotated_object_is_not_background():
    served = [ServedRegion("s9", None, MASKS["inside-corner"])]
    plan = plan_exemplars([annotated("m1", "cat", "corner-big", "manual")], served)
    assert [(p.region, p.kind) for p in plan] == [("m1", "positive")]


def test_a_drawn_region_reusing_a_served_id_is_not_a_relabel():
    plan = plan_exemplars([annotated("s1", "dog", "left", "manual")], SERVED[:1])
    assert [(p.region, p.label, p.kind) for p in plan] == [("s1", "dog", "positive")]


@pytest.mark.parametrize(
    "regions, served, message",
    [
        ([annotated("a", "cat", "left", None), annotated("a", "dog", "right", None)], [], "appears twice"),
        ([], [ServedRegion("x#1", "cat", MASKS["left"])], "must not contain"),
        (
            [annotated("a", "cat", "left", None)],
            [ServedRegion("s", "cat", np.zeros((5, 5), bool))],
            "one image size",
        ),
        ([AnnotatedRegion("a", "cat", np.zeros(4, bool))], [], r"\(H, W\) mask"),
        ([AnnotatedRegion("", "cat", MASKS["left"])], [], "non-empty string"),
    ],
)
def test_malformed_input_raises(regions, served, message):
    with pytest.raises(ValueError, match=message):
        plan_exemplars(regions, served)


def test_planned_kind_is_validated():
    with pytest.raises(ValueError, match="kind"):
        PlannedExemplar("r", MASKS["left"], "cat", "maybe")


def test_to_exemplars_keys_vectors_and_feeds_the_memory():
    regions, _ = CASES["relabelled"]
    plan = plan_exemplars(regions, SERVED)
    vectors = np.random.default_rng(0).normal(size=(len(plan), 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exemplars = to_exemplars(plan, vectors, task="17", annotation="42")
    assert [e.key for e in exemplars] == [("17", "42", p.region) for p in plan]
    np.testing.assert_allclose(np.stack([e.vector for e in exemplars]), vectors, atol=1e-6)
    memory = ExemplarMemory("p", "s")
    assert memory.replace_annotation("17", "42", exemplars) is True
    assert memory.counts() == {
        ("dog", "positive"): 2,
        ("cat", "negative"): 1,
        ("bird", "positive"): 1,
    }
    assert memory.replace_annotation("17", "42", to_exemplars(plan, vectors, "17", "42")) is False
    with pytest.raises(ValueError, match=r"expected shape \(4, D\)"):
        to_exemplars(plan, vectors[:2], "17", "42")
