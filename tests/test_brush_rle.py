"""Brush RLE: byte-identical to the SDK's encoder, exact decoding, clear errors on bad input."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter import brush

from samsem_plugin.brush_rle import _change_points, decode_words, rle_decode, rle_decode_alpha, rle_encode
from tests.support import FIXTURES

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def sdk_encode(mask: np.ndarray) -> list[int]:
    return brush.mask2rle(mask.astype(np.uint8) * 255)


def sdk_alpha(rle: list[int], height: int, width: int) -> np.ndarray:
    return brush.decode_rle(rle).reshape(height, width, 4)[..., 3]


@st.composite
def masks(draw, max_side: int = 48) -> np.ndarray:
    """Masks of random size (1x1 upwards): noise, blocks (long runs), empty or full."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["noise", "blocks", "empty", "full"]))
    if kind == "empty":
        return np.zeros((height, width), bool)
    if kind == "full":
        return np.ones((height, width), bool)
    if kind == "noise":
        return draw(arrays(bool, (height, width)))
    mask = np.zeros((height, width), bool)
    for _ in range(draw(st.integers(1, 4))):
        y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        y1, x1 = draw(st.integers(y0 + 1, height)), draw(st.integers(x0 + 1, width))
        mask[y0:y1, x0:x1] ^= True
    return mask


# -- encoding ------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(masks())
def test_encode_is_byte_identical_to_sdk_and_decodes_back(mask):
    rle = rle_encode(mask)
    assert rle == sdk_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, *mask.shape), mask)


@pytest.mark.parametrize(
    ("shape", "fill_pixels"),
    [
        ((1, 1), 0),
        ((1, 1), 1),
        ((1, 64), 64),  # a run of exactly 256 words: last 8-bit run-length token
        ((1, 65), 65),  # 260 words: first 16-bit token
        ((128, 128), 128 * 128),  # exactly 65 536 words: one full 16-bit token
        ((128, 129), 128 * 128 + 1),  # 65 540 words: a full token plus a 4-word remainder
        ((300, 500), 300 * 500),  # 600 000 words: several full tokens
        ((300, 500), 70_000),  # long foreground run then a long background run
        ((2, 2), 1),  # byte boundaries of short streams
    ],
)
def test_encode_matches_sdk_on_run_length_boundaries(shape, fill_pixels):
    mask = np.zeros(shape, bool)
    mask.reshape(-1)[:fill_pixels] = True
    rle = rle_encode(mask)
    assert rle == sdk_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, *shape), mask)


def test_encode_matches_sdk_on_a_large_smooth_mask():
    rows, cols = np.mgrid[:700, :900]
    mask = (rows - 350) ** 2 + (cols - 400) ** 2 < 300**2
    mask[100:110, :] ^= True
    assert rle_encode(mask) == sdk_encode(mask)


def _changes_reference(values: np.ndarray) -> np.ndarray:
    return np.array([p for p in range(1, values.size) if values[p] != values[p - 1]], dtype=np.int64)


@st.composite
def run_sequences(draw) -> np.ndarray:
    """1-D masks made of runs: long uniform stretches, single pixels, and periodic patterns
    (period 1-16 pixels) long enough to repeat whole 8-pixel words."""
    pieces, value = [], draw(st.booleans())
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["run", "run", "pixel", "periodic"]))
        if kind == "periodic":
            period = draw(st.integers(1, 16))
            pattern = np.array(draw(st.lists(st.booleans(), min_size=period, max_size=period)))
            pieces.append(np.tile(pattern, draw(st.integers(1, 20))))
        else:
            pieces.append(np.full(1 if kind == "pixel" else draw(st.integers(1, 200)), value))
            value = not value
    return np.concatenate(pieces)


@PROPERTY_SETTINGS
@given(run_sequences())
def test_change_points_compare_words_exactly_like_pixels(values):
    np.testing.assert_array_equal(_change_points(values), _changes_reference(values))


@pytest.mark.parametrize(
    "values",
    [
        np.zeros(64, bool),
        np.ones(64, bool),
        np.tile([True, False], 40),  # every word the same non-uniform word
        np.tile([True] * 8 + [False] * 8, 6),  # changes exactly on word boundaries
        np.concatenate((np.zeros(61, bool), [True])),  # change in the tail after the last word
        np.concatenate((np.zeros(64, bool), [True])),  # change at the first pixel after the words
        np.concatenate(([True], np.zeros(70, bool))),  # change at pixel 1
        np.concatenate((np.zeros(24, bool), np.tile([False, True, True, False], 10), np.zeros(9, bool))),
    ],
    ids=["zeros", "ones", "alternating", "word-aligned", "tail", "after-words", "first", "repeated-inside"],
)
def test_change_points_on_word_edge_cases(values):
    np.testing.assert_array_equal(_change_points(values), _changes_reference(values))


