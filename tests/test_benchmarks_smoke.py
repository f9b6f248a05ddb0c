"""``python -m benchmarks`` works (a tiny subset, no timing assertions), and the optimisations the
benchmarks measure keep results identical to segment-anything's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention

import samsem_plugin.sam_models as sam_models
from benchmarks.harness import Comparison, Figure, Timing, compare_interleaved

REPO = Path(__file__).resolve().parents[1]


def test_quick_rle_benchmark_runs_and_reports_identical_bytes(tmp_path):
    out = tmp_path / "bench.json"
    native = ("MALLOC_ARENA_MAX", "OPENBLAS_NUM_THREADS")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "rle", "--json", str(out)],
        cwd=REPO,
        env={name: value for name, value in os.environ.items() if name not in native},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "rle encode 1024x1024 blob" in completed.stdout  # the table was printed
    payload = json.loads(out.read_text())
    assert payload["mode"] == "quick" and payload["machine"]["cpu_count"] >= 1
    # the command re-executes itself with the service's native settings
    assert payload["machine"]["environment"] == {"MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}
    comparisons = payload["benchmarks"]["rle"]["comparisons"]
    assert {name.split()[1] for name in comparisons} == {"encode", "decode"}
    for name, comparison in comparisons.items():
        assert comparison["check"].split(":")[1].split()[0] == "True", (name, comparison["check"])
        for arm in ("ours", "baseline"):
            assert len(comparison[arm]["seconds"]) == comparison[arm]["repeats"] >= 1
        assert comparison["ratio"] == pytest.approx(
            comparison["baseline"]["median_s"] / comparison["ours"]["median_s"]
        )


def test_unknown_benchmark_names_are_refused():
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "rle,warp-drive"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0 and "warp-drive" in completed.stderr


def test_interleaved_comparison_alternates_and_computes_ratios():
    calls = []
    comparison = compare_interleaved(
        "x",
        ("a", lambda: calls.append("a")),
        ("b", lambda: calls.append("b")),
        repeats=2,
        warmup=1,
        target_ratio=2.0,
        setup_ours=lambda: calls.append("setup-a"),
        baseline_repeats=1,
    )
    assert calls == ["setup-a", "a", "b", "setup-a", "a", "b", "setup-a", "a"]
    assert len(comparison.ours.seconds) == 2 and len(comparison.baseline.seconds) == 1
    fixed = Comparison("y", Timing("a", [1.0, 3.0]), Timing("b", [4.0, 4.0]), target_ratio=2.0)
    assert fixed.ratio == 2.0 and fixed.meets_target is True and fixed.ratio_of_minimums == 4.0
    assert Figure("f", 5.0, "MiB", 4.0, higher_is_better=False).meets_target is False


# -- optimisations keep results identical -----------------------------------------------------------


def small_encoder(window: int) -> ImageEncoderViT:
    """A small SAM image encoder with relative positions, windowed and global blocks, and random
    (non-zero) relative-position tables."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=48,
        depth=2,
        num_heads=3,
        out_chans=32,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window,
        global_attn_indexes=(1,),
    ).eval()
    for module in encoder.modules():
        if isinstance(module, Attention):
            torch.nn.init.normal_(module.rel_pos_h, std=0.5)
            torch.nn.init.normal_(module.rel_pos_w, std=0.5)
    return encoder


@pytest.mark.parametrize("bias_elements", [sam_models.ATTENTION_BIAS_ELEMENTS, 1024, 175])
def test_fused_attention_computes_the_stock_encoder_function(monkeypatch, bias_elements):
    """Also with a bias budget so small that queries and heads are split into many chunks."""
    monkeypatch.setattr(sam_models, "ATTENTION_BIAS_ELEMENTS", bias_elements)
    encoder = small_encoder(window=3)  # 8x8 tokens: windows padded to 9x9, plus a global block
    pixels = torch.randn(1, 3, 128, 128) * 50
    with torch.inference_mode():
        expected = encoder(pixels)

        class Holder(torch.nn.Module):
            image_encoder = encoder

        sam_models.use_fused_attention(Holder())
        assert all(type(m) is not Attention for m in encoder.modules())
        got = encoder(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_the_blocks_of_one_pass_reuse_one_attention_bias_buffer(monkeypatch):
    """A fresh bias buffer per block is a fresh ``mmap`` of tens of MB on ViT-B (page faults on
    every pass of every block): the blocks take it from the pass's workspace instead."""
    encoder = small_encoder(window=3)  # windowed blocks and one global block (larger bias)

    class Holder(torch.nn.Module):
        image_encoder = encoder

    sam_models.use_fused_attention(Holder())
    real_get, buffers = sam_models._Workspace.get, []

    def recording_get(self, role, shape, like):
        tensor = real_get(self, role, shape, like)
        if role == "attention_bias":
            buffers.append(tensor.untyped_storage().data_ptr())
        return tensor

    monkeypatch.setattr(sam_models._Workspace, "get", recording_get)
    with torch.inference_mode():
        encoder(torch.randn(1, 3, 128, 128))
    assert len(buffers) == len(encoder.blocks), "every block's bias comes from the workspace"
    assert len(set(buffers)) <= 2, "allocated once, and once more when the global block needs more"


def test_fused_attention_keeps_parameters_and_state_dict_keys():
    encoder = small_encoder(window=4)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}

    class Holder(torch.nn.Module):
        image_encoder = encoder

    sam_models.use_fused_attention(Holder())
    after = encoder.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value)


