"""Concurrency: many threads of predictions and webhooks for several projects at once.

* Predictions made by 6 threads at once (batches of mixed tasks, interactive clicks) equal the
  ones made one at a time: no image, mask or region is mixed up between requests.
* Webhooks of 3 projects, sent in a shuffled order by several threads to two service instances
  sharing one MODEL_DIR (like two gunicorn workers) while predictions run, leave the store equal
  to f(final annotations): every expected exemplar present with its label and with the vector a
  fresh rebuild computes, none lost, none left over.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import numpy as np
import pytest

from backend.app import create_app
from backend.runtime import Runtime
from samsem_plugin.memory import Exemplar
from samsem_plugin.store import ExemplarStore
from tests.conftest import API_TOKEN, tiny_settings
from tools.soak import (
    FakeLabelStudio,
    World,
    expected_exemplars,
    positive_labels,
    predict_body,
    setup_body,
    start_training_body,
    webhook_body,
)

THREADS = 6
REQUESTS_PER_THREAD = 4
SPACE = "test_vit@random"


@pytest.fixture(scope="module")
def world():
    return World(projects=3, tasks_per_project=4, events=60, seed=5)


@pytest.fixture(scope="module")
def label_studio_for(world):
    fake = FakeLabelStudio(world, token=API_TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
def make_instance(tiny_models, label_studio_for, tmp_path):
    """``make_instance(model_dir) -> (test client, runtime)``: one service instance (a "worker")."""
    made: list[Runtime] = []

    def make(model_dir):
        settings = tiny_settings(model_dir, label_studio_for.url)
        runtime = Runtime(settings, models_factory=lambda _settings: tiny_models)
        made.append(runtime)
        return create_app(settings, runtime), runtime

    yield make
    for runtime in made:
        runtime.close()


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(number)`` on ``count`` threads at once; re-raise the first failure."""
    failures: list[BaseException] = []
    start = threading.Barrier(count)

    def target(number: int) -> None:
        try:
            start.wait(timeout=30)
            work(number)
        except BaseException as error:  # reported below, in the test's thread
            failures.append(error)

    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if failures:
        raise failures[0]


def geometry(prediction: dict) -> list:
    """The regions of a prediction without their ids: control, size and mask / shape."""
    return [
        (r["from_name"], r["original_width"], r["original_height"], r["type"], r["value"].get("rle"))
        for r in prediction["result"]
    ]


def clear_caches(runtime: Runtime) -> None:
    """Empty every cache, so the next predictions compute (shared session models: only slower)."""
    models = runtime.models
    for cache in (
        runtime.fetcher.cache,
        models.proposer.cache,
        models.embedder.cache,
        models.pipeline.proposal_cache,
    ):
        cache.clear()


def test_parallel_predictions_equal_the_sequential_ones(world, make_instance, tmp_path):
    app, runtime = make_instance(tmp_path / "predict")
    tasks = world.all_tasks()[:4]  # one of each image size
    assert len({task.size for task in tasks}) == 4
    assert app.test_client().post("/setup", json=setup_body(tasks[0].project)).status_code == 200

    def ask(body: dict) -> list[dict]:
        response = app.test_client().post("/predict", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)[:300]
        return response.get_json()["results"]

    batches: list[tuple[int, dict]] = []
    clicks: list[tuple[int, list]] = []
    lock = threading.Lock()

    def work(number: int) -> None:
        rng = random.Random(number)
        for _ in range(REQUESTS_PER_THREAD):
            chosen = rng.sample(tasks, k=rng.randint(1, 3))
            if rng.random() < 0.3:
                (prediction,) = ask(predict_body(chosen[0], interactive=True))
                with lock:
                    clicks.append((chosen[0].task_id, geometry(prediction)))
            else:
                body = predict_body(chosen[0])
                body["tasks"] = [task.record() for task in chosen]
                answers = ask(body)
                assert len(answers) == len(chosen)
                with lock:
                    batches.extend(
                        (task.task_id, prediction) for task, prediction in zip(chosen, answers, strict=True)
                    )

    clear_caches(runtime)
    run_threads(THREADS, work)  # cold caches: images fetched, encoded and embedded concurrently
    clear_caches(runtime)
    batch_reference = {task.task_id: ask(predict_body(task))[0] for task in tasks}
    click_reference = {task.task_id: geometry(ask(predict_body(task, interactive=True))[0]) for task in tasks}
    assert all(prediction["result"] for prediction in batch_reference.values())
    assert batches and clicks
    for task_id, prediction in batches:
        assert prediction == batch_reference[task_id], f"task {task_id}: mixed up under concurrency"
    for task_id, regions in clicks:
        assert regions == click_reference[task_id], f"task {task_id}: click mixed up under concurrency"


