"""Per-process state of the service: models (built lazily, once), memories, label configs, queue.

One :class:`Runtime` lives in each gunicorn worker. Models are built on the first prediction or
learning job — after fork, never in ``/health`` or ``/setup`` — under a lock, so concurrent first
requests build them once. Everything else here is cheap to construct.

Project state kept through the :class:`~samsem_plugin.store.ExemplarStore` (SQLite under
``{MODEL_DIR}/memory``), so it survives restarts and is shared by workers:

* the exemplar memory of each ``(project, space)``, ``space`` = the embedder id;
* project metadata: the label config (key ``"label_config"``), the model versions served
  (``"model_versions"``), and per annotation the last ``updated_at`` learnt (see ``learning.py``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import Counter

from backend.images import ImageFetcher, ImageFetchError
from backend.jobs import Job, LearningQueue
from backend.messages import brief
from backend.metrics import Metrics
from backend.settings import RANDOM_WEIGHTS, Settings
from samsem_plugin.classifier import ClassifierSettings
from samsem_plugin.label_config import ProjectConfig, parse_label_config
from samsem_plugin.memory import POSITIVE, ExemplarMemory
from samsem_plugin.store import ExemplarStore

if TYPE_CHECKING:
    from samsem_plugin.classifier import FittedClassifier
    from samsem_plugin.embedder import MaskEmbedder
    from samsem_plugin.pipeline import Pipeline
    from samsem_plugin.proposer import SamProposer

logger = logging.getLogger(__name__)

MODEL_VERSION_PREFIX = "samsem"
"""Every model version we serve starts with this (how a webhook recognises our predictions)."""
META_LABEL_CONFIG = "label_config"
META_MODEL_VERSIONS = "model_versions"
MAX_REMEMBERED_VERSIONS = 200
MAX_LABEL_CONFIG_CHARS = 1 << 20
"""Longest label config accepted (real ones are a few KiB; parsed configs are cached)."""
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Project and annotation ids accepted from requests."""


@dataclass(frozen=True)
class Models:
    """The models of one process: SAM proposer, mask embedder, and the pipeline over both."""

    proposer: SamProposer
    embedder: MaskEmbedder
    pipeline: Pipeline


def build_models(settings: Settings) -> Models:
    """Build SAM, the timm embedder and the pipeline from ``settings`` (slow: loads weights)."""
    from samsem_plugin.embedder import MaskEmbedder
    from samsem_plugin.pipeline import Pipeline
    from samsem_plugin.proposer import AutoMaskSettings, SamProposer
    from samsem_plugin.sam_models import build_sam

    device = settings.resolved_device()
    if settings.sam_model_type == "tiny-random":
        logger.warning("!" * 80)
        logger.warning("SAM_MODEL_TYPE=tiny-random: masks come from a RANDOM tiny SAM (tests/demos only)")
        logger.warning("!" * 80)
    if settings.embedder_weights == RANDOM_WEIGHTS:
        logger.warning("!" * 80)
        logger.warning("EMBEDDER_WEIGHTS=random: classes come from a RANDOM backbone (tests/demos only)")
        logger.warning("!" * 80)
    autocast_dtype = settings.autocast_dtype(device)
    sam = build_sam(settings.sam_model_type, settings.sam_checkpoint, device=device)
    proposer = SamProposer(sam, cache_bytes=settings.sam_cache_bytes, autocast_dtype=autocast_dtype)
    embedder = MaskEmbedder.from_timm(
        settings.embedder_model,
        settings.embedder_weights,
        long_side=settings.embedder_long_side,
        cache_bytes=settings.embed_cache_bytes,
        device=device,
        multi_scale=settings.embedder_multi_scale,
        autocast_dtype=autocast_dtype,
    )
    auto_settings = AutoMaskSettings(
        points_per_side=settings.points_per_side,
        points_per_batch=settings.points_per_batch,
        pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh,
        box_nms_thresh=settings.box_nms_thresh,
    )
    pipeline = Pipeline(
        proposer,
        embedder,
        auto_settings=auto_settings,
        max_regions=settings.max_regions,
        proposal_cache_bytes=settings.proposal_cache_bytes,
    )
    return Models(proposer=proposer, embedder=embedder, pipeline=pipeline)


