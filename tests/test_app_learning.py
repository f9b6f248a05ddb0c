"""Learning through webhooks: memory = f(current annotations), visible in /metrics and model_version."""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.learning import parse_webhook
from samsem_plugin.brush_rle import rle_encode
from tests.conftest import IMAGE_SIZE, load_fixture, scene_image
from tests.support.http_server import Response

H, W = IMAGE_SIZE
PROJECT = "1"
TASK_IMAGES = {
    1: "/data/upload/1/421b84f1-img2.png",  # served by the session's fake Label Studio
    2: "/data/upload/1/learn-task-2.png",
    3: "/data/upload/1/learn-task-3.png",
}


def disc_mask():
    rows, cols = np.mgrid[:H, :W]
    return (rows - H * 0.35) ** 2 + (cols - W * 0.3) ** 2 < (min(H, W) * 0.2) ** 2


def square_mask():
    mask = np.zeros((H, W), bool)
    mask[H // 2 + 1 : H // 2 + H // 3 - 1, int(W * 0.6) + 1 : int(W * 0.6) + W // 4 - 1] = True
    return mask


def brush(region_id, label, mask, origin=None):
    result = {
        "id": region_id,
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle_encode(mask), "brushlabels": [label]},
    }
    if origin is not None:
        result["origin"] = origin
    return result


def annotation_event(
    action, annotation_id, task_id, results, updated_at, *, prediction=None, was_cancelled=False
):
    """A webhook body like the captured brush fixtures, with our own annotation content."""
    body = load_fixture("webhook_annotation_created_brush")
    body["action"] = action
    annotation = body["annotation"]
    annotation.update(
        id=annotation_id,
        task=task_id,
        result=results,
        updated_at=updated_at,
        prediction=prediction or {},
        was_cancelled=was_cancelled,
    )
    body["task"].update(id=task_id, data={"image": TASK_IMAGES[task_id]})
    return body


def at(second):
    return f"2026-11-21T22:35:{second:02d}.000000Z"


def metric(client, name, key):
    """``{label value of key: sample value}`` of metric ``name`` for PROJECT."""
    text = client.get("/metrics").get_data(as_text=True)
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("project") == PROJECT:
                values[sample.labels[key]] = sample.value
    return values


def exemplars(client):
    return metric(client, "samsem_exemplars", "label")


def kinds(client):
    return metric(client, "samsem_exemplars_by_kind", "kind")


def version(client):
    return client.post("/setup", json=dict(load_fixture("setup"), project="1.1795301086")).get_json()[
        "model_version"
    ]


def send(client, runtime, *bodies):
    for body in bodies:
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
    assert runtime.queue.join(timeout=60)


def add_task_images(label_studio):
    label_studio.add_image(TASK_IMAGES[2], scene_image(7))
    label_studio.add_image(TASK_IMAGES[3], scene_image(8))


@pytest.fixture
def learner(make_client, label_studio):
    add_task_images(label_studio)
    client, runtime = make_client()
    return client, runtime


def cat_and_dog(annotation_id=10, task_id=1, second=1, action="ANNOTATION_CREATED"):
    results = [brush("c1", "Cat", disc_mask()), brush("d1", "Dog", square_mask())]
    return annotation_event(action, annotation_id, task_id, results, at(second))


def test_created_annotations_for_two_classes_fill_the_memory(learner, label_studio):
    client, runtime = learner
    before = version(client)
    fetched = {task: len(label_studio.requests_to(TASK_IMAGES[task])) for task in (1, 2)}
    second_task = annotation_event("ANNOTATION_CREATED", 11, 2, [brush("c2", "Cat", disc_mask())], at(2))
    send(client, runtime, cat_and_dog(), second_task)
    assert runtime.queue.failed == 0
    assert exemplars(client) == {"Cat": 2.0, "Dog": 1.0}
    assert kinds(client) == {"positive": 3.0}
    assert version(client) != before
    for task in (1, 2):  # each task image fetched once, with the token (the fake answers 401 otherwise)
        assert len(label_studio.requests_to(TASK_IMAGES[task])) == fetched[task] + 1


def test_the_webhook_answers_before_learning_happens(learner, monkeypatch):
    client, runtime = learner
    gate = threading.Event()
    learn = runtime.learning.learn_annotation

    def held(*args):
        assert gate.wait(30)
        return learn(*args)

    monkeypatch.setattr(runtime.learning, "learn_annotation", held)
    response = client.post("/webhook", json=cat_and_dog())
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert runtime.queue.processed == 0 and exemplars(client) == {}
    gate.set()
    assert runtime.queue.join(timeout=60)
    assert exemplars(client) == {"Cat": 1.0, "Dog": 1.0}