def stored_rows(runtime: Runtime) -> dict[str, dict]:
    """``{project: {(task, annotation, region): (label, kind, vector)}}`` from the store."""
    rows: dict[str, dict] = {}
    for project, space in runtime.store.projects():
        if space == SPACE:
            rows[project] = {
                e.key: (e.label, e.kind, e.vector) for e in runtime.store.exemplars(project, space)
            }
    return {project: exemplars for project, exemplars in rows.items() if exemplars}


def test_parallel_webhooks_on_two_workers_leave_memory_equal_to_f_of_annotations(
    world, make_instance, label_studio_for, tmp_path
):
    shared = tmp_path / "shared_model_dir"
    workers = [make_instance(shared), make_instance(shared)]
    for app, _ in workers:
        for project in world.projects:
            assert app.test_client().post("/setup", json=setup_body(project)).status_code == 200
    events = list(world.events)
    random.Random(7).shuffle(events)  # out of order: late creations, updates after deletions...
    cursor = iter(events)
    lock = threading.Lock()
    tasks = world.all_tasks()

    def work(number: int) -> None:
        rng = random.Random(100 + number)
        for _ in range(200):
            app, _ = workers[rng.randrange(2)]
            if number % 3 == 2:  # a third of the threads predict meanwhile
                if rng.random() < 0.1 and all(r.queue.qsize() == 0 for _, r in workers):
                    return
                response = app.test_client().post("/predict", json=predict_body(rng.choice(tasks)))
                assert response.status_code == 200
                continue
            with lock:
                event = next(cursor, None)
            if event is None:
                return
            response = app.test_client().post("/webhook", json=webhook_body(event))
            assert response.status_code == 200, response.get_data(as_text=True)[:300]

    run_threads(THREADS, work)
    for _, runtime in workers:
        assert runtime.queue.join(timeout=120)
        assert runtime.queue.failed == 0
    stored = stored_rows(workers[0][1])
    expected = {project: rows for project, rows in expected_exemplars(world.events).items() if rows}
    assert {
        project: positive_labels({k: v[:2] for k, v in rows.items()}) for project, rows in stored.items()
    } == (expected), "every exemplar of the final annotations is stored once, with its label; nothing else"
    assert sum(len(rows) for rows in expected.values()) >= 20

    reference_app, reference = make_instance(tmp_path / "reference")
    for project in world.projects:
        response = reference_app.test_client().post("/webhook", json=start_training_body(project))
        assert response.status_code == 200
    assert reference.queue.join(timeout=120) and reference.queue.failed == 0
    rebuilt = stored_rows(reference)
    assert rebuilt.keys() == stored.keys()
    for project, rows in stored.items():
        assert rows.keys() == rebuilt[project].keys()
        for key, (label, kind, vector) in rows.items():
            assert (label, kind) == rebuilt[project][key][:2]
            np.testing.assert_allclose(vector, rebuilt[project][key][2], atol=1e-5, err_msg=str(key))


def exemplar(annotation: str, region: str, label: str = "Cat") -> Exemplar:
    vector = np.random.default_rng(abs(hash((annotation, region))) % 2**32).normal(size=8).astype(np.float32)
    return Exemplar("t1", annotation, region, label, "positive", vector / np.linalg.norm(vector))


V1, V2, V3 = "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z"
INTERLEAVINGS = {
    # what each of two workers wrote, in the order the store saw it -> region ids left
    "deleted, then a late cancel, then an update": (
        [("remove", None), ("remove", V1), ("replace", V2)],
        set(),
    ),
    "an update, then an older cancel": ([("replace", V2), ("remove", V1)], {"v2"}),
    "a cancel, then an older update": ([("remove", V2), ("replace", V1)], set()),
    "two updates, then the first replayed": ([("replace", V1), ("replace", V2), ("replace", V1)], {"v2"}),
    "a cancel, then a newer update": ([("remove", V1), ("replace", V3)], {"v3"}),
}


@pytest.mark.parametrize("case", INTERLEAVINGS)
def test_what_two_workers_write_in_any_order_leaves_the_newest_state(tmp_path, case):
    writes, expected = INTERLEAVINGS[case]
    stores = [ExemplarStore(tmp_path), ExemplarStore(tmp_path)]  # two connections, like two workers
    try:
        for number, (operation, version) in enumerate(writes):
            store = stores[number % 2]
            if operation == "remove":
                store.remove_annotation("p", SPACE, "a1", updated_at=version)
            else:
                region = {V1: "v1", V2: "v2", V3: "v3"}[version]
                store.replace_annotation("p", SPACE, "t1", "a1", [exemplar("a1", region)], updated_at=version)
        assert {e.region for e in stores[0].exemplars("p", SPACE)} == expected
    finally:
        for store in stores:
            store.close()
