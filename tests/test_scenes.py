"""Synthetic scenes of real content (make_scene_dataset) and their COCO export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samsem_plugin.evaluate import decode_segmentation, load_coco
from samsem_plugin.scenes import (
    CONTENT_SOURCES,
    DEFAULT_CLASSES,
    SceneSettings,
    export_coco,
    make_scene,
    make_scene_dataset,
    mask_to_polygons,
    mask_to_rle,
    mask_to_uncompressed_rle,
)


@pytest.fixture(scope="module")
def dataset():
    return make_scene_dataset(6, seed=3)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_scenes_have_valid_images_and_disjoint_visible_masks(dataset):
    images, annotations = dataset
    settings = SceneSettings()
    assert len(images) == len(annotations) == 6
    for image, regions in zip(images, annotations, strict=True):
        assert image.shape == (192, 256, 3) and image.dtype == np.uint8
        assert regions.image_size == (192, 256)
        assert 1 <= len(regions) <= settings.max_objects
        assert set(regions.labels.tolist()) <= set(DEFAULT_CLASSES)
        assert (regions.masks.sum(axis=0) <= 1).all(), "visible masks must not overlap"
        assert (regions.areas >= settings.min_visible_pixels).all()
    labels = [label for regions in annotations for label in regions.labels]
    assert len(set(labels)) >= 3  # several classes appear across a few images


def test_objects_carry_their_photo_content_not_the_background():
    # the pixels inside an object differ from the texture around it (they were pasted over it)
    image, regions = make_scene(0, seed=11)
    for mask in regions.masks:
        inside = image[mask].astype(np.float32)
        ring = np.zeros_like(mask)
        rows, cols = np.nonzero(mask)
        ring[max(0, rows.min() - 6) : rows.max() + 7, max(0, cols.min() - 6) : cols.max() + 7] = True
        outside = image[ring & ~regions.masks.any(axis=0)].astype(np.float32)
        if len(outside) < 50:
            continue
        assert (
            np.abs(inside.mean(axis=0) - outside.mean(axis=0)).max() > 3
            or abs(inside.std() - outside.std()) > 3
        )


def test_same_seed_same_scenes_and_images_do_not_depend_on_dataset_size(dataset):
    images, annotations = dataset
    again_images, again_annotations = make_scene_dataset(3, seed=3)
    for i in range(3):
        np.testing.assert_array_equal(images[i], again_images[i])
        np.testing.assert_array_equal(annotations[i].masks, again_annotations[i].masks)
        assert annotations[i].labels.tolist() == again_annotations[i].labels.tolist()
    other_images, _ = make_scene_dataset(1, seed=4)
    assert not np.array_equal(images[0], other_images[0])


def test_size_classes_and_settings_are_respected():
    settings = SceneSettings(min_objects=1, max_objects=2, min_size=0.4, max_size=0.5)
    images, annotations = make_scene_dataset(
        4, seed=0, size=(100, 150), classes=("coins", "cat"), settings=settings
    )
    for image, regions in zip(images, annotations, strict=True):
        assert image.shape == (100, 150, 3)
        assert len(regions) <= 2 and set(regions.labels.tolist()) <= {"coins", "cat"}
    assert set(CONTENT_SOURCES) >= set(DEFAULT_CLASSES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ("cat", "unicorn")}, "classes"),
        ({"classes": ()}, "classes"),
        ({"settings_kwargs": {"min_objects": 3, "max_objects": 2}}, "min_objects"),
        ({"settings_kwargs": {"min_size": 0.0}}, "min_size"),
        ({"settings_kwargs": {"max_overlap": 1.0}}, "max_overlap"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings = SceneSettings(**kwargs.pop("settings_kwargs", {}))
        make_scene_dataset(1, seed=0, settings=settings, **kwargs)


def test_mask_encoders_round_trip():
    mask = np.zeros((40, 50), bool)
    mask[5:30, 10:40] = True
    mask[0:2, 0:2] = True  # starts with a foreground pixel: uncompressed RLE starts with a 0 run
    mask[12:18, 20:25] = False  # a hole
    uncompressed = mask_to_uncompressed_rle(mask)
    assert uncompressed["counts"][0] == 0 and sum(uncompressed["counts"]) == mask.size
    via_pycocotools = mask_utils.decode(mask_utils.frPyObjects(uncompressed, 40, 50)).astype(bool)
    np.testing.assert_array_equal(via_pycocotools, mask)
    np.testing.assert_array_equal(mask_utils.decode(mask_to_rle(mask)).astype(bool), mask)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2 and all(len(p) % 2 == 0 and len(p) >= 6 for p in polygons)
    filled = mask.copy()
    filled[12:18, 20:25] = True  # polygons keep outer outlines only
    assert _iou(decode_segmentation(polygons, 40, 50), filled) > 0.9


@pytest.mark.parametrize("segmentation", ["polygon", "rle", "uncompressed_rle", "mixed"])
def test_export_coco_round_trips_through_the_loader(dataset, tmp_path, segmentation):
    images, annotations = dataset
    path, image_dir = export_coco(images, annotations, tmp_path / segmentation, segmentation=segmentation)
    coco = json.loads(path.read_text())
    assert {c["name"] for c in coco["categories"]} == {str(label) for r in annotations for label in r.labels}
    assert len(coco["annotations"]) == sum(len(r) for r in annotations)
    loaded = load_coco(path, image_dir)
    assert len(loaded) == len(images)
    for image, regions, entry in zip(images, annotations, loaded, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(entry.path)), image)
        np.testing.assert_array_equal(entry.read(), image)
        assert list(entry.labels) == regions.labels.tolist()
        decoded = entry.masks()
        for got, expected in zip(decoded, regions.masks, strict=True):
            if segmentation in ("rle", "uncompressed_rle"):
                np.testing.assert_array_equal(got, expected)
            else:
                assert _iou(got, expected) > 0.85
    if segmentation == "mixed":
        kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
        counts = {
            type(a["segmentation"]["counts"]).__name__
            for a in coco["annotations"]
            if "counts" in a["segmentation"]
        }
        assert kinds == {"list", "dict"} and counts == {"str", "list"}


def test_export_coco_rejects_bad_input(dataset, tmp_path):
    images, annotations = dataset
    with pytest.raises(ValueError, match="segmentation"):
        export_coco(images, annotations, tmp_path, segmentation="svg")
    with pytest.raises(ValueError, match="one Regions per image"):
        export_coco(images, annotations[:-1], tmp_path)
