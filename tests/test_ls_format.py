"""Label Studio results ⇄ regions and smart context → prompt, against the real payload fixtures."""

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface
from skimage.measure import points_in_poly

from samsem_plugin.brush_rle import rle_encode
from samsem_plugin.label_config import parse_label_config
from samsem_plugin.ls_format import (
    context_to_prompt,
    fill_polygon,
    mask_to_polygon,
    regions_to_results,
    results_to_annotated,
    results_to_served,
)
from samsem_plugin.regions import Regions
from tests.support import FIXTURES

INTERACTIVE = json.loads((FIXTURES / "predict_interactive.json").read_text())
XML = INTERACTIVE["label_config"]
CONFIG = parse_label_config(XML)
INTERFACE = LabelInterface(XML)
H, W = 48, 64  # the fixture images


def control(name):
    return CONFIG.control_for(name)


def disc(height, width, cy, cx, radius):
    rows, cols = np.mgrid[:height, :width]
    return (rows + 0.5 - cy) ** 2 + (cols + 0.5 - cx) ** 2 < radius**2


def box_mask(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def sample_regions():
    masks = np.stack(
        [
            box_mask(H, W, 3, 5, 30, 20),
            disc(H, W, 30, 40, 10),
            box_mask(H, W, 0, 0, W, H),
            np.zeros((H, W), bool),  # empty: left out
        ]
    )
    return Regions.from_masks(
        masks,
        proposal_score=[0.9, 0.8, 0.5, 0.4],
        labels=["Cat", None, "Dog", "Cat"],
        label_score=[0.5, 0.0, 0.25, 1.0],
    )


def leaf_types(node) -> set:
    """Types of the leaves of a JSON-like tree (dict keys included)."""
    if isinstance(node, dict):
        return {type(key) for key in node} | set().union(*(leaf_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(leaf_types(v) for v in node))
    return {type(node)}


# -- regions → results ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["brush", "poly", "rect"])
def test_predictions_validate_against_the_fixture_config(name):
    results = regions_to_results(sample_regions(), control(name), id_prefix="t1-")
    assert len(results) == 3  # the empty region is left out
    prediction = {"result": results, "score": 0.5, "model_version": "v"}
    assert INTERFACE.validate_prediction(prediction, return_errors=True) == []
    assert leaf_types(prediction) <= {str, int, float, bool, type(None)}  # no numpy scalars
    json.dumps(prediction)
    first = results[0]
    assert first["from_name"] == name and first["to_name"] == "image"
    assert first["type"] == control(name).result_type
    assert (first["original_width"], first["original_height"], first["image_rotation"]) == (W, H, 0)
    assert first["readonly"] is False
    assert first["value"][first["type"]] == ["Cat"]
    assert results[1]["value"][first["type"]] == []  # unlabelled


def test_ids_are_unique_across_controls_and_scores_combine():
    regions = sample_regions()
    results = [
        r
        for name in ("brush", "poly", "rect")
        for r in regions_to_results(regions, control(name), id_prefix="p7-")
    ]
    ids = [r["id"] for r in results]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i.startswith("p7-") for i in ids)
    brush_results = regions_to_results(regions, control("brush"), id_prefix="x")
    assert [r["id"] for r in brush_results] == ["xbrush-0", "xbrush-1", "xbrush-2"]
    assert [r["score"] for r in brush_results] == pytest.approx([0.9 * 0.5, 0.8, 0.5 * 0.25])


def test_labels_outside_the_control_are_rejected():
    regions = Regions.from_masks(np.ones((1, H, W), bool), labels=["Horse"], label_score=[0.9])
    with pytest.raises(ValueError, match=r"\['Horse'\] are not labels of control 'brush'"):
        regions_to_results(regions, control("brush"), id_prefix="")


def test_non_output_controls_and_bad_tolerance_are_rejected():
    regions = sample_regions()
    with pytest.raises(ValueError, match="KeyPointLabels"):
        regions_to_results(regions, control("kp"), id_prefix="")
    with pytest.raises(ValueError, match="polygon_tolerance"):
        regions_to_results(regions, control("poly"), id_prefix="", polygon_tolerance=-1)


def test_rectangle_value_is_the_box_in_percent():
    regions = Regions.from_masks(box_mask(H, W, 16, 12, 48, 36)[None])
    (result,) = regions_to_results(regions, control("rect"), id_prefix="")
    value = result["value"]
    box = [value[key] for key in ("x", "y", "width", "height", "rotation")]
    assert box == [25.0, 25.0, 50.0, 50.0, 0]


def test_polygon_points_are_percent_pixel_corners():
    regions = Regions.from_masks(box_mask(H, W, 16, 12, 48, 36)[None], labels=["Dog"], label_score=[1])
    (result,) = regions_to_results(regions, control("poly"), id_prefix="")
    corners = sorted(map(tuple, result["value"]["points"]))
    assert corners == [(25.0, 25.0), (25.0, 75.0), (75.0, 25.0), (75.0, 75.0)]


# -- round trips ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_brush_round_trip_is_exact(height, width, seed):
    mask = np.random.default_rng(seed).random((height, width)) < 0.3
    mask[0, 0] = True
    results = regions_to_results(Regions.from_masks(mask[None]), control("brush"), id_prefix="")
    (served,) = results_to_served(results, height, width, CONFIG)
    np.testing.assert_array_equal(served.mask, mask)
    assert served.label is None and served.control == "brush"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 50), st.integers(1, 50), st.data())
