"""SQLite persistence of exemplar memories under one directory (``{directory}/memory.sqlite3``).

Durability: WAL journal, ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` transaction per change, so
a crash (even SIGKILL mid-write) leaves the database consistent and every change whose call
returned is on disk. Several processes may share the directory (SQLite locks; a busy timeout
waits for the writer). Vectors are stored as little-endian float32 BLOBs (no pickle).

Tables are keyed by ``(project, space)``: ``space`` is the embedder id, so memories built with
different backbones never mix. Each ``(project, space)`` has a revision that increments, in the
same transaction, on every change that alters stored content (a replayed update changes nothing).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from samsem_plugin.memory import Exemplar, MemorySnapshot, normalised_vector

DATABASE_NAME = "memory.sqlite3"
VECTOR_DTYPE = np.dtype("<f4")
SAME_VECTOR_TOLERANCE = 1e-6
"""Stored and new vectors differing by at most this (max abs) count as the same content."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exemplars (
    project TEXT NOT NULL,
    space TEXT NOT NULL,
    task TEXT NOT NULL,
    annotation TEXT NOT NULL,
    region TEXT NOT NULL,
    label TEXT,
    kind TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (project, space, annotation, region)
);
CREATE TABLE IF NOT EXISTS revisions (
    project TEXT NOT NULL,
    space TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (project, space)
);
CREATE TABLE IF NOT EXISTS annotation_state (
    project TEXT NOT NULL,
    space TEXT NOT NULL,
    annotation TEXT NOT NULL,
    updated_at TEXT,
    removed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (project, space, annotation)
);
CREATE TABLE IF NOT EXISTS meta (
    project TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (project, key)
);
"""

_Row = tuple[str, str, str, str | None, str, bytes]
"""``(task, annotation, region, label, kind, vector blob)``."""
AnnotationState = tuple[str | None, bool]
"""``(updated_at, removed)`` of an annotation: its last applied version and whether it is gone."""


class MemoryFullError(ValueError):
    """A change would grow a memory beyond the store's ``max_exemplars_per_project``."""


def _rows_of(exemplars: Sequence[Exemplar], task: str, annotation: str) -> list[_Row]:
    """Database rows of ``exemplars``; checks they all belong to ``(task, annotation)``."""
    rows: list[_Row] = []
    seen: set[tuple[str, str]] = set()
    for exemplar in exemplars:
        if not isinstance(exemplar, Exemplar):
            raise ValueError(f"exemplars: expected Exemplar items, got {type(exemplar).__name__}")
        if (exemplar.task, exemplar.annotation) != (task, annotation):
            raise ValueError(
                f"exemplar {exemplar.key}: expected task {task!r} and annotation {annotation!r}, "
                f"got {exemplar.task!r} and {exemplar.annotation!r}"
            )
        key = (exemplar.annotation, exemplar.region)
        if key in seen:
            raise ValueError(f"exemplars: region key {exemplar.region!r} repeated in {exemplar.annotation!r}")
        seen.add(key)
        blob = exemplar.vector.astype(VECTOR_DTYPE).tobytes()
        rows.append(
            (exemplar.task, exemplar.annotation, exemplar.region, exemplar.label, exemplar.kind, blob)
        )
    return rows


def normalise_timestamp(value: str | datetime | None) -> str | None:
    """An annotation's ``updated_at`` as a UTC ISO 8601 string with microseconds (text order =
    time order), or ``None``. Accepts ISO strings (``"…Z"`` too) and datetimes; naive means UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError as error:
            raise ValueError(f"updated_at: expected an ISO 8601 timestamp, got {text!r}") from error
    if not isinstance(value, datetime):
        raise ValueError(f"updated_at: expected an ISO 8601 string or datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _is_stale(version: str | None, stored_version: str | None, removed: bool) -> bool:
    """Whether an update with ``version`` (normalised ``updated_at``, or None) must be ignored,
    given the annotation's stored state."""
    if version is None:
        return False
    if removed:
        return stored_version is None or version <= stored_version
    return stored_version is not None and version < stored_version