def fused(encoder: ImageEncoderViT) -> ImageEncoderViT:
    class Holder(torch.nn.Module):
        image_encoder = encoder

    sam_models.use_fused_attention(Holder())
    return encoder


@pytest.mark.parametrize("window", [3, 4])
def test_fused_encoder_with_gradients_falls_back_and_computes_the_same_function(window):
    """With gradients on, the blocks run segment-anything's own code path (no in-place updates), so
    the result and its gradients match the stock encoder's."""
    encoder = small_encoder(window=window)
    pixels = torch.randn(1, 3, 128, 128) * 50
    expected = encoder(pixels)
    expected.square().sum().backward()
    stock_grad = encoder.blocks[0].attn.rel_pos_h.grad.clone()
    encoder.zero_grad()
    got = fused(encoder)(pixels)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder.blocks[0].attn.rel_pos_h.grad, stock_grad, rtol=1e-3, atol=1e-4)


def test_fused_encoder_with_the_stock_attention_switched_back_is_still_the_stock_function():
    """``benchmarks.stock_wsgi`` switches the attention classes back; the fused blocks then run
    segment-anything's own block code."""
    encoder = small_encoder(window=3)
    pixels = torch.randn(1, 3, 128, 128) * 50
    with torch.inference_mode():
        expected = encoder(pixels)
        for module in fused(encoder).modules():
            if type(module) is sam_models.FusedAttention:
                module.__class__ = Attention
        got = encoder(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cached_relative_position_tables_follow_weight_changes():
    encoder = fused(small_encoder(window=3))
    pixels = torch.randn(1, 3, 128, 128) * 50
    with torch.inference_mode():
        before = encoder(pixels)
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.mul_(-1.0)  # in place: same storage, new version
    with torch.inference_mode():
        after = encoder(pixels)
    stock = small_encoder(window=3)
    with torch.no_grad():
        for block in stock.blocks:
            block.attn.rel_pos_h.mul_(-1.0)
    with torch.inference_mode():
        expected = stock(pixels)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("rows", "cols", "window"), [(8, 8, 3), (9, 7, 3), (8, 12, 4), (5, 5, 7)])
def test_window_partition_matches_segment_anything(rows, cols, window):
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    grid = torch.randn(2, rows, cols, 5)
    fill = torch.randn(5)
    got = sam_models._partition(grid, window, fill)
    expected, padded = window_partition(grid, window)
    padded_mask = window_partition(torch.ones(2, rows, cols, 1), window)[0] == 0
    expected = torch.where(padded_mask, fill, expected)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    back = sam_models._unpartition(got, window, rows, cols)
    torch.testing.assert_close(
        back, window_unpartition(expected, window, padded, (rows, cols)), rtol=0, atol=0
    )
    torch.testing.assert_close(back, grid, rtol=0, atol=0)


def test_fused_encoder_under_bfloat16_autocast_matches_the_stock_encoder_under_autocast():
    """bfloat16 rounding only: both run the matrix products and attention in bfloat16 and keep the
    residual stream in float32."""
    encoder = small_encoder(window=3)
    pixels = torch.randn(1, 3, 128, 128) * 50
    with torch.inference_mode():
        exact = encoder(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = encoder(pixels).float()
            got = fused(encoder)(pixels).float()
    stock_error = float((expected - exact).abs().max())
    assert float((got - exact).abs().max()) <= 2 * stock_error + 1e-3
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_grid_decoder_skipping_prompts_below_the_iou_threshold_matches_the_stock_generator():
    """At 0.95 some grid points have no level above the predicted-IoU threshold: the proposer skips
    their mask upsampling, and must still return exactly the stock generator's masks."""
    from samsem_plugin.proposer import AutoMaskSettings, SamProposer
    from samsem_plugin.sam_models import build_tiny_sam
    from tests.test_proposer import assert_same_as_stock_generator
    from tests.test_sam_models import photo

    sam = build_tiny_sam()
    image = photo("astronaut")
    settings = AutoMaskSettings(points_per_side=12, pred_iou_thresh=0.95, stability_score_thresh=0.8)
    ours = SamProposer(sam).generate(image, settings)
    assert_same_as_stock_generator(sam, image, settings, ours)
