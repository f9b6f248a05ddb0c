"""Name mask embeddings from an exemplar memory, with calibrated confidence and "I don't know".

Scoring (all cosine similarities of L2-normalised vectors, one matmul of the N queries against a
bank holding every prototype and exemplar). Every vector is first centred on the memory's mean
(shrunk towards 0 for memories of few classes, ``centring``) and renormalised:

* class score: cosine to the class prototype (mean of its normalised positives, renormalised);
  with kNN, the softmax(sim / ``knn_temperature``)-weighted mean of the top-``knn_k`` cosines to
  the class's positives; ``"auto"`` blends both (``knn_weight``) once a class has
  ``knn_min_exemplars`` positives and uses the prototype alone before;
* negatives: with ``s_neg`` the highest cosine to the class's negatives, the class score drops
  where a negative is closer than the positives:
  ``s ← (s + 1) · exp(−max(0, s_neg − s) / negative_sigma) − 1`` (the METHOD formula applied to
  ``s + 1`` so that it also lowers negative cosines and stays within [−1, 1]);
* background: kNN similarity to the ``"background"`` exemplars, an extra softmax column.

Probabilities are ``softmax(scores / T)`` over the known classes (+ background when the memory has
background exemplars); ``T`` is fitted on the stored exemplars by leave-one-region-out NLL over a
grid (Laplace label smoothing, so a memory that never errs is not declared infallible). Per-class
thresholds are a low quantile (``threshold_quantile``) of each class's own leave-one-region-out
scores (the lower of the empirical quantile and a Student-t prediction bound); a class with too few
of them takes the lower of the pooled quantile of all classes and a high quantile
(``impostor_quantile``) of the scores the class wins when each calibration sample's own class is
hidden (how an object of a class nobody taught scores). Memories larger
than ``calibration_max_exemplars`` are calibrated on a stratified subset. With a single class and
no background exemplars the softmax is 1 by construction: only the threshold can refuse a label.

A label is returned only when confident; otherwise ``None`` with a reason (see ``REASONS``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from samsem_plugin.memory import BACKGROUND, NEGATIVE, POSITIVE, MemorySnapshot
from samsem_plugin.regions import Regions

METHODS = ("prototype", "knn", "auto")
CENTRINGS = ("none", "exemplars", "classes")
UNKNOWN_POLICIES = ("unlabelled", "drop")

REASON_NONE = ""
REASON_EMPTY_MEMORY = "empty_memory"
REASON_BELOW_THRESHOLD = "below_threshold"
REASON_SMALL_MARGIN = "small_margin"
REASON_BACKGROUND = "background"
REASON_LOW_PROBABILITY = "low_probability"
REASONS = (
    REASON_NONE,
    REASON_EMPTY_MEMORY,
    REASON_BELOW_THRESHOLD,
    REASON_SMALL_MARGIN,
    REASON_BACKGROUND,
    REASON_LOW_PROBABILITY,
)

TEMPERATURE_GRID = np.geomspace(0.002, 2.0, 64)
"""Candidate softmax temperatures (cosine units) for the leave-one-out NLL fit."""

_CHUNK_ELEMENTS = 1 << 25
"""Most similarity entries computed at once (128 MB of float32), to bound memory on big banks."""


def _check_range(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}: expected a value in {bracket}{low}, {high}], got {value}")


@dataclass(frozen=True)
class ClassifierSettings:
    """How the memory scores, calibrates and rejects. Similarities are cosines in [−1, 1].

    Attributes:
        method: ``"prototype"``, ``"knn"`` or ``"auto"`` (kNN blended with the prototype once a
            class has ``knn_min_exemplars`` positives).
        centring: the point subtracted from every vector (memory and queries) before cosines, then
            renormalised: ``"classes"`` the mean of the per-(label, kind) mean vectors,
            ``"exemplars"`` the mean of all stored exemplars, ``"none"``. Backbone features share
            a large common component (CNN features after ReLU are all positive); removing it
            spreads the cosines.
        centring_prior: pseudo-count of zero vectors added to that mean: the centre is
            ``sum / (count + prior)`` (count = groups for ``"classes"``, exemplars for
            ``"exemplars"``), so a memory of two classes is only half centred: centring on the
            mean of very few groups would make them artificially opposite.
        knn_k: neighbours per class for kNN.
        knn_temperature: softmax temperature of the kNN neighbour weights.
        knn_min_exemplars: positives a class needs before ``"auto"`` uses kNN.
        knn_weight: weight of the kNN score in ``"auto"`` (1 − weight goes to the prototype).
        use_negatives: lower class scores near the class's negative exemplars.
        negative_sigma: width of that penalty (cosine units).
        reject_below_threshold: reject when the best class score is under its threshold.
        threshold_quantile: the per-class threshold is this quantile of the class's own
            leave-one-out scores (the lower of the empirical quantile and the Student-t bound).
            Low (0.2 %) on purpose: objects of a known class that fall under a 1 % quantile were
            mostly right (scikit-image scenes, 10 labelled images: 19 right, 9 wrong), while
            objects of untaught classes are mostly refused by the impostor bound and the margin.
        impostor_quantile: for a class without ``threshold_min_exemplars`` leave-one-out scores
            of its own, the threshold is the lower of the pooled genuine bound (all classes) and an
            impostor bound that this share of the leave-one-*class*-out scores won by the class
            exceeds (how an object of an untaught class scores; learnt from two classes on, also
            at one exemplar per class); 0 switches the impostor bound off.
        threshold_min_exemplars: leave-one-out scores a class needs for its own threshold
            (otherwise the pooled quantile of all classes, or ``default_threshold``).
        default_threshold: threshold when there is too little data to learn one.
        min_margin: reject when P(best) − P(second best class) is under this.
        reject_background: reject when background is more probable than the best class.
        min_probability: reject when P(best) is under this.
        unknown_policy: ``"unlabelled"`` keeps rejected masks without a label, ``"drop"`` removes
            them (:meth:`FittedClassifier.classify_regions`).
        default_temperature: softmax temperature when the memory is too small to fit one.
        calibration_samples: most exemplars used as leave-one-out samples (stratified by class).
        calibration_max_exemplars: larger memories are calibrated on a stratified subset of this
            size (temperature and thresholds), so that refitting a big memory stays fast; the
            subset keeps every class (at least ``max(knn_min_exemplars, 16)`` of each).
    """

    method: str = "auto"
    centring: str = "classes"
    centring_prior: float = 2.0
    knn_k: int = 5
    knn_temperature: float = 0.07
    knn_min_exemplars: int = 10
    knn_weight: float = 0.5
    use_negatives: bool = True
    negative_sigma: float = 0.05
    reject_below_threshold: bool = True
    threshold_quantile: float = 0.002
    impostor_quantile: float = 0.05
    threshold_min_exemplars: int = 5
    default_threshold: float = 0.0
    min_margin: float = 0.1
    reject_background: bool = True
    min_probability: float = 0.4
    unknown_policy: str = "unlabelled"
    default_temperature: float = 0.05
    calibration_samples: int = 2000
    calibration_max_exemplars: int = 20_000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.centring not in CENTRINGS:
            raise ValueError(f"centring: expected one of {CENTRINGS}, got {self.centring!r}")
        if self.unknown_policy not in UNKNOWN_POLICIES:
            raise ValueError(
                f"unknown_policy: expected one of {UNKNOWN_POLICIES}, got {self.unknown_policy!r}"
            )
        for name in ("knn_k", "knn_min_exemplars", "calibration_samples", "calibration_max_exemplars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.threshold_min_exemplars < 2:
            raise ValueError(f"threshold_min_exemplars: expected >= 2, got {self.threshold_min_exemplars}")
        for name in ("knn_temperature", "negative_sigma", "default_temperature"):
            _check_range(name, getattr(self, name), 0.0, np.inf, open_low=True)
        for name in ("knn_weight", "min_margin", "min_probability"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        _check_range("threshold_quantile", self.threshold_quantile, 0.0, 0.5, open_low=True)
        _check_range("impostor_quantile", self.impostor_quantile, 0.0, 0.5)
        _check_range("centring_prior", self.centring_prior, 0.0, np.inf)
        _check_range("default_threshold", self.default_threshold, -1.0, 1.0)


@dataclass(frozen=True)
class Classification:
    """The decision for N embeddings against C known classes (``FittedClassifier.labels``).

    Attributes:
        labels: ``(N,) object`` the label, or ``None`` (unknown: rejected or empty memory).
        probability: ``(N,) float32`` calibrated P of the returned label; for an unknown, P of
            ``best_label`` (0 when there is none).
        best_label: ``(N,) object`` the most probable allowed class even when rejected (``None``
            only when no class is known or allowed).
        reason: ``(N,) object`` ``""`` when labelled, else one of ``REASONS``.
        probs: ``(N, C) float32`` calibrated class probabilities (columns as
            ``FittedClassifier.labels``; 0 for classes not allowed). Rows sum to 1 − P(background).
        scores: ``(N, C) float32`` class scores (cosine units, after negatives; −inf if not allowed).
    """

    labels: np.ndarray
    probability: np.ndarray
    best_label: np.ndarray
    reason: np.ndarray
    probs: np.ndarray
    scores: np.ndarray

    @classmethod
    def unknown(cls, n: int, n_classes: int, reason: str) -> Classification:
        """All N unknown for ``reason``."""
        return cls(
            labels=np.full(n, None, dtype=object),
            probability=np.zeros(n, np.float32),
            best_label=np.full(n, None, dtype=object),
            reason=np.full(n, reason, dtype=object),
            probs=np.zeros((n, n_classes), np.float32),
            scores=np.full((n, n_classes), -np.inf, np.float32),
        )


# -- scoring primitives --------------------------------------------------------------------------


def _knn_similarity(sims: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """``(n,)`` softmax(sim/τ)-weighted mean of the top-``k`` finite entries of each row of
    ``sims (n, m)``; −inf where a row has no finite entry (masked or ``m = 0``)."""
    n, m = sims.shape
    if m == 0:
        return np.full(n, -np.inf, np.float32)
    k = min(k, m)
    top = -np.partition(-sims, k - 1, axis=1)[:, :k]
    finite = np.isfinite(top)
    top_or_zero = np.where(finite, top, 0.0)
    best = np.where(finite, top, -np.inf).max(axis=1, keepdims=True)
    best = np.where(np.isfinite(best), best, 0.0)
    weights = np.where(finite, np.exp((top_or_zero - best) / temperature), 0.0)
    total = weights.sum(axis=1)
    mean = (weights * top_or_zero).sum(axis=1) / np.maximum(total, np.finfo(np.float32).tiny)
    return np.where(total > 0, mean, -np.inf).astype(np.float32)


def _negative_penalty(scores: np.ndarray, negative: np.ndarray, sigma: float) -> np.ndarray:
    """Scores lowered where the nearest negative is closer: ``(s + 1)·exp(−max(0, s_neg − s)/σ) − 1``.

    ``-inf`` scores stay ``-inf``; a ``-inf`` ``negative`` (none) leaves the score unchanged.
    """
    with np.errstate(invalid="ignore"):
        gap = np.maximum(0.0, np.where(np.isfinite(negative) & np.isfinite(scores), negative - scores, 0.0))
    lowered = (scores + 1.0) * np.exp(-gap / sigma) - 1.0
    return np.where(np.isfinite(scores), lowered, -np.inf).astype(np.float32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``(n, c)`` logits that may hold −inf (all −inf rows give −inf)."""
    top = logits.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = logits - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _spread_indices(n: int, most: int) -> np.ndarray:
    """At most ``most`` indices spread evenly over ``range(n)`` (deterministic)."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(np.int64))


def _student_t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t with ``dof`` degrees of freedom (Cornish-Fisher expansion around
    the normal quantile; within 0.01 of the exact value for ``dof >= 3`` and usual tails)."""
    z = NormalDist().inv_cdf(probability)
    v = float(dof)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def _lower_score_bound(scores: np.ndarray, quantile: float) -> float:
    """A score a new member of the class falls under with probability about ``quantile``.

    The lower (more permissive) of the empirical quantile and the Student-t prediction bound
    ``mean − t(1 − quantile, n − 1)·sd·sqrt(1 + 1/n)``: with few scores the empirical quantile sits
    near the minimum and would reject too many true members; with many, cosine scores' long lower
    tail makes the normal bound too strict. ``scores``: ``(n,)`` with ``n >= 2``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    empirical = float(np.quantile(scores, quantile))
    bound = scores.mean() - _student_t_quantile(1.0 - quantile, n - 1) * scores.std(ddof=1) * np.sqrt(
        1 + 1 / n
    )
    return float(min(empirical, bound))


def _upper_score_bound(scores: np.ndarray, quantile: float) -> float:
    """A score an outsider exceeds with probability about ``quantile`` (mirror of
    :func:`_lower_score_bound`: the higher of the empirical upper quantile and the Student-t bound)."""
    return -_lower_score_bound(-np.asarray(scores, dtype=np.float64), quantile)


def _centre_of(snapshot: MemorySnapshot, settings: ClassifierSettings) -> np.ndarray:
    """``(D,) float32`` the point the memory's vectors are centred on before cosines (see
    ``ClassifierSettings.centring``); zeros when centring is off or the memory is empty."""
    if settings.centring == "none" or len(snapshot) == 0:
        return np.zeros(snapshot.dim, np.float32)
    vectors = snapshot.vectors.astype(np.float64)
    if settings.centring == "exemplars":
        total, count = vectors.sum(axis=0), len(vectors)
    else:
        groups = np.unique(
            np.array(
                [f"{kind}\0{label}" for label, kind in zip(snapshot.labels, snapshot.kinds, strict=True)]
            ),
            return_inverse=True,
        )[1]
        sums = np.zeros((groups.max() + 1, snapshot.dim))
        np.add.at(sums, groups, vectors)
        means = sums / np.bincount(groups)[:, None]
        total, count = means.sum(axis=0), len(means)
    return (total / (count + settings.centring_prior)).astype(np.float32)


def _centred(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``(N, D) float32`` rows minus ``centre``, L2-normalised; zero rows (empty masks) stay zero."""
    if not centre.any():
        return vectors
    shifted = vectors.astype(np.float64) - centre
    norms = np.linalg.norm(shifted, axis=1, keepdims=True)
    keep = (np.abs(vectors).max(axis=1, keepdims=True) > 0) & (norms > 1e-12)
    return np.where(keep, shifted / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def _fit_temperature(logits: np.ndarray, targets: np.ndarray, default: float) -> float:
    """Softmax temperature minimising the label-smoothed NLL of ``logits (n, K)`` (cosine units,
    −inf = excluded column) against ``targets (n,)``, over :data:`TEMPERATURE_GRID`.

    Smoothing ``ε = 1 / (n + 2)`` (Laplace's rule) keeps the fit finite when every leave-one-out
    sample is right: n correct answers do not prove an error rate of 0. Returns ``default`` when
    there is nothing to fit (fewer than two columns or no samples).
    """
    n = len(targets)
    if n == 0 or logits.shape[1] < 2:
        return float(default)
    rows = np.arange(n)
    others = np.isfinite(logits)
    others[rows, targets] = False
    n_others = others.sum(axis=1)
    if not n_others.any():
        return float(default)
    smoothing = 1.0 / (n + 2)
    losses = []
    for temperature in TEMPERATURE_GRID:
        log_p = _log_softmax(logits / temperature)
        spread = np.where(others, log_p, 0.0).sum(axis=1) / np.maximum(n_others, 1)
        spread = np.where(n_others > 0, spread, log_p[rows, targets])
        losses.append(-((1 - smoothing) * log_p[rows, targets] + smoothing * spread).mean())
    return float(TEMPERATURE_GRID[int(np.argmin(losses))])


# -- the fitted classifier -----------------------------------------------------------------------


@dataclass
class _Bank:
    """Everything scored against, stacked in one ``(R, D)`` matrix.

    Row blocks: ``[0, C)`` prototypes, then positives grouped by class (``pos_offsets``), then
    negatives grouped by class (``neg_offsets``), then background exemplars.
    """

    matrix: np.ndarray
    n_classes: int
    pos_offsets: np.ndarray
    neg_offsets: np.ndarray
    n_background: int
    groups: np.ndarray  # (R,) region group of each row, -1 for prototypes
    class_sums: np.ndarray  # (C, D) float64 sums of positives

    @property
    def pos_start(self) -> int:
        return self.n_classes

    @property
    def neg_start(self) -> int:
        return self.n_classes + int(self.pos_offsets[-1])

    @property
    def bg_start(self) -> int:
        return self.neg_start + int(self.neg_offsets[-1])


def _rows_by_class(
    snapshot: MemorySnapshot, codes: np.ndarray, kind: str, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Snapshot rows of ``kind`` whose label is a known class, grouped by class; and the
    ``(C + 1,)`` offsets of each class's block."""
    chosen = np.flatnonzero((snapshot.kinds == kind) & (codes >= 0))
    chosen = chosen[np.argsort(codes[chosen], kind="stable")]
    counts = np.bincount(codes[chosen], minlength=n_classes)
    return chosen, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _build_bank(snapshot: MemorySnapshot, labels: list[str]) -> _Bank:
    n_classes = len(labels)
    code_of = {label: c for c, label in enumerate(labels)}
    codes = np.fromiter(
        (code_of.get(label, -1) for label in snapshot.labels.tolist()), np.int64, len(snapshot)
    )
    pos_rows, pos_offsets = _rows_by_class(snapshot, codes, POSITIVE, n_classes)
    neg_rows, neg_offsets = _rows_by_class(snapshot, codes, NEGATIVE, n_classes)
    bg_rows = snapshot.select(BACKGROUND)
    source = np.concatenate([pos_rows, neg_rows, bg_rows]).astype(np.int64)
    class_sums = np.zeros((n_classes, snapshot.dim), np.float64)
    if n_classes:
        class_sums = np.add.reduceat(snapshot.vectors[pos_rows], pos_offsets[:-1], axis=0, dtype=np.float64)
    prototypes = class_sums / np.linalg.norm(class_sums, axis=1, keepdims=True).clip(1e-12)
    return _Bank(
        matrix=np.ascontiguousarray(
            np.concatenate([prototypes.astype(np.float32), snapshot.vectors[source]])
        ),
        n_classes=n_classes,
        pos_offsets=pos_offsets,
        neg_offsets=neg_offsets,
        n_background=len(bg_rows),
        groups=np.concatenate([np.full(n_classes, -1), snapshot.region_groups()[source]]).astype(np.int64),
        class_sums=class_sums,
    )


def _stratified_subset(snapshot: MemorySnapshot, most: int, keep_at_least: int) -> MemorySnapshot:
    """About ``most`` exemplars of ``snapshot``: every ``(label, kind)`` keeps the same share
    (at least ``keep_at_least``, or all it has), spread evenly over its rows (deterministic)."""
    members: dict[tuple[str | None, str], list[int]] = {}
    for row, key in enumerate(zip(snapshot.labels.tolist(), snapshot.kinds.tolist(), strict=True)):
        members.setdefault(key, []).append(row)
    share = most / max(1, len(snapshot))
    keep: list[np.ndarray] = []
    for rows in members.values():
        n = len(rows)
        keep.append(np.asarray(rows)[_spread_indices(n, min(n, max(keep_at_least, round(n * share))))])
    chosen = np.sort(np.concatenate(keep))
    return MemorySnapshot(
        vectors=snapshot.vectors[chosen],
        labels=snapshot.labels[chosen],
        kinds=snapshot.kinds[chosen],
        keys=[snapshot.keys[i] for i in chosen],
        revision=snapshot.revision,
    )


class FittedClassifier:
    """A classifier fitted on one memory snapshot (immutable; safe to share between threads).

    Attributes:
        labels: the known classes (those with at least one positive exemplar), sorted.
        settings: the :class:`ClassifierSettings` it was fitted with.
        temperature: the fitted softmax temperature (cosine units).
        thresholds: ``(C,) float32`` per-class score thresholds.
        threshold_learnt: ``(C,) bool`` True where the threshold came from the class's own data.
        revision: the snapshot revision it was fitted on.
        dim: embedding dimension ``D`` (0 for an empty memory).
    """

    def __init__(
        self, snapshot: MemorySnapshot, settings: ClassifierSettings, centre: np.ndarray | None = None
    ) -> None:
        self.settings = settings
        self.centre = _centre_of(snapshot, settings) if centre is None else centre
        original, snapshot = snapshot, replace(snapshot, vectors=_centred(snapshot.vectors, self.centre))
        self.revision = snapshot.revision
        self.dim = snapshot.dim
        self.labels: list[str] = sorted(snapshot.label_set())
        self._bank = _build_bank(snapshot, self.labels)
        counts = np.diff(self._bank.pos_offsets)
        self.class_counts = counts.astype(np.int64)
        if settings.method == "knn":
            self._use_knn = np.ones(len(self.labels), bool)
        elif settings.method == "auto":
            self._use_knn = counts >= settings.knn_min_exemplars
        else:
            self._use_knn = np.zeros(len(self.labels), bool)
        self.temperature = float(settings.default_temperature)
        self.thresholds = np.full(len(self.labels), settings.default_threshold, np.float32)
        self.threshold_learnt = np.zeros(len(self.labels), bool)
        self.calibration_size = 0
        if not self.labels:
            return
        if len(snapshot) <= settings.calibration_max_exemplars:
            self._calibrate()
            return
        keep_at_least = max(settings.knn_min_exemplars, settings.threshold_min_exemplars, 16)
        subset = _stratified_subset(original, settings.calibration_max_exemplars, keep_at_least)
        calibrated = FittedClassifier(
            subset, replace(settings, calibration_max_exemplars=len(subset)), centre=self.centre
        )
        self.temperature = calibrated.temperature
        self.thresholds, self.threshold_learnt = calibrated.thresholds, calibrated.threshold_learnt
        self.calibration_size = calibrated.calibration_size

    # -- scoring -------------------------------------------------------------------------------

    @property
    def _has_background(self) -> bool:
        return self._bank.n_background > 0

    def _scores_from_sims(self, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Class scores ``(n, C)`` and background score ``(n,)`` (or None) from similarities
        ``(n, R)`` to the bank rows (masked entries −inf)."""
        bank, settings = self._bank, self.settings
        proto = sims[:, : bank.n_classes]
        scores = proto.astype(np.float32, copy=True)
        for c in np.flatnonzero(self._use_knn):
            block = sims[:, bank.pos_start + bank.pos_offsets[c] : bank.pos_start + bank.pos_offsets[c + 1]]
            knn = _knn_similarity(block, settings.knn_k, settings.knn_temperature)
            if settings.method == "auto":
                blend = settings.knn_weight * knn + (1.0 - settings.knn_weight) * proto[:, c]
                knn = np.where(np.isfinite(knn) & np.isfinite(proto[:, c]), blend, -np.inf)
            scores[:, c] = knn
        if settings.use_negatives:
            for c in np.flatnonzero(np.diff(bank.neg_offsets)):
                block = sims[
                    :, bank.neg_start + bank.neg_offsets[c] : bank.neg_start + bank.neg_offsets[c + 1]
                ]
                scores[:, c] = _negative_penalty(scores[:, c], block.max(axis=1), settings.negative_sigma)
        background = None
        if self._has_background:
            block = sims[:, bank.bg_start :]
            background = _knn_similarity(block, settings.knn_k, settings.knn_temperature)
        return scores, background

    def _logits(self, scores: np.ndarray, background: np.ndarray | None) -> np.ndarray:
        """``(n, C [+1])`` score columns (background last when present), cosine units."""
        if background is None:
            return scores
        return np.concatenate([scores, background[:, None]], axis=1)

    def _score(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores of ``(N, D)`` embeddings, computed in chunks of rows against the whole bank."""
        rows = max(1, _CHUNK_ELEMENTS // max(1, self._bank.matrix.shape[0]))
        parts = [
            self._scores_from_sims(chunk @ self._bank.matrix.T)
            for chunk in np.split(embeddings, np.arange(rows, embeddings.shape[0], rows))
        ]
        scores = (
            np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, len(self.labels)), np.float32)
        )
        background = None
        if self._has_background:
            background = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
        return scores, background

    # -- calibration (leave one region out) ----------------------------------------------------

    def _calibration_rows(self) -> np.ndarray:
        """Bank rows used for calibration: positives and background, stratified, deterministic."""
        bank = self._bank
        blocks = [
            (bank.pos_start + bank.pos_offsets[c], bank.pos_start + bank.pos_offsets[c + 1])
            for c in range(bank.n_classes)
        ]
        if self._has_background:
            blocks.append((bank.bg_start, bank.matrix.shape[0]))
        per_block = max(16, self.settings.calibration_samples // len(blocks))
        return np.concatenate([start + _spread_indices(stop - start, per_block) for start, stop in blocks])

    def _leave_region_out(
        self, sims: np.ndarray, rows: np.ndarray, by_group: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """Make ``sims (n, R)`` (similarities of bank rows ``rows`` to the bank) as if each
        sample's region were absent: its exemplars masked (−inf) and its class prototypes rebuilt
        without its positives (−inf when nothing is left)."""
        bank = self._bank
        order, sorted_groups = by_group
        counts = np.diff(bank.pos_offsets)
        for i, group in enumerate(bank.groups[rows]):
            lo, hi = (
                np.searchsorted(sorted_groups, group, "left"),
                np.searchsorted(sorted_groups, group, "right"),
            )
            members = order[lo:hi]
            sims[i, members] = -np.inf
            positives = members[(members >= bank.pos_start) & (members < bank.neg_start)]
            classes = np.searchsorted(bank.pos_offsets, positives - bank.pos_start, side="right") - 1
            for c in np.unique(classes):
                own = positives[classes == c]
                if counts[c] == len(own):
                    sims[i, c] = -np.inf
                    continue
                left = bank.class_sums[c] - bank.matrix[own].astype(np.float64).sum(axis=0)
                sample = bank.matrix[rows[i]].astype(np.float64)
                sims[i, c] = float(sample @ left / np.linalg.norm(left).clip(1e-12))

    def _calibrate(self) -> None:
        """Fit the temperature (NLL) and per-class thresholds on leave-one-region-out scores."""
        bank = self._bank
        rows = self._calibration_rows()
        targets = np.where(
            rows >= bank.bg_start,
            bank.n_classes,
            np.searchsorted(bank.pos_offsets, rows - bank.pos_start, side="right") - 1,
        )
        order = np.argsort(bank.groups, kind="stable")
        by_group = (order, bank.groups[order])
        logits_parts = []
        chunk = max(1, _CHUNK_ELEMENTS // bank.matrix.shape[0])
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            sims = bank.matrix[part] @ bank.matrix.T
            self._leave_region_out(sims, part, by_group)
            logits_parts.append(self._logits(*self._scores_from_sims(sims)))
        logits = np.concatenate(logits_parts)
        usable = np.isfinite(logits[np.arange(len(rows)), targets])
        impostors = self._impostor_bounds(logits, targets)
        logits, targets = logits[usable], targets[usable]
        self.calibration_size = int(len(targets))
        self._fit_thresholds(logits, targets, impostors)
        self.temperature = _fit_temperature(logits, targets, self.settings.default_temperature)

    def _impostor_bounds(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``(C,)`` upper bound of the scores with which an object of an *unknown* class wins each
        class (NaN where unknown or switched off).

        Each calibration sample is scored as if its own class had never been taught (its class's
        column removed): the class that then wins, and with what score, is what an object of an
        untaught class would get. Background samples take the best of all classes.
        """
        n_classes, quantile = len(self.labels), self.settings.impostor_quantile
        bounds = np.full(n_classes, np.nan)
        if quantile <= 0 or n_classes < 2 and not (targets == n_classes).any():
            return bounds
        columns = logits[:, :n_classes].copy()
        own = targets < n_classes
        columns[np.flatnonzero(own), targets[own]] = -np.inf
        winner = np.argmax(columns, axis=1)
        score = columns[np.arange(len(targets)), winner]
        valid = np.isfinite(score)
        winner, score = winner[valid], score[valid]
        for c in range(n_classes):
            won = score[winner == c]
            if len(won) >= 2:
                bounds[c] = _upper_score_bound(won, quantile)
            elif len(score) >= 2:
                bounds[c] = _upper_score_bound(score, quantile)
        return bounds

    def _fit_thresholds(self, logits: np.ndarray, targets: np.ndarray, impostors: np.ndarray) -> None:
        settings = self.settings
        own = logits[np.arange(len(targets)), targets]
        is_class = targets < len(self.labels)
        pooled = own[is_class]
        fallback = np.nan
        if len(pooled) >= settings.threshold_min_exemplars:
            fallback = _lower_score_bound(pooled, settings.threshold_quantile)
        for c in range(len(self.labels)):
            scores = own[targets == c]
            if len(scores) >= settings.threshold_min_exemplars:
                self.thresholds[c] = _lower_score_bound(scores, settings.threshold_quantile)
                self.threshold_learnt[c] = True
                continue
            candidates = [v for v in (fallback, impostors[c]) if np.isfinite(v)]
            self.thresholds[c] = min(candidates) if candidates else settings.default_threshold

    # -- public --------------------------------------------------------------------------------

    def _allowed_mask(self, allowed_labels: Collection[str] | None) -> np.ndarray:
        if allowed_labels is None:
            return np.ones(len(self.labels), bool)
        if isinstance(allowed_labels, str):
            raise ValueError(
                f"allowed_labels: expected a collection of labels, got the string {allowed_labels!r}"
            )
        allowed = set(allowed_labels)
        return np.array([label in allowed for label in self.labels], dtype=bool)

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings: expected shape (N, D), got {x.shape}")
        if self.labels and x.shape[1] != self.dim:
            raise ValueError(
                f"embeddings: expected dimension D = {self.dim} (the memory's), got {x.shape[1]}"
            )
        if not np.isfinite(x).all():
            raise ValueError("embeddings: expected finite numbers")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        return np.ascontiguousarray(_centred(x, self.centre))

    def classify(
        self, embeddings: np.ndarray, allowed_labels: Collection[str] | None = None
    ) -> Classification:
        """Label ``(N, D)`` L2-normalised embeddings (renormalised here), restricted to
        ``allowed_labels`` (never returns a label outside it; ``None`` = every known class)."""
        x = self._check_embeddings(embeddings)
        n, n_classes = x.shape[0], len(self.labels)
        allowed = self._allowed_mask(allowed_labels)
        if n_classes == 0 or not allowed.any():
            return Classification.unknown(n, n_classes, REASON_EMPTY_MEMORY)
        scores, background = self._score(x)
        scores = np.where(allowed[None, :], scores, -np.inf).astype(np.float32)
        probs_all = np.exp(_log_softmax(self._logits(scores, background) / self.temperature))
        probs = probs_all[:, :n_classes].astype(np.float32)
        rows = np.arange(n)
        best = np.argmax(scores, axis=1)
        p_best = probs[rows, best]
        p_second = np.sort(probs, axis=1)[:, -2] if n_classes > 1 else np.zeros(n, np.float32)
        p_background = probs_all[:, n_classes] if background is not None else np.zeros(n)
        settings = self.settings
        reason = np.select(
            [
                settings.reject_background & (p_background > p_best),
                settings.reject_below_threshold & (scores[rows, best] < self.thresholds[best]),
                p_best - p_second < settings.min_margin,
                p_best < settings.min_probability,
            ],
            [REASON_BACKGROUND, REASON_BELOW_THRESHOLD, REASON_SMALL_MARGIN, REASON_LOW_PROBABILITY],
            default=REASON_NONE,
        ).astype(object)
        best_label = np.array(self.labels, dtype=object)[best]
        labels = np.where(reason == REASON_NONE, best_label, None).astype(object)
        return Classification(
            labels=labels,
            probability=p_best.astype(np.float32),
            best_label=best_label,
            reason=reason,
            probs=probs,
            scores=scores,
        )

    def classify_regions(self, regions: Regions, allowed_labels: Collection[str] | None = None) -> Regions:
        """``regions`` (with ``embeddings``) labelled: ``labels``, ``label_score`` (calibrated
        P(label), 0 for unknown), ``extra["reject_reason"]`` and ``extra["best_label"]``; with
        ``unknown_policy="drop"`` the unknown regions are removed."""
        if regions.embeddings is None:
            raise ValueError("regions: expected embeddings (run the embedder first), got None")
        decision = self.classify(regions.embeddings, allowed_labels)
        known = np.array([label is not None for label in decision.labels], dtype=bool)
        labelled = regions.with_(
            labels=decision.labels,
            label_score=np.where(known, decision.probability, 0.0).astype(np.float32),
            extra={**regions.extra, "reject_reason": decision.reason, "best_label": decision.best_label},
        )
        if self.settings.unknown_policy == "drop":
            return labelled[known]
        return labelled

    def choose_granularity(self, regions: Regions, allowed_labels: Collection[str] | None = None) -> int:
        """Index of the SAM level (of one prompt's embedded masks) that best matches a known class.

        Ranking: accepted (not rejected) masks first, then the calibrated probability of the best
        class (equal within 1e-3 counts as a tie), then SAM's ``proposal_score``. With an empty
        memory, or when every mask is rejected, the highest ``proposal_score`` wins.
        """
        if len(regions) == 0:
            raise ValueError("regions: expected at least one mask level, got 0")
        if regions.embeddings is None:
            raise ValueError("regions: expected embeddings (run the embedder first), got None")
        decision = self.classify(regions.embeddings, allowed_labels)
        accepted = np.array([label is not None for label in decision.labels], dtype=bool)
        if not accepted.any():
            return int(np.argmax(regions.proposal_score))
        probability = np.where(accepted, np.round(decision.probability / 1e-3), -1.0)
        order = np.lexsort((-regions.proposal_score, -probability))
        return int(order[0])

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and metrics."""
        return {
            "revision": self.revision,
            "method": self.settings.method,
            "centring": self.settings.centring,
            "centre_norm": float(np.linalg.norm(self.centre)),
            "classes": len(self.labels),
            "exemplars_per_class": dict(zip(self.labels, self.class_counts.tolist(), strict=True)),
            "background_exemplars": self._bank.n_background,
            "negative_exemplars": int(self._bank.neg_offsets[-1]),
            "temperature": self.temperature,
            "thresholds": dict(zip(self.labels, self.thresholds.astype(float).tolist(), strict=True)),
            "calibration_size": self.calibration_size,
        }


def fit_classifier(snapshot: MemorySnapshot, settings: ClassifierSettings | None = None) -> FittedClassifier:
    """Fit prototypes, kNN banks, negatives, background, temperature and thresholds on ``snapshot``."""
    return FittedClassifier(snapshot, ClassifierSettings() if settings is None else settings)
