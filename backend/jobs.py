"""The background learning queue: webhooks answer at once, learning happens on one worker thread.

One daemon thread per process, started lazily on the first :meth:`LearningQueue.submit` (so under
gunicorn it starts in the worker, after fork; a queue inherited through ``fork`` restarts its
thread in the child). Jobs run one at a time in arrival order, so the events of one project are
applied in the order Label Studio sent them. The queue is bounded in jobs and in bytes (the
request bytes the jobs came from): :meth:`submit` / :meth:`submit_all` return False when the jobs
do not fit (the caller answers 503). A failing job is logged with its key and a shortened message
(never its payload) and counted; it never stops the thread. The queue lives in memory: jobs
waiting when the process dies are lost (``START_TRAINING`` rebuilds the memory from Label Studio).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from backend.messages import error_summary, stack_of

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
        size_bytes: request bytes the job holds (counted against the queue's byte bound).
    """

    kind: str
    project: str
    payload: dict[str, Any] = field(repr=False)
    received_at: float = field(default_factory=time.time)
    key: str = ""
    size_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"{self.kind} project={self.project}"


class LearningQueue:
    """A bounded FIFO of :class:`Job` served by one background thread.

    Args:
        handler: called with each job on the worker thread.
        max_size: most jobs waiting (not counting the one running); >= 1.
        max_bytes: most :attr:`Job.size_bytes` waiting in all (``None``: no byte bound).
        name: thread name prefix and log label.
        on_done: called after each job with ``(job, seconds, error or None)`` (e.g. metrics);
            its own exceptions are logged and ignored.
        expected_errors: exception types that mean "this job's input cannot be learnt" (logged
            as one line, no traceback); any other exception is logged with its stack.

    Counters (read any time): ``processed`` jobs finished (successfully or not), ``failed`` those
    that raised, ``rejected`` submits refused because the queue was full or stopped,
    ``in_flight`` 1 while a job runs else 0; :meth:`qsize` jobs waiting.
    """

    def __init__(
        self,
        handler: Callable[[Job], None],
        *,
        max_size: int,
        max_bytes: int | None = None,
        name: str = "learn",
        on_done: Callable[[Job, float, Exception | None], None] | None = None,
        expected_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size: expected >= 1, got {max_size}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes: expected >= 1 or None, got {max_bytes}")
        self._handler = handler
        self._on_done = on_done
        self._expected_errors = tuple(expected_errors)
        self.max_size = int(max_size)
        self.max_bytes = int(max_bytes) if max_bytes is not None else None
        self.waiting_bytes = 0
        self._checked_as_group = False  # True while submit_all queues the jobs it checked together
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

    def _refusal(self, jobs: list[Job]) -> str | None:
        """Why ``jobs`` cannot be queued now, or None (caller holds the condition)."""
        if self._stopped:
            return "stopped"
        if len(self._jobs) + len(jobs) > self.max_size:
            return f"full ({len(self._jobs)} of {self.max_size} jobs waiting)"
        size = sum(job.size_bytes for job in jobs)
        if self.max_bytes is not None and self._jobs and self.waiting_bytes + size > self.max_bytes:
            return f"full ({self.waiting_bytes} of {self.max_bytes} bytes waiting)"
        return None

    def submit_all(self, jobs: Iterable[Job]) -> bool:
        """Queue every job of ``jobs`` in order, or none of them (False) when they do not all fit.

        Jobs larger than the byte bound are still accepted when nothing else waits (so a big
        bulk webhook is not refused forever).
        """
        jobs = list(jobs)
        with self._condition:
            reason = self._refusal(jobs)
            if reason is not None:
                self.rejected += len(jobs)
                logger.warning(
                    "%s queue %s: rejected %s", self.name, reason, ", ".join(job.key for job in jobs)[:500]
                )
                return False
            self._checked_as_group = True
            try:
                return all([self.submit(job) for job in jobs])
            finally:
                self._checked_as_group = False

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (and nothing queued) when the queue is full or stopped."""
        with self._condition:
            reason = None if self._checked_as_group else self._refusal([job])
            if reason is not None:
                self.rejected += 1
                logger.warning("%s queue %s: rejected %s", self.name, reason, job.key)
                return False
            self._jobs.append(job)
            self.waiting_bytes += job.size_bytes
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
            self.waiting_bytes = 0
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
            job = self._jobs.popleft()
            self.waiting_bytes -= job.size_bytes
            return job

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
            summary = error_summary(caught)
            if isinstance(caught, self._expected_errors):
                logger.error("%s queue: job %s failed: %s", self.name, job.key, summary)
                logger.debug("%s queue: stack of %s:\n%s", self.name, job.key, stack_of(caught))
            else:
                logger.error("%s queue: job %s failed: %s\n%s", self.name, job.key, summary, stack_of(caught))
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