def test_an_update_replaces_and_replays_or_late_events_change_nothing(learner):
    client, runtime = learner
    created = cat_and_dog(second=1)
    send(client, runtime, created)
    learnt = version(client)
    updated = annotation_event(
        "ANNOTATION_UPDATED",
        10,
        1,
        [brush("d1", "Dog", square_mask()), brush("d2", "Dog", disc_mask())],
        at(5),
    )
    send(client, runtime, updated)
    assert exemplars(client) == {"Dog": 2.0}, "the Cat exemplar was replaced"
    after_update = version(client)
    assert after_update != learnt
    send(client, runtime, updated, created)  # a replay, then the older event arriving late
    assert exemplars(client) == {"Dog": 2.0}
    assert version(client) == after_update, "replays do not move the model version"
    assert runtime.queue.failed == 0


def test_deleted_annotations_are_forgotten_for_good(learner):
    client, runtime = learner
    send(client, runtime, cat_and_dog(10, 1), cat_and_dog(11, 2))
    assert exemplars(client) == {"Cat": 2.0, "Dog": 2.0}
    plural = dict(load_fixture("webhook_annotations_deleted"), annotations=[{"id": 10}])
    plural["project"]["id"] = 1
    send(client, runtime, plural)
    assert exemplars(client) == {"Cat": 1.0, "Dog": 1.0}
    singular = {"action": "ANNOTATION_DELETED", "project": {"id": 1}, "annotation": {"id": 11}}
    send(client, runtime, singular)
    assert exemplars(client) == {}
    send(client, runtime, cat_and_dog(10, 1, second=30, action="ANNOTATION_UPDATED"))
    assert exemplars(client) == {}, "a late update of a deleted annotation does not resurrect it"


def served_prediction(model_version):
    return {"model_version": model_version, "result": [brush("t1-brush-0", "Cat", disc_mask())], "score": 0.5}


def test_a_relabelled_served_prediction_teaches_a_negative(learner):
    client, runtime = learner
    relabelled = [brush("t1-brush-0", "Dog", disc_mask(), origin="prediction-changed")]
    ours = annotation_event(
        "ANNOTATION_CREATED", 20, 1, relabelled, at(1), prediction=served_prediction("samsem-abc123-3")
    )
    send(client, runtime, ours)
    assert exemplars(client) == {"Dog": 1.0}
    assert kinds(client) == {"positive": 1.0, "negative": 1.0}
    theirs = annotation_event(
        "ANNOTATION_CREATED", 21, 2, relabelled, at(1), prediction=served_prediction("another-model-v1")
    )
    send(client, runtime, theirs)
    assert kinds(client) == {"positive": 2.0, "negative": 1.0}, "another model's prediction is not read"


def listed_prediction(prediction_id, model_version, created_at, label="Cat"):
    """A prediction as ``/api/predictions/?task=`` lists it."""
    return {
        "id": prediction_id,
        "model_version": model_version,
        "created_at": created_at,
        "result": [brush("t1-brush-0", label, disc_mask())],
        "score": 0.5,
    }


def test_the_corrected_prediction_is_found_among_the_tasks_when_label_studio_leaves_it_out(
    learner, label_studio, monkeypatch
):
    """Label Studio fills ``annotation.prediction`` only for the project's model-version setting
    (the backend's title by default), so the captured webhooks carry ``{}``: the prediction the
    annotator saw is the newest samsem one made before the annotation."""
    client, runtime = learner
    created = load_fixture("webhook_annotation_created_brush")["annotation"]["created_at"]
    assert created.startswith("2026-11-21T22:35:31")
    monkeypatch.setitem(
        label_studio.predictions,
        1,
        [
            listed_prediction(1, "samsem-abc123-1", "2026-11-21T22:30:00Z", label="Dog"),
            listed_prediction(2, "samsem-abc123-2", "2026-11-21T22:35:00Z", label="Cat"),  # seen
            listed_prediction(3, "other-model", "2026-11-21T22:35:10Z", label="Dog"),
            listed_prediction(4, "samsem-abc123-3", "2026-11-21T22:40:00Z", label="Dog"),  # after it
        ],
    )
    relabelled = [brush("t1-brush-0", "Dog", disc_mask(), origin="prediction-changed")]
    body = annotation_event("ANNOTATION_CREATED", 40, 1, relabelled, at(40))
    assert body["annotation"]["prediction"] == {} and body["task"]["total_predictions"] == 1
    lookups = len(label_studio.requests_to("/api/predictions/"))
    send(client, runtime, body)
    assert exemplars(client) == {"Dog": 1.0}
    assert kinds(client) == {"positive": 1.0, "negative": 1.0}, "Cat -> Dog teaches a negative for Cat"
    assert len(label_studio.requests_to("/api/predictions/")) == lookups + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'samsem_prediction_lookups_total{outcome="ok"} 1.0' in text


