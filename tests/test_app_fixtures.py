"""Replay every payload a real Label Studio 1.23.2 sent (``../shared/fixtures/label-studio``)
against the app with tiny models and a loopback Label Studio serving the task images."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from samsem_plugin.brush_rle import rle_decode
from tests.conftest import IMAGE_SIZE, fixture_names, load_fixture

WEBHOOK_EXPECTATIONS = {
    "webhook_annotation_created": ("queued", 1),
    "webhook_annotation_created_brush": ("queued", 1),
    "webhook_annotation_updated": ("queued", 1),
    "webhook_annotation_updated_brush": ("queued", 1),
    "webhook_annotations_deleted": ("queued", 1),
    "webhook_start_training": ("queued", 1),
    "webhook_project_updated": ("ignored", 0),
    "webhook_tasks_created": ("ignored", 0),
    "webhook_tasks_deleted": ("ignored", 0),
}
OTHER_FIXTURES = {"setup", "predict_batch_1", "predict_batch_2", "predict_interactive"}


def test_every_fixture_has_an_expectation():
    assert set(fixture_names()) == set(WEBHOOK_EXPECTATIONS) | OTHER_FIXTURES


def assert_plain_json(node):
    if isinstance(node, dict):
        assert all(type(key) is str for key in node)
        for value in node.values():
            assert_plain_json(value)
    elif isinstance(node, list):
        for value in node:
            assert_plain_json(value)
    else:
        assert node is None or type(node) in (str, int, float, bool), type(node)


def check_prediction(prediction, label_config, task_id):
    """A valid prediction of task ``task_id`` for ``label_config`` (SDK validation included)."""
    assert set(prediction) == {"result", "score", "model_version"}
    assert prediction["model_version"].startswith("samsem-")
    assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0
    assert_plain_json(prediction)
    json.dumps(prediction)
    errors = LabelInterface(label_config).validate_prediction(prediction, return_errors=True)
    assert errors in (True, []), errors
    ids = [region["id"] for region in prediction["result"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, str) for i in ids)
    assert all(i.startswith(f"t{task_id}-") for i in ids)
    height, width = IMAGE_SIZE
    masks = []
    for region in prediction["result"]:
        assert (region["original_width"], region["original_height"]) == (width, height)
        if region["type"] == "brushlabels":
            mask = rle_decode(region["value"]["rle"], height, width)
            assert mask.shape == (height, width) and mask.any()
            masks.append(mask)
    if prediction["result"]:
        assert prediction["score"] == pytest.approx(np.mean([r["score"] for r in prediction["result"]]))
    return masks


def test_setup_fixture_answers_a_model_version(make_client):
    client, runtime = make_client()
    response = client.post("/setup", json=load_fixture("setup"))
    assert response.status_code == 200
    assert response.get_json() == {"model_version": runtime.model_version("6")}


@pytest.mark.parametrize("name", ["predict_batch_1", "predict_batch_2"])
def test_batch_fixtures_answer_one_valid_prediction_per_task_in_order(make_client, label_studio, name):
    client, runtime = make_client()
    body = load_fixture(name)
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(body["tasks"])
    for task, prediction in zip(body["tasks"], results, strict=True):
        masks = check_prediction(prediction, body["label_config"], task["id"])
        assert masks, "brush regions are proposed"
        controls = {region["from_name"] for region in prediction["result"]}
        assert controls == {"brush", "poly"}, "every output control but the smart rectangle gets the regions"
        labels = [region["value"][region["type"]] for region in prediction["result"]]
        assert all(value == [] for value in labels), "an empty memory never invents a class"


def test_batch_writes_to_a_smart_rectangle_when_it_is_the_only_output(make_client):
    client, _ = make_client()
    body = load_fixture("predict_batch_1")
    body["label_config"] = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="rect" toName="image" smart="true"><Label value="Cat"/></RectangleLabels>
    </View>"""
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    for task, prediction in zip(body["tasks"], response.get_json()["results"], strict=True):
        check_prediction(prediction, body["label_config"], task["id"])
        assert prediction["result"], "boxes are proposed"
        assert {(r["from_name"], r["type"]) for r in prediction["result"]} == {("rect", "rectanglelabels")}


