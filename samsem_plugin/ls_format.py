"""Label Studio results ⇄ samsem regions, and smart-tool context → :class:`Prompt`.

The only place of the library where Label Studio's **percent** coordinates exist.

Coordinate conventions:

* Label Studio: ``x, y, width, height`` and polygon points in percent (0–100) of the image's
  natural size (``original_width`` × ``original_height``, EXIF orientation applied). A percent
  value ``p`` along x is the continuous pixel coordinate ``p / 100 * width``.
* samsem: continuous pixel coordinates, pixel ``(col, row)`` covers ``[col, col + 1) × [row, row + 1)``;
  masks ``(H, W) bool`` (row = y); boxes XYXY in pixels.
* Rasterising (polygons, rectangles): a pixel is inside when its centre ``(col + 0.5, row + 0.5)`` is
  inside the shape (left/top edges inclusive, right/bottom exclusive), so a rectangle on whole
  pixel corners gives exactly the pixels it covers.
* Polygons written from masks follow the outer boundary of the mask's pixel squares (vertices on
  pixel corners), then are simplified with ``cv2.approxPolyDP`` (tolerance in pixels).

Result ⇄ region rules:

* One result per region; regions with an empty mask (or an empty box, for rectangles) are left
  out. Polygons keep only the largest outer contour (Label Studio polygons have no holes and one
  ring); pixels of other parts and holes are lost, and parts 1 pixel apart merge.
* Unlabelled regions (label ``None``) are written with an empty label list (``"brushlabels": []``),
  which ``LabelInterface.validate_prediction`` accepts; the annotator picks the label. For a
  ``Labels`` + tool control they are left out (an empty label list fails validation there).
* Reading results: only ``brushlabels`` / ``polygonlabels`` / ``rectanglelabels`` results of the
  config's output controls are read (keypoints, relations, text areas, choices and unknown
  controls are skipped), regions decoding to an empty mask are skipped, and a brush whose
  ``original_width/height`` differ from the image is decoded at its own size and resized to the
  image (nearest neighbour). Malformed results raise ``ValueError`` naming the result ``id``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from .brush_rle import rle_decode, rle_encode
from .label_config import OUTPUT_TYPES, ControlSpec, ProjectConfig
from .prompts import AnnotatedRegion, Prompt, ServedRegion
from .regions import Regions

logger = logging.getLogger(__name__)

_FILL_CELLS_PER_CHUNK = 1 << 20  # rows x edges per step of the polygon fill


# -- geometry ------------------------------------------------------------------------------------


def fill_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a polygon given in continuous pixel coordinates into a ``(H, W) bool`` mask.

    Args:
        points: ``(K, 2) float`` XY vertices in pixels (K >= 3); the ring is closed implicitly.
        height, width: mask size in pixels.

    A pixel is set when its centre lies inside the polygon (even-odd rule; left/top edges
    inclusive, right/bottom exclusive).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((height, width), dtype=bool)
    if points.shape[0] < 3 or height == 0 or width == 0:
        return mask
    start, end = points, np.roll(points, -1, axis=0)
    sloped = start[:, 1] != end[:, 1]  # horizontal edges never cross a row centre line
    start, end = start[sloped], end[sloped]
    if start.size == 0:
        return mask
    y_low = np.minimum(start[:, 1], end[:, 1])
    y_high = np.maximum(start[:, 1], end[:, 1])
    first_row = max(0, math.ceil(float(y_low.min()) - 0.5))
    last_row = min(height, math.ceil(float(y_high.max()) - 0.5))
    inverse_slope = (end[:, 0] - start[:, 0]) / (end[:, 1] - start[:, 1])
    rows_per_chunk = max(1, _FILL_CELLS_PER_CHUNK // start.shape[0])
    for row0 in range(first_row, last_row, rows_per_chunk):
        row1 = min(last_row, row0 + rows_per_chunk)
        centre_y = np.arange(row0, row1)[:, None] + 0.5
        crosses = (y_low <= centre_y) & (centre_y < y_high)  # (R, E), half-open: vertices once
        x = np.where(crosses, start[:, 0] + (centre_y - start[:, 1]) * inverse_slope, np.inf)
        x.sort(axis=1)
        n_cross = crosses.sum(axis=1)
        pair_row, pair = np.nonzero(np.arange(x.shape[1] // 2)[None, :] < (n_cross // 2)[:, None])
        left = np.clip(np.ceil(x[pair_row, 2 * pair] - 0.5), 0, width).astype(np.int64)
        right = np.clip(np.ceil(x[pair_row, 2 * pair + 1] - 0.5), 0, width).astype(np.int64)
        # Spans are sorted and disjoint along the flattened rows: the chunk alternates
        # background, span, background, ... so one np.repeat paints it.
        bounds = np.stack([pair_row * width + left, pair_row * width + right], axis=1).reshape(-1)
        bounds = np.concatenate(([0], bounds, [(row1 - row0) * width]))
        painted = np.arange(bounds.size - 1) % 2 == 1
        mask[row0:row1] = np.repeat(painted, np.diff(bounds)).reshape(row1 - row0, width)
    return mask


def rectangle_corners(x: float, y: float, width: float, height: float, rotation: float = 0.0) -> np.ndarray:
    """Corners ``(4, 2) float64`` of a Label Studio rectangle, all in pixels.

    ``(x, y)`` is the top-left corner before rotation; ``rotation`` is in degrees, clockwise on
    screen (y down), around ``(x, y)``, as Label Studio (Konva) draws it.
    """
    angle = math.radians(rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    local = np.array([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]])
    rotated = local @ np.array([[cos, sin], [-sin, cos]])
    return rotated + np.array([x, y])


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0) -> np.ndarray | None:
    """The largest outer boundary of a ``(H, W) bool`` mask as a polygon, or None if empty.

    Returns ``(K, 2) float64`` XY vertices in pixels on pixel corners (K >= 3), simplified with
    ``cv2.approxPolyDP(tolerance)`` (pixels; 0 keeps every corner; falls back to the unsimplified
    ring if simplification leaves fewer than 3 vertices).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = mask[y0:y1, x0:x1]
    # Corner (i, j) is set when one of the 4 pixels around it is foreground: tracing the centres
    # of these corner cells follows the outer edges of the mask's pixels.
    corners = np.zeros((crop.shape[0] + 1, crop.shape[1] + 1), dtype=np.uint8)
    for dy in (0, 1):
        for dx in (0, 1):
            corners[dy : dy + crop.shape[0], dx : dx + crop.shape[1]] |= crop
    contours, _ = cv2.findContours(corners, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    ring = max(contours, key=cv2.contourArea)
    if tolerance > 0:
        simplified = cv2.approxPolyDP(ring, float(tolerance), True)
        if len(simplified) >= 3:
            ring = simplified
    return ring.reshape(-1, 2).astype(np.float64) + np.array([x0, y0], dtype=np.float64)


# -- regions → results ---------------------------------------------------------------------------


def _percent(values: np.ndarray | float, size: int) -> Any:
    return np.asarray(values, dtype=np.float64) / size * 100.0


def _brush_value(mask: np.ndarray, box: np.ndarray, tolerance: float) -> dict | None:
    if not mask.any():
        return None
    return {"format": "rle", "rle": rle_encode(mask)}


def _polygon_value(mask: np.ndarray, box: np.ndarray, tolerance: float) -> dict | None:
    polygon = mask_to_polygon(mask, tolerance)
    if polygon is None:
        return None
    height, width = mask.shape
    percent = np.stack([_percent(polygon[:, 0], width), _percent(polygon[:, 1], height)], axis=1)
    return {"points": percent.tolist()}


def _rectangle_value(mask: np.ndarray, box: np.ndarray, tolerance: float) -> dict | None:
    height, width = mask.shape
    x0, x1 = np.clip(box[[0, 2]].astype(np.float64), 0, width)
    y0, y1 = np.clip(box[[1, 3]].astype(np.float64), 0, height)
    if not (x1 > x0 and y1 > y0):
        return None
    return {
        "x": float(_percent(x0, width)),
        "y": float(_percent(y0, height)),
        "width": float(_percent(x1 - x0, width)),
        "height": float(_percent(y1 - y0, height)),
        "rotation": 0,
    }


_VALUE_WRITERS = {
    "BrushLabels": _brush_value,
    "PolygonLabels": _polygon_value,
    "RectangleLabels": _rectangle_value,
}


def regions_to_results(
    regions: Regions, control: ControlSpec, *, id_prefix: str, polygon_tolerance: float = 1.0
) -> list[dict]:
    """Label Studio results (JSON-ready dicts) for ``regions``, written to ``control``.

    Args:
        regions: regions on one image; ``image_size`` must be the image's natural size.
        control: an output control (``BrushLabels`` / ``PolygonLabels`` / ``RectangleLabels``).
        id_prefix: prefix of the result ids; ids are ``f"{id_prefix}{control.name}-{i}"`` with
            ``i`` the region's index in ``regions`` (use a prefix unique per prediction); for a
            ``Labels`` + tool control ``f"{id_prefix}{control.name}-{tool}-{i}"`` (tool e.g.
            ``brush``), as one ``Labels`` control can feed several tools.
        polygon_tolerance: ``approxPolyDP`` tolerance in pixels for polygons (>= 0).

    Returns:
        One result per non-empty region (unlabelled ones left out for a ``Labels`` + tool
        control), in order: ``id, from_name, to_name, type, value,
        original_width, original_height, image_rotation (0), score, readonly (False)``; ``score``
        is ``label_score * proposal_score`` for labelled regions, ``proposal_score`` otherwise.
        Plain Python types only (``json.dumps`` works).

    Raises:
        ValueError: unsupported control type, a label not in ``control.labels``, bad tolerance.
    """
    writer = _VALUE_WRITERS.get(control.type)
    if writer is None:
        raise ValueError(f"control {control.name!r}: expected type in {OUTPUT_TYPES}, got {control.type!r}")
    if not (math.isfinite(polygon_tolerance) and polygon_tolerance >= 0):
        raise ValueError(f"polygon_tolerance: expected a finite number >= 0, got {polygon_tolerance}")
    unknown = sorted({str(label) for label in regions.labels if label is not None} - set(control.labels))
    if unknown:
        raise ValueError(
            f"labels {unknown} are not labels of control {control.name!r} (expected {list(control.labels)})"
        )
    height, width = regions.image_size
    id_stem = f"{id_prefix}{control.name}-"
    if control.via_labels:
        id_stem += control.result_type.removesuffix("labels") + "-"
    results = []
    for i in range(len(regions)):
        label = regions.labels[i]
        if label is None and control.via_labels:
            continue  # a Labels + tool region must carry a label (validate_prediction rejects [])
        value = writer(regions.masks[i], regions.boxes[i], polygon_tolerance)
        if value is None:
            continue
        value[control.result_type] = [] if label is None else [str(label)]
        score = float(regions.proposal_score[i])
        if label is not None:
            score *= float(regions.label_score[i])
        results.append(
            {
                "id": f"{id_stem}{i}",
                "from_name": control.name,
                "to_name": control.to_name,
                "type": control.result_type,
                "value": value,
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "score": score,
                "readonly": False,
            }
        )
    return results


# -- results → masks -----------------------------------------------------------------------------


def _result_name(result: dict, index: int) -> str:
    return repr(result.get("id", f"#{index}"))


def _number(value: dict, key: str, where: str, default: float | None = None) -> float:
    raw = value.get(key, default)
    try:
        number = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"result {where}: value.{key}: expected a number, got {raw!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"result {where}: value.{key}: expected a finite number, got {raw!r}")
    return number


def _size_of(result: dict, key: str, default: int, where: str) -> int:
    raw = result.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ValueError(f"result {where}: {key}: expected a positive integer, got {raw!r}")
    if raw != int(raw) or raw < 1:
        raise ValueError(f"result {where}: {key}: expected a positive integer, got {raw!r}")
    return int(raw)


def _brush_mask(value: dict, result: dict, height: int, width: int, where: str) -> np.ndarray:
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise ValueError(f"result {where}: expected value.format 'rle' with value.rle")
    own_height = _size_of(result, "original_height", height, where)
    own_width = _size_of(result, "original_width", width, where)
    try:
        mask = rle_decode(value["rle"], own_height, own_width)
    except ValueError as error:
        raise ValueError(f"result {where}: {error}") from None
    if (own_height, own_width) != (height, width):
        logger.warning(
            "result %s: brush is %dx%d, image is %dx%d: resized", where, own_width, own_height, width, height
        )
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return mask


def _polygon_mask(value: dict, result: dict, height: int, width: int, where: str) -> np.ndarray:
    raw = value.get("points")
    try:
        points = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"result {where}: value.points: expected [[x, y], ...] numbers") from None
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 3:
        raise ValueError(
            f"result {where}: value.points: expected >= 3 [x, y] pairs, got shape {points.shape}"
        )
    if not np.isfinite(points).all():
        raise ValueError(f"result {where}: value.points: expected finite numbers")
    return _fill_pixels(points / 100.0 * np.array([width, height]), height, width)


