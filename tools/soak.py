"""Soak and load test of a samsem service on loopback: threads of ``/predict`` and ``/webhook``.

Usage (from the repository root, with the project's virtualenv)::

    # start its own service (python -m backend, tiny random models, MODEL_DIR in a temporary
    # directory) and a fake Label Studio on 127.0.0.1; 4 threads, at most 600 requests / 120 s,
    # two kill -9 + restart cycles on the way:
    .venv/bin/python tools/soak.py --threads 4 --requests 600 --seconds 120 --kills 2

    # against a service that is already running (task images sent as data: URIs, projects
    # 900001.. so real projects are not touched; no kills, no START_TRAINING):
    .venv/bin/python tools/soak.py --url http://127.0.0.1:9090 --user U --password P \\
        --webhook-secret S --threads 4 --requests 300

What it does: a seeded *world* of projects, tasks (images of several sizes) and a stream of
annotation events (created / updated / cancelled / deleted brush annotations, timestamps in
order) is sent as Label Studio webhooks while other requests ask for batch and interactive
predictions. Every prediction must describe its own task's image (``original_width`` /
``original_height``), no answer may be a 5xx. At the end the learning queue is drained and the
stored exemplars are compared with the exemplars the acknowledged events imply; with a spawned
service, ``START_TRAINING`` is then sent for every project and the store must equal f(every
annotation in the fake Label Studio). After each kill the SQLite store must pass
``PRAGMA integrity_check``.

Output: requests per route and status, errors, latency percentiles (s), exemplars expected vs
stored (lost / extra), kills survived, the service's largest RSS (MiB). Exit status 0 when no
5xx, no mixed-up prediction, no integrity failure and no exemplar lost or extra, else 1.

The pieces (:class:`World`, :class:`FakeLabelStudio`, :class:`Service`, :class:`ServiceClient`,
:func:`stored_exemplars`, :func:`learn_jobs_done`) are also used by ``tests/test_reliability_*``.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/soak.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from samsem_plugin.brush_rle import rle_encode  # noqa: E402
from tests.conftest import TINY_ENV as TEST_TINY_ENV  # noqa: E402
from tests.conftest import png_bytes  # noqa: E402
from tests.support.http_server import LoopbackHTTPServer, RecordedRequest, Response  # noqa: E402

LABELS = ("Cat", "Dog")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Cat"/>
    <Label value="Dog"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/>
  </KeyPointLabels>
</View>"""
IMAGE_SIZES = ((48, 64), (40, 56), (56, 48), (64, 64))
"""``(H, W)`` of the task images, cycled over tasks (a mixed-up image shows in the answer size)."""
API_TOKEN = "soak-legacy-token-0123456789"
TINY_ENV = {key: value for key, value in TEST_TINY_ENV.items() if key != "LOG_LEVEL"}
"""Settings of the spawned service: tiny random models (tests and soaks only)."""
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
DELETED = "deleted"

ExemplarKey = tuple[str, str, str]
"""``(task id, annotation id, region id)`` as stored."""


# -- the world: tasks, images, annotation events ----------------------------------------------------


