"""Per-project exemplar memory: one vector per labelled region, keyed, never a running mean.

Every exemplar is keyed by ``(task, annotation, region)`` so that the memory always equals
f(current annotations): an updated annotation replaces its own exemplars, a deleted one removes
them, a replayed webhook changes nothing.

Kinds (:data:`KINDS`):

* ``"positive"``: the region is an example of ``label``;
* ``"negative"``: the region is *not* ``label`` (a served prediction relabelled or deleted);
* ``"background"``: the region is not any class (a deleted proposal); ``label`` is ``None``.

Region keys: corrections derive several exemplars from one region with keys ``"{id}"``,
``"{id}#neg"``, ``"{id}#bg"``; :func:`base_region` maps them back to ``"{id}"`` so that
leave-one-out calibration leaves a whole region out, not only one of its exemplars.

:class:`ExemplarMemory` is the facade the pipeline and service use for one ``(project, space)``
(``space`` = the embedder id: memories of different backbones never mix); it persists through an
:class:`~samsem_plugin.store.ExemplarStore` and caches the snapshot and fitted classifiers per
revision.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from samsem_plugin.classifier import ClassifierSettings, FittedClassifier
    from samsem_plugin.store import AnnotationState, ExemplarStore

POSITIVE = "positive"
NEGATIVE = "negative"
BACKGROUND = "background"
KINDS = (POSITIVE, NEGATIVE, BACKGROUND)

REGION_SUFFIX_SEPARATOR = "#"
"""Separates a region id from the suffix of an exemplar derived from it (``"r1#neg"``)."""

NORM_TOLERANCE = 1e-3
"""How far from 1 an exemplar vector's L2 norm may be (it is renormalised exactly)."""


def base_region(region: str) -> str:
    """The region id an exemplar key derives from: ``"r1#neg"`` → ``"r1"``, ``"r1"`` → ``"r1"``."""
    return region.split(REGION_SUFFIX_SEPARATOR, 1)[0]


