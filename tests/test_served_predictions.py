"""Finding the samsem prediction an annotator corrected (backend/served_predictions.py)."""

from __future__ import annotations

import pytest

from backend.served_predictions import (
    choose_served,
    is_samsem_prediction,
    made_from_a_prediction,
    served_prediction,
    timestamp,
)


def prediction(prediction_id, created_at, model_version="samsem-x-1"):
    return {"id": prediction_id, "model_version": model_version, "created_at": created_at, "result": []}


ANNOTATION = {
    "id": 5,
    "created_at": "2026-01-01T12:00:00Z",
    "prediction": {},
    "parent_prediction": None,
    "result": [{"id": "t9-brush-0", "origin": "prediction-changed"}],
}
TASK = {"id": 9, "total_predictions": 2}


def never_called(task_id):
    raise AssertionError(f"Label Studio was asked for the predictions of task {task_id}")


def test_samsem_predictions_are_recognised_by_model_version_and_a_result_list():
    assert is_samsem_prediction(prediction(1, None))
    assert not is_samsem_prediction(prediction(1, None, model_version="yolo-3"))
    assert not is_samsem_prediction({"model_version": "samsem-x-1", "result": "not a list"})
    assert not is_samsem_prediction({}) and not is_samsem_prediction(None)


def test_the_annotations_own_samsem_prediction_is_used_without_asking():
    own = prediction(3, "2026-01-01T13:00:00Z")
    assert served_prediction(ANNOTATION | {"prediction": own}, TASK, never_called) is own


def test_predictions_carried_by_the_task_are_used_without_asking():
    seen = prediction(2, "2026-01-01T11:00:00Z")
    task = TASK | {"predictions": [prediction(1, "2026-01-01T10:00:00Z"), seen]}
    assert served_prediction(ANNOTATION, task, never_called) is seen


@pytest.mark.parametrize(
    "task", [TASK | {"total_predictions": 0}, {"id": 9}, {"id": "nine", "total_predictions": 1}]
)
def test_tasks_without_predictions_are_not_looked_up(task):
    assert served_prediction(ANNOTATION, task, never_called) is None


def test_a_parent_prediction_is_looked_up_even_without_a_prediction_count():
    asked = []
    parent = prediction(4, "2026-01-01T09:00:00Z")

    def listing(task_id):
        asked.append(task_id)
        return [parent, prediction(6, "2026-01-01T11:00:00Z")]

    assert served_prediction(ANNOTATION | {"parent_prediction": 4}, {"id": 9}, listing) is parent
    assert asked == [9]
    assert served_prediction(ANNOTATION, TASK, None) is None, "no Label Studio: nothing to ask"


def test_annotations_not_made_from_a_prediction_are_not_compared_with_one():
    """Created through the API (no origin) or drawn from scratch: nobody reviewed a prediction,
    so no served region may count as deleted."""
    for results in ([{"id": "a"}], [{"id": "a", "origin": "manual"}], [], None):
        annotation = ANNOTATION | {"result": results}
        assert not made_from_a_prediction(annotation)
        assert served_prediction(annotation, TASK, never_called) is None
    accepted = ANNOTATION | {"result": [{"id": "a", "origin": "manual"}, {"id": "b", "origin": "prediction"}]}
    assert made_from_a_prediction(accepted)
    assert made_from_a_prediction(ANNOTATION | {"result": [], "parent_prediction": 3})
    assert not made_from_a_prediction(ANNOTATION | {"result": [], "parent_prediction": True})


def test_the_newest_prediction_made_before_the_annotation_is_chosen():
    before, tie_newer_id = prediction(1, "2026-01-01T11:00:00Z"), prediction(2, "2026-01-01T11:00:00Z")
    after = prediction(3, "2026-01-01T12:00:01Z")
    undated = prediction(4, "yesterday")
    assert choose_served(ANNOTATION, [undated, before, after, tie_newer_id]) is tie_newer_id
    assert choose_served(ANNOTATION, [after, undated]) is None
    assert choose_served(ANNOTATION | {"created_at": None}, [before, after]) is after
    assert choose_served(ANNOTATION, [prediction(5, "2026-01-01T11:30:00Z", "other")]) is None


def test_timestamps_accept_z_and_offsets_and_refuse_garbage():
    assert timestamp("2026-01-01T12:00:00Z") == timestamp("2026-01-01T13:00:00+01:00")
    assert timestamp("soon") is None and timestamp(None) is None and timestamp("") is None
