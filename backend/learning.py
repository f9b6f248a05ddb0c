"""Label Studio webhooks → learning jobs → exemplars in the project's memory.

:func:`parse_webhook` turns a webhook body into queued :class:`~backend.jobs.Job` records (fast,
in the request); :class:`LearningHandler` runs them in the background queue:

* ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` (and each item of the bulk
  ``ANNOTATIONS_CREATED``) → job ``"annotation"``: the annotation's exemplars are *replaced* by
  what it holds now (regions rasterised, corrections planned against the prediction we served,
  masks embedded in one batch). A cancelled (skipped) annotation removes its exemplars and teaches
  nothing.
* ``ANNOTATIONS_DELETED`` (plural, Label Studio's real action) and ``ANNOTATION_DELETED`` → job
  ``"delete"``: the annotations' exemplars are removed.
* ``START_TRAINING`` → job ``"train"``: every annotated task of the project is read through the
  Label Studio API (paged, progress logged) and the memory is replaced atomically at the end,
  except annotations that webhooks wrote while it was reading (another worker) and that are newer
  than what it read: those stay as written, and a deletion is never undone.
* anything else → no job (acknowledged as ``"ignored"``).

Idempotence and ordering: every change is written to the store *versioned* by the annotation's
``updated_at``: in the same transaction as the write, the store ignores an update older than the
version it holds and any update of a deleted annotation (Label Studio never reuses annotation
ids). This holds across processes (several gunicorn workers learning at once). Per annotation the
``updated_at`` last learnt is also kept in the project metadata (key
``"learnt/<space>/<annotation id>"``, value the timestamp or ``"deleted"``, never moving back) so
that an event not newer than what was learnt is skipped before any work. So replayed and
out-of-order events leave memory = f(current annotations).

Which regions are learnt: brush / polygon / rectangle results of the config's output controls.
Regions of a *smart* control (e.g. the rectangle drawn to prompt SAM) are learnt only when the
config has no other output control (the smart rectangle is then the annotation itself). The
prediction the annotator corrected is found by :mod:`backend.served_predictions` (in the
annotation when Label Studio put it there, else among the task's samsem predictions); another
model's prediction is never read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend.images import ImageFetchError
from backend.jobs import Job
from backend.messages import brief
from backend.runtime import project_from_request, safe_id
from backend.served_predictions import served_prediction, timestamp
from samsem_plugin.label_config import ProjectConfig
from samsem_plugin.ls_format import results_to_annotated, results_to_served
from samsem_plugin.memory import Exemplar
from samsem_plugin.store import normalise_timestamp

if TYPE_CHECKING:
    from backend.runtime import Runtime

logger = logging.getLogger(__name__)

KIND_ANNOTATION = "annotation"
KIND_DELETE = "delete"
KIND_TRAIN = "train"

ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
BULK_CREATED_ACTION = "ANNOTATIONS_CREATED"
DELETE_ACTIONS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
TRAIN_ACTION = "START_TRAINING"

DELETED = "deleted"
"""Tombstone stored for a deleted annotation."""
MAX_ACTION_LENGTH = 64
"""Longest webhook ``action`` accepted (Label Studio's are short upper-case names)."""
TRAIN_PAGE_SIZE = 100
TRAIN_PROGRESS_EVERY = 25


class LearningError(RuntimeError):
    """A learning job cannot run (missing configuration or task data); the message says why."""


@dataclass(frozen=True)
class WebhookEvent:
    """What one webhook body asks for.

    Attributes:
        action: the webhook ``action``.
        project: project id (string), or ``None`` when the body names none.
        label_config: the project's label config if the body carries it, else ``None``.
        jobs: learning jobs to queue (empty: nothing to learn, the event is acknowledged only).
    """

    action: str
    project: str | None
    label_config: str | None
    jobs: tuple[Job, ...]


def _id_of(record: Any, what: str) -> str:
    """The id of a record (``{"id": ...}``) or the id itself, checked by :func:`safe_id`."""
    if isinstance(record, Mapping):
        record = record.get("id")
    try:
        return safe_id(record, what)
    except ValueError:
        raise ValueError(f"{what}: expected an object with an integer 'id', got {brief(record)}") from None


def _webhook_project(body: Mapping[str, Any]) -> str | None:
    project = body.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project is None:
        for key in ("annotation", "task"):
            record = body.get(key)
            if isinstance(record, Mapping) and record.get("project") is not None:
                project = record["project"]
                break
    if project is None:
        return None
    return project_from_request(project)


def parse_webhook(body: Mapping[str, Any], body_bytes: int = 0) -> WebhookEvent:
    """Read a webhook body into a :class:`WebhookEvent` (see module docstring for the actions).

    ``body_bytes`` (the request's size) is shared out as the jobs' ``size_bytes``.

    Raises:
        ValueError: no ``action``, or a learning action whose body lacks what it needs (project,
            annotation id) or holds unusable ids; the message names the field.
    """
    action = body.get("action")
    if not isinstance(action, str) or not action or len(action) > MAX_ACTION_LENGTH:
        raise ValueError(f"action: expected a webhook action name, got {brief(action)}")
    project = _webhook_project(body)
    project_record = body.get("project")
    label_config = project_record.get("label_config") if isinstance(project_record, Mapping) else None
    label_config = label_config if isinstance(label_config, str) and label_config.strip() else None
    jobs = _jobs_for(action, project, body)
    if jobs and project is None:
        raise ValueError(f"{action}: expected 'project' (object with 'id') in the webhook body")
    for job in jobs:
        job.size_bytes = max(1, body_bytes // len(jobs))
    return WebhookEvent(action=action, project=project, label_config=label_config, jobs=tuple(jobs))


def _annotation_job(action: str, project: str | None, annotation: Any, task: Any) -> Job:
    if not isinstance(annotation, Mapping):
        raise ValueError(f"{action}: expected 'annotation' to be an object, got {brief(annotation)}")
    annotation_id = _id_of(annotation, "annotation")
    payload = {"annotation": dict(annotation), "task": dict(task) if isinstance(task, Mapping) else None}
    return _job(KIND_ANNOTATION, project, payload, f"{action} project={project} annotation={annotation_id}")


def _job(kind: str, project: str | None, payload: dict, key: str) -> Job:
    return Job(kind=kind, project=project or "", payload=payload, received_at=time.time(), key=key)


def _jobs_for(action: str, project: str | None, body: Mapping[str, Any]) -> list[Job]:
    if action in ANNOTATION_ACTIONS:
        return [_annotation_job(action, project, body.get("annotation"), body.get("task"))]
    if action == BULK_CREATED_ACTION:
        annotations = body.get("annotations")
        if not isinstance(annotations, list):
            raise ValueError(f"{action}: expected 'annotations' to be a list, got {brief(annotations)}")
        task_list = body.get("tasks") or []
        if not isinstance(task_list, list):
            raise ValueError(
                f"{action}: expected 'tasks' to be a list of task objects, got {brief(task_list)}"
            )
        tasks = {str(t.get("id")): t for t in task_list if isinstance(t, Mapping)}
        return [
            _annotation_job(
                action, project, item, tasks.get(str(item.get("task"))) if isinstance(item, Mapping) else None
            )
            for item in annotations
        ]
    if action in DELETE_ACTIONS:
        records = body.get("annotations")
        if records is None and body.get("annotation") is not None:
            records = [body["annotation"]]
        if not isinstance(records, list):
            raise ValueError(
                f"{action}: expected 'annotations' to be a list of {{'id': ...}}, got {brief(records)}"
            )
        ids = [_id_of(record, f"{action} annotations[{i}]") for i, record in enumerate(records)]
        key = f"{action} project={project} annotations={','.join(ids)}"
        return [_job(KIND_DELETE, project, {"annotations": ids}, key)]
    if action == TRAIN_ACTION:
        return [_job(KIND_TRAIN, project, {}, f"{action} project={project}")]
    return []


# -- timestamps ------------------------------------------------------------------------------


def store_version(updated_at: Any) -> str | None:
    """``updated_at`` as the store's version (UTC ISO 8601), or None when absent or unparsable."""
    if not isinstance(updated_at, str):
        return None
    try:
        return normalise_timestamp(updated_at)
    except ValueError:
        return None


def is_stale(event_updated_at: Any, learnt: Any) -> bool:
    """True when an event with ``event_updated_at`` must be skipped, given what was ``learnt``.

    Skipped: the annotation was deleted; or both timestamps are known and the event is not newer.
    """
    if learnt == DELETED:
        return True
    event_time, learnt_time = timestamp(event_updated_at), timestamp(learnt)
    return event_time is not None and learnt_time is not None and event_time <= learnt_time


# -- the handler -----------------------------------------------------------------------------


class LearningHandler:
    """Runs learning jobs against a :class:`~backend.runtime.Runtime` (called by the queue)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        page_size: int = TRAIN_PAGE_SIZE,
        progress_every: int = TRAIN_PROGRESS_EVERY,
    ) -> None:
        self.runtime = runtime
        self.page_size = int(page_size)
        self.progress_every = int(progress_every)

    def __call__(self, job: Job) -> None:
        if job.kind == KIND_ANNOTATION:
            self.learn_annotation(job.project, job.payload["annotation"], job.payload.get("task"))
        elif job.kind == KIND_DELETE:
            self.forget(job.project, job.payload["annotations"])
        elif job.kind == KIND_TRAIN:
            self.rebuild(job.project)
        else:
            raise ValueError(f"job {job.key}: unknown kind {job.kind!r}")
        self.runtime.refresh_exemplar_metrics(job.project)

    # -- state per annotation ----------------------------------------------------------------

    def _state_key(self, annotation_id: str) -> str:
        return f"learnt/{self.runtime.space}/{annotation_id}"

    def _learnt(self, project: str, annotation_id: str) -> Any:
        return self.runtime.store.get_meta(project, self._state_key(annotation_id))

    def _mark(self, project: str, annotation_id: str, state: Any) -> None:
        """Record what was learnt of an annotation; an older timestamp never replaces a newer one."""
        if state is None or (state != DELETED and is_stale(state, self._learnt(project, annotation_id))):
            return
        self.runtime.store.set_meta(project, self._state_key(annotation_id), state)

    # -- jobs --------------------------------------------------------------------------------

    def learn_annotation(
        self, project: str, annotation: Mapping[str, Any], task: Mapping[str, Any] | None
    ) -> None:
        """Replace the annotation's exemplars by what it holds now (see module docstring)."""
        annotation_id = _id_of(annotation, "annotation")
        updated_at = annotation.get("updated_at")
        learnt = self._learnt(project, annotation_id)
        if is_stale(updated_at, learnt):
            logger.info(
                "project %s annotation %s: event (updated_at %s) not newer than learnt (%s), skipped",
                project,
                annotation_id,
                updated_at,
                learnt,
            )
            return
        memory = self.runtime.memory(project)
        version = store_version(updated_at)
        if annotation.get("was_cancelled"):
            removed = memory.remove_annotation(annotation_id, updated_at=version)
            logger.info(
                "project %s annotation %s: cancelled, %d exemplars removed", project, annotation_id, removed
            )
        else:
            task = self._task_of(project, annotation, task)
            exemplars = self.exemplars_of(project, annotation, task)
            changed = memory.replace_annotation(str(task["id"]), annotation_id, exemplars, updated_at=version)
            logger.info(
                "project %s annotation %s: %d exemplars stored (%s)",
                project,
                annotation_id,
                len(exemplars),
                "changed" if changed else "unchanged",
            )
        self._mark(project, annotation_id, updated_at)

    def forget(self, project: str, annotation_ids: Sequence[str]) -> None:
        """Remove the exemplars of deleted annotations and keep a tombstone for each."""
        memory = self.runtime.memory(project)
        for annotation_id in annotation_ids:
            removed = memory.remove_annotation(str(annotation_id))
            self._mark(project, str(annotation_id), DELETED)
            logger.info(
                "project %s annotation %s: deleted, %d exemplars removed", project, annotation_id, removed
            )

    def rebuild(self, project: str) -> None:
        """Rebuild the project's memory from every annotated task in Label Studio (atomic)."""
        if self.runtime.fetcher.auth.base_url is None:
            raise LearningError(
                "START_TRAINING: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so samsem can read the "
                "project's annotations from Label Studio"
            )
        started = time.monotonic()
        memory = self.runtime.memory(project)
        states_before = memory.annotation_states()  # what webhooks write meanwhile is kept if newer
        collected: dict[tuple[str, str], list[Exemplar]] = {}
        states: dict[str, Any] = {}
        tasks_seen = 0
        for task in self._annotated_tasks(project):
            tasks_seen += 1
            for annotation in self._annotations_of(task):
                annotation_id = _id_of(annotation, "annotation")
                cancelled = bool(annotation.get("was_cancelled"))  # kept, with no exemplars
                exemplars = [] if cancelled else self.exemplars_of(project, annotation, task)
                collected[(str(task["id"]), annotation_id)] = exemplars
                states[annotation_id] = annotation.get("updated_at")
            if tasks_seen % self.progress_every == 0:
                logger.info("project %s training: %d annotated tasks read so far", project, tasks_seen)
        versions = {annotation_id: store_version(updated_at) for annotation_id, updated_at in states.items()}
        changed = memory.replace_all(collected, updated_at=versions, states_before=states_before)
        for annotation_id, updated_at in states.items():
            self._mark(project, annotation_id, updated_at)
        count = sum(len(exemplars) for exemplars in collected.values())
        logger.info(
            "project %s training done: %d tasks, %d annotations, %d exemplars in %.1f s (%s)",
            project,
            tasks_seen,
            len(collected),
            count,
            time.monotonic() - started,
            "changed" if changed else "unchanged",
        )

    # -- helpers -----------------------------------------------------------------------------

    def exemplars_of(
        self, project: str, annotation: Mapping[str, Any], task: Mapping[str, Any]
    ) -> list[Exemplar]:
        """Exemplars of one (not cancelled) annotation of ``task``; ``[]`` when it has no regions."""
        config = self._config(project)
        results = annotation.get("result") or []
        prediction = served_prediction(annotation, task, self._task_predictions)
        served_results = [] if prediction is None else prediction["result"]
        if not results and not served_results:
            return []
        if not isinstance(results, list) or not isinstance(served_results, list):
            raise LearningError(f"annotation {brief(annotation.get('id'))}: expected 'result' lists")
        check_result_sizes(results + served_results, self.runtime.settings.max_image_pixels)
        image = self.runtime.task_image(task, config)
        height, width = image.shape[:2]
        learnt_controls = learnable_controls(config)
        annotated = [
            region
            for region in results_to_annotated(results, height, width, config)
            if region.control in learnt_controls
        ]
        served = results_to_served(served_results, height, width, config)
        return self.runtime.pipeline.plan_learning(
            image, annotated, served, str(task["id"]), _id_of(annotation, "annotation")
        )

    def _task_predictions(self, task_id: int) -> list:
        """The task's predictions from ``/api/predictions/?task=`` (``[]`` when Label Studio is not
        configured or cannot answer: the annotation is then learnt without its corrections, and a
        warning is logged)."""
        if self.runtime.fetcher.auth.base_url is None:
            return []
        path = "/api/predictions/"
        try:
            answer = self.runtime.fetcher.get_json(path, {"task": task_id})
            predictions = answer.get("results") if isinstance(answer, Mapping) else answer
            if not isinstance(predictions, list):
                raise ImageFetchError(path, "Label Studio answered no list of predictions", status=200)
        except ImageFetchError as error:
            logger.warning("task %s: predictions not read, corrections not learnt: %s", task_id, error)
            self.runtime.metrics.count_prediction_lookup("error")
            return []
        self.runtime.metrics.count_prediction_lookup("ok")
        return predictions

    def _config(self, project: str) -> ProjectConfig:
        config = self.runtime.label_config(project)
        if config is None:
            raise LearningError(
                f"project {project}: no label config known yet (it arrives with /setup, /predict or "
                "the webhook's project)"
            )
        return config

    def _task_of(
        self, project: str, annotation: Mapping[str, Any], task: Mapping[str, Any] | None
    ) -> Mapping[str, Any]:
        if isinstance(task, Mapping) and isinstance(task.get("data"), Mapping) and task.get("id") is not None:
            _id_of(task, "task")
            return task
        task_id = annotation.get("task")
        if task_id is None:
            raise LearningError(f"annotation {brief(annotation.get('id'))}: no task in the webhook body")
        if self.runtime.fetcher.auth.base_url is None:
            raise LearningError(
                f"annotation {brief(annotation.get('id'))}: the webhook has no task data and "
                "LABEL_STUDIO_URL is not set"
            )
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise LearningError(
                f"annotation {brief(annotation.get('id'))}: task: expected an integer id, "
                f"got {brief(task_id)}"
            )
        task = self.runtime.fetcher.get_json(f"/api/tasks/{task_id}/")
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            raise LearningError(f"/api/tasks/{task_id}/: expected a task object with 'data'")
        _id_of(task, "task")
        return task

    def _annotated_tasks(self, project: str):
        """Tasks of ``project`` that have annotations, page by page from ``/api/tasks/``."""
        page = 1
        seen = 0
        while True:
            answer = self.runtime.fetcher.get_json(
                "/api/tasks/",
                {"project": project, "page": page, "page_size": self.page_size, "fields": "all"},
            )
            tasks = answer.get("tasks", []) if isinstance(answer, Mapping) else answer
            if not isinstance(tasks, list):
                raise LearningError(f"/api/tasks/ page {page}: expected a list of tasks")
            for task in tasks:
                if isinstance(task, Mapping) and (task.get("annotations") or task.get("total_annotations")):
                    yield task
            seen += len(tasks)
            total = answer.get("total") if isinstance(answer, Mapping) else None
            if len(tasks) < self.page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def _annotations_of(self, task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        annotations = task.get("annotations")
        if isinstance(annotations, list) and all(isinstance(a, Mapping) for a in annotations):
            return annotations
        answer = self.runtime.fetcher.get_json(f"/api/tasks/{int(task['id'])}/annotations/")
        return [a for a in answer if isinstance(a, Mapping)] if isinstance(answer, list) else []


def check_result_sizes(results: Sequence[Any], max_pixels: int) -> None:
    """Refuse results whose ``original_width`` × ``original_height`` exceed ``max_pixels``.

    A brush RLE of a claimed size is decoded into a mask of that size: a few hundred bytes could
    otherwise ask for gigabytes. Sizes that are not numbers are left to the decoder (ValueError).

    Raises:
        LearningError: naming the result and the limit.
    """
    for index, result in enumerate(results):
        if not isinstance(result, Mapping):
            continue
        width, height = result.get("original_width"), result.get("original_height")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (width, height))
        if numbers and float(width) * float(height) > max_pixels:
            raise LearningError(
                f"result {brief(result.get('id', index))}: original size {brief(width)} x "
                f"{brief(height)} is more than MAX_IMAGE_PIXELS={max_pixels} pixels"
            )


def learnable_controls(config: ProjectConfig) -> set[str]:
    """Names of the output controls whose regions are learnt (see module docstring)."""
    return {control.name for control in config.region_controls}
