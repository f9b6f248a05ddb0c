"""samsem_plugin.proposer on the tiny SAM: embedding cache, prompt masks, automatic masks equal to
segment-anything's own ``SamAutomaticMaskGenerator``, validation and thread-safety."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samsem_plugin import sam_decoder
from samsem_plugin.cache import image_key
from samsem_plugin.prompts import Prompt
from samsem_plugin.proposer import AutoMaskSettings, ImageEmbedding, SamProposer
from samsem_plugin.regions import boxes_from_masks, mask_ious
from samsem_plugin.sam_decoder import (
    DecoderImage,
    _factorable,
    _FactoredTokens,
    _token_variance,
    decode_prompts,
)
from samsem_plugin.sam_models import build_tiny_sam
from tests.test_sam_models import one_torch_thread, photo  # noqa: F401 (autouse fixture)

H, W = 96, 128


@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def astronaut():
    return photo("astronaut")


@pytest.fixture(scope="module")
def coffee():
    return photo("coffee")


@pytest.fixture
def proposer(sam):
    return SamProposer(sam)


def click(x: float, y: float, positive: bool = True) -> Prompt:
    return Prompt(points=[[x, y]], point_labels=[int(positive)])


def reference(sam, image, prompt: Prompt, multimask: bool = True):
    """SamPredictor's answer for the same prompt."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor.predict(
        point_coords=prompt.points if len(prompt.points) else None,
        point_labels=prompt.point_labels if len(prompt.points) else None,
        box=prompt.box,
        multimask_output=multimask,
    )


# -- settings ------------------------------------------------------------------------------------


def test_auto_mask_settings_default_to_sams_values():
    assert AutoMaskSettings() == AutoMaskSettings(32, 64, 0.88, 0.95, 1.0, 0.7, 0)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("points_per_side", 0, "an integer >= 1"),
        ("points_per_side", 4.0, "an integer"),
        ("points_per_batch", -1, "an integer >= 1"),
        ("pred_iou_thresh", 1.5, r"a number in \[0, 1\]"),
        ("stability_score_thresh", -0.1, r"a number in \[0, 1\]"),
        ("stability_score_offset", 0.0, "a number > 0"),
        ("box_nms_thresh", 0.0, r"a number in \(0, 1\]"),
        ("min_mask_region_area", -5, "an integer >= 0"),
        ("min_mask_region_area", True, "an integer"),
    ],
)
def test_auto_mask_settings_reject_bad_values_saying_what_was_expected(field, value, expected):
    with pytest.raises(ValueError, match=f"{field}: expected {expected}, got {value!r}"):
        AutoMaskSettings(**{field: value})


# -- prompts -------------------------------------------------------------------------------------


