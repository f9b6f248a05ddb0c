"""Regions: validation, boxes, indexing, concatenation."""

import numpy as np
import pytest

from samsem_plugin.regions import Regions, boxes_from_masks


def _masks() -> np.ndarray:
    masks = np.zeros((3, 6, 8), dtype=bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4
    masks[1, 5, 7] = True  # single pixel at x=7, y=5
    return masks  # third mask empty


def test_boxes_are_xyxy_pixels_with_exclusive_max_corner():
    boxes = boxes_from_masks(_masks())
    np.testing.assert_array_equal(boxes[0], [2, 1, 5, 3])
    np.testing.assert_array_equal(boxes[1], [7, 5, 8, 6])
    np.testing.assert_array_equal(boxes[2], [0, 0, 0, 0])


def test_from_masks_defaults_and_areas():
    regions = Regions.from_masks(_masks(), id_prefix="m")
    assert len(regions) == 3
    assert regions.image_size == (6, 8)
    assert list(regions.ids) == ["m0", "m1", "m2"]
    assert list(regions.labels) == [None, None, None]
    np.testing.assert_array_equal(regions.areas, [6, 1, 0])
    np.testing.assert_array_equal(regions.proposal_score, [1, 1, 1])


def test_boolean_and_integer_indexing_return_regions():
    regions = Regions.from_masks(_masks(), labels=["a", "b", None], label_score=[0.9, 0.2, 0.0])
    confident = regions[regions.label_score > 0.5]
    assert isinstance(confident, Regions)
    assert list(confident.labels) == ["a"]
    single = regions[1]
    assert len(single) == 1 and single.ids[0] == "r1"
    with pytest.raises(ValueError, match="boolean index"):
        regions[np.array([True, False])]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("boxes", np.zeros((2, 4)), r"boxes: expected shape \(3, 4\)"),
        ("proposal_score", np.zeros(4), r"proposal_score: expected shape \(3,\)"),
        ("labels", ["a"], "labels: expected 3 entries"),
        ("ids", ["x", "x", "y"], "unique"),
        ("embeddings", np.zeros((2, 5)), r"embeddings: expected shape \(3, D\)"),
        ("masks", np.zeros((3, 6, 8), dtype=np.uint8), "dtype bool"),
        ("masks", np.zeros((3, 5, 8), dtype=bool), r"expected shape \(N, 6, 8\)"),
    ],
)
def test_validation_names_field_and_expected_shape(field, value, message):
    regions = Regions.from_masks(_masks())
    with pytest.raises(ValueError, match=message):
        regions.with_(**{field: value})


def test_concatenate_keeps_order_and_embeddings():
    a = Regions.from_masks(_masks()[:2], id_prefix="a").with_(embeddings=np.ones((2, 4)))
    b = Regions.from_masks(_masks()[2:], id_prefix="b").with_(embeddings=np.zeros((1, 4)))
    both = Regions.concatenate([a, b])
    assert list(both.ids) == ["a0", "a1", "b0"]
    assert both.embeddings.shape == (3, 4)
    with pytest.raises(ValueError, match="image sizes differ"):
        Regions.concatenate([a, Regions.empty((2, 2))])


def test_empty_has_zero_rows():
    empty = Regions.empty((4, 5), embedding_dim=7)
    assert len(empty) == 0 and empty.masks.shape == (0, 4, 5) and empty.embeddings.shape == (0, 7)


def test_no_regions_have_no_areas_and_deduplicate_to_nothing():
    from samsem_plugin.pipeline import deduplicate_same_label

    empty = Regions.from_masks(np.zeros((0, 6, 8), bool))
    assert empty.areas.shape == (0,) and empty.areas.dtype == np.int64
    assert len(deduplicate_same_label(empty)) == 0


def test_mask_ious_of_two_stacks():
    from samsem_plugin.regions import mask_ious

    masks = _masks()  # areas 6, 1, 0
    ious = mask_ious(masks, masks[[0, 2]])
    assert ious.shape == (3, 2)
    np.testing.assert_allclose(ious[:, 0], [1.0, masks[1][masks[0]].sum() / 6, 0.0])
    assert ious[2, 1] == 1.0 and ious[0, 1] == 0.0  # two empty masks match; empty vs non-empty: 0
