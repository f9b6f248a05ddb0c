"""A real Label Studio 1.23 drives the real samsem service (``python -m backend``, tiny random models).

Both servers run as separate processes on loopback. The scenario goes through Label Studio's own
REST API only, the way an annotator's browser would, then looks at what Label Studio stored and at
the service's ``/metrics``:

1. project (Brush + Polygon + smart Rectangle + smart KeyPoint labels) and generated PNG uploads;
2. the backend connected with basic auth; the auto-created webhook given the shared secret header;
3. batch pre-annotation ("Retrieve predictions"): one valid prediction per task, at the image's size;
4. a smart keypoint: one mask that contains the click, labelled with the annotator's choice;
5. annotations created / updated / deleted reach the memory through the webhook; the model version
   moves and Label Studio re-predicts; "Start training" rebuilds the memory from Label Studio;
6. a predicted region relabelled in a new annotation teaches a negative exemplar (Label Studio
   leaves ``annotation.prediction`` empty: the service finds the prediction among the task's).

Run alone with ``.venv/bin/pytest -m e2e tests/e2e -x -s`` (``-s`` prints the timings).
"""

from __future__ import annotations

import copy
import io
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from . import label_studio as harness

LABELS = ("Disc", "Square")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Disc" background="#FF0000"/>
    <Label value="Square" background="#0000FF"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="Disc" background="#FF0000"/>
    <Label value="Square" background="#0000FF"/>
  </PolygonLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Disc" background="#FF0000"/>
    <Label value="Square" background="#0000FF"/>
  </RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Disc" smart="true" background="#FF0000"/>
    <Label value="Square" smart="true" background="#0000FF"/>
  </KeyPointLabels>