def test_rectangle_round_trip_is_exact(height, width, data):
    x0, y0 = data.draw(st.integers(0, width - 1)), data.draw(st.integers(0, height - 1))
    x1, y1 = data.draw(st.integers(x0 + 1, width)), data.draw(st.integers(y0 + 1, height))
    mask = box_mask(height, width, x0, y0, x1, y1)
    results = regions_to_results(
        Regions.from_masks(mask[None], labels=["Dog"], label_score=[1]), control("rect"), id_prefix=""
    )
    (region,) = results_to_annotated(results, height, width, CONFIG)
    np.testing.assert_array_equal(region.mask, mask)
    assert region.label == "Dog"


@pytest.mark.parametrize(
    "mask",
    [
        box_mask(H, W, 5, 7, 41, 30),
        disc(H, W, 24, 30, 15),
        disc(480, 640, 200, 300, 150),
    ],
    ids=["rectangle", "disc", "large-disc"],
)
def test_polygon_round_trip_keeps_the_shape(mask):
    height, width = mask.shape
    regions = Regions.from_masks(mask[None], labels=["Cat"], label_score=[1])
    (result,) = regions_to_results(regions, control("poly"), id_prefix="")
    assert len(result["value"]["points"]) >= 3
    (region,) = results_to_annotated([result], height, width, CONFIG)
    assert iou(region.mask, mask) >= 0.95


def test_unsimplified_polygon_of_a_staircase_is_exact():
    mask = np.tril(np.ones((20, 20), bool))
    regions = Regions.from_masks(mask[None])
    (result,) = regions_to_results(regions, control("poly"), id_prefix="", polygon_tolerance=0)
    (served,) = results_to_served([result], 20, 20, CONFIG)
    np.testing.assert_array_equal(served.mask, mask)


@pytest.mark.parametrize(
    ("large", "small"),
    [((20, 20, 50, 40), (2, 2, 10, 10)), ((2, 2, 40, 30), (50, 35, 60, 45))],
    ids=["large-last", "large-first"],
)
def test_polygon_keeps_the_largest_part(large, small):
    mask = box_mask(H, W, *large) | box_mask(H, W, *small)
    polygon = mask_to_polygon(mask, tolerance=0)
    np.testing.assert_array_equal(fill_polygon(polygon, H, W), box_mask(H, W, *large))


def test_polygon_edge_cases():
    assert mask_to_polygon(np.zeros((4, 4), bool)) is None
    assert len(mask_to_polygon(box_mask(4, 4, 1, 1, 2, 2), tolerance=5.0)) >= 3  # single pixel


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(-5, 45), st.floats(-5, 35)), min_size=3, max_size=12))
def test_fill_polygon_sets_exactly_the_pixels_whose_centre_is_inside(points):
    points = np.asarray(points)
    height, width = 30, 40
    rows, cols = np.mgrid[:height, :width]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    expected = points_in_poly(centres, points).reshape(height, width)
    got = fill_polygon(points, height, width)
    # points_in_poly is unspecified for centres on an edge: compare away from edges only
    start, end = points, np.roll(points, -1, axis=0)
    d = end - start
    t = np.clip(((centres[:, None, :] - start) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)
    distance = np.linalg.norm(centres[:, None, :] - (start + t[..., None] * d), axis=-1).min(axis=1)
    clear = distance.reshape(height, width) > 1e-6
    np.testing.assert_array_equal(got[clear], expected[clear])


# -- results → masks: fixtures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [("webhook_annotation_created_brush.json", "Dog"), ("webhook_annotation_updated_brush.json", "Cat")],
)
def test_webhook_brush_results_decode_like_the_sdk(name, label):
    payload = json.loads((FIXTURES / name).read_text())
    config = parse_label_config(payload["project"]["label_config"])
    results = payload["annotation"]["result"]
    (region,) = results_to_annotated(results, H, W, config)
    expected = brush.decode_rle(results[0]["value"]["rle"]).reshape(H, W, 4)[..., 3] >= 128
    assert region.mask.shape == (H, W)
    np.testing.assert_array_equal(region.mask, expected)
    assert (region.region_id, region.label, region.control) == ("ann-brush-1", label, "brush")
    assert region.origin is None  # created through the API: no origin