def test_parent_prediction_names_the_corrected_prediction(learner, label_studio, monkeypatch):
    client, runtime = learner
    monkeypatch.setitem(
        label_studio.predictions,
        2,
        [
            listed_prediction(7, "samsem-abc123-1", "2026-11-21T22:30:00Z", label="Cat"),  # the parent
            listed_prediction(8, "samsem-abc123-2", "2026-11-21T22:35:00Z", label="Dog"),  # newer
        ],
    )
    relabelled = [brush("t1-brush-0", "Dog", disc_mask(), origin="prediction-changed")]
    body = annotation_event("ANNOTATION_CREATED", 41, 2, relabelled, at(41))
    body["annotation"]["parent_prediction"] = 7
    send(client, runtime, body)
    assert kinds(client) == {"positive": 1.0, "negative": 1.0}, "relabelled from the parent's Cat"


def test_a_task_without_predictions_is_not_looked_up(learner, label_studio):
    client, runtime = learner
    body = annotation_event("ANNOTATION_CREATED", 42, 3, [brush("x", "Dog", square_mask())], at(42))
    body["task"]["total_predictions"] = 0
    lookups = len(label_studio.requests_to("/api/predictions/"))
    send(client, runtime, body)
    assert exemplars(client) == {"Dog": 1.0}
    assert len(label_studio.requests_to("/api/predictions/")) == lookups


def test_an_annotation_created_through_the_api_is_not_compared_with_a_prediction(
    learner, label_studio, monkeypatch
):
    """No region origin, no parent_prediction: nobody reviewed a prediction, so the task's
    predictions are not read and no served region counts as deleted (no negatives, no background)."""
    client, runtime = learner
    monkeypatch.setitem(
        label_studio.predictions, 1, [listed_prediction(9, "samsem-abc123-1", "2026-11-21T22:30:00Z")]
    )
    imported = annotation_event("ANNOTATION_CREATED", 44, 1, [brush("x", "Dog", square_mask())], at(44))
    assert imported["task"]["total_predictions"] == 1
    lookups = len(label_studio.requests_to("/api/predictions/"))
    send(client, runtime, imported)
    assert kinds(client) == {"positive": 1.0}
    assert len(label_studio.requests_to("/api/predictions/")) == lookups


@pytest.mark.parametrize(
    "answer", [Response(status=500), Response(body=b'{"detail": "not a list"}')], ids=["500", "no list"]
)
def test_an_unreadable_prediction_list_still_learns_the_annotation(
    learner, label_studio, monkeypatch, answer
):
    client, runtime = learner
    monkeypatch.setitem(label_studio.server.routes, "/api/predictions/", lambda request: answer)
    relabelled = [brush("t1-brush-0", "Dog", disc_mask(), origin="prediction-changed")]
    send(client, runtime, annotation_event("ANNOTATION_CREATED", 43, 1, relabelled, at(43)))
    assert runtime.queue.failed == 0
    assert kinds(client) == {"positive": 1.0}, "learnt without the correction, not lost"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'samsem_prediction_lookups_total{outcome="error"} 1.0' in text


def test_a_cancelled_annotation_teaches_nothing(learner):
    client, runtime = learner
    send(client, runtime, cat_and_dog(10, 1, second=1))
    skipped = cat_and_dog(10, 1, second=9, action="ANNOTATION_UPDATED")
    skipped["annotation"]["was_cancelled"] = True
    send(client, runtime, skipped)
    assert exemplars(client) == {}
    fresh_skip = cat_and_dog(12, 2, second=3)
    fresh_skip["annotation"]["was_cancelled"] = True
    send(client, runtime, fresh_skip)
    assert exemplars(client) == {} and runtime.queue.failed == 0