</View>"""
WEBHOOK_SECRET_HEADER = "X-Samsem-Webhook-Secret"
LEARNING_TIMEOUT_S = 180.0  # the first learning job also builds the models in the worker
# Random weights propose low-quality masks: keep every proposal; few prompt points for speed.
TINY_MODEL_SETTINGS = {
    "AUTO_POINTS_PER_SIDE": "8",
    "AUTO_PRED_IOU_THRESH": "0",
    "AUTO_STABILITY_SCORE_THRESH": "0",
}
REGION_TYPES = {"brushlabels": "brush", "polygonlabels": "poly", "rectanglelabels": "rect"}


# --------------------------------------------------------------------------- generated images


@dataclass(frozen=True)
class Scene:
    """A generated PNG: a red disc and a blue square on a noisy grey background.

    Attributes:
        name: upload file name.
        png: the encoded image.
        width, height: size in pixels.
        masks: label -> ``(height, width) bool`` mask of that object (row = y, column = x).
        disc_centre: ``(x, y)`` pixel of the disc's centre (column, row).
    """

    name: str
    png: bytes
    width: int
    height: int
    masks: dict[str, np.ndarray]
    disc_centre: tuple[int, int]


def make_scene(
    name: str, width: int, height: int, *, disc: tuple[int, int, int], square: tuple[int, int, int], seed: int
) -> Scene:
    """Draw a scene. ``disc`` = (centre x, centre y, radius) and ``square`` = (x0, y0, side), in pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(150.0, 12.0, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    cx, cy, radius = disc
    disc_mask = (cols + 0.5 - cx) ** 2 + (rows + 0.5 - cy) ** 2 <= radius**2
    x0, y0, side = square
    square_mask = (cols >= x0) & (cols < x0 + side) & (rows >= y0) & (rows < y0 + side)
    pixels[disc_mask] = (220, 30, 30)
    pixels[square_mask] = (30, 40, 210)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    masks = {"Disc": disc_mask, "Square": square_mask}
    return Scene(name, encoded.getvalue(), width, height, masks, (cx, cy))


SCENES = (
    make_scene("scene0.png", 96, 64, disc=(28, 30, 14), square=(56, 18, 24), seed=0),
    make_scene("scene1.png", 96, 64, disc=(66, 36, 12), square=(10, 12, 20), seed=1),
    make_scene("scene2.png", 80, 72, disc=(20, 50, 13), square=(44, 10, 26), seed=2),
)


# --------------------------------------------------------------------------- Label Studio JSON


def brush_region(region_id: str, mask: np.ndarray, label: str) -> dict:
    """An annotator's brush region (``brushlabels`` RLE at the mask's size)."""
    height, width = mask.shape
    rle = brush.mask2rle(mask.astype(np.uint8) * 255)
    return {
        "id": region_id,
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": [int(value) for value in rle], "brushlabels": [label]},
    }


def annotation_result(scene: Scene, prefix: str, labels: tuple[str, ...]) -> list[dict]:
    """Brush regions of ``scene`` for the given objects, each labelled with its true class."""
    return [brush_region(f"{prefix}-{label.lower()}", scene.masks[label], label) for label in labels]


def keypoint_context(scene: Scene, label: str) -> dict:
    """The smart-keypoint context a browser sends for a click at the disc's centre (percent coords)."""
    x, y = scene.disc_centre
    return {
        "result": [
            {
                "id": "click1",
                "from_name": "kp",
                "to_name": "image",
                "type": "keypointlabels",
                "origin": "manual",
                "original_width": scene.width,
                "original_height": scene.height,
                "image_rotation": 0,
                "is_positive": True,
                "value": {
                    "x": 100.0 * (x + 0.5) / scene.width,
                    "y": 100.0 * (y + 0.5) / scene.height,
                    "width": 0.6,
                    "keypointlabels": [label],
                },
            }
        ]
    }


def decode_brush(region: dict) -> np.ndarray:
    """``(original_height, original_width) bool`` mask of a brush result; fails if the RLE size differs."""
    height, width = region["original_height"], region["original_width"]
    rgba = np.asarray(brush.decode_rle(region["value"]["rle"]))
    assert rgba.size == height * width * 4, (
        f"brush region {region['id']}: RLE decodes to {rgba.size} values, expected {height}x{width}x4"
    )
    return rgba.reshape(height, width, 4)[:, :, 3] > 127


def region_labels(region: dict) -> list[str]:
    """The labels of a result region (``value[<type>]``)."""
    return list(region["value"].get(region["type"], []))


def check_prediction(prediction: dict, scene: Scene, interface: LabelInterface) -> list[dict]:
    """Assert a prediction is valid for the config and drawn at the scene's size; return its regions."""
    assert isinstance(prediction.get("model_version"), str), prediction.get("model_version")
    assert prediction["model_version"].startswith("samsem"), prediction["model_version"]
    assert isinstance(prediction.get("score"), (int, float)), prediction.get("score")
    result = prediction["result"]
    errors = interface.validate_prediction(
        {"result": result, "score": prediction["score"], "model_version": prediction["model_version"]},
        return_errors=True,
    )
    assert errors == [], f"prediction for {scene.name} is not valid for the label config: {errors}"
    ids = [region["id"] for region in result]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids), f"region ids: {ids}"
    for region in result:
        assert REGION_TYPES.get(region["type"]) == region["from_name"], (region["type"], region["from_name"])
        assert (region["original_width"], region["original_height"]) == (scene.width, scene.height), (
            f"{scene.name}: region {region['id']} is drawn for {region['original_width']}x"
            f"{region['original_height']}, the image is {scene.width}x{scene.height}"
        )
        assert set(region_labels(region)) <= set(LABELS), region_labels(region)
        if region["type"] == "brushlabels":
            decode_brush(region)
    return result


def scene_of_path(path: str) -> Scene:
    """The scene a task's uploaded file came from (Label Studio prefixes the file name with a hash)."""
    matches = [scene for scene in SCENES if path.endswith(f"-{scene.name}")]
    assert len(matches) == 1, f"task image {path!r} matches scenes {[scene.name for scene in matches]}"
    return matches[0]