def task_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB test image of ``size = (H, W)``: noise, a disc and a bar, by seed."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(60, 160, size=(height, width, 3)).astype(np.uint8)
    rows, cols = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    image[(rows - cy) ** 2 + (cols - cx) ** 2 < (min(height, width) * 0.2) ** 2] = rng.integers(0, 255, 3)
    top = int(rng.integers(0, height // 2))
    image[top : top + height // 5, : width // 3] = rng.integers(0, 255, 3)
    return image


@dataclass(frozen=True)
class Task:
    """A Label Studio task: id, project, image ``size = (H, W)`` and how its URL is written."""

    project: str
    task_id: int
    size: tuple[int, int]
    data_uri: bool = False

    @property
    def path(self) -> str:
        """Path of the image on (fake) Label Studio."""
        return f"/data/upload/{self.project}/task-{self.task_id}.png"

    def image(self) -> np.ndarray:
        return task_image(self.task_id, self.size)

    def url(self) -> str:
        """The image URL written in the task data (Label Studio path or ``data:`` URI)."""
        if not self.data_uri:
            return self.path
        return "data:image/png;base64," + base64.b64encode(png_bytes(self.image())).decode()

    def record(self) -> dict[str, Any]:
        return {"id": self.task_id, "data": {"image": self.url()}, "project": int(self.project)}


@dataclass(frozen=True)
class Region:
    """A labelled rectangle-shaped brush region; ``box = (x0, y0, x1, y1)`` pixels, x1/y1 exclusive."""

    region_id: str
    label: str
    box: tuple[int, int, int, int]

    def result(self, size: tuple[int, int]) -> dict[str, Any]:
        """The Label Studio brush result of this region on an image of ``size = (H, W)``."""
        height, width = size
        mask = np.zeros((height, width), bool)
        x0, y0, x1, y1 = self.box
        mask[y0:y1, x0:x1] = True
        return {
            "id": self.region_id,
            "from_name": "brush",
            "to_name": "image",
            "type": "brushlabels",
            "origin": "manual",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": rle_encode(mask), "brushlabels": [self.label]},
        }


@dataclass(frozen=True)
class AnnotationEvent:
    """One change of one annotation, as Label Studio reports it by webhook.

    ``action``: ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` (``regions`` = the annotation's
    content now; ``cancelled`` = skipped) or ``ANNOTATIONS_DELETED``. ``updated_at``: ISO 8601 UTC,
    increasing along the world's event list.
    """

    index: int
    action: str
    task: Task
    annotation: int
    regions: tuple[Region, ...]
    cancelled: bool
    updated_at: str

    @property
    def project(self) -> str:
        return self.task.project

    @property
    def deleted(self) -> bool:
        return self.action == "ANNOTATIONS_DELETED"

    def annotation_record(self) -> dict[str, Any]:
        return {
            "id": self.annotation,
            "task": self.task.task_id,
            "project": int(self.project),
            "result": [region.result(self.task.size) for region in self.regions],
            "was_cancelled": self.cancelled,
            "updated_at": self.updated_at,
            "prediction": {},
        }


def _project_record(project: str) -> dict[str, Any]:
    return {"id": int(project), "title": f"soak {project}", "label_config": LABEL_CONFIG}


def webhook_body(event: AnnotationEvent) -> dict[str, Any]:
    """The webhook Label Studio sends for ``event``."""
    if event.deleted:
        return {
            "action": event.action,
            "annotations": [{"id": event.annotation}],
            "project": _project_record(event.project),
        }
    return {
        "action": event.action,
        "annotation": event.annotation_record(),
        "task": event.task.record(),
        "project": _project_record(event.project),
    }


def start_training_body(project: str) -> dict[str, Any]:
    """The ``START_TRAINING`` webhook of ``project``."""
    return {"action": "START_TRAINING", "project": _project_record(project)}


def setup_body(project: str) -> dict[str, Any]:
    """``POST /setup`` as Label Studio sends it on connect."""
    return {"project": f"{project}.1795301086", "schema": LABEL_CONFIG, "extra_params": None}


def predict_body(task: Task, *, interactive: bool = False) -> dict[str, Any]:
    """``POST /predict`` for ``task``: batch, or interactive with one positive keypoint at the centre."""
    context = None
    if interactive:
        keypoint = {
            "id": "kp1",
            "from_name": "kp",
            "to_name": "image",
            "type": "keypointlabels",
            "is_positive": True,
            "original_width": task.size[1],
            "original_height": task.size[0],
            "value": {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": [LABELS[task.task_id % 2]]},
        }
        context = {"result": [keypoint]}
    return {
        "tasks": [task.record()],
        "project": f"{task.project}.1795301086",
        "label_config": LABEL_CONFIG,
        "params": {"login": None, "password": None, "context": context},
    }


def final_states(events: Iterable[AnnotationEvent]) -> dict[tuple[str, int], AnnotationEvent | str]:
    """Per ``(project, annotation)``: :data:`DELETED`, or its newest event (by ``updated_at``).

    Independent of the order of ``events`` (what the service must converge to whatever order the
    webhooks arrive in): a deletion is final, otherwise the newest content wins.
    """
    states: dict[tuple[str, int], AnnotationEvent | str] = {}
    for event in events:
        key = (event.project, event.annotation)
        current = states.get(key)
        if current == DELETED:
            continue
        if event.deleted:
            states[key] = DELETED
        elif current is None or event.updated_at >= current.updated_at:  # type: ignore[union-attr]
            states[key] = event
    return states


def expected_exemplars(events: Iterable[AnnotationEvent]) -> dict[str, dict[ExemplarKey, str]]:
    """``{project: {(task, annotation, region): label}}``: the positive exemplars ``events`` imply."""
    expected: dict[str, dict[ExemplarKey, str]] = defaultdict(dict)
    for (project, annotation), state in final_states(events).items():
        if state == DELETED or state.cancelled:  # type: ignore[union-attr]
            continue
        for region in state.regions:  # type: ignore[union-attr]
            expected[project][(str(state.task.task_id), str(annotation), region.region_id)] = region.label
    return dict(expected)


class World:
    """Seeded projects, tasks and a stream of annotation events.

    Args:
        projects: number of projects; ids ``first_project``, ``first_project + 1``, ...
        tasks_per_project: tasks per project (image sizes cycle through :data:`IMAGE_SIZES`).
        events: length of the event stream.
        seed: the random seed (same seed, same world).
        data_uri: write task images as ``data:`` URIs instead of Label Studio paths.
    """

    def __init__(
        self,
        projects: int = 2,
        tasks_per_project: int = 4,
        events: int = 40,
        seed: int = 0,
        *,
        first_project: int = 1,
        data_uri: bool = False,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.projects = [str(first_project + p) for p in range(projects)]
        self.tasks: dict[str, list[Task]] = {}
        task_id = 1
        for project in self.projects:
            self.tasks[project] = []
            for _ in range(tasks_per_project):
                size = IMAGE_SIZES[task_id % len(IMAGE_SIZES)]
                self.tasks[project].append(Task(project, task_id, size, data_uri))
                task_id += 1
        self.events = self._generate(events)

    def all_tasks(self) -> list[Task]:
        return [task for project in self.projects for task in self.tasks[project]]

    def _regions(self, task: Task, serial: int) -> tuple[Region, ...]:
        height, width = task.size
        regions = []
        for k in range(int(self.rng.integers(1, 4))):
            x0, y0 = int(self.rng.integers(0, width - 8)), int(self.rng.integers(0, height - 8))
            x1 = int(self.rng.integers(x0 + 4, min(width, x0 + width // 2) + 1))
            y1 = int(self.rng.integers(y0 + 4, min(height, y0 + height // 2) + 1))
            label = LABELS[int(self.rng.integers(0, len(LABELS)))]
            regions.append(Region(f"r{serial}-{k}", label, (x0, y0, x1, y1)))
        return tuple(regions)

    def _generate(self, count: int) -> list[AnnotationEvent]:
        events: list[AnnotationEvent] = []
        live: dict[str, list[tuple[int, Task]]] = {project: [] for project in self.projects}
        next_annotation = 1
        for index in range(count):
            project = self.projects[int(self.rng.integers(0, len(self.projects)))]
            stamp = (EPOCH + timedelta(milliseconds=index)).isoformat(timespec="microseconds")
            stamp = stamp.replace("+00:00", "Z")
            draw = self.rng.random()
            if not live[project] or draw < 0.35:
                task = self.tasks[project][int(self.rng.integers(0, len(self.tasks[project])))]
                annotation, action, cancelled = next_annotation, "ANNOTATION_CREATED", False
                next_annotation += 1
                live[project].append((annotation, task))
            else:
                slot = int(self.rng.integers(0, len(live[project])))
                annotation, task = live[project][slot]
                cancelled = draw > 0.7 and draw < 0.8
                action = "ANNOTATION_UPDATED"
                if draw >= 0.85:
                    action, cancelled = "ANNOTATIONS_DELETED", False
                    live[project].pop(slot)
            regions = () if action == "ANNOTATIONS_DELETED" else self._regions(task, index)
            events.append(AnnotationEvent(index, action, task, annotation, regions, cancelled, stamp))
        return events

    def label_studio_tasks(self, project: str, events: Sequence[AnnotationEvent] | None = None) -> list[dict]:
        """``/api/tasks/`` records of ``project`` after ``events`` (default: all), with annotations."""
        annotations: dict[int, list[dict]] = defaultdict(list)
        for (owner, _), state in final_states(self.events if events is None else events).items():
            if owner == project and state != DELETED:
                annotations[state.task.task_id].append(state.annotation_record())  # type: ignore[union-attr]
        return [dict(task.record(), annotations=annotations[task.task_id]) for task in self.tasks[project]]


# -- a fake Label Studio ---------------------------------------------------------------------------


class FakeLabelStudio:
    """Loopback Label Studio for a :class:`World`: task images and the paged ``/api/tasks/`` list,
    all behind ``Authorization: Token <token>`` (anything else answers 401)."""

    def __init__(self, world: World, token: str = API_TOKEN) -> None:
        self.world = world
        self.token = token
        self.visible: int | None = None
        """How many of the world's events have happened in Label Studio (``None``: all)."""
        self.server = LoopbackHTTPServer()
        self.unauthorised = 0
        for task in world.all_tasks():
            self.server.routes[task.path] = self._guarded(self._image_answer(task))
        self.server.routes["/api/tasks/"] = self._guarded(self._tasks_page)

    @staticmethod
    def _image_answer(task: Task) -> Response:
        return Response(body=png_bytes(task.image()), headers={"Content-Type": "image/png"})

    def _guarded(self, answer):
        def guarded(request: RecordedRequest) -> Response:
            if request.header("Authorization") != f"Token {self.token}":
                self.unauthorised += 1
                return Response(
                    status=401, body=b'{"detail": "Authentication credentials were not provided."}'
                )
            return answer(request) if callable(answer) else answer

        return guarded

    def _tasks_page(self, request: RecordedRequest) -> Response:
        query = parse_qs(urlsplit(request.path).query)
        project = query.get("project", [""])[0]
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        events = self.world.events if self.visible is None else self.world.events[: self.visible]
        tasks = self.world.label_studio_tasks(project, events) if project in self.world.tasks else []
        chosen = tasks[(page - 1) * size : page * size]
        body = json.dumps({"tasks": chosen, "total": len(tasks)}).encode()
        return Response(body=body, headers={"Content-Type": "application/json"})

    @property
    def url(self) -> str:
        return self.server.base_url

    def start(self) -> FakeLabelStudio:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


# -- the service process and a client ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    """One answer: HTTP ``status`` (0 = no answer, ``error`` says why), JSON or text body, seconds."""

    status: int
    body: Any
    seconds: float
    error: str = ""


class ServiceClient:
    """JSON calls to a samsem service with its credentials (basic auth, webhook secret).

    Thread-safe: one ``requests.Session`` per thread.
    """

    def __init__(
        self,
        base_url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        webhook_secret: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = (user, password) if user and password else None
        self.webhook_secret = webhook_secret
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def call(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Reply:
        headers = {}
        if path.startswith("/webhook") and self.webhook_secret:
            headers["X-Samsem-Webhook-Secret"] = self.webhook_secret
        started = time.perf_counter()
        try:
            response = self._session().request(
                method,
                self.base_url + path,
                json=body,
                headers=headers,
                auth=self.auth,
                timeout=timeout or self.timeout,
            )
        except requests.RequestException as error:
            return Reply(0, None, time.perf_counter() - started, type(error).__name__)
        seconds = time.perf_counter() - started
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.text
        return Reply(response.status_code, payload, seconds)

    def metrics(self) -> str:
        reply = self.call("GET", "/metrics", timeout=10)
        return reply.body if reply.status == 200 and isinstance(reply.body, str) else ""


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``[(labels, value)]`` of the samples called ``name`` in Prometheus ``text``."""
    return [
        (dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def learn_jobs_done(client: ServiceClient, kind: str | None = None) -> int:
    """Learning jobs finished by the service process (``samsem_learn_jobs_total``, ok + error)."""
    samples = metric_samples(client.metrics(), "samsem_learn_jobs_total")
    return int(sum(value for labels, value in samples if kind is None or labels.get("kind") == kind))


def wait_for_jobs(client: ServiceClient, count: int, timeout: float, kind: str | None = None) -> bool:
    """Poll until at least ``count`` learning jobs (of ``kind``) are finished; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if learn_jobs_done(client, kind) >= count:
            return True
        time.sleep(0.1)
    return learn_jobs_done(client, kind) >= count


def database_path(model_dir: Path) -> Path:
    """The exemplar store of a service with ``MODEL_DIR=model_dir``."""
    return Path(model_dir) / "memory" / "memory.sqlite3"


def stored_exemplars(model_dir: Path) -> dict[str, dict[ExemplarKey, tuple[str | None, str]]]:
    """``{project: {(task, annotation, region): (label, kind)}}`` read from the store (read-only)."""
    path = database_path(model_dir)
    if not path.exists():
        return {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = connection.execute(
            "SELECT project, task, annotation, region, label, kind FROM exemplars"
        ).fetchall()
    finally:
        connection.close()
    stored: dict[str, dict[ExemplarKey, tuple[str | None, str]]] = defaultdict(dict)
    for project, task, annotation, region, label, kind in rows:
        stored[project][(task, annotation, region)] = (label, kind)
    return dict(stored)


def positive_labels(stored: Mapping[ExemplarKey, tuple[str | None, str]]) -> dict[ExemplarKey, str]:
    """The positive exemplars of one project's :func:`stored_exemplars` as ``{key: label}``."""
    return {key: label for key, (label, kind) in stored.items() if kind == "positive" and label}


def integrity_check(model_dir: Path) -> str:
    """``PRAGMA integrity_check`` of the store, opened the way the service opens it."""
    from samsem_plugin.store import ExemplarStore

    with ExemplarStore(Path(model_dir) / "memory") as store:
        return store.integrity_check()


def process_group_rss(pgid: int) -> int:
    """Resident memory in bytes of every process in process group ``pgid`` (Linux ``/proc``)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the name: state, ppid, pgrp, ...
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


class Service:
    """``python -m backend`` as a child process group on 127.0.0.1 (gunicorn master + workers).

    Args:
        model_dir: MODEL_DIR (the store lives in ``model_dir/memory``).
        env: extra environment (settings); tiny random models unless overridden.
        log_path: where the service's stdout/stderr go (appended across restarts).
        port: TCP port (default: a free one).
    """

    def __init__(
        self, model_dir: Path, env: Mapping[str, str], log_path: Path, port: int | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        keep = ("PATH", "HOME", "LANG", "TMPDIR")
        self.env = {key: os.environ[key] for key in keep if key in os.environ}
        self.env.update(TINY_ENV, HOST="127.0.0.1", PORT=str(self.port), MODEL_DIR=str(self.model_dir))
        self.env.update(env)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self, client: ServiceClient, timeout: float = 120.0) -> None:
        """Spawn the service and wait until ``/health`` answers 200 (RuntimeError otherwise)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited {self.process.returncode}:\n{self.log_tail()}")
            if client.call("GET", "/health", timeout=5).status == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"/health did not answer within {timeout:g} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the whole process group (master and workers) and reap the master."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self._wait_group_gone(self.process.pid)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._wait_group_gone(self.process.pid)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while process_group_rss(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        return process_group_rss(self.process.pid) if self.process and self.process.poll() is None else 0


# -- the soak run ------------------------------------------------------------------------------------


@dataclass
class SoakReport:
    """What a soak run observed (printed by :func:`print_report`)."""

    requests: Counter = field(default_factory=Counter)
    """``(route, status)`` → count; status 0 = no answer."""
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    """5xx answers, unexplained transport failures, mixed-up predictions, integrity failures."""
    down_refusals: int = 0
    """Requests that failed because the service was being killed / restarted (expected)."""
    kills: int = 0
    integrity: list[str] = field(default_factory=list)
    acknowledged_events: int = 0
    exemplars: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per check (``"acknowledged"``, ``"healed"``): expected, stored, lost, extra."""
    rss_max: int = 0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def ok(self) -> bool:
        lost = sum(check["lost"] + check["extra"] for check in self.exemplars.values())
        return not self.errors and lost == 0


def compare_exemplars(expected: Mapping[str, Mapping[ExemplarKey, str]], stored: Mapping) -> dict[str, int]:
    """Totals over projects of expected vs stored positive exemplars (key and label must match)."""
    totals = Counter()
    for project in set(expected) | set(stored):
        want = dict(expected.get(project, {}))
        have = positive_labels(stored.get(project, {}))
        totals["expected"] += len(want)
        totals["stored"] += len(have)
        totals["lost"] += sum(1 for key, label in want.items() if have.get(key) != label)
        totals["extra"] += sum(1 for key, label in have.items() if want.get(key) != label)
    return dict(totals)


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))] if ordered else 0.0


class SoakRun:
    """One bounded soak: ``threads`` workers share a budget of ``max_requests`` and ``seconds``."""

    def __init__(
        self,
        world: World,
        client: ServiceClient,
        *,
        threads: int,
        max_requests: int,
        seconds: float,
        webhook_share: float = 0.5,
        service: Service | None = None,
        kills: int = 0,
        seed: int = 0,
    ) -> None:
        self.world, self.client, self.service = world, client, service
        self.threads, self.max_requests, self.seconds = threads, max_requests, seconds
        self.webhook_share, self.kills = webhook_share, kills
        self.report = SoakReport()
        self._lock = threading.Lock()
        self._issued = 0
        self._next_event = 0
        self._acked: list[AnnotationEvent] = []
        self._generation = 0
        self._down = threading.Event()
        self._stop = threading.Event()
        self._seed = seed

    # -- work items --------------------------------------------------------------------------

    def _take(self) -> bool:
        with self._lock:
            if self._issued >= self.max_requests:
                return False
            self._issued += 1
            return True

    def _next(self) -> AnnotationEvent | None:
        with self._lock:
            if self._next_event >= len(self.world.events):
                return None
            event = self.world.events[self._next_event]
            self._next_event += 1
            return event

    def _record(self, route: str, reply: Reply, generation: int) -> bool:
        """Count ``reply``; True when the request reached a running service."""
        with self._lock:
            self.report.requests[(route, reply.status)] += 1
            if reply.status == 0 and (self._down.is_set() or generation != self._generation):
                self.report.down_refusals += 1
                return False
            self.report.latencies[route].append(reply.seconds)
            if reply.status == 0 or (reply.status >= 500 and reply.status != 503):
                self.report.errors.append(f"{route}: {reply.status or reply.error} {str(reply.body)[:200]}")
        return reply.status != 0

    def _check_prediction(self, task: Task, reply: Reply) -> None:
        if reply.status != 200 or not isinstance(reply.body, dict):
            return
        height, width = task.size
        for prediction in reply.body.get("results", []):
            for result in prediction.get("result", []):
                if (result.get("original_height"), result.get("original_width")) != (height, width):
                    with self._lock:
                        self.report.errors.append(
                            f"task {task.task_id}: prediction sized {result.get('original_width')}x"
                            f"{result.get('original_height')}, image is {width}x{height} (mixed up)"
                        )
                    return

    def _worker(self, number: int) -> None:
        rng = np.random.default_rng(self._seed * 1000 + number)
        tasks = self.world.all_tasks()
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self._down.is_set():
                time.sleep(0.05)
                continue
            if not self._take():
                return
            generation = self._generation
            event = self._next() if rng.random() < self.webhook_share else None
            if event is not None:
                reply = self.client.call("POST", "/webhook", webhook_body(event))
                if self._record("/webhook", reply, generation) and reply.status == 200:
                    with self._lock:
                        self._acked.append(event)
                continue
            task = tasks[int(rng.integers(0, len(tasks)))]
            interactive = rng.random() < 0.25
            reply = self.client.call("POST", "/predict", predict_body(task, interactive=interactive))
            route = "/predict interactive" if interactive else "/predict batch"
            if self._record(route, reply, generation):
                self._check_prediction(task, reply)

    # -- kills -------------------------------------------------------------------------------

    def _due(self, cycle: int, started: float) -> bool:
        """Whether kill number ``cycle`` (0-based) is due: that share of the budget is used up."""
        share = (cycle + 1) / (self.kills + 1)
        with self._lock:
            used = self._issued / self.max_requests
        return used >= share or time.monotonic() - started >= share * self.seconds

    def _killer(self) -> None:
        started = time.monotonic()
        for cycle in range(self.kills):
            while not self._due(cycle, started):
                if self._stop.wait(0.02):
                    return
            self._down.set()
            with self._lock:
                self._generation += 1
            self.service.kill9()  # type: ignore[union-attr]
            self.report.kills += 1
            result = integrity_check(self.service.model_dir)  # type: ignore[union-attr]
            self.report.integrity.append(result)
            if result != "ok":
                self.report.errors.append(f"kill {cycle + 1}: integrity_check says {result!r}")
            self.service.start(self.client)  # type: ignore[union-attr]
            self._down.clear()

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.5):
            if self.service is not None:
                self.report.rss_max = max(self.report.rss_max, self.service.rss_bytes())

    # -- the run -----------------------------------------------------------------------------

    def run(self, *, heal: bool) -> SoakReport:
        """Send the load, drain the queue, compare the store (and heal with START_TRAINING)."""
        for project in self.world.projects:
            self._record("/setup", self.client.call("POST", "/setup", setup_body(project)), 0)
        helpers = [threading.Thread(target=self._sample_rss, daemon=True)]
        if self.kills and self.service is not None:
            helpers.append(threading.Thread(target=self._killer, daemon=True))
        workers = [threading.Thread(target=self._worker, args=(n,)) for n in range(self.threads)]
        for thread in helpers + workers:
            thread.start()
        for thread in workers:
            thread.join()
        self._stop.set()
        for thread in helpers:
            thread.join(timeout=180)
        self.report.acknowledged_events = len(self._acked)
        self._settle(heal=heal)
        return self.report

    def _drained(self, timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.client.call("GET", "/health", timeout=10)
            if health.status == 200 and health.body.get("learn_queue") == 0:
                before = learn_jobs_done(self.client)
                time.sleep(0.3)
                if (
                    learn_jobs_done(self.client) == before
                    and self.client.call("GET", "/health").body.get("learn_queue") == 0
                ):
                    return True
            time.sleep(0.2)
        return False

    def _stored(self) -> dict:
        if self.service is not None:
            return stored_exemplars(self.service.model_dir)
        samples = metric_samples(self.client.metrics(), "samsem_exemplars")
        # without the database only counts are visible: key them by (label, n) per project
        stored: dict[str, dict] = defaultdict(dict)
        for labels, value in samples:
            for n in range(int(value)):
                stored[labels["project"]][("count", labels["label"], str(n))] = (labels["label"], "positive")
        return stored

    def _expected_counts(self, expected: Mapping[str, Mapping[ExemplarKey, str]]) -> dict:
        counted: dict[str, dict] = defaultdict(dict)
        for project, exemplars in expected.items():
            for label, n in Counter(exemplars.values()).items():
                for i in range(n):
                    counted[project][("count", label, str(i))] = label
        return counted

    def _settle(self, *, heal: bool) -> None:
        if not self._drained():
            self.report.errors.append("the learning queue did not drain within 300 s")
        expected = {p: e for p, e in expected_exemplars(self._acked).items() if p in self.world.projects}
        if not self.report.kills:  # acknowledged events since the last start are all applied
            wanted = expected if self.service is not None else self._expected_counts(expected)
            stored = {p: s for p, s in self._stored().items() if p in self.world.projects}
            self.report.exemplars["acknowledged"] = compare_exemplars(wanted, stored)
        if heal and self.service is not None:
            trained = learn_jobs_done(self.client, "train")
            for project in self.world.projects:
                self._record(
                    "/webhook", self.client.call("POST", "/webhook", start_training_body(project)), -1
                )
            if not wait_for_jobs(self.client, trained + len(self.world.projects), 300, kind="train"):
                self.report.errors.append("START_TRAINING did not finish within 300 s")
            self._drained()
            everything = expected_exemplars(self.world.events)
            self.report.exemplars["healed"] = compare_exemplars(everything, self._stored())
        if self.service is not None:
            self.report.rss_max = max(self.report.rss_max, self.service.rss_bytes())


def print_report(report: SoakReport, out=sys.stdout) -> None:
    """Human-readable summary of a soak run."""
    print(
        f"requests: {report.total_requests} ({report.down_refusals} refused while the service was down)",
        file=out,
    )
    for (route, status), count in sorted(report.requests.items()):
        print(f"  {route:22s} {status or 'no answer':>9} x {count}", file=out)
    for route, values in sorted(report.latencies.items()):
        p50, p95 = statistics.median(values), _percentile(values, 0.95)
        print(
            f"latency {route:22s} p50 {p50:.3f} s  p95 {p95:.3f} s  max {max(values):.3f} s"
            f"  (n={len(values)})",
            file=out,
        )
    print(f"events acknowledged: {report.acknowledged_events}", file=out)
    for check, totals in report.exemplars.items():
        print(
            f"exemplars ({check}): expected {totals.get('expected', 0)}, stored {totals.get('stored', 0)}, "
            f"lost {totals.get('lost', 0)}, extra {totals.get('extra', 0)}",
            file=out,
        )
    print(f"kills survived: {report.kills} (integrity: {', '.join(report.integrity) or 'n/a'})", file=out)
    rss = f"{report.rss_max / 2**20:.0f} MiB" if report.rss_max else "n/a (not spawned here)"
    print(f"service RSS max: {rss}", file=out)
    print(f"errors: {len(report.errors)}", file=out)
    for error in report.errors[:20]:
        print(f"  {error}", file=out)
    print("RESULT: " + ("ok" if report.ok else "FAILED"), file=out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service (default: spawn one with tiny models)")
    parser.add_argument("--user", help="basic-auth user of --url")
    parser.add_argument("--password", help="basic-auth password of --url")
    parser.add_argument("--webhook-secret", help="WEBHOOK_SECRET of --url")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--requests", type=int, default=400, help="most requests in all (default 400)")
    parser.add_argument("--seconds", type=float, default=120.0, help="most seconds of load (default 120)")
    parser.add_argument("--projects", type=int, default=3, help="projects (default 3)")
    parser.add_argument("--tasks", type=int, default=6, help="tasks per project (default 6)")
    parser.add_argument("--events", type=int, default=200, help="annotation events (default 200)")
    parser.add_argument("--kills", type=int, default=0, help="kill -9 + restart cycles (spawned only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary MODEL_DIR and log")
    args = parser.parse_args(argv)
    if args.url and args.kills:
        parser.error("--kills needs a spawned service (drop --url)")
    if min(args.threads, args.requests, args.projects, args.tasks) < 1 or args.seconds <= 0:
        parser.error("--threads, --requests, --projects, --tasks and --seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spawned = args.url is None
    world = World(
        args.projects,
        args.tasks,
        args.events,
        args.seed,
        first_project=1 if spawned else 900001,
        data_uri=not spawned,
    )

    def soak(client: ServiceClient, service: Service | None = None) -> SoakReport:
        return SoakRun(
            world,
            client,
            threads=args.threads,
            max_requests=args.requests,
            seconds=args.seconds,
            service=service,
            kills=args.kills,
            seed=args.seed,
        ).run(heal=service is not None)

    if not spawned:
        report = soak(
            ServiceClient(
                args.url, user=args.user, password=args.password, webhook_secret=args.webhook_secret
            )
        )
        print_report(report)
        return 0 if report.ok else 1
    workdir = Path(tempfile.mkdtemp(prefix="samsem-soak-"))
    label_studio = FakeLabelStudio(world).start()
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": API_TOKEN,
        "WORKERS": "1",
        "THREADS": str(max(2, args.threads)),
        "LOG_LEVEL": "WARNING",
    }
    service = Service(workdir / "model_dir", env, workdir / "service.log")
    try:
        service.start(ServiceClient(service.url))
        report = soak(ServiceClient(service.url), service)
    finally:
        service.stop()
        label_studio.stop()
    print_report(report)
    print(f"service log: {service.log_path}" if args.keep else "", end="\n" if args.keep else "")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