def test_batch_predict_with_reversed_tasks_reverses_the_predictions(make_client):
    client, _ = make_client()
    body = load_fixture("predict_batch_2")
    forward = client.post("/predict", json=body).get_json()["results"]
    body["tasks"].reverse()
    backward = client.post("/predict", json=body).get_json()["results"]
    assert [p["result"][0]["id"] for p in backward] == [p["result"][0]["id"] for p in reversed(forward)]
    assert [p["score"] for p in backward] == [p["score"] for p in reversed(forward)]


def test_interactive_fixture_answers_one_mask_containing_the_click(make_client):
    client, runtime = make_client()
    body = load_fixture("predict_interactive")
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 1
    prediction = results[0]
    masks = check_prediction(prediction, body["label_config"], body["tasks"][0]["id"])
    assert len(prediction["result"]) == 1 and len(masks) == 1, "one brush region"
    region = prediction["result"][0]
    assert region["from_name"] == "brush"
    assert region["value"]["brushlabels"] == ["Cat"], "the smart tool's label (empty memory)"
    # the keypoint is at x=10 %, y=10 % of 64 x 48 → pixel column 6.4, row 4.8
    assert masks[0][4, 6]


def test_a_second_click_on_the_same_image_does_not_run_the_sam_encoder(make_client):
    client, runtime = make_client()
    body = load_fixture("predict_interactive")
    assert client.post("/predict", json=body).status_code == 200
    passes = runtime.models.proposer.encoder_calls
    keypoint = body["params"]["context"]["result"][0]
    keypoint["value"].update(x=70.0, y=75.0)
    second = client.post("/predict", json=body)
    assert second.status_code == 200
    assert runtime.models.proposer.encoder_calls == passes
    ids = [second.get_json()["results"][0]["result"][0]["id"]]
    first_ids = [client.post("/predict", json=body).get_json()["results"][0]["result"][0]["id"]]
    assert ids != first_ids, "region ids of successive clicks never collide"


def test_a_batch_prefetch_makes_the_first_click_free_of_encoder_passes(make_client):
    client, runtime = make_client()
    batch = load_fixture("predict_batch_2")  # holds task 15, the task of the interactive fixture
    assert client.post("/predict", json=batch).status_code == 200
    passes = runtime.models.proposer.encoder_calls
    assert client.post("/predict", json=load_fixture("predict_interactive")).status_code == 200
    assert runtime.models.proposer.encoder_calls == passes


@pytest.mark.parametrize("name", sorted(WEBHOOK_EXPECTATIONS))
def test_webhook_fixtures_are_acknowledged_and_processed_in_the_background(make_client, label_studio, name):
    client, runtime = make_client()
    label_studio.add_json("/api/tasks/", {"tasks": [], "total": 0})  # START_TRAINING reads the tasks
    status, jobs = WEBHOOK_EXPECTATIONS[name]
    response = client.post("/webhook", json=load_fixture(name))
    assert response.status_code == 200
    assert response.get_json()["status"] == status
    assert response.get_json().get("jobs", 0) == jobs
    assert runtime.queue.join(timeout=60)
    assert runtime.queue.processed == jobs and runtime.queue.failed == 0


def test_concurrent_clicks_on_different_images_get_their_own_masks(make_client):
    client, _ = make_client()
    bodies = []
    for task_id, path, (x, y) in [
        (14, "/data/upload/6/46e4d7be-m0.png", (30.0, 35.0)),
        (15, "/data/upload/6/7244171f-m1.png", (80.0, 70.0)),
        (16, "/data/upload/6/e1d671da-m2.png", (10.0, 10.0)),
    ]:
        body = load_fixture("predict_interactive")
        body["tasks"][0].update(id=task_id, data={"image": path})
        body["params"]["context"]["result"][0]["value"].update(x=x, y=y)
        bodies.append(body)

    def rle_of(body):
        response = client.post("/predict", json=body)
        assert response.status_code == 200
        return response.get_json()["results"][0]["result"][0]["value"]["rle"]

    sequential = [rle_of(body) for body in bodies]
    assert len({tuple(rle) for rle in sequential}) == 3, "three different masks"
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(rle_of, bodies * 2))
    assert concurrent == sequential * 2