def embedder_space(settings: Settings) -> str:
    """The embedder id the settings' backbone will have, computed without building it.

    Same form as ``MaskEmbedder.embedder_id``: ``"<timm name>@random"`` or
    ``"<timm name>@<sha256 prefix of the weights file>"`` (hashing the file takes ~1 s per GB), plus
    ``MULTI_SCALE_SUFFIX`` (``"+ms3"``) with ``EMBEDDER_MULTI_SCALE``.
    """
    from samsem_plugin.embedder import MULTI_SCALE_SUFFIX, file_sha256

    weights = settings.embedder_weights
    tag = RANDOM_WEIGHTS if weights == RANDOM_WEIGHTS else file_sha256(weights)
    suffix = MULTI_SCALE_SUFFIX if settings.embedder_multi_scale else ""
    return f"{settings.embedder_model}@{tag}{suffix}"


def safe_id(value: object, what: str) -> str:
    """An id from untrusted input (Label Studio ids are integers) as a string.

    Raises:
        ValueError: not an integer or a string of 1-64 letters, digits, ``_`` or ``-`` (such ids
            are safe in logs, metric labels and region ids).
    """
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if text is None or not SAFE_ID.fullmatch(text):
        raise ValueError(
            f"{what}: expected an integer id (or 1-64 letters, digits, '_', '-'), got {brief(value)}"
        )
    return text


def project_from_request(value: object) -> str:
    """Project id from a ``/predict`` or ``/setup`` body: ``"6.1795301086"`` → ``"6"``; ``6`` → ``"6"``.

    Raises:
        ValueError: not a string like ``"6.1795301086"`` or an integer (see :func:`safe_id`).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"project: expected a string like '6.1795301086' or an integer, got {brief(value)}")
    return safe_id(str(value).split(".", 1)[0], "project")


def task_id_of(task: Mapping[str, Any]) -> int | None:
    """``task["id"]`` as an int when it is one (or a string of ASCII digits), else None."""
    value = task.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


class TaskDataError(ValueError):
    """A task's ``data`` does not hold an image the label config reads."""


def task_image_url(task: Mapping[str, Any], config: ProjectConfig) -> str:
    """The image URL of ``task``: ``task["data"][key]`` for the first Image key of ``config``
    (the output controls' Image first).

    Raises:
        TaskDataError: ``data`` missing or no non-empty string under any image key.
    """
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise TaskDataError(f"task {brief(task.get('id'))}: expected a 'data' object, got {brief(data)}")
    keys = [control.image_value_key for control in config.output_controls] + list(config.image_keys)
    for key in dict.fromkeys(keys):
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise TaskDataError(
        f"task {brief(task.get('id'))}: no image in data: expected a URL under {list(dict.fromkeys(keys))}, "
        f"got keys {brief(sorted(map(str, data)))}"
    )


