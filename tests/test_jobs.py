"""LearningQueue: lazy worker, order, bound, failures, join/stop, on_done."""

from __future__ import annotations

import logging
import threading

import pytest

from backend.jobs import Job, LearningQueue


def job(project: str = "1", n: int = 0, kind: str = "ANNOTATION_CREATED") -> Job:
    return Job(
        kind=kind,
        project=project,
        payload={"n": n, "secret": "payload-secret"},
        received_at=0.0,
        key=f"{kind} #{n}",
    )


def test_worker_starts_lazily_and_runs_jobs_in_order():
    seen: list[tuple[str, int]] = []
    queue = LearningQueue(lambda j: seen.append((j.project, j.payload["n"])), max_size=100)
    assert queue._thread is None  # nothing started before the first submit
    submitted = [(project, n) for n in range(20) for project in ("a", "b")]
    for project, n in submitted:
        assert queue.submit(job(project, n))
    assert queue.join(timeout=10)
    assert seen == submitted and queue.processed == 40 and queue.failed == 0
    assert queue.qsize() == 0 and queue.in_flight == 0
    queue.stop()


def test_full_queue_rejects_and_accepts_again_once_drained():
    release = threading.Event()
    started = threading.Event()

    def handler(j: Job) -> None:
        started.set()
        release.wait(10)

    queue = LearningQueue(handler, max_size=2)
    assert queue.submit(job(n=0))
    assert started.wait(5)  # job 0 is running, not waiting
    assert queue.submit(job(n=1)) and queue.submit(job(n=2))
    assert queue.qsize() == 2 and queue.in_flight == 1
    assert queue.submit(job(n=3)) is False and queue.rejected == 1
    release.set()
    assert queue.join(timeout=10)
    assert queue.processed == 3 and queue.submit(job(n=4))
    assert queue.join(timeout=10)
    queue.stop()


def test_failing_job_is_logged_with_its_key_counted_and_does_not_stop_the_worker(caplog):
    def handler(j: Job) -> None:
        if j.payload["n"] == 1:
            raise RuntimeError("boom")

    done: list[tuple[str, float, Exception | None]] = []
    queue = LearningQueue(handler, max_size=10, on_done=lambda j, s, e: done.append((j.key, s, e)))
    with caplog.at_level(logging.INFO, logger="backend.jobs"):
        for n in range(3):
            queue.submit(job(n=n))
        assert queue.join(timeout=10)
    assert queue.processed == 3 and queue.failed == 1
    assert [key for key, _, _ in done] == [
        "ANNOTATION_CREATED #0",
        "ANNOTATION_CREATED #1",
        "ANNOTATION_CREATED #2",
    ]
    assert isinstance(done[1][2], RuntimeError) and done[0][2] is None and all(s >= 0 for _, s, _ in done)
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failure) == 1 and "ANNOTATION_CREATED #1" in failure[0].getMessage()
    assert "payload-secret" not in caplog.text
    queue.stop()


def test_failing_on_done_callback_does_not_stop_the_worker():
    def on_done(j: Job, seconds: float, error: Exception | None) -> None:
        raise ValueError("metrics broke")

    seen: list[int] = []
    queue = LearningQueue(lambda j: seen.append(j.payload["n"]), max_size=10, on_done=on_done)
    for n in range(3):
        queue.submit(job(n=n))
    assert queue.join(timeout=10)
    assert seen == [0, 1, 2] and queue.failed == 0
    queue.stop()


def test_join_times_out_while_a_job_runs():
    release = threading.Event()
    queue = LearningQueue(lambda j: release.wait(10), max_size=10)
    queue.submit(job())
    assert queue.join(timeout=0.05) is False
    release.set()
    assert queue.join(timeout=10) is True
    queue.stop()


def test_join_on_an_unused_queue_returns_at_once():
    assert LearningQueue(lambda j: None, max_size=1).join(timeout=0) is True


def test_stop_finishes_the_running_job_drops_waiting_ones_and_refuses_new_ones():
    release = threading.Event()
    started = threading.Event()
    seen: list[int] = []

    def handler(j: Job) -> None:
        started.set()
        release.wait(10)
        seen.append(j.payload["n"])

    queue = LearningQueue(handler, max_size=10)
    for n in range(3):
        queue.submit(job(n=n))
    assert started.wait(5)
    stopper = threading.Thread(target=queue.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert seen == [0] and queue.qsize() == 0 and queue.stopped
    assert queue.submit(job(n=9)) is False
    assert queue._thread is not None and not queue._thread.is_alive()


def test_default_key_names_kind_and_project():
    assert Job(kind="START_TRAINING", project="7", payload={}).key == "START_TRAINING project=7"


def test_max_size_must_be_positive():
    with pytest.raises(ValueError, match="max_size"):
        LearningQueue(lambda j: None, max_size=0)


def test_a_queue_inherited_through_fork_starts_its_own_worker_in_the_child():
    import os

    seen: list[str] = []
    queue = LearningQueue(lambda j: seen.append(j.project), max_size=10)
    queue.submit(job("parent"))
    assert queue.join(timeout=10) and seen == ["parent"]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's worker thread does not exist here
        try:
            ok = queue.submit(job("child")) and queue.join(timeout=10) and seen == ["parent", "child"]
            os.write(write_end, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 2)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    queue.stop()