def test_served_fixture_prediction_decodes_brush_and_rectangle():
    results = INTERACTIVE["tasks"][0]["predictions"][0]["result"]
    served = {r.region_id: r for r in results_to_served(results, H, W, CONFIG)}
    expected_brush = brush.decode_rle(results[0]["value"]["rle"]).reshape(H, W, 4)[..., 3] >= 128
    np.testing.assert_array_equal(served["brush1"].mask, expected_brush)
    # rect: x 31.25 % → 20 px, width 31.25 % → 20 px; y 20.8 % → 9.984 px, height 41.7 % → 20.016 px
    rows, cols = np.mgrid[:H, :W] + 0.5
    expected_rect = (cols >= 20) & (cols < 40) & (rows >= 9.984) & (rows < 30.0)
    np.testing.assert_array_equal(served["rect1"].mask, expected_rect)
    assert served["rect1"].label == "Cat" and served["rect1"].control == "rect"


def test_reading_skips_what_is_not_a_labelled_region_of_an_output_control():
    base = regions_to_results(
        Regions.from_masks(disc(H, W, 20, 20, 8)[None], labels=["Cat"], label_score=[1]),
        control("brush"),
        id_prefix="",
    )[0]
    unlabelled = dict(base, id="u", value=dict(base["value"], brushlabels=[]))
    foreign_label = dict(base, id="f", value=dict(base["value"], brushlabels=["Horse"]))
    other_control = dict(base, id="o", from_name="not-in-config")
    keypoint = {
        "id": "k",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "value": {"x": 1, "y": 1, "width": 1, "keypointlabels": ["Cat"]},
    }
    relation = {"from_id": "a", "to_id": "b", "type": "relation", "direction": "right"}
    textarea = {
        "id": "t",
        "from_name": "note",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["x"]},
    }
    empty_polygon = {
        "id": "e",
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "value": {"points": [[0, 0], [0.1, 0], [0, 0.1]], "polygonlabels": ["Cat"]},
    }
    results = [base, unlabelled, foreign_label, other_control, keypoint, relation, textarea, empty_polygon]
    annotated = results_to_annotated(results, H, W, CONFIG)
    assert [a.region_id for a in annotated] == [base["id"]]
    served = results_to_served(results, H, W, CONFIG)
    assert [(s.region_id, s.label) for s in served] == [(base["id"], "Cat"), ("u", None), ("f", "Horse")]


def test_origin_is_copied():
    result = regions_to_results(
        Regions.from_masks(disc(H, W, 20, 20, 8)[None], labels=["Dog"], label_score=[1]),
        control("poly"),
        id_prefix="",
    )[0]
    for origin in ("prediction", "prediction-changed", "manual"):
        (region,) = results_to_annotated([dict(result, origin=origin)], H, W, CONFIG)
        assert region.origin == origin


def test_brush_of_another_size_is_resized_to_the_image():
    small = box_mask(24, 32, 8, 6, 24, 18)
    result = {
        "id": "s",
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 32,
        "original_height": 24,
        "value": {"format": "rle", "rle": rle_encode(small), "brushlabels": ["Cat"]},
    }
    (region,) = results_to_annotated([result], H, W, CONFIG)
    np.testing.assert_array_equal(region.mask, box_mask(H, W, 16, 12, 48, 36))


def test_rotated_rectangle_turns_clockwise_around_its_top_left_corner():
    # 20 x 10 px rectangle at (30, 10) turned by 90°: it now spans x 20..30, y 10..30
    value = {"x": 30 / W * 100, "y": 10 / H * 100, "width": 20 / W * 100, "height": 10 / H * 100}
    result = {
        "id": "r",
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": dict(value, rotation=90, rectanglelabels=["Dog"]),
    }
    (region,) = results_to_annotated([result], H, W, CONFIG)
    np.testing.assert_array_equal(region.mask, box_mask(H, W, 20, 10, 30, 30))