class Runtime:
    """Models, memories, label configs, image fetcher, learning queue and metrics of one process.

    Args:
        settings: the validated service settings.
        models_factory: builds the models on first use (default :func:`build_models`; tests pass
            a factory returning shared tiny models).
        handler: the learning-job handler; default :attr:`learning`, a
            ``backend.learning.LearningHandler(self)``.

    Thread-safe: model building, the memory table, label configs and served versions each have a
    lock; the proposer, embedder, store and memories guard themselves.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        models_factory: Callable[[Settings], Models] = build_models,
        handler: Callable[[Job], None] | None = None,
    ) -> None:
        from backend.learning import LearningError, LearningHandler  # deferred: learning.py uses this module

        self.settings = settings
        self.metrics = Metrics()
        self.store = ExemplarStore(settings.model_dir / "memory")
        self.fetcher = ImageFetcher.from_settings(settings)
        self.classifier_settings = ClassifierSettings(**settings.classifier_options())
        self.learning = LearningHandler(self)
        self.queue = LearningQueue(
            handler if handler is not None else self.learning,
            max_size=settings.queue_max,
            max_bytes=settings.queue_max_bytes,
            expected_errors=(LearningError, ImageFetchError, ValueError),
            on_done=self._job_done,
        )
        self._models_factory = models_factory
        self._models: Models | None = None
        self._build_lock = threading.Lock()
        self._space: str | None = None
        self._space_lock = threading.Lock()
        self._memories: dict[str, ExemplarMemory] = {}
        self._memories_lock = threading.Lock()
        self._configs: dict[str, tuple[str, ProjectConfig]] = {}
        self._configs_lock = threading.Lock()
        self._versions: dict[str, list[str]] = {}
        self._versions_lock = threading.Lock()
        self.task_failures = Counter(
            "samsem_predict_task_failures",
            "Tasks answered with an empty prediction because they could not be processed.",
            ["reason"],
            registry=self.metrics.registry,
        )
        self._register_metric_callbacks()
        if settings.embedder_weights != RANDOM_WEIGHTS:  # hash the weights file now, not in /setup
            threading.Thread(target=self._compute_space, name="embedder-id", daemon=True).start()

    # -- models ------------------------------------------------------------------------------

    @property
    def models_loaded(self) -> bool:
        """True once the models of this process are built."""
        return self._models is not None

    @property
    def models(self) -> Models:
        """The models, built on first access (under a lock, once per process)."""
        models = self._models
        if models is not None:
            return models
        with self._build_lock:
            if self._models is None:
                logger.info("building models (first prediction or learning job in this process)")
                with self.metrics.observe_stage("load"):
                    built = self._models_factory(self.settings)
                space = self.space
                if built.embedder.embedder_id != space:
                    raise RuntimeError(
                        f"embedder id {built.embedder.embedder_id!r} differs from the memory space {space!r}"
                    )
                built.pipeline.timer = self.metrics.observe_stage
                self._models = built
                logger.info("models ready: SAM %s, embedder %s", self.settings.sam_model_type, space)
            return self._models

    @property
    def pipeline(self) -> Pipeline:
        return self.models.pipeline

    @property
    def space(self) -> str:
        """The embedding space of this process's memories (the embedder id; computed once)."""
        if self._space is None:
            with self._space_lock:
                if self._space is None:
                    self._space = embedder_space(self.settings)
        return self._space

    def _compute_space(self) -> None:
        try:
            logger.info("embedding space: %s", self.space)
        except OSError as error:
            logger.error("cannot hash EMBEDDER_WEIGHTS %s: %s", self.settings.embedder_weights, error)

    # -- memories ----------------------------------------------------------------------------

    def memory(self, project: str) -> ExemplarMemory:
        """The exemplar memory of ``project`` in this process's embedding space."""
        with self._memories_lock:
            memory = self._memories.get(project)
            if memory is None:
                memory = ExemplarMemory(project, self.space, self.store)
                self._memories[project] = memory
            return memory

    def classifier(self, project: str) -> FittedClassifier:
        """The project's classifier, fitted on its current memory (cached per revision)."""
        return self.memory(project).classifier(self.classifier_settings)

    def model_version(self, project: str) -> str:
        """``"samsem-<space tag>-<revision>"``: moves with every real change of the project's
        memory (not on replays), stable otherwise, distinct across embedders."""
        tag = hashlib.blake2b(self.space.encode(), digest_size=3).hexdigest()
        return f"{MODEL_VERSION_PREFIX}-{tag}-{self.memory(project).revision}"

    def remember_version(self, project: str, version: str) -> None:
        """Record that ``version`` was served for ``project`` (for ``GET /versions``)."""
        self.metrics.set_model_version(project, version)
        with self._versions_lock:
            versions = self._versions_of(project)
            if version not in versions:
                versions.append(version)
                del versions[:-MAX_REMEMBERED_VERSIONS]
                self.store.set_meta(project, META_MODEL_VERSIONS, versions)

    def versions(self, project: str) -> list[str]:
        """Model versions served for ``project``, oldest first."""
        with self._versions_lock:
            return list(self._versions_of(project))

    def _versions_of(self, project: str) -> list[str]:
        if project not in self._versions:
            self._versions[project] = list(self.store.get_meta(project, META_MODEL_VERSIONS, []) or [])
        return self._versions[project]

    def known_projects(self) -> list[str]:
        """Projects with a memory in this space, or with a label config seen by this process."""
        with self._configs_lock:
            seen = set(self._configs)
        stored = {project for project, space in self.store.projects() if space == self.space}
        return sorted(seen | stored)

    # -- label configs -----------------------------------------------------------------------

    def set_label_config(self, project: str, xml: str) -> ProjectConfig:
        """Parse, remember and persist the project's label config.

        Raises:
            ValueError: the config is invalid, longer than :data:`MAX_LABEL_CONFIG_CHARS` or has no
                supported control (message names it).
        """
        if isinstance(xml, str) and len(xml) > MAX_LABEL_CONFIG_CHARS:
            raise ValueError(
                f"label config: expected at most {MAX_LABEL_CONFIG_CHARS} characters of XML, got {len(xml)}"
            )
        config = parse_label_config(xml)
        with self._configs_lock:
            current = self._configs.get(project)
            if current is not None and current[0] == xml:
                return config
            self._configs[project] = (xml, config)
        if self.store.get_meta(project, META_LABEL_CONFIG) != xml:
            self.store.set_meta(project, META_LABEL_CONFIG, xml)
            logger.info(
                "project %s: label config updated (%d output controls)", project, len(config.output_controls)
            )
        return config

    def label_config(self, project: str) -> ProjectConfig | None:
        """The last label config seen for ``project`` (also from before a restart), or None."""
        with self._configs_lock:
            current = self._configs.get(project)
        if current is not None:
            return current[1]
        xml = self.store.get_meta(project, META_LABEL_CONFIG)
        if not xml:
            return None
        try:
            return self.set_label_config(project, xml)
        except ValueError as error:
            logger.warning("project %s: stored label config is unusable: %s", project, error)
            return None

    # -- task images -------------------------------------------------------------------------

    def task_image(self, task: Mapping[str, Any], config: ProjectConfig) -> np.ndarray:
        """The image of a Label Studio task: ``(H, W, 3) uint8`` RGB, EXIF applied (read-only).

        Raises:
            TaskDataError: the task has no ``data`` object or no image under the config's keys.
            backend.images.ImageFetchError: the image cannot be fetched or decoded.
        """
        url = task_image_url(task, config)
        with self.metrics.observe_stage("fetch"):
            return self.fetcher.fetch(url, task_id_of(task))

    # -- metrics -----------------------------------------------------------------------------

    def refresh_exemplar_metrics(self, project: str | None = None) -> None:
        """Update ``samsem_exemplars`` gauges from the store (one project, or all known)."""
        for name in [project] if project is not None else self.known_projects():
            counts = self.memory(name).counts()
            positives = {label: n for (label, kind), n in counts.items() if kind == POSITIVE}
            by_kind: dict[str, int] = {}
            for (_, kind), n in counts.items():
                by_kind[kind] = by_kind.get(kind, 0) + n
            self.metrics.set_exemplar_counts(name, positives)
            self.metrics.set_exemplar_kind_counts(name, by_kind)

    def count_task_failure(self, reason: str) -> None:
        """One task answered with an empty prediction (``reason``: the error class name)."""
        self.task_failures.labels(reason).inc()

    def _register_metric_callbacks(self) -> None:
        self.metrics.track_queue(self.queue.qsize)
        self.metrics.track_cache("image", lambda: self.fetcher.cache)
        self.metrics.track_cache("sam", lambda: self._models.proposer.cache if self._models else None)
        self.metrics.track_cache("embedder", lambda: self._models.embedder.cache if self._models else None)
        self.metrics.track_cache(
            "proposals", lambda: self._models.pipeline.proposal_cache if self._models else None
        )
        self.metrics.track_encoder("sam", lambda: self._models.proposer.encoder_calls if self._models else 0)
        self.metrics.track_encoder(
            "embedder", lambda: self._models.embedder.forward_calls if self._models else 0
        )

    def _job_done(self, job: Job, seconds: float, error: Exception | None) -> None:
        self.metrics.count_learn_job(job.kind, "error" if error is not None else "ok")
        self.metrics.observe_stage_seconds("learn", seconds)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the learning queue and close the store."""
        self.queue.stop()
        self.store.close()