def describe_prediction(prediction: dict) -> str:
    """One line for the log: region count per type and the labels given, e.g. ``brushlabels: 3 [Disc]``."""
    by_type: dict[str, list[str]] = {}
    for region in prediction["result"]:
        by_type.setdefault(region["type"], []).extend(region_labels(region))
    counts = Counter(region["type"] for region in prediction["result"])
    parts = [f"{kind}: {counts[kind]} {sorted(set(labels))}" for kind, labels in sorted(by_type.items())]
    return f"{prediction['model_version']} score {prediction['score']:.3f} | " + (
        "; ".join(parts) or "no regions"
    )


def project_uid(project: dict) -> str:
    """``"<id>.<created timestamp>"``: how Label Studio names the project to ``/setup`` and ``/predict``."""
    created = datetime.fromisoformat(project["created_at"].replace("Z", "+00:00"))
    return f"{project['id']}.{int(created.timestamp())}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def steps() -> harness.StepRunner:
    """The module's step runner; prints every step's duration at the end."""
    runner = harness.StepRunner()
    yield runner
    print(f"\nend-to-end timings:\n{runner.summary()}")


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Throwaway directory for logs, Label Studio's data and the backend's MODEL_DIR."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def label_studio(steps: harness.StepRunner, e2e_dir: Path) -> harness.LabelStudioServer:
    """A running Label Studio (installed on first use); stopped, with all its processes, at the end."""
    with steps.step("install label-studio"):
        venv = harness.label_studio_venv_path()
        install = harness.ensure_label_studio(venv, log_path=e2e_dir / "install.log")
        print(
            f"\nlabel-studio {install.version} in {install.venv} "
            f"({'reused' if install.reused else 'installed'}, {install.seconds:.1f} s)"
        )
    with steps.step("start label-studio"):
        server = harness.start_label_studio(
            install, e2e_dir / "label-studio-data", log_path=e2e_dir / "label-studio.log"
        )
    steps.watch(server.process)
    yield server
    left = server.process.stop()
    assert left == [], f"Label Studio processes still alive after SIGKILL: {left}"


@pytest.fixture(scope="module")
def backend(
    steps: harness.StepRunner, e2e_dir: Path, label_studio: harness.LabelStudioServer
) -> harness.BackendServer:
    """The samsem service pointed at ``label_studio``; stopped, with its workers, at the end."""
    with steps.step("start samsem backend"):
        server = harness.start_samsem_backend(
            label_studio,
            e2e_dir / "backend",
            log_path=e2e_dir / "backend.log",
            extra_env=TINY_MODEL_SETTINGS,
        )
    steps.watch(server.process)
    yield server
    left = server.process.stop()
    assert left == [], f"backend processes still alive after SIGKILL: {left}"


@pytest.fixture(scope="module")
def ls_client(label_studio: harness.LabelStudioServer) -> harness.LabelStudioClient:
    """REST client of the running Label Studio, authenticated with its legacy token."""
    return harness.LabelStudioClient(label_studio.url, label_studio.token)


# --------------------------------------------------------------------------- tests


@pytest.mark.e2e
def test_label_studio_serves_uploads_only_with_its_token(
    steps: harness.StepRunner, ls_client: harness.LabelStudioClient
) -> None:
    """The harness alone: a project with uploads, whose files need the token (so the backend must send it)."""
    with steps.step("harness: project + upload"):
        project = ls_client.create_project("e2e-uploads", LABEL_CONFIG)
        ls_client.import_files(project["id"], {SCENES[0].name: SCENES[0].png})
        tasks = ls_client.tasks(project["id"])
        assert len(tasks) == 1, tasks
        path = tasks[0]["data"]["image"]
        assert path.startswith("/data/upload/") and path.endswith(SCENES[0].name), path
    with steps.step("harness: uploads need the token"):
        anonymous = ls_client.download(path, authenticated=False)
        assert anonymous.status_code in (301, 302, 401, 403), (anonymous.status_code, anonymous.text[:200])
        with_token = ls_client.download(path)
        assert with_token.status_code == 200, (with_token.status_code, with_token.text[:200])
        assert Image.open(io.BytesIO(with_token.content)).size == (SCENES[0].width, SCENES[0].height)