def test_memory_and_label_config_survive_a_restart(make_client, label_studio, tmp_path):
    add_task_images(label_studio)
    model_dir = tmp_path / "shared_model_dir"
    client, runtime = make_client(model_dir)
    send(client, runtime, cat_and_dog())
    learnt_version = version(client)
    runtime.close()
    restarted, _ = make_client(model_dir)
    assert exemplars(restarted) == {"Cat": 1.0, "Dog": 1.0}
    assert version(restarted) == learnt_version
    batch = load_fixture("predict_batch_1")
    batch.update(project="1.1795301086", label_config=None)
    batch["tasks"][0]["data"] = {"image": TASK_IMAGES[1]}
    response = restarted.post("/predict", json=batch)
    assert response.status_code == 200, "the label config learnt before the restart is used"
    assert response.get_json()["results"][0]["model_version"] == learnt_version


def test_start_training_rebuilds_the_memory_from_label_studio(learner, label_studio):
    client, runtime = learner
    stale = annotation_event("ANNOTATION_CREATED", 99, 2, [brush("x", "Dog", square_mask())], at(1))
    send(client, runtime, stale)
    assert exemplars(client) == {"Dog": 1.0}

    def task(task_id, annotations):
        return {"id": task_id, "data": {"image": TASK_IMAGES[task_id]}, "annotations": annotations}

    def annotation(annotation_id, task_id, results, cancelled=False):
        return {
            "id": annotation_id,
            "task": task_id,
            "result": results,
            "was_cancelled": cancelled,
            "updated_at": at(40),
        }

    cat, dog = brush("c", "Cat", disc_mask()), brush("d", "Dog", square_mask())
    pages = {
        1: [task(1, [annotation(30, 1, [cat])]), task(2, [annotation(31, 2, [dog], cancelled=True)])],
        2: [task(3, [annotation(32, 3, [cat, dog])])],
    }

    def tasks_page(request):
        query = parse_qs(urlsplit(request.path).query)
        assert query["project"] == ["1"] and query["page_size"] == ["2"]
        page = pages[int(query["page"][0])]
        return Response(body=json.dumps({"tasks": page, "total": 3}).encode())

    label_studio.add_route("/api/tasks/", tasks_page)
    reads_before = len(label_studio.requests_to("/api/tasks/"))
    runtime.learning.page_size = 2
    send(client, runtime, load_fixture("webhook_start_training") | {"project": {"id": 1}})
    assert runtime.queue.failed == 0
    assert exemplars(client) == {"Cat": 2.0, "Dog": 1.0}, "annotation 99 (not in Label Studio) is gone"
    assert len(label_studio.requests_to("/api/tasks/")) == reads_before + 2, "two pages read"


def test_start_training_keeps_an_annotation_another_worker_learnt_while_it_was_reading(learner, label_studio):
    client, runtime = learner
    cat = brush("c", "Cat", disc_mask())
    task_one = {"id": 1, "data": {"image": TASK_IMAGES[1]}}
    old = {"id": 30, "task": 1, "result": [cat], "was_cancelled": False, "updated_at": at(40)}
    concurrent = annotation_event("ANNOTATION_CREATED", 77, 2, [brush("d", "Dog", square_mask())], at(50))
    send(client, runtime, annotation_event("ANNOTATION_CREATED", 30, 1, [cat], at(40)))  # config known
    other_worker_done = []

    def tasks_page(request):
        if not other_worker_done:  # another gunicorn worker learns annotation 77 during the read
            for job in parse_webhook(concurrent).jobs:
                runtime.learning(job)
            other_worker_done.append(True)
        return Response(body=json.dumps({"tasks": [task_one | {"annotations": [old]}], "total": 1}).encode())

    label_studio.add_route("/api/tasks/", tasks_page)
    send(client, runtime, load_fixture("webhook_start_training") | {"project": {"id": 1}})
    assert runtime.queue.failed == 0 and other_worker_done
    assert exemplars(client) == {"Cat": 1.0, "Dog": 1.0}, "annotation 77, learnt during the read, is kept"


def test_bulk_created_annotations_are_each_learnt(learner):
    client, runtime = learner
    first, second = cat_and_dog(40, 1), cat_and_dog(41, 2)
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "annotations": [first["annotation"], second["annotation"]],
        "tasks": [first["task"], second["task"]],
        "project": first["project"],
    }
    response = client.post("/webhook", json=bulk)
    assert response.status_code == 200 and response.get_json()["jobs"] == 2
    assert runtime.queue.join(timeout=60) and runtime.queue.failed == 0
    assert exemplars(client) == {"Cat": 2.0, "Dog": 2.0}
