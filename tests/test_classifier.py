"""Classifier on synthetic Gaussian clusters (D = 32): accuracy, calibration, reject option,
background, margins, negatives, allowed labels, empty memory, kNN on a bimodal class, granularity."""

import json

import numpy as np
import pytest

from samsem_plugin import classifier as classifier_module
from samsem_plugin.classifier import ClassifierSettings, fit_classifier
from samsem_plugin.memory import Exemplar, MemorySnapshot
from samsem_plugin.regions import Regions

D = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def around(center: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors scattered around ``center`` (noise ~ relative spread)."""
    return unit(center + noise * rng.normal(size=(n, D)) / np.sqrt(D))


def exemplars(vectors: np.ndarray, label: str | None, kind: str = "positive", annotation: str = "a") -> list:
    suffix = {"positive": "", "negative": "#neg", "background": "#bg"}[kind]
    return [
        Exemplar("t", f"{annotation}-{label}-{i}", f"r{i}{suffix}", label, kind, v)
        for i, v in enumerate(vectors)
    ]


def cluster_world(seed: int, n_classes: int = 5, shots: int = 10, noise: float = 1.2):
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(n_classes + 1, D)))  # the last one is never taught
    labels = [f"c{c}" for c in range(n_classes)]
    memory = []
    for c, label in enumerate(labels):
        memory += exemplars(around(centers[c], shots, noise, rng), label)
    snapshot = MemorySnapshot.from_exemplars(memory)

    def queries(n_per_class: int):
        vectors = np.concatenate([around(centers[c], n_per_class, noise, rng) for c in range(n_classes)])
        return vectors, np.repeat(np.array(labels, dtype=object), n_per_class)

    def outsiders(n: int):
        return around(centers[-1], n, noise, rng)

    return snapshot, queries, outsiders


def expected_calibration_error(probability: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    index = np.clip((probability * bins).astype(int), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(correct[chosen].mean() - probability[chosen].mean())
    return float(error)


# -- accuracy, calibration, reject ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["prototype", "knn", "auto"])
def test_accuracy_on_separated_clusters(method):
    snapshot, queries, _ = cluster_world(seed=0)
    vectors, truth = queries(100)
    decision = fit_classifier(snapshot, ClassifierSettings(method=method)).classify(vectors)
    assert np.mean(decision.best_label == truth) >= 0.93
    labelled = decision.labels != None  # noqa: E711 - elementwise on an object array
    assert labelled.mean() >= 0.8
    assert np.mean(decision.labels[labelled] == truth[labelled]) >= 0.95


def test_probabilities_are_calibrated_on_held_out_queries():
    errors = []
    for seed in range(3):
        snapshot, queries, _ = cluster_world(seed=seed, shots=20, noise=2.0)
        fitted = fit_classifier(snapshot, ClassifierSettings(method="prototype"))
        vectors, truth = queries(300)
        decision = fitted.classify(vectors)
        correct = decision.best_label == truth
        assert 0.8 < correct.mean() < 0.95  # hard enough for calibration to matter
        errors.append(expected_calibration_error(decision.probability, correct))
        assert TEMPERATURE_INTERIOR[0] < fitted.temperature < TEMPERATURE_INTERIOR[1]
    assert np.mean(errors) < 0.05, errors


TEMPERATURE_INTERIOR = (classifier_module.TEMPERATURE_GRID[0], classifier_module.TEMPERATURE_GRID[-1])


def test_a_too_sharp_temperature_would_be_visibly_miscalibrated():
    """The ECE check above can fail: the same scores at a 10x sharper temperature are overconfident."""
    snapshot, queries, _ = cluster_world(seed=0, shots=20, noise=2.0)
    fitted = fit_classifier(snapshot, ClassifierSettings(method="prototype"))
    vectors, truth = queries(300)
    decision = fitted.classify(vectors)
    fitted.temperature /= 10
    sharp = fitted.classify(vectors)
    correct = decision.best_label == truth
    fitted_error = expected_calibration_error(decision.probability, correct)
    assert expected_calibration_error(sharp.probability, correct) > fitted_error + 0.04


def test_out_of_distribution_cluster_is_rejected_below_threshold():
    snapshot, queries, outsiders = cluster_world(seed=2, shots=10, noise=0.8)
    fitted = fit_classifier(snapshot)
    assert fitted.threshold_learnt.all()
    outside = fitted.classify(outsiders(200))
    assert np.mean(outside.labels == None) >= 0.95  # noqa: E711
    assert np.mean(outside.reason == "below_threshold") >= 0.9
    inside = fitted.classify(queries(50)[0])
    assert np.mean(inside.labels != None) >= 0.8  # noqa: E711
    lenient = fit_classifier(snapshot, ClassifierSettings(reject_below_threshold=False, min_margin=0.0))
    assert np.mean(lenient.classify(outsiders(200)).reason == "below_threshold") == 0


def test_background_prototype_wins_gives_unknown():
    rng = np.random.default_rng(3)
    cat, dog, clutter = unit(rng.normal(size=(3, D)))
    memory = exemplars(around(cat, 10, 0.8, rng), "cat") + exemplars(around(dog, 10, 0.8, rng), "dog")
    memory += exemplars(around(clutter, 10, 0.8, rng), None, "background")
    fitted = fit_classifier(MemorySnapshot.from_exemplars(memory))
    on_clutter = fitted.classify(around(clutter, 100, 0.8, rng))
    assert np.all(on_clutter.labels == None)  # noqa: E711
    assert np.mean(on_clutter.reason == "background") >= 0.95
    assert np.all(on_clutter.probs.sum(axis=1) < 0.5)  # background holds the rest of the mass
    on_cat = fitted.classify(around(cat, 100, 0.8, rng))
    assert np.mean(on_cat.labels == "cat") >= 0.8 and "dog" not in on_cat.labels.tolist()
    ignored = fit_classifier(
        MemorySnapshot.from_exemplars(memory),
        ClassifierSettings(
            reject_background=False, reject_below_threshold=False, min_margin=0, min_probability=0
        ),
    )
    assert np.all(ignored.classify(around(clutter, 20, 0.8, rng)).reason != "background")


def test_a_query_between_two_classes_is_rejected_for_a_small_margin():
    rng = np.random.default_rng(4)
    husky, other = unit(rng.normal(size=(2, D)))
    wolf = unit(husky + 0.7 * unit(rng.normal(size=D)))
    memory = exemplars(around(husky, 15, 0.3, rng), "husky") + exemplars(around(wolf, 15, 0.3, rng), "wolf")
    memory += exemplars(around(other, 15, 0.3, rng), "cat")
    snapshot = MemorySnapshot.from_exemplars(memory)
    between = around(unit(husky + wolf), 100, 0.05, rng)
    decision = fit_classifier(snapshot, ClassifierSettings(reject_below_threshold=False)).classify(between)
    assert np.mean(decision.reason == "small_margin") >= 0.8
    assert set(decision.best_label.tolist()) <= {"husky", "wolf"}
    permissive = ClassifierSettings(min_probability=0.0, min_margin=0.0, reject_below_threshold=False)
    assert np.all(fit_classifier(snapshot, permissive).classify(between).labels != None)  # noqa: E711


def test_indistinguishable_classes_are_not_sold_as_certain():
    rng = np.random.default_rng(14)
    shared, other = unit(rng.normal(size=(2, D)))
    memory = exemplars(around(shared, 15, 1.0, rng), "husky") + exemplars(
        around(shared, 15, 1.0, rng), "wolf"
    )
    memory += exemplars(around(other, 15, 1.0, rng), "cat")
    decision = fit_classifier(MemorySnapshot.from_exemplars(memory)).classify(around(shared, 200, 1.0, rng))
    assert set(decision.best_label.tolist()) <= {"husky", "wolf"}
    assert decision.probability.mean() < 0.65  # a coin flip: about 0.5, not near 1
    assert np.mean(decision.labels == None) >= 0.3  # noqa: E711 - many are refused outright


def test_negatives_lower_the_score_of_a_relabelled_away_class():
    rng = np.random.default_rng(5)
    car, truck = unit(rng.normal(size=(2, D)))
    van = unit(car + 0.9 * unit(rng.normal(size=D)))  # near "car", but annotators said "not car"
    memory = exemplars(around(car, 10, 0.5, rng), "car") + exemplars(around(truck, 10, 0.5, rng), "truck")
    memory += exemplars(around(van, 6, 0.3, rng), "car", "negative", annotation="fix")
    snapshot = MemorySnapshot.from_exemplars(memory)
    queries = around(van, 100, 0.3, rng)
    no_threshold = ClassifierSettings(reject_below_threshold=False)  # isolate the negatives' effect
    with_negatives = fit_classifier(snapshot, no_threshold)
    without = fit_classifier(snapshot, ClassifierSettings(reject_below_threshold=False, use_negatives=False))
    car_column = with_negatives.labels.index("car")
    penalised, plain = with_negatives.classify(queries), without.classify(queries)
    assert np.all(penalised.scores[:, car_column] < plain.scores[:, car_column] - 0.05)
    assert np.mean(plain.labels == "car") >= 0.8
    assert np.mean(penalised.labels == "car") == 0
    on_cars = with_negatives.classify(around(car, 100, 0.5, rng))
    assert np.mean(on_cars.labels == "car") >= 0.85  # far from the negatives: untouched


def test_allowed_labels_are_never_exceeded():
    snapshot, queries, _ = cluster_world(seed=6)
    fitted = fit_classifier(snapshot)
    vectors, truth = queries(40)
    decision = fitted.classify(vectors, allowed_labels={"c0", "c1", "not-in-memory"})
    assert set(decision.labels.tolist()) <= {"c0", "c1", None}
    assert set(decision.best_label.tolist()) <= {"c0", "c1"}
    assert np.all(decision.probs[:, 2:] == 0)
    assert np.mean(decision.best_label[truth == "c0"] == "c0") >= 0.95
    nothing = fitted.classify(vectors[:3], allowed_labels=["unknown-class"])
    assert nothing.reason.tolist() == ["empty_memory"] * 3
    with pytest.raises(ValueError, match="collection of labels"):
        fitted.classify(vectors, allowed_labels="c0")


@pytest.mark.parametrize(
    "memory",
    [[], exemplars(unit(np.random.default_rng(7).normal(size=(3, D))), None, "background")],
    ids=["empty", "background-only"],
)
def test_empty_memory_never_invents_a_class(memory):
    fitted = fit_classifier(MemorySnapshot.from_exemplars(memory))
    vectors = unit(np.random.default_rng(8).normal(size=(4, D)))
    decision = fitted.classify(vectors)
    assert fitted.labels == [] and decision.labels.tolist() == [None] * 4
    assert decision.reason.tolist() == ["empty_memory"] * 4 and decision.probs.shape == (4, 0)
    regions = make_levels(vectors[:3], proposal_score=[0.2, 0.9, 0.5])
    assert fitted.classify_regions(regions).labels.tolist() == [None] * 3
    assert fitted.choose_granularity(regions) == 1


def test_knn_handles_a_bimodal_class_where_the_mean_prototype_fails():
    rng = np.random.default_rng(9)
    front, side = unit(rng.normal(size=(2, D)))
    between = unit(front + side)  # another class sits exactly where the bimodal class's mean points
    memory = exemplars(np.concatenate([around(front, 10, 0.5, rng), around(side, 10, 0.5, rng)]), "bus")
    memory += exemplars(around(between, 20, 0.5, rng), "tram")
    snapshot = MemorySnapshot.from_exemplars(memory)
    queries = np.concatenate(
        [around(front, 50, 0.5, rng), around(side, 50, 0.5, rng), around(between, 100, 0.5, rng)]
    )
    truth = np.array(["bus"] * 100 + ["tram"] * 100, dtype=object)
    accuracy = {
        method: np.mean(
            fit_classifier(snapshot, ClassifierSettings(method=method)).classify(queries).best_label == truth
        )
        for method in ("prototype", "knn", "auto")
    }
    assert accuracy["prototype"] < 0.75
    assert accuracy["knn"] >= 0.95 and accuracy["auto"] >= 0.95
    # the prototype classifier knows it cannot separate them: it does not claim a label
    prototype = fit_classifier(snapshot, ClassifierSettings(method="prototype")).classify(queries)
    assert np.mean(prototype.labels != None) < 0.2  # noqa: E711


# -- vectorisation -------------------------------------------------------------------------------


def test_batched_and_chunked_scoring_match_one_by_one(monkeypatch):
    rng = np.random.default_rng(10)
    snapshot, queries, _ = cluster_world(seed=10, shots=12)
    memory = list(
        MemorySnapshot.from_exemplars(
            [
                Exemplar(*key, label, kind, vector)
                for key, label, kind, vector in zip(
                    snapshot.keys, snapshot.labels, snapshot.kinds, snapshot.vectors, strict=True
                )
            ]
        ).keys
    )
    assert len(memory) == len(snapshot)
    background = exemplars(unit(rng.normal(size=(5, D))), None, "background")
    negatives = exemplars(unit(rng.normal(size=(4, D))), "c1", "negative")
    full = MemorySnapshot(
        vectors=np.concatenate([snapshot.vectors] + [np.stack([e.vector for e in background + negatives])]),
        labels=list(snapshot.labels) + [e.label for e in background + negatives],
        kinds=list(snapshot.kinds) + [e.kind for e in background + negatives],
        keys=snapshot.keys + [e.key for e in background + negatives],
    )
    vectors = queries(7)[0]
    settings = ClassifierSettings(method="auto", knn_min_exemplars=5)
    whole = fit_classifier(full, settings)
    batch = whole.classify(vectors)
    single = [whole.classify(v[None]) for v in vectors]
    np.testing.assert_allclose(batch.probs, np.concatenate([s.probs for s in single]), rtol=1e-5, atol=1e-6)
    assert batch.labels.tolist() == [s.labels[0] for s in single]
    monkeypatch.setattr(classifier_module, "_CHUNK_ELEMENTS", 3 * full.vectors.shape[0])
    chunked = fit_classifier(full, settings)
    assert chunked.temperature == whole.temperature
    np.testing.assert_allclose(chunked.thresholds, whole.thresholds, rtol=1e-5)
    np.testing.assert_allclose(chunked.classify(vectors).probs, batch.probs, rtol=1e-5, atol=1e-6)


def test_leave_one_region_out_matches_brute_force():
    """Calibration scores each stored exemplar as if its region had never been stored."""
    snapshot, _, _ = cluster_world(seed=15, n_classes=3, shots=4)
    fitted = fit_classifier(snapshot)
    bank = fitted._bank
    rows = fitted._calibration_rows()
    sims = bank.matrix[rows] @ bank.matrix.T
    order = np.argsort(bank.groups, kind="stable")
    fitted._leave_region_out(sims, rows, (order, bank.groups[order]))
    for i, row in enumerate(rows):
        c = int(np.searchsorted(bank.pos_offsets, row - bank.pos_start, side="right") - 1)
        others = [
            r for r in range(bank.pos_start + bank.pos_offsets[c], bank.pos_start + bank.pos_offsets[c + 1])
        ]
        others.remove(row)
        prototype = bank.matrix[others].sum(axis=0)
        expected = np.array([bank.matrix[row] @ bank.matrix[k] for k in range(3)])
        expected[c] = bank.matrix[row] @ (prototype / np.linalg.norm(prototype))
        np.testing.assert_allclose(sims[i, :3], expected, atol=1e-5)
        assert sims[i, row] == -np.inf and np.isfinite(np.delete(sims[i], row)).all()


def test_large_memories_are_calibrated_on_a_stratified_subset():
    snapshot, queries, _ = cluster_world(seed=16, n_classes=4, shots=60)
    full = fit_classifier(snapshot)
    subset = fit_classifier(snapshot, ClassifierSettings(calibration_max_exemplars=100))
    assert subset.calibration_size < full.calibration_size
    assert subset.labels == full.labels and subset.threshold_learnt.all()
    assert subset.temperature == pytest.approx(full.temperature, rel=0.5)
    np.testing.assert_allclose(subset.thresholds, full.thresholds, atol=0.1)
    vectors, truth = queries(50)
    assert np.mean(subset.classify(vectors).best_label == truth) >= 0.95


def test_embedding_dimension_must_match_the_memory():
    snapshot, _, _ = cluster_world(seed=11, n_classes=2, shots=3)
    with pytest.raises(ValueError, match="dimension D = 32"):
        fit_classifier(snapshot).classify(np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        fit_classifier(snapshot).classify(np.ones(32, np.float32))


# -- regions and granularity ---------------------------------------------------------------------


def make_levels(vectors: np.ndarray, proposal_score) -> Regions:
    n = len(vectors)
    masks = np.zeros((n, 8, 8), bool)
    for i in range(n):
        masks[i, : i + 2, : i + 2] = True
    return Regions.from_masks(masks, proposal_score=proposal_score).with_(embeddings=vectors)


def test_classify_regions_fills_labels_scores_and_reasons_and_drops_unknowns_on_request():
    snapshot, _, outsiders = cluster_world(seed=12, noise=0.8)
    remembered = snapshot.vectors[[0, 10, 20]]  # one exemplar of c0, c1, c2: surely known
    vectors = np.concatenate([remembered, outsiders(2)])
    regions = make_levels(vectors, proposal_score=np.linspace(0.5, 0.9, 5))
    labelled = fit_classifier(snapshot).classify_regions(regions)
    known = labelled.labels != None  # noqa: E711
    assert labelled.labels.tolist()[:3] == ["c0", "c1", "c2"] and known.tolist()[3:] == [False, False]
    assert np.all(labelled.label_score[known] > 0.5) and np.all(labelled.label_score[~known] == 0)
    assert labelled.extra["reject_reason"].tolist()[3:] == ["below_threshold"] * 2
    assert labelled.extra["best_label"][3] is not None
    dropped = fit_classifier(snapshot, ClassifierSettings(unknown_policy="drop")).classify_regions(regions)
    assert dropped.ids.tolist() == regions.ids.tolist()[:3]
    with pytest.raises(ValueError, match="embeddings"):
        fit_classifier(snapshot).classify_regions(regions.with_(embeddings=None))


def test_granularity_follows_the_class_not_sam_confidence():
    rng = np.random.default_rng(13)
    wheel, car, street = unit(rng.normal(size=(3, D)))
    memory = exemplars(around(wheel, 8, 0.6, rng), "wheel") + exemplars(around(car, 8, 0.6, rng), "car")
    fitted = fit_classifier(MemorySnapshot.from_exemplars(memory))
    part, whole, group = around(wheel, 1, 0.3, rng)[0], around(car, 1, 0.3, rng)[0], street
    levels = make_levels(np.stack([part, whole, group]), proposal_score=[0.80, 0.85, 0.99])
    assert fitted.choose_granularity(levels) in (0, 1)
    assert fitted.choose_granularity(levels, allowed_labels=["wheel"]) == 0
    assert fitted.choose_granularity(levels, allowed_labels=["car"]) == 1
    unknown_only = make_levels(np.stack([street, street]), proposal_score=[0.3, 0.6])
    assert fitted.choose_granularity(unknown_only) == 1  # nothing matches: SAM's choice
    tied = make_levels(np.stack([part, part]), proposal_score=[0.3, 0.6])
    assert fitted.choose_granularity(tied) == 1  # equal probabilities: SAM's IoU breaks the tie
    with pytest.raises(ValueError, match="at least one"):
        fitted.choose_granularity(levels[np.zeros(3, bool)])


# -- centring and thresholds from few exemplars ------------------------------------------------


def offset_world(seed: int, n_classes: int = 4, shots: int = 6, common: float = 3.0):
    """Clusters sharing a strong common component (like post-ReLU CNN features): all cosines are
    high, the class information lives in small deviations."""
    rng = np.random.default_rng(seed)
    shared = unit(rng.normal(size=D))
    centers = unit(common * shared + unit(rng.normal(size=(n_classes + 1, D))))
    labels = [f"c{c}" for c in range(n_classes)]
    memory = []
    for c, label in enumerate(labels):
        memory += exemplars(around(centers[c], shots, 0.15, rng), label)
    return MemorySnapshot.from_exemplars(memory), centers, rng


def test_centre_is_the_shrunk_mean_of_class_means_and_applies_to_queries_too():
    snapshot, centers, rng = offset_world(seed=20)
    snapshot = MemorySnapshot.from_exemplars(
        [e for e in exemplars(snapshot.vectors, None, "background")[:2]]
        + [
            Exemplar(*key, label, "positive", v)
            for key, label, v in zip(snapshot.keys, snapshot.labels, snapshot.vectors, strict=True)
        ]
    )
    settings = ClassifierSettings(centring="classes", centring_prior=2.0)
    fitted = fit_classifier(snapshot, settings)
    groups = [
        snapshot.vectors[(snapshot.labels == label) & (snapshot.kinds == kind)]
        for label, kind in {
            (label, kind)
            for label, kind in zip(snapshot.labels.tolist(), snapshot.kinds.tolist(), strict=True)
        }
    ]
    expected = sum(g.astype(np.float64).mean(axis=0) for g in groups) / (len(groups) + 2.0)
    np.testing.assert_allclose(fitted.centre, expected, atol=1e-6)
    # scores are cosines of the centred, renormalised vectors: brute force against the prototypes
    queries = around(centers[0], 5, 0.15, rng)
    moved = unit(queries - expected)
    c0 = unit(snapshot.vectors[snapshot.labels == "c0"] - expected).sum(axis=0)
    scores = fitted.classify(queries).scores  # 6 positives per class: prototype scores ("auto")
    np.testing.assert_allclose(scores[:, 0], moved @ (c0 / np.linalg.norm(c0)), atol=1e-5)
    exemplar_mean = fit_classifier(snapshot, ClassifierSettings(centring="exemplars", centring_prior=0.0))
    np.testing.assert_allclose(exemplar_mean.centre, snapshot.vectors.mean(axis=0), atol=1e-6)
    assert not fit_classifier(snapshot, ClassifierSettings(centring="none")).centre.any()


def test_centring_removes_a_common_component_and_widens_class_gaps():
    snapshot, centers, rng = offset_world(seed=21)
    members = around(centers[1], 200, 0.15, rng)
    gaps = {}
    for centring in ("none", "classes"):
        fitted = fit_classifier(snapshot, ClassifierSettings(centring=centring))
        decision = fitted.classify(members)
        assert np.mean(decision.labels == "c1") >= 0.9
        ordered = np.sort(decision.scores, axis=1)
        gaps[centring] = float(np.median(ordered[:, -1] - ordered[:, -2]))
        prototypes = fitted._bank.matrix[: len(fitted.labels)]
        off_diagonal = (prototypes @ prototypes.T)[~np.eye(len(fitted.labels), dtype=bool)]
        gaps[centring + " prototype cosine"] = float(off_diagonal.mean())
    assert gaps["none prototype cosine"] > 0.8 and gaps["classes prototype cosine"] < 0.5
    assert gaps["classes"] > 2 * gaps["none"]


def test_one_exemplar_per_class_still_refuses_an_untaught_class():
    """No class has its own leave-one-out scores: the impostor bound (scores a class wins when a
    sample's own class is hidden) is the threshold."""
    rng = np.random.default_rng(22)
    centers = unit(rng.normal(size=(7, D)))
    memory = []
    for c in range(6):
        memory += exemplars(around(centers[c], 1, 0.6, rng), f"c{c}", annotation=f"a{c}")
    snapshot = MemorySnapshot.from_exemplars(memory)
    with_impostors = fit_classifier(snapshot)
    assert not with_impostors.threshold_learnt.any()
    without = fit_classifier(snapshot, ClassifierSettings(impostor_quantile=0.0))
    assert np.all(without.thresholds == without.settings.default_threshold)
    outsiders = around(centers[6], 200, 0.6, rng)
    members = np.concatenate([around(centers[c], 30, 0.6, rng) for c in range(6)])
    truth = np.repeat([f"c{c}" for c in range(6)], 30)
    refused = {
        name: np.mean(fitted.classify(outsiders).labels == None)  # noqa: E711
        for name, fitted in (("with", with_impostors), ("without", without))
    }
    assert refused["with"] >= 0.8 and refused["with"] > refused["without"] + 0.3
    decision = with_impostors.classify(members)
    labelled = decision.labels != None  # noqa: E711
    assert labelled.mean() >= 0.6 and np.mean(decision.labels[labelled] == truth[labelled]) >= 0.95


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="svm"), "method"),
        (dict(unknown_policy="hide"), "unknown_policy"),
        (dict(knn_k=0), "knn_k"),
        (dict(knn_temperature=0.0), "knn_temperature"),
        (dict(negative_sigma=-1.0), "negative_sigma"),
        (dict(threshold_quantile=0.0), "threshold_quantile"),
        (dict(min_margin=1.5), "min_margin"),
        (dict(min_probability=-0.1), "min_probability"),
        (dict(knn_weight=2.0), "knn_weight"),
        (dict(threshold_min_exemplars=1), "threshold_min_exemplars"),
        (dict(default_threshold=3.0), "default_threshold"),
        (dict(calibration_max_exemplars=0), "calibration_max_exemplars"),
        (dict(centring="median"), "centring"),
        (dict(centring_prior=-1.0), "centring_prior"),
        (dict(impostor_quantile=0.6), "impostor_quantile"),
    ],
)
def test_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierSettings(**kwargs)


def test_describe_is_json_able():
    snapshot, _, _ = cluster_world(seed=14, n_classes=2, shots=6)
    summary = fit_classifier(snapshot).describe()
    assert json.loads(json.dumps(summary))["exemplars_per_class"] == {"c0": 6, "c1": 6}
