"""Figure 3: Label Studio brush RLE encode and decode vs ``label_studio_sdk.converter.brush``.

Masks: 1024² and 4032×3024 (a 12 MP phone photo), each an annotation-like smooth blob and a
speckled mask with many runs. Encode: ``rle_encode(mask)`` vs ``brush.mask2rle(mask * 255)``, the
bytes must be identical. Decode: ``rle_decode(rle, H, W)`` vs ``brush.decode_rle(rle)`` (alpha
>= 128), the masks must be identical.
"""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter import brush

from benchmarks.fixtures import blob_mask, speckled_mask
from benchmarks.harness import BenchmarkResult, compare_interleaved
from samsem_plugin.brush_rle import rle_decode, rle_encode

ENCODE_TARGET = 10.0
DECODE_TARGET = 5.0
SIZES = {"1024x1024": (1024, 1024), "4032x3024": (3024, 4032)}


def _sdk_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    return brush.decode_rle(rle).reshape(height, width, 4)[..., 3] >= 128


def run(quick: bool) -> BenchmarkResult:
    result = BenchmarkResult("rle")
    repeats = 3 if quick else 7
    sizes = {"1024x1024": SIZES["1024x1024"]} if quick else SIZES
    for size_name, size in sizes.items():
        for shape_name, mask in (("blob", blob_mask(size)), ("speckled", speckled_mask(size))):
            sdk_input = mask.astype(np.uint8) * 255
            ours_rle = rle_encode(mask)
            sdk_rle = list(brush.mask2rle(sdk_input))
            identical = ours_rle == sdk_rle
            encode = compare_interleaved(
                f"rle encode {size_name} {shape_name}",
                ("rle_encode", lambda mask=mask: rle_encode(mask)),
                ("brush.mask2rle", lambda sdk_input=sdk_input: brush.mask2rle(sdk_input)),
                repeats=repeats,
                target_ratio=ENCODE_TARGET,
            )
            encode.check = f"bytes identical: {identical} ({len(ours_rle)} B)"
            height, width = size
            decoded_equal = bool(
                np.array_equal(rle_decode(sdk_rle, height, width), _sdk_decode(sdk_rle, height, width))
                and np.array_equal(rle_decode(sdk_rle, height, width), mask)
            )
            decode = compare_interleaved(
                f"rle decode {size_name} {shape_name}",
                ("rle_decode", lambda rle=sdk_rle, h=height, w=width: rle_decode(rle, h, w)),
                ("brush.decode_rle", lambda rle=sdk_rle, h=height, w=width: _sdk_decode(rle, h, w)),
                repeats=repeats,
                target_ratio=DECODE_TARGET,
            )
            decode.check = f"masks identical: {decoded_equal}"
            result.comparisons += [encode, decode]
            result.info[f"{size_name} {shape_name}"] = {
                "pixels": int(mask.size),
                "foreground": int(mask.sum()),
                "rle_bytes": len(ours_rle),
                "bytes_identical": identical,
                "decoded_identical": decoded_equal,
            }
    return result
