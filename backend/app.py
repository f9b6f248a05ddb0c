"""The Label Studio ML backend HTTP API: ``create_app(settings)`` → a Flask app.

Routes (the contract is ``docs``/LABEL_STUDIO.md):

* ``GET /health``, ``GET /`` → ``{"status": "UP", "model_class": "samsem", "models_loaded": …}``;
  no model work.
* ``POST /setup`` → ``{"model_version": …}``; remembers the label config (``schema``); never
  loads models.
* ``POST /predict`` → ``{"results": [prediction, …]}``:

  - batch (``params.context`` null or without ``result``): exactly one prediction per task, in
    task order. Every output control of the config that is not smart (Brush → RLE, Polygon →
    polygon, Rectangle → box; the smart ones when all are smart: ``ProjectConfig.region_controls``)
    gets every region, labelled only with that control's labels (a label the control lacks → the
    region is written unlabelled there). A task whose image cannot be read gets an empty
    prediction (reason logged and counted), never a failure of the whole batch.
  - interactive (``params.context.result`` with smart keypoints / rectangles): exactly one
    prediction holding one region, written to ONE control: the Brush control if the config has
    one, else Polygon, else Rectangle (preferring the control over the same Image that has the
    smart tool's label). Label: the memory's when confident, else the smart tool's label.

  ``score`` of a region = P(label) × SAM predicted IoU (predicted IoU when unlabelled); of a
  prediction = mean region score (0 with no region). Unlabelled regions are written with an empty
  label list, which ``LabelInterface.validate_prediction`` accepts.
* ``POST /webhook`` → 200 ``{"status": "queued" | "ignored"}`` at once; learning runs in the
  background queue (503 when the queue is full). Authenticated by ``install_auth`` (webhook
  secret header).
* ``GET /versions?project=ID`` → ``{"versions": [...]}`` model versions served.
* ``GET /metrics`` → Prometheus text.

Errors: bad input → 4xx ``{"error": "<what is wrong>"}``; an unexpected failure → 500
``{"error": "internal error <id>"}`` with the traceback only in the service log under that id;
models that cannot be built (missing weights) → 503 naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

import samsem_plugin
from backend.auth import install_auth
from backend.images import ImageFetchError
from backend.json_responses import OrjsonProvider
from backend.learning import parse_webhook
from backend.messages import quiet_url_loggers, shorten
from backend.native_memory import release_free_memory
from backend.runtime import Runtime, TaskDataError, project_from_request
from backend.settings import Settings, SettingsError
from samsem_plugin.errors import WeightsError
from samsem_plugin.label_config import ControlSpec, ProjectConfig
from samsem_plugin.ls_format import context_to_prompt, regions_to_results
from samsem_plugin.pipeline import region_scores
from samsem_plugin.regions import Regions

logger = logging.getLogger(__name__)

MODEL_CLASS = "samsem"
DEFAULT_PROJECT = "default"
"""Project id used when a ``/predict`` body names none (e.g. a hand-made request)."""
INTERACTIVE_TYPE_ORDER = ("BrushLabels", "PolygonLabels", "RectangleLabels")
UNSAFE_ID_CHARACTERS = re.compile(r"[^0-9A-Za-z_.-]")
RETRY_AFTER_SECONDS = 30
"""``Retry-After`` of a 503 answered because the learning queue is full."""

routes = Blueprint("samsem", __name__)


class ApiError(Exception):
    """A request we refuse: ``status`` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        message = shorten(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# -- app factory ---------------------------------------------------------------------------------


def create_app(settings: Settings, runtime: Runtime | None = None) -> Flask:
    """The Flask app serving Label Studio's ML backend API with ``settings``.

    ``runtime`` defaults to a new :class:`~backend.runtime.Runtime` (models are built lazily on
    the first prediction or learning job, never here). Library loggers that would print whole
    URLs are kept at INFO (:func:`backend.messages.quiet_url_loggers`).
    """
    runtime = runtime if runtime is not None else Runtime(settings)
    quiet_url_loggers()
    app = Flask("samsem")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json = OrjsonProvider(app)
    app.extensions["samsem_runtime"] = runtime
    _install_request_metrics(app, runtime)  # first: refused requests are counted too
    install_auth(app, settings)
    _install_error_handlers(app)
    app.register_blueprint(routes)
    return app


def _runtime() -> Runtime:
    return current_app.extensions["samsem_runtime"]


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        logger.info("%s %s → %d: %s", request.method, request.path, error.status, error.message)
        response, status = _error(error.status, error.message)
        response.headers.update(error.headers)
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        return _error(error.code or 500, f"{error.name}: {error.description}")

    @app.errorhandler(WeightsError)
    @app.errorhandler(SettingsError)
    def _models_unavailable(error: Exception):
        logger.error("models unavailable: %s", error)
        return _error(503, f"models unavailable: {error}")

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        error_id = secrets.token_hex(4)
        logger.exception("internal error %s on %s %s", error_id, request.method, request.path)
        return _error(500, f"internal error {error_id} (details in the samsem service log)")


def _install_request_metrics(app: Flask, runtime: Runtime) -> None:
    @app.before_request
    def _start_clock() -> None:
        g.samsem_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("samsem_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else "other"
            runtime.metrics.observe_request(route, response.status_code, time.perf_counter() - started)
        return response


# -- request helpers -----------------------------------------------------------------------------


def _json_object() -> dict[str, Any]:
    """The request body as a JSON object, or ApiError(400) naming the problem."""
    raw = request.get_data(cache=True)
    if not raw:
        raise ApiError(400, "request body: expected a JSON object, got an empty body")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # a chunked body is cut at the limit by werkzeug: refuse it instead of parsing a part
        raise ApiError(413, f"request body too large: {limit} bytes or more (MAX_REQUEST_MB)")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body: expected valid JSON ({error})") from None
    except RecursionError:
        raise ApiError(400, "request body: expected valid JSON, got values nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    return body


def _project(body: Mapping[str, Any], *, required: bool) -> str:
    value = body.get("project")
    if value is None and not required:
        return DEFAULT_PROJECT
    try:
        return project_from_request(value)
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def _label_config(runtime: Runtime, project: str, xml: Any) -> ProjectConfig:
    """The config sent with the request (remembered), else the project's last known one."""
    if xml is not None and not isinstance(xml, str):
        raise ApiError(400, f"label_config: expected XML text, got {type(xml).__name__}")
    if xml and xml.strip():
        try:
            return runtime.set_label_config(project, xml)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
    config = runtime.label_config(project)
    if config is None:
        raise ApiError(400, f"label_config: missing, and no label config is known for project {project}")
    return config


# -- health, setup, versions, metrics -------------------------------------------------------------


@routes.get("/")
@routes.get("/health")
def health():
    runtime = _runtime()
    return jsonify(
        status="UP",
        model_class=MODEL_CLASS,
        models_loaded=runtime.models_loaded,
        learn_queue=runtime.queue.qsize(),
        version=samsem_plugin.__version__,
    )


@routes.post("/setup")
def setup():
    runtime = _runtime()
    body = _json_object()
    project = _project(body, required=True)
    extra = body.get("extra_params")
    if extra is not None and not isinstance(extra, dict):
        raise ApiError(400, f"extra_params: expected an object or null, got {type(extra).__name__}")
    schema = body.get("schema")
    if schema is not None:
        _label_config(runtime, project, schema)
    version = runtime.model_version(project)
    runtime.remember_version(project, version)
    return jsonify(model_version=version)


@routes.get("/versions")
def versions():
    runtime = _runtime()
    project = request.args.get("project")
    if project is not None:
        try:
            project = project_from_request(project)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return jsonify(versions=runtime.versions(project))
    return jsonify(versions=sorted({v for p in runtime.known_projects() for v in runtime.versions(p)}))


@routes.get("/metrics")
def metrics():
    runtime = _runtime()
    runtime.refresh_exemplar_metrics()
    body, content_type = runtime.metrics.render()
    return Response(body, content_type=content_type)


# -- webhook -------------------------------------------------------------------------------------


@routes.post("/webhook")
def webhook():
    runtime = _runtime()
    body = _json_object()
    try:
        event = parse_webhook(body, body_bytes=request.content_length or len(request.get_data(cache=True)))
    except ValueError as error:
        raise ApiError(400, str(error)) from None
    if event.project is not None and event.label_config is not None:
        try:
            runtime.set_label_config(event.project, event.label_config)
        except ValueError as error:
            logger.warning(
                "webhook %s: project %s label config unusable: %s", event.action, event.project, error
            )
    if not event.jobs:
        return jsonify(status="ignored", action=event.action)
    if not runtime.queue.submit_all(event.jobs):
        queue = runtime.queue
        raise ApiError(
            503,
            f"learning queue full ({queue.qsize()} jobs, {queue.waiting_bytes} bytes waiting; limits "
            f"LEARN_QUEUE_MAX={queue.max_size}, LEARN_QUEUE_MB={(queue.max_bytes or 0) >> 20}): "
            f"{event.action} not queued; send it again later, or START_TRAINING once the queue drained",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return jsonify(status="queued", action=event.action, jobs=len(event.jobs))


# -- predict -------------------------------------------------------------------------------------


def _tasks(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tasks = body.get("tasks")
    if tasks is None:
        raise ApiError(400, "tasks: missing (expected a list of task objects)")
    if not isinstance(tasks, list):
        raise ApiError(400, f"tasks: expected a list of task objects, got {type(tasks).__name__}")
    for index, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ApiError(400, f"tasks[{index}]: expected a task object, got {type(task).__name__}")
    return tasks


def _context(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """``params.context`` when it asks for an interactive prediction (has ``result``), else None."""
    params = body.get("params")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ApiError(400, f"params: expected an object or null, got {type(params).__name__}")
    context = params.get("context")
    if context is None:
        return None
    if not isinstance(context, dict):
        raise ApiError(400, f"params.context: expected an object or null, got {type(context).__name__}")
    if "result" not in context:
        return None
    result = context["result"]
    if not isinstance(result, list) or not result:
        raise ApiError(400, "params.context.result: expected a non-empty list of smart-tool regions")
    return context


@routes.post("/predict")
def predict():
    runtime = _runtime()
    body = _json_object()
    tasks = _tasks(body)
    project = _project(body, required=False)
    config = _label_config(runtime, project, body.get("label_config"))
    context = _context(body)
    version = runtime.model_version(project)
    runtime.remember_version(project, version)
    if context is not None:
        if not tasks:
            raise ApiError(400, "tasks: an interactive request needs one task, got none")
        return jsonify(results=[_predict_interactive(runtime, project, config, tasks[0], context, version)])
    return jsonify(results=_predict_batch(runtime, project, config, tasks, version))


def _prediction(results: list[dict], version: str) -> dict[str, Any]:
    scores = [float(r["score"]) for r in results]
    return {"result": results, "score": float(np.mean(scores)) if scores else 0.0, "model_version": version}


def _task_id(task: Mapping[str, Any]) -> str:
    """The task id for region ids and logs: its safe characters only, at most 40 (``"x"`` if none)."""
    value = task.get("id")
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    return UNSAFE_ID_CHARACTERS.sub("_", text)[:40] or "x"


def results_for_controls(regions: Regions, controls: Sequence[ControlSpec], id_prefix: str) -> list[dict]:
    """Results of ``regions`` for every control; a label the control lacks is written unlabelled."""
    results: list[dict] = []
    for control in controls:
        allowed = set(control.labels)
        labels = [label if label in allowed else None for label in regions.labels]
        results += regions_to_results(regions.with_(labels=labels), control, id_prefix=id_prefix)
    return results


def _predict_batch(
    runtime: Runtime, project: str, config: ProjectConfig, tasks: list[dict], version: str
) -> list[dict[str, Any]]:
    if not tasks:
        return []
    pipeline = runtime.pipeline  # builds the models on first use (503 if impossible)
    classifier = runtime.classifier(project)
    allowed = sorted({label for control in config.region_controls for label in control.labels})
    predictions = []
    for task in tasks:
        task_id = _task_id(task)
        try:
            image = runtime.task_image(task, config)
            if runtime.settings.prefetch_sam_embedding:
                pipeline.warm(image)
            regions = pipeline.predict_auto(image, classifier, allowed)
            with runtime.metrics.observe_stage("encode"):
                results = results_for_controls(regions, config.region_controls, f"t{task_id}-")
        except (TaskDataError, ImageFetchError) as error:
            logger.warning("project %s task %s: empty prediction: %s", project, task_id, shorten(str(error)))
            runtime.count_task_failure(type(error).__name__)
            results = []
        except Exception:
            error_id = secrets.token_hex(4)
            logger.exception(
                "project %s task %s: internal error %s, empty prediction", project, task_id, error_id
            )
            runtime.count_task_failure("internal")
            results = []
        predictions.append(_prediction(results, version))
        logger.info("project %s task %s: %d regions predicted", project, task_id, len(results))
    release_free_memory()  # the request's arrays are freed: keep RSS near the caches' bounds
    return predictions


def interactive_control(config: ProjectConfig, label: str | None, smart_control: str | None) -> ControlSpec:
    """The control an interactive mask is written to: Brush, else Polygon, else Rectangle;
    among several of one type, the one over the smart tool's Image holding its label first."""
    smart_image = next((c.to_name for c in config.controls if c.name == smart_control), None)
    for control_type in INTERACTIVE_TYPE_ORDER:
        candidates = [c for c in config.output_controls if c.type == control_type]
        if candidates:
            return max(candidates, key=lambda c: (c.to_name == smart_image, label in c.labels))
    raise ApiError(400, "label config: no Brush, Polygon or Rectangle labels control to write the mask to")


def _predict_interactive(
    runtime: Runtime,
    project: str,
    config: ProjectConfig,
    task: Mapping[str, Any],
    context: Mapping[str, Any],
    version: str,
) -> dict[str, Any]:
    try:
        image = runtime.task_image(task, config)
    except TaskDataError as error:
        raise ApiError(400, str(error)) from None
    except ImageFetchError as error:
        raise ApiError(error.http_status, str(error)) from None
    height, width = image.shape[:2]
    try:
        prompt = context_to_prompt(dict(context), config, height, width)
    except ValueError as error:
        raise ApiError(400, f"params.context: {error}") from None
    target = interactive_control(config, prompt.label, prompt.control)
    pipeline = runtime.pipeline
    regions = pipeline.predict_prompt(image, prompt, runtime.classifier(project), target.labels)
    with runtime.metrics.observe_stage("encode"):
        prefix = f"t{_task_id(task)}-{uuid.uuid4().hex[:12]}-"
        results = results_for_controls(regions, [target], prefix)
    logger.info(
        "project %s task %s: interactive mask, label %r (%s), score %.3f",
        project,
        _task_id(task),
        regions.labels[0],
        regions.extra["label_source"][0],
        float(region_scores(regions)[0]),
    )
    return _prediction(results, version)
