"""Which samsem prediction an annotator saw when making an annotation (the reference that turns
an annotation into corrections: accepted, relabelled, deleted regions).

Label Studio stores the prediction in ``annotation.prediction`` only when the prediction's
``model_version`` equals the project's *model version* setting. When an ML backend is connected
that setting becomes the backend's *title*, while samsem's predictions carry
``samsem-<embedder>-<revision>``: so by default the field is ``{}`` (as in every captured webhook)
and the served prediction has to be found among the task's predictions:

1. ``annotation.prediction`` when it is a samsem prediction;
2. else, when the annotation shows that it was made from a prediction (a ``parent_prediction``,
   or a region whose ``origin`` is ``"prediction"`` / ``"prediction-changed"``: the editor marks
   every region it submits, annotations created through the API carry no origin and were not
   made by reviewing a prediction), among the samsem predictions of the task
   (``task["predictions"]`` when the task carries them, else ``GET /api/predictions/?task=<id>``,
   asked only when Label Studio says the task has predictions or a ``parent_prediction`` is
   named): the one whose id is the annotation's ``parent_prediction``, else the newest one
   created no later than the annotation (Label Studio shows the newest prediction of the
   connected backend).

Timestamps are ISO 8601 strings (``Z`` allowed); ids are Label Studio's integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from backend.runtime import MODEL_VERSION_PREFIX

ListPredictions = Callable[[int], Sequence[Any]]
"""``task id → the task's predictions`` as Label Studio lists them (``/api/predictions/?task=``)."""


def timestamp(value: Any) -> datetime | None:
    """An ISO 8601 string (``Z`` allowed) as an aware datetime (naive ones taken as local time),
    or None if absent or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.now().astimezone().tzinfo)


def is_samsem_prediction(prediction: Any) -> bool:
    """True for a prediction record samsem served: a mapping whose ``model_version`` starts with
    :data:`MODEL_VERSION_PREFIX` and whose ``result`` is a list."""
    return (
        isinstance(prediction, Mapping)
        and str(prediction.get("model_version", "")).startswith(MODEL_VERSION_PREFIX)
        and isinstance(prediction.get("result"), list)
    )


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


REVIEWED_ORIGINS = ("prediction", "prediction-changed")
"""Region origins the editor gives to regions that came from a prediction."""


def made_from_a_prediction(annotation: Mapping[str, Any]) -> bool:
    """True when ``annotation`` names a ``parent_prediction`` or holds a region whose ``origin`` is
    one of :data:`REVIEWED_ORIGINS`."""
    if _integer(annotation.get("parent_prediction")) is not None:
        return True
    results = annotation.get("result")
    return isinstance(results, list) and any(
        isinstance(region, Mapping) and region.get("origin") in REVIEWED_ORIGINS for region in results
    )


def _might_have_predictions(annotation: Mapping[str, Any], task: Mapping[str, Any]) -> bool:
    count = _integer(task.get("total_predictions"))
    return (count is not None and count > 0) or _integer(annotation.get("parent_prediction")) is not None


def choose_served(annotation: Mapping[str, Any], predictions: Sequence[Any]) -> Mapping[str, Any] | None:
    """Among a task's ``predictions``, the samsem one the annotator saw (rule 2 of the module
    docstring), or None."""
    ours = [p for p in predictions if is_samsem_prediction(p)]
    parent = _integer(annotation.get("parent_prediction"))
    if parent is not None:
        for prediction in ours:
            if _integer(prediction.get("id")) == parent:
                return prediction
    created = timestamp(annotation.get("created_at"))
    dated = [(timestamp(p.get("created_at")), p) for p in ours]
    seen = [
        (when, prediction)
        for when, prediction in dated
        if when is not None and (created is None or when <= created)
    ]
    if not seen:
        return None
    return max(seen, key=lambda pair: (pair[0], _integer(pair[1].get("id")) or 0))[1]


def served_prediction(
    annotation: Mapping[str, Any], task: Mapping[str, Any], list_predictions: ListPredictions | None
) -> Mapping[str, Any] | None:
    """The samsem prediction the annotator saw when making ``annotation`` of ``task`` (see the
    module docstring), or None when there is none to be found. ``list_predictions`` is called at
    most once, and not at all when the task carries its predictions or has none
    (``list_predictions=None``: Label Studio is not reachable, rule 2 uses the task only)."""
    own = annotation.get("prediction")
    if is_samsem_prediction(own):
        return own
    if not made_from_a_prediction(annotation):
        return None
    predictions = task.get("predictions")
    if not isinstance(predictions, list):
        task_id = _integer(task.get("id"))
        if list_predictions is None or task_id is None or not _might_have_predictions(annotation, task):
            return None
        predictions = list(list_predictions(task_id))
    return choose_served(annotation, predictions)