def _brush_result(**changes):
    result = {
        "id": "bad",
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": rle_encode(box_mask(H, W, 1, 1, 5, 5)), "brushlabels": ["Cat"]},
    }
    result.update(changes)
    return result


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (_brush_result(original_width=63), r"'bad'.*size mismatch"),
        (_brush_result(original_width=0), r"'bad'.*original_width: expected a positive integer"),
        (_brush_result(original_height=math.inf), r"'bad'.*original_height: expected a positive integer"),
        (_brush_result(original_height="48"), r"'bad'.*original_height: expected a positive integer"),
        (
            _brush_result(value={"format": "rle", "rle": [1, 2, 3], "brushlabels": ["Cat"]}),
            r"'bad'.*truncated",
        ),
        (_brush_result(value={"format": "png", "brushlabels": ["Cat"]}), r"'bad'.*format 'rle'"),
        (_brush_result(value=[1, 2]), r"'bad'.*value to be an object"),
        (_brush_result(value={"format": "rle", "rle": [0], "brushlabels": "Cat"}), r"'bad'.*list of strings"),
        (
            {"id": "p", "from_name": "poly", "type": "polygonlabels", "value": {"points": [[1, 2]]}},
            r"'p'.*>= 3 \[x, y\] pairs",
        ),
        (
            {
                "id": "p",
                "from_name": "poly",
                "type": "polygonlabels",
                "value": {"points": [[1, "a"], [1, 2], [3, 4]]},
            },
            r"'p'.*value.points",
        ),
        (
            {
                "id": "r",
                "from_name": "rect",
                "type": "rectanglelabels",
                "value": {"x": 1, "y": 2, "width": 3},
            },
            r"'r'.*value.height: expected a number",
        ),
        (
            {
                "id": "r",
                "from_name": "rect",
                "type": "rectanglelabels",
                "value": {"x": 1, "y": 2, "width": 3, "height": math.inf},
            },
            r"'r'.*value.height: expected a finite number",
        ),
    ],
)
def test_malformed_results_raise_value_error_naming_the_region(result, message):
    with pytest.raises(ValueError, match=message):
        results_to_annotated([result], H, W, CONFIG)


def test_results_must_be_a_list_and_size_positive():
    with pytest.raises(ValueError, match="list of result dicts"):
        results_to_served({"result": []}, H, W, CONFIG)
    with pytest.raises(ValueError, match="image size"):
        results_to_annotated([], 0, W, CONFIG)


# -- Labels + Brush variant ----------------------------------------------------------------------

MERGED_XML = """<View>
  <Image name="img" value="$image"/>
  <Labels name="tag" toName="img"><Label value="Car"/><Label value="Tree"/></Labels>
  <Brush name="br" toName="img"/>
  <Polygon name="pg" toName="img"/>
</View>"""


@pytest.mark.parametrize("result_type", ["BrushLabels", "PolygonLabels"])
def test_labels_with_tool_variant_writes_and_reads(result_type):
    config = parse_label_config(MERGED_XML)
    spec = config.control_for("tag", result_type)
    regions = Regions.from_masks(disc(H, W, 24, 30, 12)[None], labels=["Tree"], label_score=[0.7])
    results = regions_to_results(regions, spec, id_prefix="m-")
    assert results[0]["from_name"] == "tag" and results[0]["type"] == result_type.lower()
    prediction = {"result": results, "score": 0.7, "model_version": "v"}
    assert LabelInterface(MERGED_XML).validate_prediction(prediction, return_errors=True) == []
    (region,) = results_to_annotated(results, H, W, config)
    assert region.label == "Tree" and region.control == "tag"
    assert iou(region.mask, regions.masks[0]) >= 0.95


def test_labels_with_two_tools_gives_unique_ids():
    config = parse_label_config(MERGED_XML)
    masks = np.stack([disc(H, W, 24, 30, 12), disc(H, W, 10, 10, 5), disc(H, W, 40, 50, 5)])
    regions = Regions.from_masks(masks, labels=["Car", "Tree", None], label_score=[0.9, 0.8, 0])
    results = [
        result
        for spec in config.output_controls
        for result in regions_to_results(regions, spec, id_prefix="m-")
    ]
    assert sorted(r["id"] for r in results) == [  # the unlabelled region is left out
        "m-tag-brush-0",
        "m-tag-brush-1",
        "m-tag-polygon-0",
        "m-tag-polygon-1",
    ]
    prediction = {"result": results, "score": 0.7, "model_version": "v"}
    assert LabelInterface(MERGED_XML).validate_prediction(prediction, return_errors=True) == []


