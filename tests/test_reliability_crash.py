"""Crash safety: ``kill -9`` of a real ``python -m backend`` in the middle of a webhook stream.

A real gunicorn service (tiny random models, MODEL_DIR in tmp) receives a stream of annotation
webhooks over HTTP from one sender thread (so the learning queue runs them in the order they were
acknowledged) while a fake Label Studio on loopback serves the task images and ``/api/tasks/``.
When the service reports (``samsem_learn_jobs_total``) that some jobs are done, the whole process
group gets SIGKILL. Then:

* the SQLite store opens and ``PRAGMA integrity_check`` says ``ok``;
* the stored exemplars equal f(the events applied before this stream + the first k' acknowledged
  events) for some k' >= the k jobs reported done: nothing acknowledged-and-applied is lost, and
  no event is half applied;
* after a restart, ``START_TRAINING`` (reading the fake Label Studio API) makes the memory equal
  f(every annotation Label Studio holds): what was queued but not applied is healed.
"""

from __future__ import annotations

import threading
import time

import pytest

from tools.soak import (
    FakeLabelStudio,
    Service,
    ServiceClient,
    World,
    expected_exemplars,
    integrity_check,
    learn_jobs_done,
    positive_labels,
    start_training_body,
    stored_exemplars,
    wait_for_jobs,
    webhook_body,
)

KILLS = 2
EVENTS_PER_STREAM = 16
KILL_AFTER_JOBS = 6
"""Kill once the service reports this many jobs of the current stream done."""
BACKLOG = 3
"""Jobs the sender keeps waiting in the service's queue."""
SENT_BEFORE_KILL = EVENTS_PER_STREAM - BACKLOG
"""The sender holds the stream's last events back until the kill, so the kill always lands
mid-stream however fast the learning runs (the kill comes at :data:`KILL_AFTER_JOBS` done jobs,
which the sender reaches with :data:`BACKLOG` more queued; the metrics poll may lag behind)."""

pytestmark = pytest.mark.slow


def stored_positives(model_dir) -> dict[str, dict]:
    return {project: positive_labels(rows) for project, rows in stored_exemplars(model_dir).items()}


def nonempty(expected: dict[str, dict]) -> dict[str, dict]:
    return {project: rows for project, rows in expected.items() if rows}


class Stream:
    """Sends events one at a time from a thread, keeping about :data:`BACKLOG` jobs queued ahead
    of the learning (so a kill lands while webhooks still arrive and jobs wait) and holding the
    events from :data:`SENT_BEFORE_KILL` on back until :attr:`stop`; records which events were
    sent and acknowledged."""

    def __init__(self, client: ServiceClient, label_studio: FakeLabelStudio, events) -> None:
        self.client, self.label_studio, self.events = client, label_studio, list(events)
        self.attempted: list = []
        self.acknowledged = 0
        self.unexpected: list[str] = []
        self.stop = threading.Event()
        self.jobs_before = learn_jobs_done(client)
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _wait_for_backlog(self, sent: int) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            if learn_jobs_done(self.client) - self.jobs_before >= sent - BACKLOG:
                return
            time.sleep(0.02)

    def _send(self) -> None:
        for sent, event in enumerate(self.events):
            if sent >= SENT_BEFORE_KILL:
                self.stop.wait(timeout=120)
            self._wait_for_backlog(sent)
            if self.stop.is_set():
                return
            self.label_studio.visible = event.index + 1  # the change happens in Label Studio first
            self.attempted.append(event)
            reply = self.client.call("POST", "/webhook", webhook_body(event), timeout=10)
            if reply.status == 200:
                self.acknowledged += 1
            elif not self.stop.is_set():
                self.unexpected.append(f"event {event.index}: {reply.status} {reply.error} {reply.body}")
                return


def heal(client: ServiceClient, world: World) -> None:
    """START_TRAINING for every project; wait until every training job is done."""
    trained = learn_jobs_done(client, "train")
    for project in world.projects:
        reply = client.call("POST", "/webhook", start_training_body(project))
        assert reply.status == 200 and reply.body["status"] == "queued", reply
    assert wait_for_jobs(client, trained + len(world.projects), timeout=120, kind="train")


def test_kill_9_mid_stream_keeps_every_applied_event_and_start_training_heals(tmp_path):
    world = World(projects=2, tasks_per_project=4, events=EVENTS_PER_STREAM * KILLS, seed=11)
    label_studio = FakeLabelStudio(world).start()
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "WORKERS": "1",
        "THREADS": "4",
        "LOG_LEVEL": "INFO",
    }
    service = Service(tmp_path / "model_dir", env, tmp_path / "service.log")
    client = ServiceClient(service.url, timeout=60)
    applied_before = 0  # events[:applied_before] are in memory (healed) when a stream starts
    survived = 0
    try:
        for cycle in range(KILLS):
            service.start(client)
            if cycle:
                heal(client, world)
                assert stored_positives(service.model_dir) == nonempty(
                    expected_exemplars(world.events[:applied_before])
                ), "START_TRAINING after the restart healed the memory"
            stream = Stream(
                client, label_studio, world.events[cycle * EVENTS_PER_STREAM :][:EVENTS_PER_STREAM]
            )
            stream.thread.start()
            assert wait_for_jobs(client, stream.jobs_before + KILL_AFTER_JOBS, timeout=120), (
                service.log_tail()
            )
            done = learn_jobs_done(client) - stream.jobs_before  # learning committed before the kill
            service.kill9()
            stream.stop.set()
            stream.thread.join(timeout=30)
            survived += 1
            assert not stream.unexpected, stream.unexpected
            assert done >= KILL_AFTER_JOBS and stream.acknowledged >= done
            assert KILL_AFTER_JOBS <= len(stream.attempted) <= SENT_BEFORE_KILL < len(stream.events)

            assert integrity_check(service.model_dir) == "ok"
            stored = stored_positives(service.model_dir)
            base = world.events[:applied_before]
            candidates = {
                applied: nonempty(expected_exemplars(base + stream.attempted[:applied]))
                for applied in range(done, len(stream.attempted) + 1)
            }
            matches = [applied for applied, expected in candidates.items() if expected == stored]
            assert matches, (
                f"cycle {cycle}: the store after kill -9 matches no prefix of >= {done} applied events "
                f"(of {len(stream.attempted)} sent, {stream.acknowledged} acknowledged)"
            )
            applied_before = stream.attempted[-1].index + 1

        service.start(client)
        heal(client, world)
        expected = nonempty(expected_exemplars(world.events[:applied_before]))
        assert stored_positives(service.model_dir) == expected
        assert sum(len(rows) for rows in expected.values()) > 0
        assert label_studio.unauthorised == 0, "every Label Studio request carried the token"
        assert label_studio.token not in service.log_path.read_text(errors="replace"), "no token in the log"
    finally:
        service.stop()
        label_studio.stop()
    assert survived == KILLS
