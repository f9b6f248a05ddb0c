"""Label Studio brush RLE: encode and decode ``(H, W) bool`` masks, vectorised with numpy.

Label Studio stores a brush region as ``value.rle``: a list of byte values (ints 0..255) holding a
`thi.ng rle-pack <https://github.com/thi-ng/umbrella/tree/develop/packages/rle-pack>`_ bit stream
of the region's RGBA image, row-major, ``H * W * 4`` 8-bit words (``H, W`` = the image's natural
size, ``original_height`` × ``original_width``).

Bit stream (most significant bit first)::

    header  32 bits  number of words (H * W * 4)
             5 bits  word size - 1 (Label Studio: 7, i.e. 8-bit words)
          4 x 4 bits run-length field sizes - 1 (Label Studio: 3, 4, 8, 16 bits)
    tokens  1 bit    1 = repeat run (one word repeated), 0 = literal run (words follow)
             2 bits  index of the run-length field size
             n bits  run length - 1
                     then one word (repeat) or run-length words (literal)
    padding zero bits up to a whole byte

:func:`rle_encode` produces exactly the bytes of the SDK's
``label_studio_sdk.converter.brush.mask2rle(mask.astype(np.uint8) * 255)`` (including its quirks:
every run of two or more words is a repeat token, runs longer than 65 536 words are split into
65 536-word tokens from the front, and a whole zero byte is appended when the stream already ends
on a byte boundary). :func:`rle_decode` reads any valid rle-pack stream with word sizes up to 8.

Foreground rule (decoding): a pixel is foreground when its **alpha** (the 4th word of the pixel)
is ``>= 128``. Label Studio draws brush strokes anti-aliased, so stroke edges carry partial alpha;
128 (half coverage) is the natural cut. Label Studio renders a pixel with its alpha as opacity,
so masks written with value 1 (e.g. ``mask2rle`` of a 0/1 mask) are nearly invisible there and
decode as empty here; pass ``threshold=1`` to count every non-zero alpha as foreground (what the
SDK's COCO export does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

_SDK_WORD_SIZE = 8
_SDK_RUN_FIELD_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_MAX_WORDS = 2**32 - 1
_LONGEST_TOKEN = 2**16  # words in one token with a 16-bit run-length field
DEFAULT_ALPHA_THRESHOLD = 128


# -- encoding ------------------------------------------------------------------------------------


_WORD_PIXELS = 8
_UNIFORM_WORDS = (0, 0x0101010101010101)  # 8 bool pixels read as one little-endian uint64
_DENSE_CHANGES = 32
"""Above one changing word in this many, :func:`_change_points` compares every pixel instead."""
_DENSITY_SAMPLE_STRIDE = 61
"""Every 61st word boundary is checked first, to take the per-pixel path without a word pass."""


def _change_points_per_pixel(values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(values[1:] != values[:-1]) + 1


def _change_points(values: np.ndarray) -> np.ndarray:
    """Sorted positions ``p`` (``(C,) int64``, 1 <= p < n) where a contiguous 1-D bool array of
    n pixels changes value: ``values[p] != values[p - 1]``.

    Masks are mostly long runs, so the pixels are first compared 8 at a time as uint64 words: a
    change can only lie in a word that differs from the word before it (at its first pixel or
    inside), or inside a word that is not uniform (all 0 or all 1). A non-uniform word equal to its
    predecessor heads nothing new but repeats the changes of the run of equal words it belongs to,
    so those runs are expanded. Only the candidate words are then compared pixel by pixel, by
    shifting and XOR-ing the words themselves. About 4x less memory traffic than comparing every
    pixel; speckled masks (many changing words) take the per-pixel path.
    """
    full = values.size // _WORD_PIXELS * _WORD_PIXELS
    if full < 2 * _WORD_PIXELS:
        return _change_points_per_pixel(values)
    words = values[:full].view("<u8")
    sampled = words[:-1:_DENSITY_SAMPLE_STRIDE] != words[1::_DENSITY_SAMPLE_STRIDE]
    if np.count_nonzero(sampled) * _DENSE_CHANGES > sampled.size:  # dense: skip the word pass
        return _change_points_per_pixel(values)
    run_starts = np.flatnonzero(words[1:] != words[:-1]) + 1
    if run_starts.size * _DENSE_CHANGES > words.size:
        return _change_points_per_pixel(values)
    run_starts = np.concatenate(([0], run_starts))
    run_words = words[run_starts]
    uniform = (run_words == _UNIFORM_WORDS[0]) | (run_words == _UNIFORM_WORDS[1])
    run_lengths = np.diff(np.append(run_starts, words.size))
    repeated = np.flatnonzero(~uniform & (run_lengths > 1))  # runs of equal non-uniform words
    candidates = run_starts
    if repeated.size:
        extra = run_lengths[repeated] - 1
        offsets = np.arange(int(extra.sum())) - np.repeat(np.cumsum(extra) - extra, extra)
        more = np.repeat(run_starts[repeated] + 1, extra) + offsets
        candidates = np.sort(np.concatenate((run_starts, more)), kind="stable")  # two sorted runs
    # Per candidate word, its pixels XOR the same pixels shifted by one (the previous word's last
    # pixel in front): byte k is 1 exactly where pixel 8 i + k differs from its predecessor.
    chosen = words[candidates]  # candidates[0] is word 0 (every run list starts there)
    previous = words[candidates - 1] >> np.uint64(56)  # word 0 wraps to the last word: replaced
    previous[0] = chosen[0] & np.uint64(1)  # pixel 0 has no predecessor: compared with itself
    changed = chosen ^ ((chosen << np.uint64(8)) | previous)
    flat = np.flatnonzero(changed.view(bool))  # (word, byte) as word x 8 + byte
    points = candidates[flat >> 3] * _WORD_PIXELS + (flat & 7)
    tail = _change_points_per_pixel(values[full - 1 :]) + (full - 1)
    return np.concatenate((points, tail)).astype(np.int64, copy=False)


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths ``(R,) int64`` and run values ``(R,)`` of a non-empty contiguous 1-D bool array."""
    starts = np.concatenate(([0], _change_points(values)))
    lengths = np.diff(np.append(starts, values.size))
    return lengths.astype(np.int64), values[starts]


