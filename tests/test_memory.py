"""Exemplar records, snapshots and the ExemplarMemory facade (replace / remove / replay semantics)."""

import itertools
import threading

import numpy as np
import pytest

from samsem_plugin.classifier import ClassifierSettings
from samsem_plugin.memory import (
    KINDS,
    Exemplar,
    ExemplarMemory,
    MemorySnapshot,
    base_region,
)
from samsem_plugin.store import ExemplarStore

D = 8


def unit(seed: int, dim: int = D) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def positive(task: str, annotation: str, region: str, label: str, seed: int) -> Exemplar:
    return Exemplar(task, annotation, region, label, "positive", unit(seed))


# -- records ---------------------------------------------------------------------------------


def test_exemplar_renormalises_nearly_unit_vectors_and_exposes_its_key():
    vector = unit(0) * np.float32(1.0005)
    exemplar = Exemplar("t1", "a1", "r1", "cat", "positive", vector)
    assert exemplar.vector.dtype == np.float32
    assert np.linalg.norm(exemplar.vector) == pytest.approx(1.0, abs=1e-6)
    assert exemplar.key == ("t1", "a1", "r1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="maybe"), "kind"),
        (dict(kind="background"), "None for a background"),
        (dict(label=None), "label of a positive"),
        (dict(label=None, kind="negative"), "label of a negative"),
        (dict(task=""), "task"),
        (dict(annotation=7), "annotation"),
        (dict(vector=np.ones(D, np.float32)), "L2-normalised"),
        (dict(vector=np.full(D, np.nan, np.float32)), "finite"),
        (dict(vector=np.zeros((2, D), np.float32)), "shape"),
    ],
)
def test_exemplar_rejects_bad_fields(kwargs, message):
    fields = dict(task="t", annotation="a", region="r", label="cat", kind="positive", vector=unit(1))
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Exemplar(**fields)


def test_background_exemplar_has_no_label():
    exemplar = Exemplar("t", "a", "r#bg", None, "background", unit(2))
    assert exemplar.label is None and exemplar.kind in KINDS


def test_base_region_strips_the_derived_suffix():
    assert base_region("r1#neg") == "r1" and base_region("r1#bg") == "r1" and base_region("r1") == "r1"


def test_snapshot_helpers_count_and_select():
    exemplars = [
        positive("t", "a", "r1", "cat", 1),
        positive("t", "a", "r2", "cat", 2),
        positive("t", "a", "r3", "dog", 3),
        Exemplar("t", "a", "r3#neg", "cat", "negative", unit(3)),
        Exemplar("t", "a", "r4#bg", None, "background", unit(4)),
        Exemplar("t", "a", "r4#neg", "bird", "negative", unit(4)),
    ]
    snapshot = MemorySnapshot.from_exemplars(exemplars, revision=7)
    assert len(snapshot) == 6 and snapshot.dim == D and snapshot.revision == 7
    assert snapshot.label_set() == {"cat", "dog"}  # "bird" has only a negative
    assert snapshot.counts() == {
        ("cat", "positive"): 2,
        ("dog", "positive"): 1,
        ("cat", "negative"): 1,
        (None, "background"): 1,
        ("bird", "negative"): 1,
    }
    np.testing.assert_array_equal(snapshot.positives_of("cat"), np.stack([unit(1), unit(2)]))
    assert snapshot.select("negative", "cat").tolist() == [3]
    groups = snapshot.region_groups()
    assert groups[2] == groups[3] and groups[4] == groups[5] and len(set(groups.tolist())) == 4


def test_snapshot_validates_columns():
    with pytest.raises(ValueError, match="labels: expected 2"):
        MemorySnapshot(np.zeros((2, D), np.float32), ["a"], ["positive", "positive"], [("t", "a", "r")] * 2)
    with pytest.raises(ValueError, match="kinds: expected only"):
        MemorySnapshot(np.zeros((1, D), np.float32), ["a"], ["weird"], [("t", "a", "r")])
    with pytest.raises(ValueError, match="one vector dimension"):
        MemorySnapshot.from_exemplars(
            [positive("t", "a", "r1", "cat", 1), Exemplar("t", "a", "r2", "cat", "positive", unit(2, 4))]
        )


# -- the facade: replace / remove / replay -----------------------------------------------------


@pytest.fixture(params=["in-memory", "sqlite"])
def memory(request, tmp_path):
    store = None if request.param == "in-memory" else ExemplarStore(tmp_path)
    return ExemplarMemory("p1", "space-a", store)


def test_update_replaces_the_annotations_exemplars(memory):
    assert memory.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "cat", 1)]) is True
    assert memory.replace_annotation("t1", "a1", [positive("t1", "a1", "r2", "dog", 2)]) is True
    snapshot = memory.snapshot()
    assert snapshot.keys == [("t1", "a1", "r2")] and snapshot.labels.tolist() == ["dog"]
    assert memory.revision == 2


