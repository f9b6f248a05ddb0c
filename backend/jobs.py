"""The background learning queue: webhooks answer at once, learning happens on one worker thread.

One daemon thread per process, started lazily on the first :meth:`LearningQueue.submit` (so under
gunicorn it starts in the worker, after fork; a queue inherited through ``fork`` restarts its
thread in the child). Jobs run one at a time in arrival order, so the events of one project are
applied in the order Label Studio sent them. The queue is bounded: :meth:`submit` returns False
when it is full (the caller answers 503). A failing job is logged with its key (never its payload)
and counted; it never stops the thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One unit of learning work.

    Attributes:
        kind: what to do, e.g. the webhook action ``"ANNOTATION_CREATED"``.
        project: Label Studio project id (string).
        payload: the data the handler needs (e.g. the webhook body); never logged.
        received_at: ``time.time()`` when the event arrived (seconds since the epoch).
        key: short identifier for logs, e.g. ``"ANNOTATION_UPDATED project=3 annotation=17"``.
    """

    kind: str
    project: str
    payload: dict[str, Any] = field(repr=False)
    received_at: float = field(default_factory=time.time)
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"{self.kind} project={self.project}"


class LearningQueue:
    """A bounded FIFO of :class:`Job` served by one background thread.

    Args:
        handler: called with each job on the worker thread.
        max_size: most jobs waiting (not counting the one running); >= 1.
        name: thread name prefix and log label.
        on_done: called after each job with ``(job, seconds, error or None)`` (e.g. metrics);
            its own exceptions are logged and ignored.

    Counters (read any time): ``processed`` jobs finished (successfully or not), ``failed`` those
    that raised, ``rejected`` submits refused because the queue was full or stopped,
    ``in_flight`` 1 while a job runs else 0; :meth:`qsize` jobs waiting.
    """

    def __init__(
        self,
        handler: Callable[[Job], None],
        *,
        max_size: int,
        name: str = "learn",
        on_done: Callable[[Job, float, Exception | None], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size: expected >= 1, got {max_size}")
        self._handler = handler
        self._on_done = on_done
        self.max_size = int(max_size)
        self.name = name
        self._jobs: deque[Job] = deque()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._thread_pid: int | None = None
        self._stopped = False
        self.processed = 0
        self.failed = 0
        self.rejected = 0
        self.in_flight = 0

    # ------------------------------------------------------------------ producer side

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (and nothing queued) when the queue is full or stopped."""
        with self._condition:
            if self._stopped or len(self._jobs) >= self.max_size:
                self.rejected += 1
                reason = "stopped" if self._stopped else f"full ({self.max_size} waiting)"
                logger.warning("%s queue %s: rejected %s", self.name, reason, job.key)
                return False
            self._jobs.append(job)
            self._ensure_thread()
            self._condition.notify_all()
            waiting = len(self._jobs)
        logger.info("%s queue: queued %s (%d waiting)", self.name, job.key, waiting)
        return True

    def qsize(self) -> int:
        """Jobs waiting (the running one not included)."""
        with self._condition:
            return len(self._jobs)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def join(self, timeout: float) -> bool:
        """Wait until no job is waiting or running; True if that happened within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._jobs or self.in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, let the running job finish (up to ``timeout`` s), drop the waiting ones."""
        with self._condition:
            self._stopped = True
            dropped = len(self._jobs)
            self._jobs.clear()
            self._condition.notify_all()
            thread = self._thread
        if dropped:
            logger.warning("%s queue stopped: %d waiting job(s) dropped", self.name, dropped)
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _ensure_thread(self) -> None:
        """Start the worker if none runs in this process (caller holds the condition)."""
        pid = os.getpid()
        if self._thread is not None and self._thread_pid == pid and self._thread.is_alive():
            return
        if self._thread_pid not in (None, pid):
            self.in_flight = 0  # the parent's running job does not exist in this child
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
        self._thread_pid = pid
        self._thread.start()

    def _next_job(self) -> Job | None:
        with self._condition:
            while not self._jobs and not self._stopped:
                self._condition.wait()
            if self._stopped:
                return None
            self.in_flight = 1
            return self._jobs.popleft()

    def _run(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            error = self._execute(job)
            with self._condition:
                self.in_flight = 0
                self.processed += 1
                self.failed += error is not None
                self._condition.notify_all()

    def _execute(self, job: Job) -> Exception | None:
        started = time.monotonic()
        error: Exception | None = None
        try:
            self._handler(job)
        except Exception as caught:  # a job must never kill the worker
            error = caught
            logger.exception("%s queue: job %s failed: %s", self.name, job.key, type(caught).__name__)
        seconds = time.monotonic() - started
        if error is None:
            logger.info(
                "%s queue: done %s in %.2f s (%.1f s after it arrived)",
                self.name,
                job.key,
                seconds,
                time.time() - job.received_at,
            )
        if self._on_done is not None:
            try:
                self._on_done(job, seconds, error)
            except Exception:
                logger.exception("%s queue: on_done callback failed for %s", self.name, job.key)
        return error