def _fill_pixels(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    limit = 4.0 * max(height, width)  # far-away vertices (corrupt input) cannot blow up the fill
    return fill_polygon(np.clip(pixels, -limit, limit), height, width)


def _rectangle_mask(value: dict, result: dict, height: int, width: int, where: str) -> np.ndarray:
    x, w = (_number(value, key, where) / 100.0 * width for key in ("x", "width"))
    y, h = (_number(value, key, where) / 100.0 * height for key in ("y", "height"))
    rotation = _number(value, "rotation", where, default=0.0)
    return _fill_pixels(rectangle_corners(x, y, w, h, rotation), height, width)


_MASK_READERS = {
    "brushlabels": _brush_mask,
    "polygonlabels": _polygon_mask,
    "rectanglelabels": _rectangle_mask,
}


def _check_size(height: int, width: int) -> tuple[int, int]:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size: expected height, width >= 1, got {height} x {width}")
    return int(height), int(width)


def _decoded(
    results: Sequence[dict], height: int, width: int, config: ProjectConfig
) -> Iterator[tuple[str, ControlSpec, list[str], np.ndarray, dict]]:
    """``(region_id, control, labels, mask, result)`` for each readable, non-empty region."""
    height, width = _check_size(height, width)
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise ValueError(f"results: expected a list of result dicts, got {type(results).__name__}")
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            continue
        result_type = str(result.get("type", "")).lower()
        reader = _MASK_READERS.get(result_type)
        control = config.control_for(str(result.get("from_name", "")), result_type) if reader else None
        if reader is None or control is None:
            continue
        where = _result_name(result, index)
        value = result.get("value")
        if not isinstance(value, dict):
            raise ValueError(f"result {where}: expected value to be an object, got {type(value).__name__}")
        labels = value.get(result_type, value.get("labels", []))
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError(
                f"result {where}: value.{result_type}: expected a list of strings, got {labels!r}"
            )
        mask = reader(value, result, height, width, where)
        if not mask.any():
            logger.debug("result %s: empty mask, skipped", where)
            continue
        region_id = str(result["id"]) if "id" in result else f"result-{index}"
        yield region_id, control, labels, mask, result


def results_to_annotated(
    results: Sequence[dict], height: int, width: int, config: ProjectConfig
) -> list[AnnotatedRegion]:
    """The labelled regions of an annotation's ``result`` list, rasterised to ``(height, width)``.

    Args:
        results: ``annotation["result"]``: Label Studio result dicts (percent coordinates).
        height, width: the image's natural size in pixels (EXIF applied).
        config: the project's parsed label config.

    Returns:
        One :class:`AnnotatedRegion` per brush / polygon / rectangle result of an output control
        that carries a label of that control (the first one if several); ``origin`` and
        ``from_name`` copied. Results without a valid label are skipped (logged). Rectangles of a
        smart ``RectangleLabels`` control are included: filter on ``control`` if that tool is only
        used for prompting.

    Raises:
        ValueError: malformed result (names the result id and the problem).
    """
    annotated = []
    for region_id, control, labels, mask, result in _decoded(results, height, width, config):
        label = next((label for label in labels if label in control.labels), None)
        if label is None:
            logger.info("result %r: no label of control %r in %r, skipped", region_id, control.name, labels)
            continue
        annotated.append(
            AnnotatedRegion(
                region_id=region_id, label=label, mask=mask, origin=result.get("origin"), control=control.name
            )
        )
    return annotated


def results_to_served(
    results: Sequence[dict], height: int, width: int, config: ProjectConfig
) -> list[ServedRegion]:
    """The regions of a prediction we served (``annotation["prediction"]["result"]``).

    Same reading rules as :func:`results_to_annotated`, but the label may be absent (``None``,
    served unlabelled); the first label is kept as served.
    """
    return [
        ServedRegion(
            region_id=region_id, label=labels[0] if labels else None, mask=mask, control=control.name
        )
        for region_id, control, labels, mask, _ in _decoded(results, height, width, config)
    ]


# -- smart-tool context → prompt -----------------------------------------------------------------


def _is_positive(result: dict) -> bool:
    flag = result.get("is_positive")
    if flag is None and isinstance(result.get("value"), dict):
        flag = result["value"].get("positive")
    if flag is None:
        return True
    if isinstance(flag, str):
        return flag.strip().lower() not in ("false", "0", "no", "")
    return bool(flag)


def _finite_numbers(value: dict, keys: Sequence[str]) -> list[float] | None:
    numbers = []
    for key in keys:
        raw = value.get(key)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            return None
        numbers.append(float(raw))
    return numbers


def _keypoint_pixels(value: dict, height: int, width: int) -> list[float] | None:
    """``[x, y]`` pixels of a keypoint value (percent), clipped to the image; None if unusable."""
    xy = _finite_numbers(value, ("x", "y"))
    if xy is None:
        return None
    return [float(np.clip(xy[0] / 100 * width, 0, width)), float(np.clip(xy[1] / 100 * height, 0, height))]


def _rectangle_box(value: dict, height: int, width: int) -> list[float] | None:
    """XYXY pixel box of a rectangle value (percent; bounding box if rotated), clipped; None if empty."""
    numbers = _finite_numbers(value, ("x", "y", "width", "height"))
    if numbers is None:
        return None
    x, w = numbers[0] / 100 * width, numbers[2] / 100 * width
    y, h = numbers[1] / 100 * height, numbers[3] / 100 * height
    rotation = (_finite_numbers({"r": value.get("rotation", 0)}, ("r",)) or [0.0])[0]
    corners = rectangle_corners(x, y, w, h, rotation)
    x0, y0 = np.clip(corners.min(axis=0), 0, [width, height])
    x1, y1 = np.clip(corners.max(axis=0), 0, [width, height])
    if not (x1 > x0 and y1 > y0):
        return None
    return [float(x0), float(y0), float(x1), float(y1)]


def _smart_label(result: dict, result_type: str, config: ProjectConfig) -> str | None:
    """The first label of a smart region that belongs to its control, or None."""
    from_name = str(result.get("from_name"))
    chosen = result["value"].get(result_type) if result_type.endswith("labels") else None
    known = config.labels_of(from_name) if config.control_for(from_name) else ()
    return next((item for item in chosen or [] if item in known), None)


def context_to_prompt(context: dict, config: ProjectConfig, height: int, width: int) -> Prompt:
    """A SAM prompt in pixels from ``params.context`` of an interactive ``/predict`` request.

    Args:
        context: ``{"result": [...]}`` with the smart regions of the current attempt, in percent
            of the image (``x_px = x / 100 * width``).
        config: the project's parsed label config (to find the smart control's labels).
        height, width: the image's natural size in pixels.

    Returns:
        :class:`Prompt` with every keypoint as a point (``is_positive`` or ``value.positive``;
        missing → positive), the **last** rectangle as the XYXY box (bounding box if rotated), all
        clipped to the image; ``label`` / ``control`` from the last smart region carrying a label
        of its control (else the last smart region's control and no label).

    Raises:
        ValueError: context is not ``{"result": [...]}``, or no usable keypoint or rectangle.
    """
    height, width = _check_size(height, width)
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        raise ValueError("context: expected an object with a 'result' list of smart-tool regions")
    points, point_labels, box = [], [], None
    label, control_name = None, None
    for result in context["result"]:
        if not isinstance(result, dict) or not isinstance(result.get("value"), dict):
            continue
        result_type = str(result.get("type", "")).lower()
        if result_type in ("keypointlabels", "keypoint"):
            point = _keypoint_pixels(result["value"], height, width)
            if point is None:
                continue
            points.append(point)
            point_labels.append(1 if _is_positive(result) else 0)
        elif result_type in ("rectanglelabels", "rectangle"):
            box = _rectangle_box(result["value"], height, width) or box
        else:
            continue
        result_label = _smart_label(result, result_type, config)
        if result_label is not None or label is None:  # the last labelled smart region wins
            from_name = result.get("from_name")
            control_name = None if from_name is None else str(from_name)
            label = result_label
    if not points and box is None:
        raise ValueError(
            "context: no usable keypoint or rectangle (expected keypointlabels with numeric x, y or "
            "rectanglelabels with a non-empty x, y, width, height inside the image)"
        )
    return Prompt(
        points=np.asarray(points, dtype=np.float32).reshape(-1, 2),
        point_labels=np.asarray(point_labels, dtype=np.int32),
        box=None if box is None else np.asarray(box, dtype=np.float32),
        label=label,
        control=control_name,
    )