def _same_content(old: Sequence[_Row], new: Sequence[_Row]) -> bool:
    """True when two row sets hold the same keys, labels, kinds and (nearly) the same vectors."""
    if len(old) != len(new):
        return False
    old_by_key = {row[:3]: row for row in old}
    for row in new:
        previous = old_by_key.get(row[:3])
        if previous is None or previous[3:5] != row[3:5] or len(previous[5]) != len(row[5]):
            return False
        if previous[5] != row[5]:
            a = np.frombuffer(previous[5], VECTOR_DTYPE)
            b = np.frombuffer(row[5], VECTOR_DTYPE)
            if np.max(np.abs(a - b)) > SAME_VECTOR_TOLERANCE:
                return False
    return True


class ExemplarStore:
    """Exemplar memories of many ``(project, space)`` pairs in one SQLite database.

    Args:
        directory: folder holding ``memory.sqlite3`` (created if missing); ``None`` keeps the
            database in memory (one process, lost on exit; for evaluation and tests).
        max_exemplars_per_project: most exemplars one ``(project, space)`` may hold; a change
            that would exceed it raises :class:`MemoryFullError` and changes nothing.
        busy_timeout_s: how long a writer waits for another process's write lock.

    Thread-safe: one connection guarded by a lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        max_exemplars_per_project: int = 200_000,
        busy_timeout_s: float = 30.0,
    ) -> None:
        if max_exemplars_per_project < 1:
            raise ValueError(f"max_exemplars_per_project: expected >= 1, got {max_exemplars_per_project}")
        self.max_exemplars_per_project = int(max_exemplars_per_project)
        if directory is None:
            self.path: Path | None = None
            target = ":memory:"
        else:
            folder = Path(directory)
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / DATABASE_NAME
            target = str(self.path)
        self._lock = threading.RLock()
        self._connection = sqlite3.connect(
            target, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        if self.path is not None:
            self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(_SCHEMA)

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE`` for writes), committed or rolled back as a whole."""
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @staticmethod
    def _revision_in(connection: sqlite3.Connection, project: str, space: str) -> int:
        row = connection.execute(
            "SELECT revision FROM revisions WHERE project = ? AND space = ?", (project, space)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _bump_revision(self, connection: sqlite3.Connection, project: str, space: str) -> None:
        connection.execute(
            "INSERT INTO revisions (project, space, revision) VALUES (?, ?, 1) "
            "ON CONFLICT (project, space) DO UPDATE SET revision = revision + 1",
            (project, space),
        )

    @staticmethod
    def _select_rows(connection: sqlite3.Connection, where: str, params: tuple[str, ...]) -> list[_Row]:
        return connection.execute(
            f"SELECT task, annotation, region, label, kind, vector FROM exemplars WHERE {where} "
            "ORDER BY task, annotation, region",
            params,
        ).fetchall()

    def _check_fits(
        self,
        connection: sqlite3.Connection,
        project: str,
        space: str,
        kept_besides: str | None,
        new: Sequence[_Row],
    ) -> None:
        """``ValueError`` on a vector-dimension mismatch, :class:`MemoryFullError` beyond capacity.

        ``kept_besides``: the annotation being replaced (its other annotations stay), or ``None``
        when the whole ``(project, space)`` is being replaced.
        """
        dims = {len(row[5]) // VECTOR_DTYPE.itemsize for row in new}
        kept = 0
        if kept_besides is not None:
            kept, low, high = connection.execute(
                "SELECT COUNT(*), MIN(dim), MAX(dim) FROM exemplars "
                "WHERE project = ? AND space = ? AND annotation != ?",
                (project, space, kept_besides),
            ).fetchone()
            if kept and dims:
                dims |= {int(low), int(high)}
        if len(dims) > 1:
            raise ValueError(
                f"memory {project!r}/{space!r}: expected one vector dimension, got {sorted(dims)}"
            )
        after = int(kept) + len(new)
        if after > self.max_exemplars_per_project:
            raise MemoryFullError(
                f"memory {project!r}/{space!r}: {after} exemplars would exceed the limit of "
                f"{self.max_exemplars_per_project} (max_exemplars_per_project)"
            )

    @staticmethod
    def _insert(connection: sqlite3.Connection, project: str, space: str, rows: Sequence[_Row]) -> None:
        connection.executemany(
            "INSERT INTO exemplars (project, space, task, annotation, region, label, kind, dim, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(project, space, *row[:5], len(row[5]) // VECTOR_DTYPE.itemsize, row[5]) for row in rows],
        )

    # -- changes -----------------------------------------------------------------------------

    @staticmethod
    def _state(connection: sqlite3.Connection, project: str, space: str, annotation: str) -> tuple:
        """``(updated_at, removed)`` of an annotation (``(None, 0)`` when never seen)."""
        row = connection.execute(
            "SELECT updated_at, removed FROM annotation_state "
            "WHERE project = ? AND space = ? AND annotation = ?",
            (project, space, annotation),
        ).fetchone()
        return (None, 0) if row is None else (row[0], int(row[1]))

    @staticmethod
    def _set_state(
        connection: sqlite3.Connection,
        project: str,
        space: str,
        annotation: str,
        updated_at: str | None,
        removed: bool,
    ) -> None:
        connection.execute(
            "INSERT INTO annotation_state (project, space, annotation, updated_at, removed) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (project, space, annotation) DO UPDATE SET "
            "updated_at = excluded.updated_at, removed = excluded.removed",
            (project, space, annotation, updated_at, int(removed)),
        )

    def replace_annotation(
        self,
        project: str,
        space: str,
        task: str,
        annotation: str,
        exemplars: Sequence[Exemplar],
        updated_at: str | datetime | None = None,
    ) -> bool:
        """Atomically replace every exemplar of ``annotation`` by ``exemplars``.

        Every exemplar must carry this ``task`` and ``annotation`` and a unique ``region``.
        Returns True iff the stored content changed (then the revision increments); replaying the
        same update returns False. An empty ``exemplars`` removes the annotation's exemplars.

        Out-of-order delivery (e.g. two workers learning from events of one annotation) is
        handled for *versioned* updates, those given ``updated_at`` (the annotation's own
        timestamp, ISO 8601): one is ignored (False) when older than the last applied version,
        or when the annotation was removed at or after that time (see :meth:`remove_annotation`).
        Unversioned updates always apply.
        """
        new = _rows_of(exemplars, task, annotation)
        version = normalise_timestamp(updated_at)
        with self._transaction(write=True) as connection:
            stored_version, removed = self._state(connection, project, space, annotation)
            if _is_stale(version, stored_version, removed):
                return False
            kept_version = version if version is not None else stored_version
            self._set_state(connection, project, space, annotation, kept_version, removed=False)
            old = self._select_rows(
                connection, "project = ? AND space = ? AND annotation = ?", (project, space, annotation)
            )
            if _same_content(old, new):
                return False
            self._check_fits(connection, project, space, annotation, new)
            connection.execute(
                "DELETE FROM exemplars WHERE project = ? AND space = ? AND annotation = ?",
                (project, space, annotation),
            )
            self._insert(connection, project, space, new)
            self._bump_revision(connection, project, space)
            return True

    def remove_annotation(
        self, project: str, space: str, annotation: str, updated_at: str | datetime | None = None
    ) -> int:
        """Remove every exemplar of ``annotation``; returns how many (0: revision unchanged).

        The removal is remembered: without ``updated_at`` (a deletion; Label Studio never reuses
        annotation ids) no versioned update can bring the annotation back; with ``updated_at``
        (e.g. the annotation was cancelled at that time) only a newer versioned update can.
        A versioned removal is ignored (0) when it is stale like an update would be: older than
        the version applied, or the annotation is already removed at or after that time (a
        deletion stays a deletion).
        """
        version = normalise_timestamp(updated_at)
        with self._transaction(write=True) as connection:
            stored_version, was_removed = self._state(connection, project, space, annotation)
            if version is not None and _is_stale(version, stored_version, was_removed):
                return 0
            self._set_state(connection, project, space, annotation, version, removed=True)
            removed = connection.execute(
                "DELETE FROM exemplars WHERE project = ? AND space = ? AND annotation = ?",
                (project, space, annotation),
            ).rowcount
            if removed:
                self._bump_revision(connection, project, space)
            return int(removed)

    def replace_project(
        self,
        project: str,
        space: str,
        exemplars_by_annotation: Mapping[tuple[str, str], Sequence[Exemplar]],
        updated_at: Mapping[str, str | datetime] | None = None,
        states_before: Mapping[str, AnnotationState] | None = None,
    ) -> bool:
        """Atomically rebuild the whole memory from ``{(task, annotation): exemplars}``.

        Annotations absent from the mapping are removed (and, like :meth:`remove_annotation`,
        remembered as gone); those present count as current (un-removed), with their
        ``updated_at[annotation]`` when given. Returns True iff the content changed.

        ``states_before``: :meth:`annotation_states` read before the mapping was collected (a
        rebuild reading Label Studio for a while). An annotation whose state changed since then
        was written concurrently (another worker's webhook) and is kept as stored, unless the
        mapping's version of it is newer; a deletion is never undone. Without it, the mapping
        replaces everything.
        """
        annotations = [annotation for _, annotation in exemplars_by_annotation]
        in_mapping = set(annotations)
        if len(in_mapping) != len(annotations):
            raise ValueError("exemplars_by_annotation: an annotation id appears under two tasks")
        versions = {a: normalise_timestamp(t) for a, t in (updated_at or {}).items()}
        with self._transaction(write=True) as connection:
            kept = set()  # written concurrently and newer than the mapping: left as stored
            if states_before is not None:
                for annotation, state in self._states_in(connection, project, space).items():
                    if states_before.get(annotation) == state:
                        continue  # untouched since the rebuild began: the mapping decides
                    stored_version, removed = state
                    deleted = removed and stored_version is None
                    if (
                        annotation not in in_mapping
                        or deleted
                        or _is_stale(versions.get(annotation), stored_version, removed)
                    ):
                        kept.add(annotation)
            new: list[_Row] = []
            for (task, annotation), exemplars in exemplars_by_annotation.items():
                if annotation not in kept:
                    new.extend(_rows_of(exemplars, task, annotation))
            old = self._select_rows(connection, "project = ? AND space = ?", (project, space))
            new.extend(row for row in old if row[1] in kept)
            stored = {row[1] for row in old}
            for annotation in stored - in_mapping - kept:
                self._set_state(connection, project, space, annotation, None, removed=True)
            for annotation in annotations:
                if annotation not in kept:
                    self._set_state(
                        connection, project, space, annotation, versions.get(annotation), removed=False
                    )
            if _same_content(old, new):
                return False
            self._check_fits(connection, project, space, None, new)
            connection.execute("DELETE FROM exemplars WHERE project = ? AND space = ?", (project, space))
            self._insert(connection, project, space, new)
            self._bump_revision(connection, project, space)
            return True

    def annotation_states(self, project: str, space: str) -> dict[str, AnnotationState]:
        """``{annotation: (updated_at, removed)}`` of every annotation ever seen in ``(project, space)``."""
        with self._transaction(write=False) as connection:
            return self._states_in(connection, project, space)

    @staticmethod
    def _states_in(connection: sqlite3.Connection, project: str, space: str) -> dict[str, AnnotationState]:
        rows = connection.execute(
            "SELECT annotation, updated_at, removed FROM annotation_state WHERE project = ? AND space = ?",
            (project, space),
        )
        return {row[0]: (row[1], bool(row[2])) for row in rows}

    # -- reads -------------------------------------------------------------------------------

    def snapshot(self, project: str, space: str) -> MemorySnapshot:
        """All exemplars of ``(project, space)`` ordered by ``(task, annotation, region)``, with
        the revision read in the same transaction."""
        with self._transaction(write=False) as connection:
            rows = self._select_rows(connection, "project = ? AND space = ?", (project, space))
            revision = self._revision_in(connection, project, space)
        if not rows:
            return MemorySnapshot.empty(revision=revision)
        dims = {len(row[5]) for row in rows}
        if len(dims) != 1:
            raise ValueError(f"memory {project!r}/{space!r}: stored vectors have mixed sizes {sorted(dims)}")
        blob = b"".join(row[5] for row in rows)
        vectors = np.frombuffer(blob, VECTOR_DTYPE).reshape(len(rows), -1).astype(np.float32)
        return MemorySnapshot(
            vectors=vectors,
            labels=[row[3] for row in rows],
            kinds=[row[4] for row in rows],
            keys=[row[:3] for row in rows],
            revision=revision,
        )

    def exemplars(self, project: str, space: str) -> list[Exemplar]:
        """All exemplars of ``(project, space)`` as records, in snapshot order."""
        with self._transaction(write=False) as connection:
            rows = self._select_rows(connection, "project = ? AND space = ?", (project, space))
        return [
            Exemplar(
                task, annotation, region, label, kind, normalised_vector(np.frombuffer(blob, VECTOR_DTYPE))
            )
            for task, annotation, region, label, kind, blob in rows
        ]

    def _read(self, sql: str, params: tuple[str, ...] = ()) -> list[tuple]:
        """Rows of one read-only query, in its own transaction."""
        with self._transaction(write=False) as connection:
            return connection.execute(sql, params).fetchall()

    def counts(self, project: str, space: str) -> dict[tuple[str | None, str], int]:
        """Number of exemplars per ``(label, kind)``."""
        rows = self._read(
            "SELECT label, kind, COUNT(*) FROM exemplars WHERE project = ? AND space = ? "
            "GROUP BY label, kind",
            (project, space),
        )
        return {(label, kind): int(count) for label, kind, count in rows}

    def revision(self, project: str, space: str) -> int:
        """Revision of ``(project, space)``: 0 before any change, +1 per real change."""
        with self._transaction(write=False) as connection:
            return self._revision_in(connection, project, space)

    def projects(self) -> list[tuple[str, str]]:
        """Every ``(project, space)`` that ever changed, sorted."""
        rows = self._read("SELECT project, space FROM revisions ORDER BY project, space")
        return [(str(p), str(s)) for p, s in rows]

    def annotation_ids(self, project: str, space: str) -> list[str]:
        """Sorted ids of the annotations that have exemplars in ``(project, space)``."""
        rows = self._read(
            "SELECT DISTINCT annotation FROM exemplars WHERE project = ? AND space = ? ORDER BY annotation",
            (project, space),
        )
        return [str(row[0]) for row in rows]

    # -- project metadata --------------------------------------------------------------------

    def set_meta(self, project: str, key: str, value: Any) -> None:
        """Store a JSON-able ``value`` under ``(project, key)`` (e.g. label config, versions)."""
        try:
            text = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"meta {key!r}: expected a JSON-able value, got {type(value).__name__}"
            ) from error
        with self._transaction(write=True) as connection:
            connection.execute(
                "INSERT INTO meta (project, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (project, key) DO UPDATE SET value = excluded.value",
                (project, key, text),
            )

    def get_meta(self, project: str, key: str, default: Any = None) -> Any:
        """The value stored under ``(project, key)``, or ``default``."""
        rows = self._read("SELECT value FROM meta WHERE project = ? AND key = ?", (project, key))
        return default if not rows else json.loads(rows[0][0])

    # -- lifetime ----------------------------------------------------------------------------

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` answer (``"ok"`` when healthy)."""
        with self._lock:
            return str(self._connection.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        """Close the connection (further calls fail)."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> ExemplarStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
