"""Shared test fixtures: tiny real models, Label Studio payload fixtures, a loopback "Label Studio"
serving task images behind a token, and app/runtime factories.

Models are the real code paths with random weights (``tiny-random`` SAM, timm ``test_vit``), built
once per test session; no network, no downloaded weights.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from tests.support import FIXTURES
from tests.support.http_server import LoopbackHTTPServer, RecordedRequest, Response

API_TOKEN = "test-legacy-token-0123456789"
IMAGE_SIZE = (48, 64)
"""(H, W) of the images behind the fixture payloads (their brush RLEs are 64 x 48)."""


# -- Label Studio payload fixtures ---------------------------------------------------------------


def load_fixture(name: str) -> dict[str, Any]:
    """A deep copy of the fixture body ``name`` (with or without ``.json``)."""
    path = FIXTURES / (name if name.endswith(".json") else f"{name}.json")
    return copy.deepcopy(json.loads(path.read_text()))


def fixture_names() -> list[str]:
    return sorted(path.stem for path in FIXTURES.glob("*.json"))


LABEL_CONFIG = load_fixture("setup")["schema"]


# -- images --------------------------------------------------------------------------------------


def scene_image(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """A ``(H, W, 3) uint8`` scene: textured background, a red disc and a blue square."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = (rng.integers(90, 140, size=(h, w, 3))).astype(np.uint8)
    rows, cols = np.mgrid[:h, :w]
    cy, cx, r = h * 0.35, w * 0.3, min(h, w) * 0.22
    image[(rows - cy) ** 2 + (cols - cx) ** 2 < r**2] = (220, 30, 30)
    y0, x0 = int(h * 0.5), int(w * 0.6)
    image[y0 : y0 + h // 3, x0 : x0 + w // 4] = (30, 40, 220)
    return image


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


FIXTURE_IMAGE_PATHS = (
    "/data/upload/6/46e4d7be-m0.png",
    "/data/upload/6/7244171f-m1.png",
    "/data/upload/6/e1d671da-m2.png",
    "/data/upload/1/421b84f1-img2.png",
)


class FakeLabelStudio:
    """A loopback HTTP server playing Label Studio: task images (and API answers) behind
    ``Authorization: Token <API_TOKEN>``; anything else answers 401. ``/api/predictions/?task=ID``
    answers ``predictions[ID]`` (``[]`` for a task without any)."""

    def __init__(self) -> None:
        self.server = LoopbackHTTPServer()
        self.images: dict[str, np.ndarray] = {}
        self.predictions: dict[int, list[dict]] = {}
        self.add_route("/api/predictions/", self._predictions_of_task)

    def _predictions_of_task(self, request: RecordedRequest) -> Response:
        task = int(parse_qs(urlsplit(request.path).query)["task"][0])
        body = json.dumps(self.predictions.get(task, [])).encode()
        return Response(body=body, headers={"Content-Type": "application/json"})

    def add_image(self, path: str, image: np.ndarray) -> str:
        self.images[path] = image
        self.add_route(path, Response(body=png_bytes(image), headers={"Content-Type": "image/png"}))
        return path

    def add_json(self, path: str, payload: Any) -> None:
        self.add_route(
            path, Response(body=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        )

    def add_route(self, path: str, response: Response | Callable[[RecordedRequest], Response]) -> None:
        def guarded(request: RecordedRequest) -> Response:
            if request.header("Authorization") != f"Token {API_TOKEN}":
                return Response(
                    status=401, body=b'{"detail": "Authentication credentials were not provided."}'
                )
            return response(request) if callable(response) else response

        self.server.routes[path] = guarded

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return self.server.requests_to(path)

    @property
    def url(self) -> str:
        return self.server.base_url


@pytest.fixture(scope="session")
def label_studio() -> Iterator[FakeLabelStudio]:
    """One fake Label Studio for the session, serving every fixture task image (64 x 48)."""
    fake = FakeLabelStudio()
    fake.server.start()
    for seed, path in enumerate(FIXTURE_IMAGE_PATHS):
        fake.add_image(path, scene_image(seed))
    try:
        yield fake
    finally:
        fake.server.stop()


# -- settings, models, runtime, app --------------------------------------------------------------


TINY_ENV = {
    "SAM_MODEL_TYPE": "tiny-random",
    "EMBEDDER_MODEL": "test_vit",
    "EMBEDDER_WEIGHTS": "random",
    "DEVICE": "cpu",
    "AUTO_POINTS_PER_SIDE": "4",
    "AUTO_POINTS_PER_BATCH": "16",
    "AUTO_PRED_IOU_THRESH": "0.0",
    "AUTO_STABILITY_SCORE_THRESH": "0.0",
    "MAX_REGIONS": "12",
    "LOG_LEVEL": "INFO",
}
"""Environment of the tiny-model service (the thresholds are open: random weights score low)."""


def tiny_settings(model_dir: Path, label_studio_url: str | None = None, **overrides: Any):
    """Settings for tiny random models, memory under ``model_dir``, images from ``label_studio_url``."""
    from backend.settings import Settings

    env = dict(TINY_ENV, MODEL_DIR=str(model_dir))
    if label_studio_url is not None:
        env.update(LABEL_STUDIO_URL=label_studio_url, LABEL_STUDIO_API_KEY=API_TOKEN)
    return replace(Settings.from_env(env), **overrides)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny models, built once per session through ``backend.runtime.build_models``."""
    from backend.runtime import build_models

    return build_models(tiny_settings(tmp_path_factory.mktemp("models")))


@pytest.fixture
def make_runtime(tiny_models, label_studio, tmp_path):
    """``make_runtime(model_dir=None, **settings overrides) -> Runtime`` sharing the tiny models;
    every runtime made is closed at teardown."""
    from backend.runtime import Runtime

    made = []

    def make(model_dir: Path | None = None, **overrides: Any) -> Runtime:
        settings = tiny_settings(model_dir or tmp_path / "model_dir", label_studio.url, **overrides)
        runtime = Runtime(settings, models_factory=lambda _settings: tiny_models)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
def make_client(make_runtime):
    """``make_client(model_dir=None, **settings overrides) -> (flask test client, runtime)``."""
    from backend.app import create_app

    def make(model_dir: Path | None = None, **overrides: Any):
        runtime = make_runtime(model_dir, **overrides)
        app = create_app(runtime.settings, runtime)
        return app.test_client(), runtime

    return make