def test_encode_of_non_contiguous_masks_matches_sdk():
    rows, cols = np.mgrid[:90, :130]
    mask = ((rows // 7 + cols // 5) % 3 == 0) | ((rows - 45) ** 2 + (cols - 60) ** 2 < 900)
    for view in (mask.T, mask[::2, ::3], mask[:, 5:], np.asfortranarray(mask)):
        assert rle_encode(view) == sdk_encode(view)


def test_encode_returns_plain_ints_that_serialise():
    rle = rle_encode(np.eye(5, dtype=bool))
    assert all(type(v) is int for v in rle)
    assert json.loads(json.dumps(rle)) == rle


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((4, 4), np.uint8), "dtype bool"),
        (np.zeros((2, 4, 4), bool), r"shape \(H, W\)"),
        (np.zeros((0, 4), bool), "H, W >= 1"),
    ],
)
def test_encode_rejects_bad_masks(mask, message):
    with pytest.raises(ValueError, match=message):
        rle_encode(mask)


# -- decoding ------------------------------------------------------------------------------------


def _fixture_brush_results():
    found = []
    for name in sorted(FIXTURES.glob("*.json")):
        text = name.read_text()
        if '"rle"' not in text:
            continue

        def walk(node, source=name.name):
            if isinstance(node, dict):
                if isinstance(node.get("value"), dict) and "rle" in node["value"]:
                    found.append((source, node))
                for child in node.values():
                    walk(child)
            elif isinstance(node, list):
                for child in node:
                    walk(child)

        walk(json.loads(text))
    return found


FIXTURE_BRUSHES = _fixture_brush_results()


def test_fixtures_contain_brush_results():
    assert len(FIXTURE_BRUSHES) >= 3


@pytest.mark.parametrize(("source", "result"), FIXTURE_BRUSHES, ids=[s for s, _ in FIXTURE_BRUSHES])
def test_decoding_fixture_rles_equals_sdk_decoding(source, result):
    height, width = result["original_height"], result["original_width"]
    rle = result["value"]["rle"]
    expected = sdk_alpha(rle, height, width)
    np.testing.assert_array_equal(rle_decode_alpha(rle, height, width), expected)
    mask = rle_decode(rle, height, width)
    assert mask.shape == (height, width) and mask.dtype == bool
    np.testing.assert_array_equal(mask, expected >= 128)
    assert 0 < mask.sum() < mask.size


def _bits(number: int, size: int) -> str:
    return format(number, f"0{size}b")


def reference_stream(words, word_size, field_sizes, rng) -> list[int]:
    """An rle-pack stream of ``words`` written independently of the code under test.

    Unlike the SDK encoder it also writes *literal* tokens (several words after one header), the
    form the browser's thi.ng encoder produces, and uses the given word and field sizes.
    """
    out = [_bits(len(words), 32), _bits(word_size - 1, 5)] + [_bits(s - 1, 4) for s in field_sizes]
    i = 0
    while i < len(words):
        same = 1
        while i + same < len(words) and words[i + same] == words[i]:
            same += 1
        repeat = same > 1 and rng.random() < 0.8
        count = same if repeat else int(rng.integers(1, len(words) - i + 1))
        fitting = [k for k, size in enumerate(field_sizes) if count <= 2**size]
        if not fitting:
            count = 2 ** max(field_sizes)
            fitting = [field_sizes.index(max(field_sizes))]
        k = int(rng.choice(fitting))
        out.append(("1" if repeat else "0") + _bits(k, 2) + _bits(count - 1, field_sizes[k]))
        out += [_bits(words[i], word_size)] if repeat else [_bits(w, word_size) for w in words[i : i + count]]
        i += count
    bits = "".join(out)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[j : j + 8], 2) for j in range(0, len(bits), 8)]