@pytest.mark.e2e
def test_label_studio_drives_samsem_backend(
    steps: harness.StepRunner, ls_client: harness.LabelStudioClient, backend: harness.BackendServer
) -> None:
    """The whole annotator loop through Label Studio's API against the real service."""
    interface = LabelInterface(LABEL_CONFIG)
    service = harness.BackendClient(backend)
    drive_started = time.monotonic()

    with steps.step("backend requires basic auth"):
        assert service.get("/health", authenticated=False).status_code == 401
        assert service.get("/health").json()["status"] == "UP"

    with steps.step("create project and upload images"):
        project = ls_client.create_project("e2e-samsem", LABEL_CONFIG)
        project_id = project["id"]
        ls_client.import_files(project_id, {scene.name: scene.png for scene in SCENES})
        tasks = ls_client.tasks(project_id)
        assert len(tasks) == len(SCENES), tasks
        scene_of = {task["id"]: scene_of_path(task["data"]["image"]) for task in tasks}
        task_of = {scene.name: task_id for task_id, scene in scene_of.items()}

    with steps.step("connect backend with basic auth"):
        with pytest.raises(harness.ApiError) as refused:
            ls_client.connect_ml_backend(
                project_id, backend.url, title="wrong password", basic_auth=(backend.user, "not-the-password")
            )
        assert refused.value.status == 400 and "authentication" in refused.value.body, refused.value
        ml = ls_client.connect_ml_backend(project_id, backend.url, title="samsem", basic_auth=backend.auth)
        ml_id = ml["id"]
        first_version = ls_client.ml_backend(ml_id)["model_version"]
        assert isinstance(first_version, str) and first_version.startswith("samsem"), first_version

    with steps.step("add the webhook secret header"):
        webhook_url = f"{backend.url}/webhook"
        hooks = [hook for hook in ls_client.webhooks(project_id) if hook["url"] == webhook_url]
        secret = {WEBHOOK_SECRET_HEADER: backend.webhook_secret}
        if hooks:
            webhook = ls_client.update_webhook(hooks[0]["id"], headers=secret)
        else:
            webhook = ls_client.create_webhook(project_id, webhook_url, secret)
        assert webhook["headers"] == secret and webhook["send_payload"] and webhook["is_active"], webhook

    with steps.step("batch predictions with an empty memory"):
        ls_client.retrieve_predictions(project_id, list(scene_of))
        for task_id, scene in scene_of.items():
            predictions = ls_client.predictions(task_id)
            assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions stored, expected 1"
            assert predictions[0]["model_version"] == first_version, predictions[0]["model_version"]
            regions = check_prediction(predictions[0], scene, interface)
            print(f"\n  {scene.name}: {describe_prediction(predictions[0])}", end="")
            invented = [region_labels(region) for region in regions if region_labels(region)]
            assert invented == [], f"empty memory, yet {scene.name} got labels {invented}"
            # masks are still proposed (unlabelled), so the brush RLE really went through LS
            assert any(region["type"] == "brushlabels" for region in regions), f"{scene.name}: no brush mask"

    with steps.step("interactive smart keypoint"):
        scene = SCENES[1]
        answer = ls_client.interactive_annotating(ml_id, task_of[scene.name], keypoint_context(scene, "Disc"))
        assert "errors" not in answer and "data" in answer, answer
        regions = check_prediction(answer["data"], scene, interface)
        brushes = [region for region in regions if region["type"] == "brushlabels"]
        assert len(brushes) == 1, f"expected one brush mask, got {[r['type'] for r in regions]}"
        x, y = scene.disc_centre
        assert decode_brush(brushes[0])[y, x], f"the mask does not contain the click at pixel ({x}, {y})"
        assert region_labels(brushes[0]) == ["Disc"], region_labels(brushes[0])

    def wait_for_counts(expected: dict[str, int], what: str) -> None:
        harness.wait_until(
            lambda: service.exemplar_counts(project_id),
            lambda counts: counts == expected,
            timeout=LEARNING_TIMEOUT_S,
            what=f"samsem_exemplars = {expected} after {what}",
        )

    with steps.step("learning: annotations created"):
        scene_a, scene_b, scene_c = SCENES
        task_a, task_b, task_c = (task_of[scene.name] for scene in SCENES)
        annotation_a = ls_client.create_annotation(task_a, annotation_result(scene_a, "a", LABELS))
        annotation_b = ls_client.create_annotation(task_b, annotation_result(scene_b, "b", ("Disc",)))
        wait_for_counts({"Disc": 2, "Square": 1}, "creating two annotations")

    with steps.step("learning: annotation updated"):
        ls_client.update_annotation(annotation_b["id"], annotation_result(scene_b, "b", LABELS))
        wait_for_counts({"Disc": 2, "Square": 2}, "adding a Square region to an annotation")

    with steps.step("learning: annotation deleted"):
        ls_client.delete_annotation(annotation_a["id"])
        wait_for_counts({"Disc": 1, "Square": 1}, "deleting an annotation")

    with steps.step("model version moved"):
        version_now = service.setup(project_uid(project), LABEL_CONFIG)
        assert version_now != first_version, f"model_version is still {first_version} after learning"

    with steps.step("Label Studio re-predicts with the new version"):
        ls_client.retrieve_predictions(project_id, list(scene_of))
        assert ls_client.ml_backend(ml_id)["model_version"] == version_now
        learnt_labels: set[str] = set()
        for task_id, scene in scene_of.items():
            predictions = ls_client.predictions(task_id)
            assert [p["model_version"] for p in predictions] == [first_version, version_now], (
                f"task {task_id}: stored versions {[p['model_version'] for p in predictions]}"
            )
            regions = check_prediction(predictions[-1], scene, interface)
            print(f"\n  {scene.name}: {describe_prediction(predictions[-1])}", end="")
            learnt_labels |= {label for region in regions for label in region_labels(region)}
        assert learnt_labels, "the memory holds Disc and Square, yet no predicted region got a label"

    with steps.step("start training rebuilds the memory from Label Studio"):
        trainings_before = service.learn_jobs("train")
        # An annotation made while the webhook is off never reaches the service by itself...
        ls_client.update_webhook(webhook["id"], is_active=False)
        ls_client.create_annotation(task_c, annotation_result(scene_c, "c", LABELS))
        ls_client.update_webhook(webhook["id"], is_active=True)
        # ...but "Start training" rebuilds the memory from every labelled task: B and C.
        ls_client.train(ml_id)
        harness.wait_until(
            lambda: (service.learn_jobs("train"), service.exemplar_counts(project_id)),
            lambda seen: seen == (trainings_before + 1, {"Disc": 2, "Square": 2}),
            timeout=LEARNING_TIMEOUT_S,
            what="one more finished training job and samsem_exemplars = {'Disc': 2, 'Square': 2}",
        )

    with steps.step("learning: a relabelled prediction teaches a negative"):
        # Label Studio leaves annotation.prediction empty (its model-version setting is the backend's
        # title): the service finds the prediction the annotator corrected among the task's own.
        labelled = [
            (task_id, region)
            for task_id in scene_of
            for region in ls_client.predictions(task_id)[-1]["result"]
            if region["type"] == "brushlabels" and region_labels(region)
        ]
        assert labelled, "the re-predicted tasks hold no labelled brush region"
        task_id, region = labelled[0]
        served_label = region_labels(region)[0]
        other = next(label for label in LABELS if label != served_label)
        relabelled = copy.deepcopy(region)
        relabelled["value"]["brushlabels"] = [other]
        relabelled["origin"] = "prediction-changed"
        kinds_before = service.exemplar_kinds(project_id)
        ls_client.create_annotation(task_id, [relabelled])
        # a negative for the served label (and for the other served labelled regions, left out of
        # the annotation: deleted); without the served prediction only the positive is learnt
        harness.wait_until(
            lambda: service.exemplar_kinds(project_id),
            lambda kinds: (
                kinds.get("positive", 0) > kinds_before.get("positive", 0)
                and kinds.get("negative", 0) > kinds_before.get("negative", 0)
            ),
            timeout=LEARNING_TIMEOUT_S,
            what=f"more positive and negative exemplars ({served_label} -> {other}) than {kinds_before}",
        )

    steps.timings["drive (total)"] = time.monotonic() - drive_started


