"""ExemplarStore: SQLite persistence, atomic changes, revisions, spaces, capacity, crash safety."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from samsem_plugin.memory import Exemplar
from samsem_plugin.store import DATABASE_NAME, ExemplarStore, MemoryFullError, normalise_timestamp

D = 8
REPO = Path(__file__).resolve().parents[1]


def unit(seed: int, dim: int = D) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def exemplars_of(task: str, annotation: str, n: int, seed: int, label: str = "cat", dim: int = D) -> list:
    return [
        Exemplar(task, annotation, f"r{i}", label, "positive", unit(seed * 1000 + i, dim)) for i in range(n)
    ]


@pytest.fixture
def store(tmp_path):
    with ExemplarStore(tmp_path) as opened:
        yield opened


def test_survives_reopening_with_vectors_bit_exact(tmp_path):
    exemplars = exemplars_of("t1", "a1", 3, 1) + [Exemplar("t1", "a1", "x#bg", None, "background", unit(5))]
    with ExemplarStore(tmp_path) as store:
        assert store.replace_annotation("p", "s", "t1", "a1", exemplars) is True
        store.set_meta("p", "label_config", {"labels": ["cat"], "version": 3})
    with ExemplarStore(tmp_path) as store:
        snapshot = store.snapshot("p", "s")
        assert store.revision("p", "s") == 1 and snapshot.revision == 1
        assert snapshot.keys == [e.key for e in exemplars]
        assert snapshot.labels.tolist() == ["cat", "cat", "cat", None]
        assert snapshot.vectors.tobytes() == np.stack([e.vector for e in exemplars]).tobytes()
        assert [e.key for e in store.exemplars("p", "s")] == snapshot.keys
        assert store.get_meta("p", "label_config") == {"labels": ["cat"], "version": 3}
        assert store.get_meta("p", "missing", default=42) == 42
        assert store.projects() == [("p", "s")]
    assert (tmp_path / DATABASE_NAME).exists()


def test_journal_is_wal_and_sync_full(store):
    connection = sqlite3.connect(store.path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
    assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_vectors_are_float32_blobs_not_pickles(store):
    exemplar = exemplars_of("t", "a", 1, 3)[0]
    store.replace_annotation("p", "s", "t", "a", [exemplar])
    blob, dim = sqlite3.connect(store.path).execute("SELECT vector, dim FROM exemplars").fetchone()
    assert dim == D and blob == exemplar.vector.astype("<f4").tobytes()


def test_replay_is_a_no_op_and_changes_bump_the_revision(store):
    first = exemplars_of("t", "a", 2, 1)
    assert store.replace_annotation("p", "s", "t", "a", first) is True
    assert store.replace_annotation("p", "s", "t", "a", list(reversed(first))) is False
    assert store.revision("p", "s") == 1
    relabelled = [Exemplar("t", "a", "r0", "dog", "positive", first[0].vector), first[1]]
    assert store.replace_annotation("p", "s", "t", "a", relabelled) is True
    moved = [Exemplar("t", "a", "r0", "dog", "positive", unit(77)), first[1]]
    assert store.replace_annotation("p", "s", "t", "a", moved) is True
    assert store.revision("p", "s") == 3
    assert store.counts("p", "s") == {("dog", "positive"): 1, ("cat", "positive"): 1}
    assert store.replace_annotation("p", "s", "t", "a", []) is True
    assert store.counts("p", "s") == {} and store.revision("p", "s") == 4


def test_stale_versioned_updates_and_updates_of_removed_annotations_are_ignored(store):
    new, old = exemplars_of("t", "a", 1, 1, "new"), exemplars_of("t", "a", 1, 2, "old")
    assert store.replace_annotation("p", "s", "t", "a", new, updated_at="2025-03-01T12:00:00.5Z") is True
    assert store.replace_annotation("p", "s", "t", "a", old, updated_at="2025-03-01T12:00:00+00:00") is False
    assert store.replace_annotation("p", "s", "t", "a", old, updated_at="2025-03-01T13:00:00+01:00") is False
    assert store.snapshot("p", "s").labels.tolist() == ["new"] and store.revision("p", "s") == 1
    # a deletion processed before the creation it follows: the versioned creation arrives stale
    assert store.remove_annotation("p", "s", "b") == 0 and store.revision("p", "s") == 1
    b = exemplars_of("t", "b", 1, 3)
    assert store.replace_annotation("p", "s", "t", "b", b, updated_at="2025-03-01T12:00:00Z") is False
    assert store.annotation_ids("p", "s") == ["a"]
    # an unversioned update is the caller's explicit word: it applies
    assert store.replace_annotation("p", "s", "t", "b", b) is True
    with pytest.raises(ValueError, match="ISO 8601"):
        store.replace_annotation("p", "s", "t", "b", [], updated_at="yesterday")


def test_a_cancelled_annotation_comes_back_only_with_a_newer_version(store):
    exemplars = exemplars_of("t", "a", 2, 1)
    store.replace_annotation("p", "s", "t", "a", exemplars, updated_at="2025-03-01T12:00:00Z")
    assert store.remove_annotation("p", "s", "a", updated_at="2025-03-01T12:05:00Z") == 2
    assert store.replace_annotation("p", "s", "t", "a", exemplars, updated_at="2025-03-01T12:05:00Z") is False
    assert store.replace_annotation("p", "s", "t", "a", exemplars, updated_at="2025-03-01T12:09:00Z") is True
    assert store.revision("p", "s") == 3 and len(store.snapshot("p", "s")) == 2


def test_a_rebuild_revives_the_annotations_it_holds_and_removes_the_others(store):
    store.replace_annotation("p", "s", "t", "a", exemplars_of("t", "a", 1, 1))
    store.remove_annotation("p", "s", "b")
    assert store.replace_project("p", "s", {("t", "b"): exemplars_of("t", "b", 1, 3)}) is True
    late = exemplars_of("t", "a", 1, 1)
    assert store.replace_annotation("p", "s", "t", "a", late, updated_at="2025-01-01T00:00:00Z") is False
    assert (
        store.replace_annotation("p", "s", "t", "b", exemplars_of("t", "b", 2, 3), "2025-01-01T00:00Z")
        is True
    )
    assert store.annotation_ids("p", "s") == ["b"]


T1, T2, T3 = "2025-01-01T00:00:01Z", "2025-01-01T00:00:02Z", "2025-01-01T00:00:03Z"


def _rebuild_racing_webhooks(store: ExemplarStore, with_states_before: bool) -> bool:
    """A rebuild whose Label Studio read (a, b, c at T1; e at T3) overlaps webhooks of another
    worker: a updated at T2, b deleted, d created at T2, e updated at T2."""
    for task, annotation, seed in (("t1", "a", 1), ("t2", "b", 2), ("t3", "c", 3), ("t5", "e", 5)):
        store.replace_annotation("p", "s", task, annotation, exemplars_of(task, annotation, 1, seed), T1)
    before = store.annotation_states("p", "s") if with_states_before else None
    read = {
        ("t1", "a"): exemplars_of("t1", "a", 1, 1),
        ("t2", "b"): exemplars_of("t2", "b", 1, 2),
        ("t3", "c"): exemplars_of("t3", "c", 3, 33),
        ("t5", "e"): exemplars_of("t5", "e", 2, 55),
    }
    store.replace_annotation("p", "s", "t1", "a", exemplars_of("t1", "a", 2, 11), T2)
    store.remove_annotation("p", "s", "b")
    store.replace_annotation("p", "s", "t4", "d", exemplars_of("t4", "d", 1, 4), T2)
    store.replace_annotation("p", "s", "t5", "e", exemplars_of("t5", "e", 1, 51), T2)
    versions = {"a": T1, "b": T1, "c": T1, "e": T3}
    return store.replace_project("p", "s", read, versions, states_before=before)


def _exemplars_per_annotation(store: ExemplarStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, annotation, _ in store.snapshot("p", "s").keys:
        counts[annotation] = counts.get(annotation, 0) + 1
    return counts


def test_a_rebuild_keeps_what_webhooks_wrote_while_it_was_reading(store):
    assert _rebuild_racing_webhooks(store, with_states_before=True) is True
    # a: the webhook's T2 version (2 exemplars) beats the read T1; b: stays deleted; c: as read;
    # d: created meanwhile, kept; e: the read T3 version (2 exemplars) beats the webhook's T2
    assert _exemplars_per_annotation(store) == {"a": 2, "c": 3, "d": 1, "e": 2}
    states = store.annotation_states("p", "s")
    assert states["a"][0] == normalise_timestamp(T2) and states["e"][0] == normalise_timestamp(T3)
    assert states["b"] == (None, True) and states["d"][0] == normalise_timestamp(T2)


def test_without_the_states_before_a_rebuild_would_undo_concurrent_webhooks(store):
    _rebuild_racing_webhooks(store, with_states_before=False)
    assert _exemplars_per_annotation(store) == {"a": 1, "b": 1, "c": 3, "e": 2}  # d lost, b revived


def test_timestamps_normalise_to_utc_text_in_time_order():
    assert normalise_timestamp("2025-03-01T13:00:00+01:00") == normalise_timestamp("2025-03-01T12:00:00Z")
    assert normalise_timestamp(datetime(2025, 3, 1, 12)) == "2025-03-01T12:00:00.000000+00:00"
    assert normalise_timestamp("2025-03-01T12:00:00.5Z") > normalise_timestamp("2025-03-01T12:00:00Z")
    assert normalise_timestamp(None) is None


def test_spaces_and_projects_never_mix(store):
    store.replace_annotation("p", "dinov2-s", "t", "a", exemplars_of("t", "a", 2, 1))
    store.replace_annotation("p", "effnet", "t", "a", exemplars_of("t", "a", 1, 2, dim=4))
    store.replace_annotation("q", "dinov2-s", "t", "a", exemplars_of("t", "a", 3, 3))
    assert len(store.snapshot("p", "dinov2-s")) == 2 and store.snapshot("p", "effnet").dim == 4
    assert store.remove_annotation("p", "dinov2-s", "a") == 2
    assert len(store.snapshot("p", "effnet")) == 1 and len(store.snapshot("q", "dinov2-s")) == 3
    assert store.revision("q", "dinov2-s") == 1 and store.revision("p", "dinov2-s") == 2
    assert store.projects() == [("p", "dinov2-s"), ("p", "effnet"), ("q", "dinov2-s")]


def test_replace_project_rebuilds_atomically(store):
    store.replace_annotation("p", "s", "t0", "old", exemplars_of("t0", "old", 2, 9))
    mapping = {("t1", "a1"): exemplars_of("t1", "a1", 2, 1), ("t2", "a2"): exemplars_of("t2", "a2", 1, 2)}
    assert store.replace_project("p", "s", mapping) is True
    assert store.annotation_ids("p", "s") == ["a1", "a2"]
    assert store.replace_project("p", "s", mapping) is False and store.revision("p", "s") == 2
    assert store.replace_project("p", "s", {}) is True and len(store.snapshot("p", "s")) == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda s: s.replace_annotation("p", "s", "t", "a", exemplars_of("t", "other", 1, 1)),
            "expected task",
        ),
        (lambda s: s.replace_annotation("p", "s", "t", "a", exemplars_of("t", "a", 1, 1) * 2), "repeated"),
        (lambda s: s.replace_annotation("p", "s", "t", "a", ["nope"]), "Exemplar items"),
        (
            lambda s: s.replace_annotation("p", "s", "t", "b", exemplars_of("t", "b", 1, 1, dim=4)),
            "dimension",
        ),
        (lambda s: s.replace_project("p", "s", {("t", "b"): [], ("u", "b"): []}), "two tasks"),
        (lambda s: s.replace_project("p", "s", {("t", "b"): exemplars_of("t", "c", 1, 1)}), "expected task"),
        (lambda s: s.set_meta("p", "k", object()), "JSON-able"),
    ],
)
def test_bad_changes_raise_and_leave_the_store_unchanged(store, call, message):
    store.replace_annotation("p", "s", "t", "a", exemplars_of("t", "a", 2, 5))
    before = store.snapshot("p", "s")
    with pytest.raises(ValueError, match=message):
        call(store)
    after = store.snapshot("p", "s")
    assert after.keys == before.keys and after.revision == before.revision


def test_capacity_limit_raises_memory_full_and_changes_nothing(tmp_path):
    with ExemplarStore(tmp_path, max_exemplars_per_project=5) as store:
        store.replace_annotation("p", "s", "t", "a", exemplars_of("t", "a", 3, 1))
        with pytest.raises(MemoryFullError, match="exceed the limit of 5"):
            store.replace_annotation("p", "s", "t", "b", exemplars_of("t", "b", 3, 2))
        assert isinstance(MemoryFullError("x"), ValueError)
        assert len(store.snapshot("p", "s")) == 3 and store.revision("p", "s") == 1
        # replacing the same annotation with more rows counts only what remains
        assert store.replace_annotation("p", "s", "t", "a", exemplars_of("t", "a", 5, 3)) is True
        with pytest.raises(MemoryFullError):
            store.replace_project("p", "s", {("t", "z"): exemplars_of("t", "z", 6, 4)})
        assert store.replace_annotation("q", "s", "t", "a", exemplars_of("t", "a", 5, 5)) is True


def test_in_memory_store_works_without_a_directory():
    store = ExemplarStore(None)
    assert store.path is None
    store.replace_annotation("p", "s", "t", "a", exemplars_of("t", "a", 2, 1))
    assert len(store.snapshot("p", "s")) == 2 and store.integrity_check() == "ok"


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from samsem_plugin.memory import Exemplar
    from samsem_plugin.store import ExemplarStore

    store = ExemplarStore(sys.argv[1])
    rng = np.random.default_rng(0)
    i = 0
    while True:
        vectors = rng.normal(size=(40, 64)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        label = f"c{i % 3}"
        exemplars = [Exemplar("t", f"a{i}", f"r{j}", label, "positive", v) for j, v in enumerate(vectors)]
        store.replace_annotation("p", "s", "t", f"a{i}", exemplars)
        if i % 2:
            store.remove_annotation("p", "s", f"a{i - 1}")
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_mid_stream_leaves_a_consistent_store_with_every_acknowledged_change(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    acknowledged = -1
    try:
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= 60:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL and acknowledged >= 60
    with ExemplarStore(tmp_path) as store:
        assert store.integrity_check() == "ok"
        present = set(store.annotation_ids("p", "s"))
        snapshot = store.snapshot("p", "s")
    # every acknowledged step is visible: odd steps removed their predecessor, even ones stayed
    for i in range(acknowledged + 1):
        removed = i % 2 == 0 and i + 1 <= acknowledged
        assert (f"a{i}" in present) != removed, f"a{i}"
    # nothing half-written: every annotation present has all 40 rows
    per_annotation = {}
    for _, annotation, _ in snapshot.keys:
        per_annotation[annotation] = per_annotation.get(annotation, 0) + 1
    assert set(per_annotation.values()) == {40}
    assert np.allclose(np.linalg.norm(snapshot.vectors, axis=1), 1.0, atol=1e-5)