_FIELD_BITS = np.asarray(_SDK_RUN_FIELD_SIZES, dtype=np.int64)
_FULL_TOKEN = (
    (1 << (2 + 16 + _SDK_WORD_SIZE)) | (3 << (16 + _SDK_WORD_SIZE)) | ((_LONGEST_TOKEN - 1) << _SDK_WORD_SIZE)
)
"""A repeat token of 65 536 words with the 16-bit run-length field, before its word value."""


def _sdk_tokens(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token codes and bit counts for runs of 8-bit words, following the SDK's ``encode_rle``.

    Args:
        lengths: ``(R,) int64`` run lengths in words, each >= 1.
        values: ``(R,) uint8`` word value of each run.

    Returns:
        ``(codes, nbits)``: ``(T,) int64`` token bit patterns (right-aligned) and their widths.
    """
    # Size index by the *run* length (a short remainder of a long run still uses the 16-bit field).
    size_index = (lengths > 8).astype(np.int64) + (lengths > 16) + (lengths > 256)
    field_bits = _FIELD_BITS[size_index]
    value = values.astype(np.int64)
    # Runs over 65 536 words become several 16-bit tokens: full ones first, the remainder last.
    full_tokens = (lengths - 1) // _LONGEST_TOKEN
    remainder = lengths - full_tokens * _LONGEST_TOKEN
    is_repeat = (lengths > 1).astype(np.int64)
    # A single word is a literal token "0 00 000 <word>", which is the same layout.
    codes = (
        (is_repeat << (2 + field_bits + _SDK_WORD_SIZE))
        | (size_index << (field_bits + _SDK_WORD_SIZE))
        | ((remainder - 1) << _SDK_WORD_SIZE)
        | value
    )
    nbits = 3 + field_bits + _SDK_WORD_SIZE
    if full_tokens.any():
        per_run = full_tokens + 1
        expanded = np.repeat(_FULL_TOKEN | value, per_run)
        expanded[np.cumsum(per_run) - 1] = codes  # each run's last token is its remainder
        return expanded, np.repeat(nbits, per_run)
    return codes, nbits


def _pack_codes(codes: np.ndarray, nbits: np.ndarray) -> np.ndarray:
    """Concatenate right-aligned codes of ``nbits`` (each <= 33) MSB first, pad with >= 1 zero bit.

    Returns ``(B,) uint8`` with ``B = total_bits // 8 + 1`` (the SDK always pads, a full zero byte
    when the bits end on a byte boundary).
    """
    offsets = np.cumsum(nbits) - nbits
    total_bits = int(offsets[-1] + nbits[-1])
    n_bytes = total_bits // 8 + 1
    first_byte = offsets >> 3
    shift = offsets & 7
    # Place each code in a 40-bit field starting at its first byte: bits [shift, shift + nbits);
    # the field is bytes 3-7 of the code as a big-endian uint64.
    placed = (codes.astype(np.uint64) << (40 - shift - nbits).astype(np.uint64)).astype(">u8")
    byte_values = placed.view(np.uint8).reshape(-1, 8)[:, 3:]  # (T, 5)
    indices = first_byte[:, None] + np.arange(5)
    # Codes never share a bit, so summing the bytes equals OR-ing them (exact in float64).
    packed = np.bincount(indices.ravel(), weights=byte_values.ravel(), minlength=n_bytes + 4)[:n_bytes]
    return packed.astype(np.uint8)


def _header_codes(n_words: int) -> tuple[list[int], list[int]]:
    codes = [n_words >> 16, n_words & 0xFFFF, _SDK_WORD_SIZE - 1, *(s - 1 for s in _SDK_RUN_FIELD_SIZES)]
    nbits = [16, 16, 5, 4, 4, 4, 4]
    return codes, nbits


def rle_encode(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a ``(H, W) bool`` mask (foreground written as 255 in all 4 channels).

    Byte-identical to ``label_studio_sdk.converter.brush.mask2rle(mask.astype(np.uint8) * 255)``.

    Args:
        mask: ``(H, W) bool``, row = y, column = x; ``H, W >= 1``.

    Returns:
        The RLE as a list of Python ints in 0..255 (JSON-ready ``value.rle``).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected shape (H, W), got {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"mask: expected dtype bool, got {mask.dtype}")
    if mask.size == 0:
        raise ValueError(f"mask: expected H, W >= 1, got shape {mask.shape}")
    n_words = mask.size * 4
    if n_words > _MAX_WORDS:
        raise ValueError(f"mask: at most {_MAX_WORDS // 4} pixels fit a brush RLE, got {mask.size}")
    pixel_runs, pixel_values = _runs(np.ascontiguousarray(mask).reshape(-1))
    codes, nbits = _sdk_tokens(pixel_runs * 4, pixel_values.astype(np.uint8) * np.uint8(255))
    header_codes, header_bits = _header_codes(n_words)
    all_codes = np.concatenate((np.asarray(header_codes, dtype=np.int64), codes))
    all_bits = np.concatenate((np.asarray(header_bits, dtype=np.int64), nbits))
    return _pack_codes(all_codes, all_bits).tolist()


# -- decoding ------------------------------------------------------------------------------------


def _as_bytes(rle: Sequence[int] | bytes | np.ndarray) -> np.ndarray:
    """``(B,) uint8`` from a list of ints 0..255 (or bytes); ValueError for anything else."""
    if isinstance(rle, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    if type(rle) is list:  # the usual case (JSON): ints 0..255 convert in C, ~10x faster
        with contextlib.suppress(TypeError, ValueError):
            return np.frombuffer(bytes(rle), dtype=np.uint8)
    if isinstance(rle, str) or not isinstance(rle, (Sequence, np.ndarray)):
        raise ValueError(f"rle: expected a list of ints 0..255, got {type(rle).__name__}")
    try:
        array = np.asarray(rle)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"rle: expected a flat list of ints 0..255 ({error})") from None
    if array.ndim != 1:
        raise ValueError(f"rle: expected a flat list of ints 0..255, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"rle: expected ints 0..255, got elements of dtype {array.dtype}")
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError("rle: expected ints 0..255, got non-integer numbers")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"rle: expected ints 0..255, got values in {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def _read_header(data: np.ndarray) -> tuple[int, int, tuple[int, int, int, int]]:
    if data.size * 8 < _HEADER_BITS:
        raise ValueError(f"rle: truncated: {data.size} bytes, a header alone needs 7")
    head = int.from_bytes(data[:7].tobytes(), "big") >> (56 - _HEADER_BITS)
    n_words = head >> 21
    word_size = ((head >> 16) & 0x1F) + 1
    a, b, c, d = (((head >> (12 - 4 * k)) & 0xF) + 1 for k in range(4))
    return n_words, word_size, (a, b, c, d)


def _parse_tokens(
    data: np.ndarray, n_words: int, word_size: int, field_sizes: tuple[int, ...]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Walk the token stream once (one Python step per token; literal words are skipped over).

    Returns lists ``(is_repeat, count, payload_bit, repeat_value)`` per token, where
    ``payload_bit`` is the bit offset of the token's first word.
    """
    n_bits = data.size * 8
    padded = np.concatenate((data, np.zeros(8, np.uint8)))
    # Big-endian 64-bit window starting at every byte: a token header plus one word fits in it.
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)[: data.size].copy()
    window_at = windows.view(">u8").reshape(-1).tolist()
    word_mask = (1 << word_size) - 1
    field_masks = [(1 << s) - 1 for s in field_sizes]
    is_repeat: list[int] = []
    counts: list[int] = []
    payload_bits: list[int] = []
    repeat_values: list[int] = []
    position = _HEADER_BITS
    produced = 0
    while produced < n_words:
        if position + 3 > n_bits:
            raise ValueError(f"rle: truncated: stream ends after {produced} of {n_words} values")
        window = window_at[position >> 3]
        free = 64 - (position & 7)  # bits of the window from `position` on
        head = (window >> (free - 3)) & 7
        field = field_sizes[head & 3]
        count = ((window >> (free - 3 - field)) & field_masks[head & 3]) + 1
        payload = position + 3 + field
        if head >> 2:
            value = (window >> (free - 3 - field - word_size)) & word_mask
            position = payload + word_size
        else:
            value = 0
            position = payload + count * word_size
        if position > n_bits:
            raise ValueError(f"rle: truncated: stream ends after {produced} of {n_words} values")
        produced += count
        if produced > n_words:
            raise ValueError(f"rle: corrupt: runs hold more than the declared {n_words} values")
        is_repeat.append(head >> 2)
        counts.append(count)
        payload_bits.append(payload)
        repeat_values.append(value)
    return is_repeat, counts, payload_bits, repeat_values