@PROPERTY_SETTINGS
@given(
    st.integers(1, 8).flatmap(
        lambda ws: st.tuples(
            st.just(ws),
            st.lists(st.integers(0, 2**ws - 1), min_size=1, max_size=300),
            st.lists(st.integers(1, 16), min_size=4, max_size=4),
            st.integers(0, 2**32 - 1),
        )
    )
)
def test_decoding_literal_and_repeat_tokens_of_any_layout(case):
    word_size, words, field_sizes, seed = case
    # long runs so repeat tokens appear
    words = [w for w in words for _ in range(1 + (w % 5))]
    stream = reference_stream(words, word_size, field_sizes, np.random.default_rng(seed))
    values, lengths = decode_words(stream)
    decoded = np.repeat(values, lengths)
    np.testing.assert_array_equal(decoded, words)
    np.testing.assert_array_equal(decoded, brush.decode_rle(stream))


def test_alpha_threshold_is_128_by_default_and_adjustable():
    alphas = [0, 1, 127, 128, 200, 255]
    rgba = [v for alpha in alphas for v in (alpha, alpha, alpha, alpha)]
    stream = reference_stream(rgba, 8, [3, 4, 8, 16], np.random.default_rng(0))
    np.testing.assert_array_equal(rle_decode_alpha(stream, 2, 3).reshape(-1), alphas)
    np.testing.assert_array_equal(rle_decode(stream, 2, 3).reshape(-1), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(rle_decode(stream, 2, 3, threshold=1).reshape(-1), [0, 1, 1, 1, 1, 1])


def test_decode_uses_the_alpha_channel_only():
    rgba = [255, 255, 255, 0] * 3 + [0, 0, 0, 255]
    stream = reference_stream(rgba, 8, [3, 4, 8, 16], np.random.default_rng(1))
    np.testing.assert_array_equal(rle_decode(stream, 1, 4), [[False, False, False, True]])


# -- bad input -----------------------------------------------------------------------------------

GOOD = rle_encode(np.pad(np.ones((6, 6), bool), 5))  # 16 x 16


@pytest.mark.parametrize(
    ("rle", "size", "message"),
    [
        (GOOD, (16, 15), "size mismatch.*1024.*16 x 15 x 4 = 960"),
        (GOOD, (0, 16), "height, width >= 1"),
        (GOOD[:3], (16, 16), "truncated"),
        (GOOD[:-3], (16, 16), "truncated"),
        ([], (16, 16), "truncated"),
        (GOOD[:4] + [0xFF] + GOOD[5:], (16, 16), "word size"),
        ([*GOOD[:-1], 256], (16, 16), "0..255"),
        ([*GOOD[:-1], -1], (16, 16), "0..255"),
        ([*GOOD[:-1], 1.5], (16, 16), "non-integer"),
        ([*GOOD[:-1], "a"], (16, 16), "ints"),
        ([GOOD, GOOD], (16, 16), "flat list"),
        ("0,0,4", (16, 16), "list of ints"),
        (None, (16, 16), "list of ints"),
    ],
)
def test_decode_rejects_bad_input_with_value_error(rle, size, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, *size)


def test_decode_rejects_a_stream_cut_inside_a_token():
    stream = reference_stream([5] * 8, 8, [3, 4, 8, 16], np.random.default_rng(0))
    assert len(stream) == 9  # 53 header bits + one 14-bit repeat token
    np.testing.assert_array_equal(np.repeat(*decode_words(stream)), [5] * 8)
    with pytest.raises(ValueError, match="truncated"):
        decode_words(stream[:8])  # the token's header is there, its word is not


def test_decode_rejects_runs_longer_than_the_declared_size():
    header_says_8_words = [0, 0, 0, 8] + GOOD[4:]  # runs describe 1024 words
    with pytest.raises(ValueError, match="more than the declared 8"):
        decode_words(header_says_8_words)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 255), max_size=60), st.integers(1, 8), st.integers(1, 8))
def test_decode_of_arbitrary_bytes_returns_a_mask_or_raises_value_error(rle, height, width):
    try:
        mask = rle_decode(rle, height, width)
    except ValueError:
        return
    assert mask.shape == (height, width) and mask.dtype == bool


@settings(max_examples=80, deadline=None, derandomize=True)
@given(masks(max_side=12), st.data())
def test_corrupting_a_valid_stream_never_raises_anything_but_value_error(mask, data):
    rle = rle_encode(mask)
    cut = data.draw(st.integers(0, len(rle)))
    flip = data.draw(st.integers(0, len(rle) - 1))
    corrupted = rle[:cut] if data.draw(st.booleans()) else rle[:flip] + [rle[flip] ^ 0xA5] + rle[flip + 1 :]
    try:
        out = rle_decode(corrupted, *mask.shape)
    except ValueError:
        return
    assert out.shape == mask.shape
