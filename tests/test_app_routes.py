"""backend.app routes: health/setup without models, bad input → 4xx JSON, auth on every route."""

from __future__ import annotations

import base64
import json

import pytest

from backend.runtime import Runtime
from tests.conftest import LABEL_CONFIG, load_fixture, tiny_settings

SECRET = "hook-secret-42"


def assert_json_error(response, status, *words):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    for word in words:
        assert word.lower() in body["error"].lower(), body["error"]
    return body["error"]


@pytest.fixture
def never_built(label_studio, tmp_path):
    """An app whose models must never be built (the factory fails the test if called)."""
    from backend.app import create_app

    def refuse(settings):
        raise AssertionError("models were built")

    settings = tiny_settings(tmp_path / "m", label_studio.url)
    runtime = Runtime(settings, models_factory=refuse)
    yield create_app(settings, runtime).test_client(), runtime
    runtime.close()


# -- health, setup, versions, metrics ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/"])
def test_health_answers_up_without_loading_models(never_built, path):
    client, runtime = never_built
    response = client.get(path)
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "UP" and body["model_class"] == "samsem"
    assert body["models_loaded"] is False and not runtime.models_loaded


def test_setup_returns_a_model_version_without_loading_models(never_built):
    client, runtime = never_built
    response = client.post("/setup", json=load_fixture("setup"))
    assert response.status_code == 200
    version = response.get_json()["model_version"]
    assert version.startswith("samsem-") and version == runtime.model_version("6")
    assert not runtime.models_loaded
    assert runtime.label_config("6") is not None, "the schema was remembered"


@pytest.mark.parametrize("extra", [{"a": 1}, None])
def test_setup_accepts_extra_params_object_or_null(never_built, extra):
    client, _ = never_built
    body = dict(load_fixture("setup"), extra_params=extra)
    assert client.post("/setup", json=body).status_code == 200


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"extra_params": [1, 2]}, ["extra_params"]),
        ({"schema": "<View><Image name='i' value='$image'/>"}, ["label config", "invalid xml"]),
        ({"schema": "<View><Text name='t' value='$text'/></View>"}, ["label config", "image"]),
        (
            {
                "schema": "<View><Image name='i' value='$image'/><Choices name='c' toName='i'>"
                "<Choice value='a'/></Choices></View>"
            },
            ["no supported control"],
        ),
        ({"project": None}, ["project"]),
        ({"project": ""}, ["project"]),
    ],
)
def test_setup_refuses_bad_bodies_with_json_errors(never_built, change, words):
    client, runtime = never_built
    body = dict(load_fixture("setup"), **change)
    assert_json_error(client.post("/setup", json=body), 400, *words)
    assert not runtime.models_loaded


def test_versions_lists_the_versions_reported(never_built):
    client, _ = never_built
    version = client.post("/setup", json=load_fixture("setup")).get_json()["model_version"]
    assert client.get("/versions?project=6").get_json() == {"versions": [version]}
    assert client.get("/versions?project=7").get_json() == {"versions": []}
    assert version in client.get("/versions").get_json()["versions"]


def test_metrics_is_prometheus_text(never_built):
    client, _ = never_built
    client.get("/health")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert 'samsem_requests_total{route="/health",status="200"} 1.0' in response.get_data(as_text=True)


# -- /predict bad input --------------------------------------------------------------------------


def predict_body(**change):
    return dict(load_fixture("predict_batch_1"), **change)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", ["empty body"]),
        (b"{not json", ["valid json"]),
        (b"[1, 2]", ["json object", "list"]),
        (json.dumps({"label_config": LABEL_CONFIG, "project": "6.1"}).encode(), ["tasks", "missing"]),
        (json.dumps(predict_body(tasks={"id": 1})).encode(), ["tasks", "list"]),
        (json.dumps(predict_body(tasks=[1, 2])).encode(), ["tasks[0]", "task object"]),
        (json.dumps(predict_body(label_config="<View>")).encode(), ["label config"]),
        (json.dumps(predict_body(label_config=42)).encode(), ["label_config", "xml"]),
        (json.dumps(predict_body(params=[1])).encode(), ["params"]),
        (json.dumps(predict_body(params={"context": "x"})).encode(), ["params.context"]),
        (json.dumps(predict_body(params={"context": {"result": []}})).encode(), ["params.context.result"]),
        (json.dumps(predict_body(project="7.1", label_config=None)).encode(), ["label_config", "project 7"]),
    ],
)
def test_predict_refuses_bad_bodies_with_json_errors(never_built, data, words):
    client, runtime = never_built
    response = client.post("/predict", data=data, content_type="application/json")
    assert_json_error(response, 400, *words)
    assert not runtime.models_loaded


def test_interactive_predict_with_an_unusable_context_is_a_400(make_client):
    client, _ = make_client()
    body = load_fixture("predict_interactive")
    body["params"]["context"]["result"] = [{"type": "keypointlabels", "value": {"x": "left"}}]
    assert_json_error(client.post("/predict", json=body), 400, "params.context")


def test_interactive_predict_without_the_task_image_is_a_json_error(make_client):
    client, _ = make_client()
    body = load_fixture("predict_interactive")
    body["tasks"][0]["data"] = {"image": "/data/upload/6/missing.png"}
    assert_json_error(client.post("/predict", json=body), 424, "missing.png", "404")
    body["tasks"][0]["data"] = {"text": "no image here"}
    assert_json_error(client.post("/predict", json=body), 400, "no image in data")