# ------------------------------------------------------------- the harness itself (fast, no servers)


def test_venv_location_defaults_to_repo_and_follows_the_env_var() -> None:
    assert harness.label_studio_venv_path({}) == harness.REPO_ROOT / ".venv-labelstudio"
    assert harness.label_studio_venv_path({"LABEL_STUDIO_VENV": "/opt/ls-venv"}) == Path("/opt/ls-venv")


@pytest.mark.parametrize(("raw", "expected"), [(None, 300.0), ("120", 120.0), ("45.5", 45.5)])
def test_start_timeout_defaults_to_300_s(raw: str | None, expected: float) -> None:
    env = {} if raw is None else {"LABEL_STUDIO_START_TIMEOUT": raw}
    assert harness.label_studio_start_timeout(env) == expected


@pytest.mark.parametrize("raw", ["soon", "0", "-5"])
def test_start_timeout_rejects_what_is_not_a_positive_number(raw: str) -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_START_TIMEOUT.*positive"):
        harness.label_studio_start_timeout({"LABEL_STUDIO_START_TIMEOUT": raw})


def test_install_never_overwrites_a_directory_that_is_not_a_virtualenv(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(harness.HarnessError, match="not a virtualenv"):
        harness.ensure_label_studio(tmp_path, log_path=tmp_path / "install.log")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def sleepers(tmp_path: Path, script: str) -> harness.ManagedProcess:
    """A shell whose two background ``sleep`` children share its process group."""
    return harness.ManagedProcess(
        "sleepers",
        ["/bin/sh", "-c", script],
        env=harness.base_environment(tmp_path),
        cwd=tmp_path,
        log_path=tmp_path / "sleepers.log",
    ).start()


@pytest.mark.parametrize(
    "script",
    ["sleep 60 & sleep 60 & wait", 'trap "" TERM; sleep 60 & sleep 60 & wait'],
    ids=["obeys-sigterm", "ignores-sigterm"],
)
def test_stop_ends_the_whole_process_group(tmp_path: Path, script: str) -> None:
    process = sleepers(tmp_path, script)
    harness.wait_until(
        lambda: len(harness.process_group_members(process.pid)),
        lambda count: count == 3,
        timeout=10,
        what="the shell and its two sleeps",
    )
    assert process.stop(grace=1.0) == []
    assert harness.process_group_members(process.pid) == []
    assert not process.running


def test_waiting_for_a_server_that_exits_fails_at_once_with_its_exit_code(tmp_path: Path) -> None:
    process = sleepers(tmp_path, "echo cannot bind; exit 3")
    with pytest.raises(harness.HarnessError, match="exited with code 3"):
        harness.wait_for_http(f"http://127.0.0.1:{harness.free_port()}/health", timeout=30, process=process)
    assert "cannot bind" in process.log_tail()
    assert process.stop() == []


def test_a_failing_step_reports_the_step_the_error_and_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("booting\nbooting\nready\nERROR upstream refused\n")
    runner = harness.StepRunner()
    runner.watch(harness.ManagedProcess("server", ["true"], env={}, cwd=tmp_path, log_path=log))
    with pytest.raises(pytest.fail.Exception) as failed, runner.step("connect backend"):
        raise harness.ApiError("POST", "http://127.0.0.1:1/api/ml", 400, "health check failed")
    report = str(failed.value)
    assert "step 'connect backend' failed" in report
    assert "POST http://127.0.0.1:1/api/ml -> HTTP 400: health check failed" in report
    assert "booting\nready\nERROR upstream refused" in report  # doubled lines collapsed
    assert "connect backend" in runner.timings