# -- smart context → prompt ----------------------------------------------------------------------


def test_fixture_keypoint_becomes_a_positive_pixel_point():
    prompt = context_to_prompt(INTERACTIVE["params"]["context"], CONFIG, H, W)
    np.testing.assert_allclose(prompt.points, [[6.4, 4.8]], rtol=1e-6)
    np.testing.assert_array_equal(prompt.point_labels, [1])
    assert prompt.box is None
    assert (prompt.label, prompt.control) == ("Cat", "kp")


def keypoint(x, y, label="Cat", from_name="kp", **extra):
    value = {"x": x, "y": y, "width": 1, "keypointlabels": [label] if label else []}
    value.update(extra.pop("value", {}))
    return {"type": "keypointlabels", "from_name": from_name, "to_name": "image", "value": value, **extra}


def rectangle(x, y, w, h, label="Dog", rotation=0):
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}
    return {"type": "rectanglelabels", "from_name": "rect", "to_name": "image", "value": value}


@pytest.mark.parametrize(
    ("regions", "points", "point_labels", "box", "label", "control_name"),
    [
        ([keypoint(50, 50)], [[32, 24]], [1], None, "Cat", "kp"),
        ([keypoint(50, 50, is_positive=False)], [[32, 24]], [0], None, "Cat", "kp"),
        ([keypoint(50, 50, value={"positive": False})], [[32, 24]], [0], None, "Cat", "kp"),
        ([keypoint(50, 50, is_positive="false")], [[32, 24]], [0], None, "Cat", "kp"),
        ([keypoint(50, 50, is_positive="true")], [[32, 24]], [1], None, "Cat", "kp"),
        ([keypoint(50, 50, value={"positive": True}, is_positive=False)], [[32, 24]], [0], None, "Cat", "kp"),
        (
            [keypoint(25, 50), keypoint(75, 50, is_positive=False)],
            [[16, 24], [48, 24]],
            [1, 0],
            None,
            "Cat",
            "kp",
        ),
        ([keypoint(150, -10)], [[64, 0]], [1], None, "Cat", "kp"),  # clipped
        ([keypoint(50, 50, label="Horse")], [[32, 24]], [1], None, None, "kp"),
        ([keypoint(50, 50, from_name="elsewhere")], [[32, 24]], [1], None, None, "elsewhere"),
        ([rectangle(25, 25, 50, 50)], [], [], [16, 12, 48, 36], "Dog", "rect"),
        ([rectangle(0, 0, 10, 10), rectangle(25, 25, 50, 50)], [], [], [16, 12, 48, 36], "Dog", "rect"),
        ([rectangle(50, 50, 80, 80)], [], [], [32, 24, 64, 48], "Dog", "rect"),  # clipped
        ([rectangle(50, 25, 25, 50, rotation=90)], [], [], [8, 12, 32, 28], "Dog", "rect"),  # bounding box
        (
            [rectangle(25, 25, 50, 50), keypoint(50, 50, label=None)],
            [[32, 24]],
            [1],
            [16, 12, 48, 36],
            "Dog",
            "rect",
        ),
        ([keypoint(50, 50), rectangle(25, 25, 50, 50)], [[32, 24]], [1], [16, 12, 48, 36], "Dog", "rect"),
    ],
)
def test_context_to_prompt_table(regions, points, point_labels, box, label, control_name):
    prompt = context_to_prompt({"result": regions}, CONFIG, H, W)
    np.testing.assert_allclose(prompt.points, np.asarray(points, np.float32).reshape(-1, 2), atol=1e-4)
    np.testing.assert_array_equal(prompt.point_labels, point_labels)
    if box is None:
        assert prompt.box is None
    else:
        np.testing.assert_allclose(prompt.box, box, atol=1e-4)
    assert (prompt.label, prompt.control) == (label, control_name)


@pytest.mark.parametrize(
    "context",
    [
        None,
        [],
        {"result": None},
        {"result": []},
        {"result": [{"type": "textarea", "value": {"text": ["hi"]}}]},
        {"result": [keypoint("a", 5)]},
        {"result": [rectangle(150, 150, 10, 10)]},  # entirely outside
        {"result": [rectangle(10, 10, 0, 10)]},  # zero width
    ],
)
def test_context_without_usable_prompt_raises_value_error(context):
    with pytest.raises(ValueError, match="context"):
        context_to_prompt(copy.deepcopy(context), CONFIG, H, W)