def test_batch_predict_answers_empty_predictions_for_unreadable_tasks(make_client):
    client, runtime = make_client()
    body = load_fixture("predict_batch_2")
    good = body["tasks"][1]
    body["tasks"] = [
        dict(good, id=101, data={"image": "/data/upload/6/missing.png"}),
        dict(good, id=102, data={"text": "no image key"}),
        good,
    ]
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 3
    assert results[0]["result"] == [] and results[0]["score"] == 0.0
    assert results[1]["result"] == [] and results[1]["score"] == 0.0
    assert results[2]["result"], "the readable task is still predicted"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'samsem_predict_task_failures_total{reason="ImageFetchError"} 1.0' in metrics
    assert 'samsem_predict_task_failures_total{reason="TaskDataError"} 1.0' in metrics


def test_batch_predict_with_no_tasks_answers_an_empty_list(never_built):
    client, runtime = never_built
    response = client.post("/predict", json=predict_body(tasks=[]))
    assert response.status_code == 200 and response.get_json() == {"results": []}
    assert not runtime.models_loaded


def test_predict_uses_the_remembered_label_config_when_none_is_sent(make_client):
    client, _ = make_client()
    assert client.post("/setup", json=load_fixture("setup")).status_code == 200
    response = client.post("/predict", json=predict_body(label_config=None))
    assert response.status_code == 200 and len(response.get_json()["results"]) == 1


def test_request_size_limit_answers_413_json(make_client):
    client, _ = make_client(max_request_mb=1)
    data = b'{"tasks": [], "pad": "' + b"x" * (1 << 20) + b'"}'
    assert_json_error(client.post("/predict", data=data, content_type="application/json"), 413, "too large")


def test_unknown_route_and_wrong_method_are_json_errors(never_built):
    client, _ = never_built
    assert_json_error(client.get("/nowhere"), 404, "not found")
    assert_json_error(client.get("/predict"), 405, "method not allowed")


def test_an_unexpected_failure_is_a_500_with_an_error_id_and_no_traceback(never_built, monkeypatch, caplog):
    client, runtime = never_built

    def broken(project):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runtime, "model_version", broken)
    error = assert_json_error(client.post("/setup", json=load_fixture("setup")), 500, "internal error")
    assert "disk on fire" not in error
    error_id = error.split()[2]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_models_that_cannot_be_built_answer_503_naming_the_problem(label_studio, tmp_path):
    from backend.app import create_app
    from samsem_plugin.errors import WeightsError

    def missing(settings):
        raise WeightsError("SAM checkpoint /weights/sam.pth not found; set SAM_CHECKPOINT")

    settings = tiny_settings(tmp_path / "m", label_studio.url)
    runtime = Runtime(settings, models_factory=missing)
    client = create_app(settings, runtime).test_client()
    assert_json_error(
        client.post("/predict", json=predict_body()), 503, "models unavailable", "sam_checkpoint"
    )
    runtime.close()


# -- /webhook bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"annotation": {"id": 1}}, ["action"]),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1}}, ["annotation"]),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 5, "result": []}}, ["project"]),
        ({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": "5"}, ["annotations"]),
    ],
)
def test_webhook_refuses_bodies_it_cannot_act_on(never_built, body, words):
    client, runtime = never_built
    assert_json_error(client.post("/webhook", json=body), 400, *words)
    assert runtime.queue.qsize() == 0


def test_webhook_answers_503_when_the_learning_queue_is_full(make_client, monkeypatch):
    client, runtime = make_client()
    monkeypatch.setattr(runtime.queue, "submit", lambda job: False)
    assert_json_error(
        client.post("/webhook", json=load_fixture("webhook_annotation_created")), 503, "queue full"
    )


# -- auth ----------------------------------------------------------------------------------------


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def protected(make_client):
    client, runtime = make_client(basic_auth_user="ls", basic_auth_pass="pw", webhook_secret=SECRET)
    return client, runtime


ROUTES = [
    ("get", "/health", None),
    ("get", "/", None),
    ("get", "/metrics", None),
    ("get", "/versions?project=6", None),
    ("post", "/setup", "setup"),
    ("post", "/predict", "predict_batch_1"),
]


@pytest.mark.parametrize(("method", "path", "fixture"), ROUTES)
def test_basic_auth_protects_every_route(protected, method, path, fixture):
    client, _ = protected
    body = load_fixture(fixture) if fixture else None
    call = getattr(client, method)
    assert_json_error(call(path, json=body), 401, "missing authorization")
    assert_json_error(call(path, json=body, headers=basic("ls", "wrong")), 401, "wrong")
    assert call(path, json=body, headers=basic("ls", "pw")).status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-Samsem-Webhook-Secret": "nope"}, 401),
        ({"X-Samsem-Webhook-Secret": SECRET}, 200),
        ({"Authorization": f"Bearer {SECRET}"}, 200),
        (basic("ls", "pw"), 200),
    ],
)
def test_webhook_is_authenticated_by_its_secret(protected, headers, status):
    client, runtime = protected
    response = client.post("/webhook", json=load_fixture("webhook_project_updated"), headers=headers)
    assert response.status_code == status
    if status == 401:
        assert_json_error(response, 401, "webhook")