def test_prompt_gives_three_levels_equal_to_sam_predictor(proposer, sam, astronaut):
    prompt = click(30.5, 40.25)
    regions = proposer.predict_prompt(astronaut, prompt)
    masks, scores, low_res = reference(sam, astronaut, prompt)
    assert regions.image_size == (H, W) and regions.masks.shape == (3, H, W)
    np.testing.assert_array_equal(regions.masks, masks)
    np.testing.assert_allclose(regions.extra["predicted_iou"], scores, rtol=1e-6)
    np.testing.assert_allclose(regions.proposal_score, np.clip(scores, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(regions.extra["low_res_logits"], low_res, rtol=1e-5, atol=1e-4)
    assert regions.ids.tolist() == ["level0", "level1", "level2"]
    assert regions.extra["level"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(regions.boxes, boxes_from_masks(masks))


@pytest.mark.parametrize(
    "prompt",
    [
        Prompt(points=np.zeros((0, 2)), point_labels=[], box=[10, 20, 70, 80]),
        Prompt(points=[[40, 50], [100, 20]], point_labels=[1, 0], box=[10, 20, 70, 80]),
        Prompt(points=[[40, 50], [100, 20], [5, 5]], point_labels=[1, 1, 0]),
    ],
    ids=["box", "points+box", "three-points"],
)
def test_boxes_and_several_points_combine_into_one_prompt(proposer, sam, astronaut, prompt):
    regions = proposer.predict_prompt(astronaut, prompt)
    masks, _, _ = reference(sam, astronaut, prompt)
    np.testing.assert_array_equal(regions.masks, masks)


def test_single_mask_output(proposer, sam, astronaut):
    prompt = click(64, 48)
    regions = proposer.predict_prompt(astronaut, prompt, multimask=False)
    masks, _, _ = reference(sam, astronaut, prompt, multimask=False)
    assert regions.ids.tolist() == ["single"] and regions.extra["level"].tolist() == [-1]
    np.testing.assert_array_equal(regions.masks, masks)


def test_clicks_reuse_the_cached_embedding_by_image_content(proposer, astronaut, coffee):
    key = proposer.embed_image(astronaut)
    assert key == image_key(astronaut) and proposer.encoder_calls == 1
    proposer.predict_prompt(astronaut, click(10, 10))
    proposer.predict_prompt(astronaut.copy(), click(100, 60))  # same content, another array
    assert proposer.encoder_calls == 1
    proposer.predict_prompt(coffee, click(10, 10))
    assert proposer.encoder_calls == 2
    changed = astronaut.copy()
    changed[0, 0, 0] ^= 1
    proposer.predict_prompt(changed, click(10, 10))
    assert proposer.encoder_calls == 3


def test_cache_stays_within_its_byte_bound_and_evicts(sam, astronaut, coffee):
    probe = SamProposer(sam)
    probe.embed_image(astronaut)
    size = probe.cache.nbytes
    assert size == 64 * 16 * 16 * 4  # (1, C, h, w) float32
    proposer = SamProposer(sam, cache_bytes=size + size // 2)  # room for one embedding
    proposer.embed_image(astronaut)
    proposer.embed_image(coffee)
    assert len(proposer.cache) == 1 and proposer.cache.nbytes <= size + size // 2
    assert proposer.cache.evictions == 1
    proposer.embed_image(astronaut)  # evicted: encoded again
    assert proposer.encoder_calls == 3
    proposer.embed_image(astronaut)
    assert proposer.encoder_calls == 3


def test_cache_can_be_disabled(sam, astronaut):
    proposer = SamProposer(sam, cache_bytes=0)
    first = proposer.predict_prompt(astronaut, click(30, 30))
    second = proposer.predict_prompt(astronaut, click(30, 30))
    assert proposer.encoder_calls == 2 and len(proposer.cache) == 0
    np.testing.assert_array_equal(first.masks, second.masks)


@pytest.mark.parametrize(
    "image, expected",
    [
        (np.zeros((H, W), np.uint8), r"expected shape \(H, W, 3\)"),
        (np.zeros((H, W, 4), np.uint8), r"expected shape \(H, W, 3\)"),
        (np.zeros((0, W, 3), np.uint8), r"expected shape \(H, W, 3\) with H, W >= 1"),
        (np.zeros((H, W, 3), np.float32), "expected dtype uint8, got float32"),
        ([[[0, 0, 0]]], "expected a numpy array"),
    ],
    ids=["gray", "rgba", "empty", "float", "list"],
)
def test_bad_images_are_value_errors(proposer, image, expected):
    with pytest.raises(ValueError, match=expected):
        proposer.predict_prompt(image, click(1, 1))
    with pytest.raises(ValueError, match=expected):
        proposer.generate(image, AutoMaskSettings(points_per_side=2))
    assert proposer.encoder_calls == 0


@pytest.mark.parametrize(
    "prompt",
    [
        click(W + 0.5, 10),
        click(10, -1),
        Prompt(points=np.zeros((0, 2)), point_labels=[], box=[0, 0, 50, H * 2]),
    ],
    ids=["x-beyond-width", "negative-y", "box-beyond-height"],
)
def test_prompts_outside_the_image_are_value_errors(proposer, astronaut, prompt):
    with pytest.raises(ValueError, match=f"within the {W}x{H} image"):
        proposer.predict_prompt(astronaut, prompt)


def test_prompt_on_the_image_border_is_accepted(proposer, astronaut):
    assert len(proposer.predict_prompt(astronaut, click(W, H))) == 3


def test_wrong_argument_types_are_value_errors(proposer, sam, astronaut):
    with pytest.raises(ValueError, match="prompt: expected a Prompt, got dict"):
        proposer.predict_prompt(astronaut, {"points": [[1, 1]]})
    with pytest.raises(ValueError, match="settings: expected AutoMaskSettings, got dict"):
        proposer.generate(astronaut, {"points_per_side": 4})
    with pytest.raises(ValueError, match="sam: expected a segment_anything Sam model"):
        SamProposer(object())


# -- automatic masks -----------------------------------------------------------------------------


def assert_same_as_stock_generator(sam, image, settings: AutoMaskSettings, ours):
    stock = SamAutomaticMaskGenerator(
        sam,
        points_per_side=settings.points_per_side,
        points_per_batch=settings.points_per_batch,
        pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh,
        stability_score_offset=settings.stability_score_offset,
        box_nms_thresh=settings.box_nms_thresh,
        min_mask_region_area=settings.min_mask_region_area,
        output_mode="binary_mask",
    ).generate(image)
    assert len(ours) == len(stock) >= 4
    theirs = np.stack([record["segmentation"] for record in stock])
    ious = mask_ious(ours.masks, theirs)
    match = ious.argmax(axis=1)
    assert sorted(match.tolist()) == list(range(len(stock)))  # one-to-one
    assert (ious.max(axis=1) >= 0.99).all()
    for index, other in enumerate(match):
        record = stock[other]
        assert ours.extra["predicted_iou"][index] == pytest.approx(record["predicted_iou"], rel=1e-5)
        assert ours.extra["stability_score"][index] == pytest.approx(record["stability_score"], rel=1e-5)
        np.testing.assert_allclose(ours.extra["point_coords"][index], record["point_coords"][0])


@pytest.mark.parametrize(
    "settings",
    [
        AutoMaskSettings(points_per_side=12),
        AutoMaskSettings(
            points_per_side=12,
            points_per_batch=10,
            pred_iou_thresh=0.9,
            stability_score_thresh=0.9,
            stability_score_offset=2.0,
            box_nms_thresh=0.5,
            min_mask_region_area=30,
        ),
    ],
    ids=["sam-defaults", "other-settings+small-regions"],
)
def test_generate_returns_the_masks_of_sams_automatic_mask_generator(sam, astronaut, settings):
    ours = SamProposer(sam).generate(astronaut, settings)
    assert_same_as_stock_generator(sam, astronaut, settings, ours)
    assert ours.ids.tolist() == [f"auto{i}" for i in range(len(ours))]
    assert (np.diff(ours.extra["predicted_iou"]) <= 0).all() or settings.min_mask_region_area > 0
    np.testing.assert_array_equal(ours.boxes, boxes_from_masks(ours.masks))
    assert ours.extra["point_coords"].shape == (len(ours), 2)


def test_generate_reuses_the_embedding_of_earlier_clicks(proposer, astronaut):
    proposer.predict_prompt(astronaut, click(20, 20))
    regions = proposer.generate(astronaut, AutoMaskSettings(points_per_side=6))
    assert proposer.encoder_calls == 1 and len(regions) > 0
    proposer.generate(astronaut, AutoMaskSettings(points_per_side=6))
    assert proposer.encoder_calls == 1


def test_generate_with_nothing_passing_returns_empty_regions(proposer, coffee):
    regions = proposer.generate(coffee, AutoMaskSettings(points_per_side=4, pred_iou_thresh=1.0))
    assert len(regions) == 0 and regions.masks.shape == (0, H, W)
    assert regions.extra["point_coords"].shape == (0, 2)


def test_bfloat16_autocast_runs_and_returns_float32(sam, astronaut):
    """The mechanism only: the tiny model's hand-set weights cancel large offsets, so bf16 moves its
    strictest level a lot; the accuracy of bf16 must be judged on real weights."""
    exact = SamProposer(sam).predict_prompt(astronaut, click(60, 70))
    fast = SamProposer(sam, autocast_dtype=torch.bfloat16).predict_prompt(astronaut, click(60, 70))
    assert fast.extra["low_res_logits"].dtype == np.float32 and fast.proposal_score.dtype == np.float32
    assert not np.array_equal(fast.extra["low_res_logits"], exact.extra["low_res_logits"])  # bf16 was used
    np.testing.assert_allclose(fast.extra["predicted_iou"], exact.extra["predicted_iou"], atol=0.02)
    assert mask_ious(fast.masks[2:], exact.masks[2:])[0, 0] >= 0.9


# -- threads -------------------------------------------------------------------------------------


def test_concurrent_requests_never_mix_images(sam, astronaut, coffee):
    proposer = SamProposer(sam)
    jobs = [(image, click(x, y)) for x, y in ((20, 20), (100, 70), (64, 10)) for image in (astronaut, coffee)]
    expected = [SamProposer(sam).predict_prompt(image, prompt).masks for image, prompt in jobs]
    start = threading.Barrier(4)

    def run(job):
        image, prompt = job
        start.wait(timeout=30)  # four requests at a time, released together
        return proposer.predict_prompt(image, prompt).masks

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs * 2))
    for got, want in zip(results, expected * 2, strict=True):
        np.testing.assert_array_equal(got, want)
    assert proposer.encoder_calls == 2  # each image encoded once, even when first asked concurrently


# -- factored decoder ----------------------------------------------------------------------------


def vit_b_decoder_sam(seed: int = 0) -> Sam:
    """SAM's ViT-B prompt encoder and mask decoder (random weights; no image encoder: the tests
    feed random embeddings)."""
    torch.manual_seed(seed)
    size, grid = 1024, 64
    return Sam(
        image_encoder=torch.nn.Identity(),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(size, size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    ).eval()


def sparse_prompts(sam: Sam, kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """Sparse embeddings ``(count, T, C)`` of random prompts in the encoder's input frame."""
    size = float(sam.prompt_encoder.input_image_size[0])
    points = labels = boxes = None
    if kind in ("point", "points", "points+box"):
        per_prompt = {"point": 1, "points": 3, "points+box": 2}[kind]
        points = torch.rand(count, per_prompt, 2, generator=generator) * size
        labels = torch.randint(0, 2, (count, per_prompt), generator=generator)
        labels[:, 0] = 1
    if kind in ("box", "points+box"):
        corners = torch.rand(count, 2, 2, generator=generator) * size
        boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    sparse, _ = sam.prompt_encoder(
        points=None if points is None else (points, labels), boxes=boxes, masks=None
    )
    return sparse


def stock_decoder(sam: Sam, features: torch.Tensor, sparse: torch.Tensor, multimask: bool):
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        len(sparse), -1, *features.shape[-2:]
    )
    return sam.mask_decoder(
        image_embeddings=features,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


@pytest.fixture(scope="module")
def vit_b_decoder():
    return vit_b_decoder_sam()


@pytest.mark.parametrize("factored_upscaling", [False, True], ids=["sam-norms", "factored-upscaling"])
@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("kind", ["point", "points", "box", "points+box"])
@pytest.mark.parametrize("model", ["tiny", "vit-b"])
def test_factored_decoder_equals_sams_mask_decoder(
    sam, vit_b_decoder, monkeypatch, model, kind, multimask, factored_upscaling
):
    monkeypatch.setattr(sam_decoder, "FACTORED_UPSCALING", factored_upscaling)
    model_sam = sam if model == "tiny" else vit_b_decoder
    generator = torch.Generator().manual_seed(3)
    channels = model_sam.prompt_encoder.embed_dim
    grid = model_sam.prompt_encoder.image_embedding_size
    with torch.inference_mode():
        features = torch.randn(1, channels, *grid, generator=generator)
        image = DecoderImage.of(model_sam, features)
        assert image.factored is not None
        sparse = sparse_prompts(model_sam, kind, 5, generator)
        low_res, iou, decoded = decode_prompts(model_sam.mask_decoder, image, sparse, multimask=multimask)
        expected_low_res, expected_iou = stock_decoder(model_sam, features, sparse, multimask)
    assert decoded.tolist() == list(range(5))
    scale = expected_low_res.abs().max().item()
    np.testing.assert_allclose(low_res, expected_low_res, rtol=1e-5, atol=1e-6 * max(scale, 1.0))
    np.testing.assert_allclose(iou, expected_iou, rtol=1e-5, atol=1e-6)


def test_factored_decoder_filters_prompts_by_predicted_iou(vit_b_decoder):
    generator = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        features = torch.randn(1, 256, 64, 64, generator=generator)
        sparse = sparse_prompts(vit_b_decoder, "point", 8, generator)
        image = DecoderImage.of(vit_b_decoder, features)
        _, all_iou, _ = decode_prompts(vit_b_decoder.mask_decoder, image, sparse)
        threshold = float(all_iou.max(dim=1).values.median())
        low_res, iou, decoded = decode_prompts(
            vit_b_decoder.mask_decoder, image, sparse, pred_iou_thresh=threshold
        )
        expected_low_res, expected_iou = stock_decoder(vit_b_decoder, features, sparse[decoded], True)
    assert 0 < len(decoded) < 8
    assert decoded.tolist() == torch.nonzero((all_iou > threshold).any(dim=1)).flatten().tolist()
    np.testing.assert_allclose(low_res, expected_low_res, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(iou, expected_iou, rtol=1e-5, atol=1e-6)


def test_decoders_of_another_design_fall_back_to_the_unfactored_path(vit_b_decoder):
    class ChannelNorm(torch.nn.GroupNorm):  # a norm over the channels of (B, N, C) tokens, no LayerNorm
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    other = copy.deepcopy(vit_b_decoder)
    other.mask_decoder.transformer.layers[1].norm4 = ChannelNorm(1, 256)
    assert _factorable(vit_b_decoder.mask_decoder) and not _factorable(other.mask_decoder)
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        features = torch.randn(1, 256, 64, 64, generator=generator)
        image = DecoderImage.of(other, features)
        assert image.factored is None
        sparse = sparse_prompts(other, "points+box", 3, generator)
        low_res, iou, _ = decode_prompts(other.mask_decoder, image, sparse)
        expected_low_res, expected_iou = stock_decoder(other, features, sparse, True)
    np.testing.assert_allclose(low_res, expected_low_res, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(iou, expected_iou, rtol=1e-5, atol=1e-6)


def test_token_variance_recomputes_tokens_whose_variance_cancels():
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    base = base - base.mean(-1, keepdim=True)
    rows = torch.randn(1, 3, 16, generator=generator, dtype=torch.float64)
    coeff = torch.randn(1, 3, 6, generator=generator, dtype=torch.float64)
    scale = torch.rand(1, 6, generator=generator, dtype=torch.float64) + 0.5
    # tokens 0 and 3: the update cancels the base up to 1e-6
    rows[0, 0] = -base[0] * scale[0, 0] + 1e-6 * torch.randn(16, generator=generator, dtype=torch.float64)
    coeff[0, :, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    coeff[0, :, 3] = coeff[0, :, 0]
    base[3] = base[0] * scale[0, 0] / scale[0, 3]
    tokens = _FactoredTokens(scale.float(), coeff.float(), rows.float())
    values = scale[0, :, None] * base + coeff[0].T @ rows[0]
    expected = values.var(dim=-1, unbiased=False) + 1e-5
    base32 = base.float()
    cross = (coeff * (base @ rows[0].T).T[None]).sum(1)
    variance = _token_variance(tokens, lambda: base32, base32.square().sum(-1), cross.float(), 1e-5)
    np.testing.assert_allclose(variance[0].double(), expected, rtol=1e-5)


@pytest.mark.parametrize("original_size", [(192, 256), (256, 192), (100, 140), (300, 400)])
def test_upsampling_equals_sams_postprocess_masks_exactly(proposer, sam, original_size):
    """Including sizes whose long side is the encoder's (256 for the tiny model), where the final
    same-size resample is skipped."""
    side = sam.image_encoder.img_size
    scale = side / max(original_size)
    input_size = tuple(int(round(size * scale)) for size in original_size)
    embedding = ImageEmbedding(torch.zeros(1), input_size, original_size)
    low_res = torch.randn(3, side // 4, side // 4, generator=torch.Generator().manual_seed(0)) * 5
    ours = proposer._upsample(low_res, embedding)
    with torch.inference_mode():
        stock = sam.postprocess_masks(low_res[:, None], input_size, original_size)[:, 0]
    assert ours.shape == (3, *original_size)
    assert torch.equal(ours, stock)