def _read_words(data: np.ndarray, bit_offsets: np.ndarray, word_size: int) -> np.ndarray:
    """Words of ``word_size`` bits (<= 8) at the given bit offsets, ``uint8``."""
    padded = np.concatenate((data, np.zeros(2, np.uint8))).astype(np.uint16)
    first = bit_offsets >> 3
    pair = (padded[first] << 8) | padded[first + 1]
    shift = (16 - word_size - (bit_offsets & 7)).astype(np.uint16)
    return ((pair >> shift) & ((1 << word_size) - 1)).astype(np.uint8)


def decode_words(rle: Sequence[int] | bytes | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode an rle-pack stream into runs: ``(values (R,) uint8, lengths (R,) int64)``.

    ``np.repeat(values, lengths)`` is the full word array (what ``brush.decode_rle`` returns).
    Raises ValueError for malformed input (not ints 0..255, truncated, overlong runs, word size > 8).
    """
    data = _as_bytes(rle)
    n_words, word_size, field_sizes = _read_header(data)
    if word_size > 8:
        raise ValueError(f"rle: expected word size <= 8 bits, got {word_size}")
    if n_words == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    is_repeat, counts, payload_bits, repeat_values = _parse_tokens(data, n_words, word_size, field_sizes)
    repeat = np.asarray(is_repeat, dtype=bool)
    count = np.asarray(counts, dtype=np.int64)
    payload = np.asarray(payload_bits, dtype=np.int64)
    # Every repeat token is one run; a literal token of c words is c runs of one word.
    runs_per_token = np.where(repeat, 1, count)
    token_of_run = np.repeat(np.arange(count.size), runs_per_token)
    index_in_token = np.arange(token_of_run.size) - (np.cumsum(runs_per_token) - runs_per_token)[token_of_run]
    values = np.asarray(repeat_values, dtype=np.uint8)[token_of_run]
    literal = ~repeat[token_of_run]
    if literal.any():
        offsets = payload[token_of_run[literal]] + index_in_token[literal] * word_size
        values[literal] = _read_words(data, offsets, word_size)
    lengths = np.where(literal, 1, count[token_of_run])
    return values, lengths


def _alpha_runs(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
    """Alpha values and their pixel run lengths for an ``height`` x ``width`` brush RLE."""
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"size: expected height, width >= 1, got {height} x {width}")
    values, lengths = decode_words(rle)
    expected = int(height) * int(width) * 4
    total = int(lengths.sum())
    if total != expected:
        raise ValueError(
            f"rle: size mismatch: it holds {total} values, expected {height} x {width} x 4 = {expected}"
        )
    # Word k is channel k % 4 of pixel k // 4; pixel i's alpha is word 4 i + 3. A run of words
    # [start, end) covers the alphas of pixels ceil((start - 3) / 4) = start // 4 up to
    # ceil((end - 3) / 4) - 1 = end // 4 - 1.
    ends = np.cumsum(lengths)
    return values, ends // 4 - (ends - lengths) // 4


def rle_decode_alpha(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """The alpha channel of a brush RLE, ``(H, W) uint8`` (``decode_rle(rle).reshape(H, W, 4)[..., 3]``)."""
    values, pixel_counts = _alpha_runs(rle, height, width)
    return np.repeat(values, pixel_counts).reshape(int(height), int(width))


def rle_decode(
    rle: Sequence[int] | bytes | np.ndarray,
    height: int,
    width: int,
    *,
    threshold: int = DEFAULT_ALPHA_THRESHOLD,
) -> np.ndarray:
    """Decode a Label Studio brush RLE into a ``(height, width) bool`` mask.

    Args:
        rle: ``value.rle`` of a brush result: ints 0..255 (list, bytes or ``uint8`` array).
        height, width: the region's ``original_height`` / ``original_width`` in pixels.
        threshold: foreground where alpha ``>= threshold`` (default 128, see the module docstring).

    Raises:
        ValueError: not a list of bytes, truncated or corrupt stream, or a stream whose length is
            not ``height * width * 4`` (naming both sizes).
    """
    values, pixel_counts = _alpha_runs(rle, height, width)
    return np.repeat(values >= threshold, pixel_counts).reshape(int(height), int(width))