def normalised_vector(vector: np.ndarray, name: str = "vector") -> np.ndarray:
    """``(D,) float32`` copy of an L2-normalised vector; ``ValueError`` if it is not one.

    Accepts norms within :data:`NORM_TOLERANCE` of 1 (e.g. after a bf16 pass) and renormalises.
    """
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (D,) with D > 0, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: expected finite numbers")
    norm = float(np.linalg.norm(array.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise ValueError(f"{name}: expected an L2-normalised vector (norm 1), got norm {norm:.6f}")
    return (array / np.float32(norm)).astype(np.float32)


def _check_key_part(value: object, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")


@dataclass(frozen=True)
class Exemplar:
    """One remembered region.

    Attributes:
        task: Label Studio task id (string).
        annotation: annotation id (string).
        region: exemplar key within the annotation (region id, maybe with a ``#suffix``).
        label: the class; ``None`` exactly when ``kind == "background"``.
        kind: one of :data:`KINDS`.
        vector: ``(D,) float32`` L2-normalised mask embedding.
    """

    task: str
    annotation: str
    region: str
    label: str | None
    kind: str
    vector: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        _check_key_part(self.task, "task")
        _check_key_part(self.annotation, "annotation")
        _check_key_part(self.region, "region")
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.kind == BACKGROUND:
            if self.label is not None:
                raise ValueError(f"label: expected None for a background exemplar, got {self.label!r}")
        else:
            _check_key_part(self.label, f"label of a {self.kind} exemplar")
        object.__setattr__(self, "vector", normalised_vector(self.vector))

    @property
    def key(self) -> tuple[str, str, str]:
        """``(task, annotation, region)``."""
        return (self.task, self.annotation, self.region)


def _object_array(values: Sequence[object]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


@dataclass(frozen=True)
class MemorySnapshot:
    """An immutable view of one memory at one revision, as columns.

    Attributes:
        vectors: ``(M, D) float32`` L2-normalised exemplar vectors (``D`` may be 0 when ``M = 0``).
        labels: ``(M,) object`` label strings (``None`` for background).
        kinds: ``(M,) object`` kind strings (:data:`KINDS`).
        keys: ``M`` tuples ``(task, annotation, region)``.
        revision: the memory's revision this snapshot was taken at.
    """

    vectors: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray
    keys: list[tuple[str, str, str]]
    revision: int = 0

    def __post_init__(self) -> None:
        vectors = np.asarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"vectors: expected shape (M, D), got {vectors.shape}")
        m = vectors.shape[0]
        labels = _object_array(list(self.labels))
        kinds = _object_array(list(self.kinds))
        keys = [tuple(key) for key in self.keys]
        for name, column in (("labels", labels), ("kinds", kinds), ("keys", keys)):
            if len(column) != m:
                raise ValueError(f"{name}: expected {m} entries, got {len(column)}")
        unknown = set(kinds.tolist()) - set(KINDS)
        if unknown:
            raise ValueError(f"kinds: expected only {KINDS}, got {sorted(unknown)}")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "revision", int(self.revision))

    @classmethod
    def empty(cls, dim: int = 0, revision: int = 0) -> MemorySnapshot:
        """A snapshot with no exemplars."""
        return cls(np.zeros((0, dim), np.float32), [], [], [], revision)

    @classmethod
    def from_exemplars(cls, exemplars: Sequence[Exemplar], revision: int = 0) -> MemorySnapshot:
        """Columns of ``exemplars`` in the given order; all vectors must share one dimension."""
        if not exemplars:
            return cls.empty(revision=revision)
        dims = {e.vector.shape[0] for e in exemplars}
        if len(dims) != 1:
            raise ValueError(f"exemplars: expected one vector dimension, got {sorted(dims)}")
        return cls(
            vectors=np.stack([e.vector for e in exemplars]),
            labels=[e.label for e in exemplars],
            kinds=[e.kind for e in exemplars],
            keys=[e.key for e in exemplars],
            revision=revision,
        )

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension ``D``."""
        return int(self.vectors.shape[1])

    def select(self, kind: str, label: str | None = None) -> np.ndarray:
        """``(K,) int64`` indices of the exemplars of ``kind`` (and ``label`` if given), in order."""
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        chosen = self.kinds == kind
        if label is not None:
            chosen &= self.labels == label
        return np.flatnonzero(chosen)

    def positives_of(self, label: str) -> np.ndarray:
        """``(K, D) float32`` vectors of the positive exemplars of ``label``."""
        return self.vectors[self.select(POSITIVE, label)]

    def label_set(self) -> set[str]:
        """Labels that have at least one positive exemplar (the classes the memory can name)."""
        return set(self.labels[self.kinds == POSITIVE].tolist())

    def counts(self) -> dict[tuple[str | None, str], int]:
        """Number of exemplars per ``(label, kind)``."""
        return dict(Counter(zip(self.labels.tolist(), self.kinds.tolist(), strict=True)))

    def region_groups(self) -> np.ndarray:
        """``(M,) int64`` group index per exemplar: exemplars derived from one region share it.

        A region is ``(task, annotation, base_region(region))``; used to leave whole regions out.
        """
        index: dict[tuple[str, str, str], int] = {}
        groups = [index.setdefault((t, a, base_region(r)), len(index)) for t, a, r in self.keys]
        return np.asarray(groups, dtype=np.int64)


class ExemplarMemory:
    """The memory of one ``(project, space)``: persisted, cached per revision, thread-safe.

    Args:
        project: project id (string).
        space: embedding space id (the embedder id; exemplars of different spaces never mix).
        store: the persistence; ``None`` keeps the memory in this process only (evaluation).

    Reads (:meth:`snapshot`, :meth:`classifier`) check the stored revision, so changes written by
    another process sharing the store directory are seen; the classifier is refitted lazily, only
    after a change, once per settings.
    """

    def __init__(self, project: str, space: str, store: ExemplarStore | None = None) -> None:
        from samsem_plugin.store import ExemplarStore  # deferred: store.py imports this module

        _check_key_part(project, "project")
        _check_key_part(space, "space")
        self.project = project
        self.space = space
        self.store = store if store is not None else ExemplarStore(None)
        self._lock = threading.RLock()
        self._snapshot: MemorySnapshot | None = None
        self._fitted: dict[ClassifierSettings, FittedClassifier] = {}

    # -- changes -----------------------------------------------------------------------------

    def replace_annotation(
        self,
        task: str,
        annotation: str,
        exemplars: Sequence[Exemplar],
        updated_at: str | datetime | None = None,
    ) -> bool:
        """Replace all exemplars of ``annotation`` by ``exemplars``; True iff the content changed.

        With ``updated_at``, stale updates (older than the last applied one, or of an annotation
        removed since) are ignored; see :meth:`~samsem_plugin.store.ExemplarStore.replace_annotation`.
        """
        return self.store.replace_annotation(
            self.project, self.space, task, annotation, exemplars, updated_at
        )

    def remove_annotation(self, annotation: str, updated_at: str | datetime | None = None) -> int:
        """Remove all exemplars of ``annotation``; returns how many were removed.

        See :meth:`~samsem_plugin.store.ExemplarStore.remove_annotation` for ``updated_at``.
        """
        return self.store.remove_annotation(self.project, self.space, annotation, updated_at)

    def replace_all(
        self,
        exemplars_by_annotation: Mapping[tuple[str, str], Sequence[Exemplar]],
        updated_at: Mapping[str, str | datetime] | None = None,
        states_before: Mapping[str, AnnotationState] | None = None,
    ) -> bool:
        """Rebuild the whole memory from ``{(task, annotation): exemplars}``; True iff changed.

        ``states_before``: :meth:`annotation_states` taken before the mapping was collected;
        annotations written since then (concurrently) are kept unless the mapping is newer
        (:meth:`~samsem_plugin.store.ExemplarStore.replace_project`)."""
        return self.store.replace_project(
            self.project, self.space, exemplars_by_annotation, updated_at, states_before
        )

    def annotation_states(self) -> dict[str, AnnotationState]:
        """``{annotation: (updated_at, removed)}`` as stored now."""
        return self.store.annotation_states(self.project, self.space)

    # -- reads -------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The stored revision (increments on every real change)."""
        return self.store.revision(self.project, self.space)

    def counts(self) -> dict[tuple[str | None, str], int]:
        """Number of exemplars per ``(label, kind)``."""
        return self.store.counts(self.project, self.space)

    def snapshot(self) -> MemorySnapshot:
        """The current snapshot (reloaded only when the stored revision moved)."""
        with self._lock:
            revision = self.revision
            if self._snapshot is None or self._snapshot.revision != revision:
                self._snapshot = self.store.snapshot(self.project, self.space)
                self._fitted = {}
            return self._snapshot

    def classifier(self, settings: ClassifierSettings | None = None) -> FittedClassifier:
        """The classifier fitted on the current snapshot with ``settings`` (cached per revision)."""
        from samsem_plugin.classifier import ClassifierSettings, fit_classifier  # deferred: cycle

        settings = ClassifierSettings() if settings is None else settings
        with self._lock:
            snapshot = self.snapshot()
            fitted = self._fitted.get(settings)
            if fitted is None:
                fitted = fit_classifier(snapshot, settings)
                self._fitted[settings] = fitted
            return fitted