def test_deletion_removes_and_replay_changes_nothing(memory):
    memory.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "cat", 1)])
    memory.replace_annotation("t2", "a2", [positive("t2", "a2", "r1", "cat", 2)])
    revision = memory.revision
    assert memory.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "cat", 1)]) is False
    assert memory.revision == revision
    assert memory.remove_annotation("a1") == 1
    assert memory.revision == revision + 1
    assert memory.remove_annotation("a1") == 0
    assert memory.revision == revision + 1
    assert [key[1] for key in memory.snapshot().keys] == ["a2"]
    assert memory.counts() == {("cat", "positive"): 1}


def _apply(memory: ExemplarMemory, event: tuple) -> None:
    if event[0] == "replace":
        _, task, annotation, exemplars, updated_at = event
        memory.replace_annotation(task, annotation, exemplars, updated_at=updated_at)
    else:
        memory.remove_annotation(event[1])


def _content(memory: ExemplarMemory) -> tuple:
    snapshot = memory.snapshot()
    return snapshot.keys, snapshot.labels.tolist(), snapshot.vectors.tobytes()


def test_out_of_order_replays_end_equal_to_the_current_annotations():
    """Every delivery order of an annotation history, with every event delivered twice, ends
    with the memory of the current annotations: a1 at its latest version, a2 emptied, a3 deleted."""
    history = [
        ("replace", "t1", "a1", [positive("t1", "a1", "r1", "cat", 1)], "2025-01-01T10:00:00Z"),
        ("replace", "t1", "a1", [positive("t1", "a1", "r1", "dog", 1)], "2025-01-01T10:05:00Z"),
        ("replace", "t2", "a2", [positive("t2", "a2", "r1", "cat", 2)], "2025-01-01T10:00:00Z"),
        ("replace", "t2", "a2", [], "2025-01-01T10:07:00+00:00"),
        ("replace", "t3", "a3", [positive("t3", "a3", "r1", "bird", 3)], "2025-01-01T10:00:00Z"),
        ("remove", "a3"),
    ]
    reference = ExemplarMemory("p", "s")
    reference.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "dog", 1)])
    expected = _content(reference)
    orders = list(itertools.permutations(history))
    for index in np.random.default_rng(0).choice(len(orders), size=120, replace=False):
        memory = ExemplarMemory("p", "s")
        for event in orders[index] + orders[index]:
            _apply(memory, event)
        assert _content(memory) == expected, orders[index]


def test_replace_all_rebuilds_and_is_idempotent(memory):
    memory.replace_annotation("t9", "a9", [positive("t9", "a9", "r1", "old", 9)])
    rebuild = {
        ("t1", "a1"): [positive("t1", "a1", "r1", "cat", 1)],
        ("t2", "a2"): [positive("t2", "a2", "r1", "dog", 2)],
    }
    assert memory.replace_all(rebuild) is True
    revision = memory.revision
    assert memory.replace_all(rebuild) is False and memory.revision == revision
    assert memory.snapshot().label_set() == {"cat", "dog"}


def test_classifier_is_cached_per_revision_and_refitted_after_a_change(memory):
    memory.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "cat", 1)])
    settings = ClassifierSettings(method="prototype")
    first = memory.classifier(settings)
    assert memory.classifier(settings) is first
    assert memory.snapshot() is memory.snapshot()
    memory.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "cat", 1)])  # replay: no change
    assert memory.classifier(settings) is first
    memory.replace_annotation("t2", "a2", [positive("t2", "a2", "r1", "dog", 2)])
    second = memory.classifier(settings)
    assert second is not first and second.labels == ["cat", "dog"]
    assert memory.classifier(ClassifierSettings(method="knn")) is not second


def test_a_second_process_view_sees_changes_through_the_shared_directory(tmp_path):
    writer = ExemplarMemory("p", "s", ExemplarStore(tmp_path))
    reader = ExemplarMemory("p", "s", ExemplarStore(tmp_path))
    assert reader.classifier().labels == []
    writer.replace_annotation("t1", "a1", [positive("t1", "a1", "r1", "cat", 1)])
    assert reader.classifier().labels == ["cat"]


def test_concurrent_writers_and_readers_keep_the_memory_consistent(tmp_path):
    memory = ExemplarMemory("p", "s", ExemplarStore(tmp_path))
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(15):
                annotation = f"a{worker}-{i}"
                memory.replace_annotation("t", annotation, [positive("t", annotation, "r", "cat", i)])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def read() -> None:
        try:
            for _ in range(15):
                snapshot = memory.snapshot()
                assert len(snapshot) == len(snapshot.keys)
                memory.classifier()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)] + [
        threading.Thread(target=read) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(memory.snapshot()) == 45 and memory.revision == 45


def test_project_and_space_must_be_named():
    with pytest.raises(ValueError, match="space"):
        ExemplarMemory("p", "")
