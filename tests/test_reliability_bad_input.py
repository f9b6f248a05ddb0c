"""Bad input on every route, table-driven and fuzzed (hypothesis): never a 5xx, never a traceback.

Every refused request gets a 4xx with a JSON ``{"error": ...}`` naming the problem; a batch task
whose image cannot be used gets an empty prediction, with the reason logged and counted; a
webhook whose learning cannot run fails in the background (logged, counted) without touching the
memory. In every case no unexpected exception is logged, the stored data is unchanged and the
service keeps answering.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import sqlite3
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.app import create_app
from backend.runtime import Runtime
from samsem_plugin.brush_rle import rle_encode
from tests.conftest import FIXTURE_IMAGE_PATHS, IMAGE_SIZE, LABEL_CONFIG, load_fixture, png_bytes, scene_image
from tests.support.http_server import Response
from tests.test_images import png_header_only
from tools.soak import free_port, metric_samples

H, W = IMAGE_SIZE
GOOD_IMAGE = FIXTURE_IMAGE_PATHS[1]
MAX_MESSAGE = 600
"""Longest error message / log line accepted: payloads are never echoed whole."""
FETCH_TIMEOUT = 0.5
MAX_IMAGE_BYTES = 64 << 10
MAX_IMAGE_PIXELS = 1_000_000
CLOSED_PORT = free_port()
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- the service under test --------------------------------------------------------------------------


class Api:
    """A service (tiny models, fake Label Studio) and what a test needs to judge its answers."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.client = create_app(runtime.settings, runtime).test_client()
        self.sent = 0

    def post(self, path: str, body: Any = None, *, data: bytes | None = None):
        self.sent += 1
        if data is None:
            data = json.dumps(body).encode()
        return self.client.post(path, data=data, content_type="application/json")

    def get(self, path: str):
        self.sent += 1
        return self.client.get(path)

    def stored(self) -> dict[str, list[tuple]]:
        """Every row of every table of the store (what must not change)."""
        connection = sqlite3.connect(f"file:{self.runtime.store.path}?mode=ro", uri=True)
        try:
            tables = [
                row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            return {
                table: sorted(connection.execute(f"SELECT * FROM {table}").fetchall()) for table in tables
            }
        finally:
            connection.close()

    def learnt(self) -> dict[str, list[tuple]]:
        """The exemplar tables only (a valid config or served version may legitimately be remembered)."""
        stored = self.stored()
        return {table: stored[table] for table in ("exemplars", "revisions", "annotation_state")}

    def metric(self, name: str, **labels: str) -> float:
        text = self.get("/metrics").get_data(as_text=True)
        return sum(
            value
            for sample_labels, value in metric_samples(text, name)
            if all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def drain(self) -> None:
        assert self.runtime.queue.join(timeout=60), "the learning queue drained"


@pytest.fixture(scope="module")
def api(tiny_models, label_studio, tmp_path_factory) -> Iterator[Api]:
    from tests.conftest import tiny_settings

    add_bad_images(label_studio)
    settings_ = tiny_settings(
        tmp_path_factory.mktemp("bad_input"),
        label_studio.url,
        fetch_timeout=FETCH_TIMEOUT,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        allowed_image_hosts=(f"127.0.0.1:{CLOSED_PORT}",),
        allow_private_image_hosts=True,
    )
    runtime = Runtime(settings_, models_factory=lambda _settings: tiny_models)
    service = Api(runtime)
    setup = service.post("/setup", load_fixture("setup"))
    assert setup.status_code == 200
    learn_once(service)
    yield service
    print(f"\nbad-input requests sent: {service.sent}")
    runtime.close()


def learn_once(api: Api) -> None:
    """Give project 1 some exemplars, so an unchanged memory is a non-empty one."""
    body = annotation_webhook([brush("seed-region", "Cat", square_mask())], annotation_id=900)
    assert api.post("/webhook", body).status_code == 200
    api.drain()
    assert api.learnt()["exemplars"], "the memory holds exemplars"


def assert_refused(response, *words: str, statuses=range(400, 500)) -> str:
    """A 4xx JSON error naming the problem (``words``), no traceback, short."""
    text = response.get_data(as_text=True)
    assert response.status_code in statuses, f"{response.status_code}: {text[:300]}"
    assert response.is_json, text[:300]
    error = response.get_json().get("error")
    assert isinstance(error, str) and error, text[:300]
    assert "Traceback" not in text and 'File "' not in text
    assert len(error) <= MAX_MESSAGE, f"error message of {len(error)} chars echoes the input"
    for word in words:
        assert word.lower() in error.lower(), error
    return error


def assert_no_internal_errors(caplog) -> None:
    """No unexpected exception was logged, and no log line repeats a whole payload."""
    for record in caplog.records:
        message = record.getMessage()
        assert record.levelno < logging.ERROR, f"{record.name}: {message[:300]}"
        assert len(message) <= 2 * MAX_MESSAGE, f"{len(message)}-char log line: {message[:200]}"


def guard(api: Api, caplog, read, what: str) -> Iterator[None]:
    """After the test: ``read()`` unchanged, nothing unexpected logged, the service answering."""
    caplog.set_level(logging.INFO)
    before = read()
    yield
    api.drain()
    assert read() == before, f"{what} changed"
    assert_no_internal_errors(caplog)
    assert api.get("/health").status_code == 200


@pytest.fixture
def unchanged(api, caplog):
    """The whole store is unchanged by the test."""
    yield from guard(api, caplog, api.stored, "stored data")


@pytest.fixture
def unchanged_memory(api, caplog):
    """The memory is unchanged (a valid label config or a served version may be remembered)."""
    yield from guard(api, caplog, api.learnt, "the memory")


# -- helpers building Label Studio bodies ------------------------------------------------------------


def square_mask() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[10:30, 20:44] = True
    return mask


def brush(region_id: str, label: str, mask: np.ndarray, **overrides: Any) -> dict[str, Any]:
    result = {
        "id": region_id,
        "from_name": "brush",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "value": {"format": "rle", "rle": rle_encode(mask), "brushlabels": [label]},
    }
    result.update(overrides)
    return result


def annotation_webhook(results: list, *, annotation_id: int = 1, image: str = GOOD_IMAGE, **fields) -> dict:
    body = load_fixture("webhook_annotation_created_brush")
    body["project"]["id"] = 1
    body["annotation"].update(id=annotation_id, task=77, result=results, **fields)
    body["task"].update(id=77, data={"image": image})
    return body


def batch(*tasks: dict) -> dict:
    return dict(load_fixture("predict_batch_1"), tasks=list(tasks))


def task(task_id: Any = 5, image: Any = GOOD_IMAGE, **fields: Any) -> dict:
    return {"id": task_id, "data": {"image": image}, **fields}


def interactive(context_result: Any = None, the_task: dict | None = None) -> dict:
    body = load_fixture("predict_interactive")
    if context_result is not None:
        body["params"]["context"]["result"] = context_result
    if the_task is not None:
        body["tasks"] = [the_task]
    return body


def keypoint(x: Any, y: Any, **extra: Any) -> dict:
    return {
        "id": "k",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["Cat"], **extra},
    }


def rectangle(x: Any, y: Any, width: Any, height: Any, rotation: Any = 0) -> dict:
    return {
        "id": "r",
        "from_name": "rect",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": rotation,
            "rectanglelabels": ["Dog"],
        },
    }


# -- image sources that go wrong ---------------------------------------------------------------------


def _truncated_png() -> bytes:
    data = png_bytes(scene_image(5))
    return data[: len(data) // 2]


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n"


def _jpeg_with_garbage() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene_image(6)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    data[200:400] = b"\xff" * 200
    return bytes(data[:600])


BAD_IMAGES: dict[str, tuple[Response, tuple[str, ...]]] = {
    "corrupt.png": (Response(body=b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), ("corrupt",)),
    "truncated.png": (Response(body=_truncated_png()), ("corrupt",)),
    "garbled.jpg": (Response(body=_jpeg_with_garbage()), ("image",)),
    "page.html": (Response(body=b"<html><body>login</body></html>"), ("not an image",)),
    "empty.png": (Response(body=b""), ("not an image",)),
    "picture.eps": (Response(body=_eps()), ("image",)),
    "bomb.png": (Response(body=png_header_only(100_000, 100_000)), ("too large",)),
    "wide.png": (Response(body=png_header_only(2_000_000, 1)), ("too large",)),
    "huge.bin": (Response(body=b"\x00" * (MAX_IMAGE_BYTES + 1)), ("too large",)),
    "huge-unsized.bin": (Response(body=b"\x00" * (MAX_IMAGE_BYTES + 1), send_length=False), ("too large",)),
    "401.png": (Response(status=401), ("401",)),
    "403.png": (Response(status=403), ("403",)),
    "404.png": (Response(status=404), ("404",)),
    "500.png": (Response(status=500, body=b"Traceback (most recent call last): secret"), ("500",)),
    "502.png": (Response(status=502), ("502",)),
    "slow.png": (Response(body=png_bytes(scene_image(1)), delay=FETCH_TIMEOUT * 4), ("timed out",)),
    "drip.png": (
        Response(body=png_bytes(scene_image(2)), chunk_size=16, chunk_delay=FETCH_TIMEOUT / 4),
        ("timed out",),
    ),
    "redirect-loop.png": (
        Response(status=302, headers={"Location": "/data/upload/bad/redirect-loop.png"}),
        ("redirects",),
    ),
    "redirect-nowhere.png": (
        Response(status=302, headers={"Location": f"http://127.0.0.1:{CLOSED_PORT}/x.png"}),
        ("cannot connect",),
    ),
}
OTHER_BAD_URLS: dict[str, tuple[str, ...]] = {
    f"http://127.0.0.1:{CLOSED_PORT}/unreachable.png": ("cannot connect",),
    "http://169.254.169.254/latest/meta-data/": ("allowed_image_hosts",),
    "file:///etc/passwd": ("unsupported url scheme",),
    "ftp://example.org/a.png": ("unsupported url scheme",),
    "javascript:alert(1)": ("unsupported url scheme",),
    "http://[::1": ("unparsable",),
    "data:image/png;base64,%%%notbase64": ("image",),
    "data:image/png": ("malformed data uri",),
    "/data/upload/6/missing.png": ("404",),
    "s3://bucket/key.png": ("404",),
}


def add_bad_images(label_studio) -> None:
    for name, (response, _) in BAD_IMAGES.items():
        label_studio.add_route(f"/data/upload/bad/{name}", response)


BAD_SOURCES = [(f"/data/upload/bad/{name}", words) for name, (_, words) in BAD_IMAGES.items()] + list(
    OTHER_BAD_URLS.items()
)


# -- malformed bodies on every route -----------------------------------------------------------------


MALFORMED_BODIES: list[tuple[bytes, tuple[str, ...]]] = [
    (b"", ("empty body",)),
    (b"{not json", ("valid json",)),
    (b"\xff\xfe\x00garbage", ("valid json",)),
    (b"\xef\xbb\xbf{}", ()),
    (b"[" * 100_000 + b"]" * 100_000, ("json",)),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, ("json",)),
    (b"[1, 2]", ("json object",)),
    (b'"text"', ("json object",)),
    (b"3.5", ("json object",)),
    (b"null", ("json object",)),
    (b"NaN", ("json object",)),
    (b'{"project": ' + b"9" * 5000 + b"}", ("json",)),
]


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize(
    ("data", "words"), MALFORMED_BODIES, ids=lambda v: repr(v)[:24] if isinstance(v, bytes) else None
)
def test_malformed_bodies_are_refused_on_every_post_route(api, unchanged, path, data, words):
    assert_refused(api.post(path, data=data), *words, statuses=(400,))


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("get", "/predict", 405),
        ("get", "/setup", 405),
        ("get", "/webhook", 405),
        ("post", "/health", 405),
        ("post", "/metrics", 405),
        ("delete", "/predict", 405),
        ("put", "/webhook", 405),
        ("get", "/nowhere", 404),
        ("get", "/../../etc/passwd", 404),
        ("post", "/predict/../setup/x", 404),
        ("get", "/versions?project=.5", 400),
        ("get", "/versions?project=" + "9" * 5000, 400),
        ("get", "/versions?project=a%0Ab", 400),
        ("get", "/versions?project=%00", 400),
    ],
)
def test_wrong_methods_routes_and_queries_are_json_errors(api, unchanged, method, path, status):
    api.sent += 1
    assert_refused(getattr(api.client, method)(path), statuses=(status,))


# -- /setup and label configs ------------------------------------------------------------------------


XXE_CONFIG = """<?xml version="1.0"?>
<!DOCTYPE View [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="&xxe;"/></BrushLabels></View>"""
LAUGHS_CONFIG = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{(f"&lol{i - 1};" if i > 1 else "&lol;") * 10}">' for i in range(1, 10))
    + ']><View><Image name="image" value="$image"/><BrushLabels name="b" toName="image">'
    '<Label value="&lol9;"/></BrushLabels></View>'
)
DEEP_CONFIG = (
    "<View>" * 3000
    + '<Image name="image" value="$image"/>'
    + '<BrushLabels name="b" toName="image"><Label value="a"/></BrushLabels>'
    + "</View>" * 3000
)
BAD_CONFIGS: list[tuple[Any, tuple[str, ...]]] = [
    ("<View>", ("label config", "invalid xml")),
    ("not xml at all", ("label config",)),
    ("<View></View>", ("label config", "image")),
    (
        '<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="a"/></Labels></View>',
        ("image",),
    ),
    (
        '<View><Image name="i" value="https://example.org/x.png"/><BrushLabels name="b" toName="i">'
        '<Label value="a"/></BrushLabels></View>',
        ("image",),
    ),
    (
        '<View><Image name="i" value="$image"/>'
        '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
        ("no supported control",),
    ),
    (
        '<View><Image name="i" value="$image"/><KeyPointLabels name="k" toName="i" smart="true">'
        '<Label value="a"/></KeyPointLabels></View>',
        ("no supported control",),
    ),
    (
        '<View><Image name="i" value="$image"/>'
        '<EllipseLabels name="e" toName="i"><Label value="a"/></EllipseLabels></View>',
        ("no supported control",),
    ),
    (
        '<View><Image name="i" value="$image"/><BrushLabels name="b" toName="elsewhere"><Label value="a"/>'
        "</BrushLabels></View>",
        ("label config",),
    ),
    ('<View><Image name="i" value="$image"/><Unknown name="u" toName="i"/></View>', ("label config",)),
    (XXE_CONFIG, ("label config",)),
    (LAUGHS_CONFIG, ("label config",)),
    (DEEP_CONFIG, ("label config",)),
    (42, ("label_config", "xml")),
    (["<View/>"], ("label_config", "xml")),
    ({"xml": "<View/>"}, ("label_config", "xml")),
]


@pytest.mark.parametrize(
    ("config", "words"), BAD_CONFIGS, ids=lambda v: repr(v)[:30] if not isinstance(v, tuple) else None
)
def test_unusable_label_configs_are_refused_by_setup_and_predict(api, unchanged, config, words):
    assert_refused(api.post("/setup", dict(load_fixture("setup"), schema=config)), *words)
    refused = assert_refused(api.post("/predict", dict(batch(task()), label_config=config)), *words)
    assert "root:" not in refused, "no file content leaks through an XML entity"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"project": None}, ("project",)),
        ({"project": ""}, ("project",)),
        ({"project": "."}, ("project",)),
        ({"project": True}, ("project",)),
        ({"project": [6]}, ("project",)),
        ({"project": {"id": 6}}, ("project",)),
        ({"project": "x" * 10_000}, ("project",)),
        ({"project": "6\nINFO forged log line"}, ("project",)),
        ({"project": "../../etc"}, ("project",)),
        ({"extra_params": "yes"}, ("extra_params",)),
        ({"extra_params": [1]}, ("extra_params",)),
    ],
)
def test_setup_refuses_bad_fields(api, unchanged, change, words):
    assert_refused(api.post("/setup", dict(load_fixture("setup"), **change)), *words)


# -- /predict: bodies, tasks, contexts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"label_config": LABEL_CONFIG}, ("tasks", "missing")),
        (batch() | {"tasks": None}, ("tasks", "missing")),
        (batch() | {"tasks": {"id": 1}}, ("tasks", "list")),
        (batch() | {"tasks": "all"}, ("tasks", "list")),
        (batch(task(), 7), ("tasks[1]",)),
        (batch(task(), [task()]), ("tasks[1]",)),
        (batch(task()) | {"project": "x" * 10_000}, ("project",)),
        (batch(task()) | {"project": ["6"]}, ("project",)),
        (batch(task()) | {"params": "interactive"}, ("params",)),
        (batch(task()) | {"params": {"context": [1]}}, ("params.context",)),
        (batch(task()) | {"params": {"context": {"result": {}}}}, ("params.context.result",)),
        (batch(task()) | {"params": {"context": {"result": "kp"}}}, ("params.context.result",)),
        (batch(task()) | {"project": "7", "label_config": None}, ("label_config", "project 7")),
        (interactive() | {"tasks": []}, ("tasks",)),
    ],
)
def test_predict_refuses_bad_bodies(api, unchanged_memory, body, words):
    assert_refused(api.post("/predict", body), *words)


ABSURD_CONTEXTS: list[tuple[list, int]] = [
    ([keypoint(1e308, -1e308)], 200),
    ([keypoint(-50, 250)], 200),
    ([keypoint(50, 50), keypoint(1e300, 1e300, positive=False)], 200),
    ([rectangle(-50, -50, 1e308, 1e308)], 200),
    ([rectangle(10, 10, -20, -20)], 200),
    ([rectangle(10, 10, 50, 50, rotation=1e308)], 200),
    ([rectangle(10, 10, 50, 50, rotation="sideways")], 200),
    ([keypoint(50, 50)] * 2000, 200),
    ([keypoint("left", "top")], 400),
    ([keypoint(None, 5)], 400),
    ([keypoint(True, False)], 400),
    ([keypoint([1], {"y": 2})], 400),
    ([rectangle(10, 10, 0, 0)], 400),
    ([rectangle(-1e308, -1e308, 1e308, 1e308)], 400),
    ([rectangle(150, 150, 10, 10)], 400),
    ([{"type": "keypointlabels"}], 400),
    ([{"type": "keypointlabels", "value": "x"}], 400),
    ([{"type": "ellipselabels", "value": {"x": 1, "y": 1}}], 400),
    ([1, "two", None, []], 400),
]


@pytest.mark.parametrize(("context_result", "status"), ABSURD_CONTEXTS, ids=lambda v: repr(v)[:40])
def test_interactive_predict_with_absurd_coordinates(api, unchanged_memory, context_result, status):
    response = api.post("/predict", interactive(context_result))
    if status == 400:
        assert_refused(response, "params.context", statuses=(400,))
        return
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    (prediction,) = response.get_json()["results"]
    for result in prediction["result"]:
        assert (result["original_width"], result["original_height"]) == (W, H)


@pytest.mark.parametrize(
    ("bad_task", "words"),
    [
        ({"id": 5, "data": None}, ("data",)),
        ({"id": 5}, ("data",)),
        ({"id": 5, "data": "image.png"}, ("data",)),
        ({"id": 5, "data": {"text": "hello"}}, ("no image",)),
        (task(image=None), ("no image",)),
        (task(image=""), ("no image",)),
        (task(image=["a.png"]), ("no image",)),
        (task(image={"url": "a.png"}), ("no image",)),
        (task(task_id="²", image="s3://bucket/key.png"), ("task id",)),
        (task(task_id=10**30, image="s3://bucket/key.png"), ("404",)),
        (task(task_id=None, image="s3://bucket/key.png"), ("task id",)),
        (task(task_id={"id": 1}, image="s3://bucket/key.png"), ("task id",)),
        *[(task(image=url), words) for url, words in BAD_SOURCES],
    ],
    ids=lambda v: repr(v)[:60] if isinstance(v, dict) else None,
)
def test_a_bad_task_gets_an_empty_prediction_in_a_batch_and_a_4xx_interactively(
    api, unchanged_memory, caplog, bad_task, words
):
    failures = api.metric("samsem_predict_task_failures_total")
    internal = api.metric("samsem_predict_task_failures_total", reason="internal")
    good = task(task_id=6)
    response = api.post("/predict", batch(bad_task, good))
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    results = response.get_json()["results"]
    assert len(results) == 2
    assert results[0]["result"] == [] and results[0]["score"] == 0.0
    assert results[1]["result"], "the good task of the batch is still predicted"
    assert api.metric("samsem_predict_task_failures_total") == failures + 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "empty prediction" in r.getMessage()
    ]
    assert warnings and all(word.lower() in warnings[-1].lower() for word in words), warnings
    assert api.metric("samsem_predict_task_failures_total", reason="internal") == internal
    assert_refused(api.post("/predict", interactive(the_task=bad_task)), *words)


def test_no_task_failure_was_ever_an_internal_error(api):
    assert api.metric("samsem_predict_task_failures_total", reason="internal") == 0


# -- /webhook ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, ("action",)),
        ({"action": None}, ("action",)),
        ({"action": ""}, ("action",)),
        ({"action": ["ANNOTATION_CREATED"]}, ("action",)),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1}}, ("annotation",)),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": 5}, ("annotation",)),
        (
            {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"result": []}},
            ("annotation",),
        ),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": True}}, ("annotation",)),
        ({"action": "ANNOTATION_UPDATED", "annotation": {"id": 5}}, ("project",)),
        ({"action": "ANNOTATION_UPDATED", "project": {"id": None}, "annotation": {"id": 5}}, ("project",)),
        ({"action": "ANNOTATION_UPDATED", "project": {"id": [1]}, "annotation": {"id": 5}}, ("project",)),
        (
            {"action": "ANNOTATION_UPDATED", "project": {"id": "x" * 5000}, "annotation": {"id": 5}},
            ("project",),
        ),
        ({"action": "ANNOTATION_UPDATED", "project": {"id": "1\n2"}, "annotation": {"id": 5}}, ("project",)),
        ({"action": "ANNOTATIONS_CREATED", "project": {"id": 1}, "annotations": "all"}, ("annotations",)),
        ({"action": "ANNOTATIONS_CREATED", "project": {"id": 1}, "annotations": [1, 2]}, ("annotation",)),
        (
            {"action": "ANNOTATIONS_CREATED", "project": {"id": 1}, "annotations": [{"id": 1}], "tasks": 5},
            ("tasks",),
        ),
        (
            {
                "action": "ANNOTATIONS_CREATED",
                "project": {"id": 1},
                "annotations": [{"id": 1}],
                "tasks": {"a": 1},
            },
            ("tasks",),
        ),
        ({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}}, ("annotations",)),
        ({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": "5"}, ("annotations",)),
        (
            {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": None}]},
            ("annotations[0]",),
        ),
        (
            {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"pk": 3}]},
            ("annotations[0]",),
        ),
        ({"action": "START_TRAINING"}, ("project",)),
        ({"action": "START_TRAINING", "project": {"id": {"id": {"id": []}}}}, ("project",)),
        ({"action": "x" * 100_000, "project": {"id": 1}, "annotation": "y" * 100_000}, ()),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else None,
)
def test_webhooks_that_cannot_be_acted_on_are_refused_and_queue_nothing(api, unchanged, body, words):
    processed = api.runtime.queue.processed
    response = api.post("/webhook", body)
    if str(body.get("action")).startswith("x"):
        assert response.status_code in (200, 400) and len(response.get_data()) <= MAX_MESSAGE
        assert response.get_json().get("status", "ignored") == "ignored"
    else:
        assert_refused(response, *words, statuses=(400,))
    api.drain()
    assert api.runtime.queue.processed == processed, "no job was queued"


@pytest.mark.parametrize(
    "action", ["PROJECT_UPDATED", "TASKS_CREATED", "TASKS_DELETED", "LABEL_LINK_CREATED", "SOMETHING_NEW"]
)
def test_other_webhook_actions_are_acknowledged_and_ignored(api, unchanged, action):
    response = api.post("/webhook", {"action": action, "project": {"id": 1}})
    assert response.status_code == 200 and response.get_json()["status"] == "ignored"


def huge_brush() -> dict:
    side = 1200  # > MAX_IMAGE_PIXELS once squared: must be refused before decoding
    return brush("big", "Cat", np.ones((side, side), bool))


UNLEARNABLE: list[tuple[str, dict]] = [
    ("image 404", annotation_webhook([brush("a", "Cat", square_mask())], image="/data/upload/6/missing.png")),
    (
        "image corrupt",
        annotation_webhook([brush("a", "Cat", square_mask())], image="/data/upload/bad/corrupt.png"),
    ),
    ("image bomb", annotation_webhook([brush("a", "Cat", square_mask())], image="/data/upload/bad/bomb.png")),
    ("image slow", annotation_webhook([brush("a", "Cat", square_mask())], image="/data/upload/bad/slow.png")),
    ("no image", annotation_webhook([brush("a", "Cat", square_mask())], image=None)),
    (
        "rle garbage",
        annotation_webhook(
            [brush("a", "Cat", square_mask()) | {"value": {"rle": [999, -1, "x"], "brushlabels": ["Cat"]}}]
        ),
    ),
    (
        "rle truncated",
        annotation_webhook(
            [
                brush("a", "Cat", square_mask())
                | {"value": {"rle": rle_encode(square_mask())[:9], "brushlabels": ["Cat"]}}
            ]
        ),
    ),
    (
        "rle not a list",
        annotation_webhook(
            [brush("a", "Cat", square_mask()) | {"value": {"rle": "AAAA", "brushlabels": ["Cat"]}}]
        ),
    ),
    ("value not an object", annotation_webhook([brush("a", "Cat", square_mask()) | {"value": [1, 2]}])),
    (
        "labels not strings",
        annotation_webhook(
            [
                brush("a", "Cat", square_mask())
                | {"value": {"rle": rle_encode(square_mask()), "brushlabels": [1]}}
            ]
        ),
    ),
    ("negative size", annotation_webhook([brush("a", "Cat", square_mask(), original_width=-64)])),
    ("size not a number", annotation_webhook([brush("a", "Cat", square_mask(), original_height="48px")])),
    ("huge claimed size", annotation_webhook([huge_brush()])),
    (
        "polygon absurd",
        annotation_webhook(
            [
                {
                    "id": "p",
                    "from_name": "poly",
                    "type": "polygonlabels",
                    "value": {"points": [[1e308, -1e308], [1, "x"]], "polygonlabels": ["Dog"]},
                }
            ]
        ),
    ),
    ("result not a list", annotation_webhook("everything")),
    (
        "task not a number",
        annotation_webhook([brush("a", "Cat", square_mask())])
        | {"task": None}
        | {"annotation": {"id": 3, "task": "seven", "result": []}},
    ),
]


@pytest.mark.parametrize(("case", "body"), UNLEARNABLE, ids=[case for case, _ in UNLEARNABLE])
def test_a_webhook_whose_learning_cannot_run_fails_in_the_background_only(api, caplog, case, body):
    caplog.set_level(logging.INFO)
    before = api.learnt()
    errors = api.metric("samsem_learn_jobs_total", outcome="error")
    response = api.post("/webhook", body)
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    api.drain()
    assert api.metric("samsem_learn_jobs_total", outcome="error") == errors + 1, case
    assert api.learnt() == before, "the memory is unchanged"
    failures = [
        r.getMessage() for r in caplog.records if "failed" in r.getMessage() and r.name == "backend.jobs"
    ]
    assert len(failures) == 1 and 'File "' not in failures[0], "one expected failure, logged without a stack"
    for record in caplog.records:
        assert len(record.getMessage()) <= 2 * MAX_MESSAGE
        if record.exc_info:
            assert len(str(record.exc_info[1])) <= 2 * MAX_MESSAGE, "exception text echoes the payload"
    # the worker survives: the next good webhook is learnt
    good = annotation_webhook([brush("b", "Dog", square_mask())], annotation_id=901)
    assert api.post("/webhook", good).status_code == 200
    api.drain()
    assert api.metric("samsem_learn_jobs_total", outcome="error") == errors + 1


def test_a_huge_claimed_brush_size_is_refused_before_decoding(api, monkeypatch):
    import samsem_plugin.ls_format as ls_format

    decoded = []
    original = ls_format.rle_decode
    monkeypatch.setattr(ls_format, "rle_decode", lambda *a, **k: decoded.append(a[1:3]) or original(*a, **k))
    errors = api.metric("samsem_learn_jobs_total", outcome="error")
    assert api.post("/webhook", annotation_webhook([huge_brush()], annotation_id=902)).status_code == 200
    api.drain()
    assert api.metric("samsem_learn_jobs_total", outcome="error") == errors + 1
    assert decoded == [], "a brush bigger than MAX_IMAGE_PIXELS is never decoded"


# -- fuzzing -----------------------------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indexes) into a JSON value, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_of(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value[:5]):
            found += paths_of(child, prefix + (index,))
    return found


@st.composite
def mutated(draw, fixture: dict, extra_keys: tuple[str, ...] = ()) -> Any:
    """A Label Studio body with 1-3 random subtrees replaced (or deleted) by random JSON."""
    body = copy.deepcopy(fixture)
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(body)
        path = draw(st.sampled_from(paths))
        replacement = draw(json_values | st.sampled_from(extra_keys or (None,)))
        if not path:
            body = replacement
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = replacement
    return body


SMALL_WEBHOOK = annotation_webhook([brush("z", "Cat", square_mask())], annotation_id=950)
SMALL_WEBHOOK["project"] = {"id": 1, "label_config": LABEL_CONFIG}


def assert_answered_well(response) -> None:
    event(f"HTTP {response.status_code}")
    text = response.get_data(as_text=True)
    assert response.status_code < 500 or response.status_code == 503 and "queue" in text, text[:300]
    assert "Traceback" not in text
    if response.status_code >= 400:
        assert_refused(response, statuses=range(400, 600))


@FUZZ
@given(body=mutated(load_fixture("predict_batch_1"), ("/data/upload/bad/corrupt.png", GOOD_IMAGE)))
def test_fuzzed_batch_predictions_never_fail_the_service(api, caplog, body):
    caplog.clear()
    response = api.post("/predict", body)
    assert_no_internal_errors(caplog)
    assert_answered_well(response)
    params = body.get("params") if isinstance(body, dict) else None
    context = params.get("context") if isinstance(params, dict) else None
    if response.status_code == 200 and not (isinstance(context, dict) and "result" in context):
        assert len(response.get_json()["results"]) == len(body["tasks"])
    assert api.metric("samsem_predict_task_failures_total", reason="internal") == 0


@FUZZ
@given(body=mutated(load_fixture("predict_interactive"), ("keypointlabels", "rectanglelabels", "kp")))
def test_fuzzed_interactive_predictions_never_fail_the_service(api, caplog, body):
    caplog.clear()
    response = api.post("/predict", body)
    assert_no_internal_errors(caplog)
    assert_answered_well(response)
    if response.status_code == 200:
        assert isinstance(response.get_json()["results"], list)


@FUZZ
@given(body=mutated(load_fixture("setup"), (LABEL_CONFIG, "<View/>")))
def test_fuzzed_setups_never_fail_the_service(api, caplog, body):
    caplog.clear()
    assert_answered_well(api.post("/setup", body))
    assert_no_internal_errors(caplog)


@FUZZ
@given(body=mutated(SMALL_WEBHOOK, ("ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING")))
def test_fuzzed_webhooks_never_fail_the_service_or_its_worker(api, caplog, body):
    caplog.clear()
    response = api.post("/webhook", body)
    assert_answered_well(response)
    api.drain()
    unexpected = [r.getMessage() for r in caplog.records if 'File "' in r.getMessage() or r.exc_info]
    assert not unexpected, "learning failed only for expected reasons: " + unexpected[0][:2000]
    assert api.runtime.queue._thread is None or api.runtime.queue._thread.is_alive()


@FUZZ
@given(data=st.binary(max_size=200), path=st.sampled_from(["/setup", "/predict", "/webhook"]))
def test_fuzzed_bytes_are_refused(api, data, path):
    response = api.post(path, data=data)
    assert_answered_well(response)


@FUZZ
@given(project=st.text(max_size=30))
def test_fuzzed_version_queries_never_fail(api, project):
    from urllib.parse import quote

    assert_answered_well(api.get("/versions?project=" + quote(project)))


def test_after_all_bad_input_the_stored_memory_is_intact_and_the_service_answers(api):
    api.drain()
    assert api.runtime.store.integrity_check() == "ok"
    assert api.get("/health").get_json()["status"] == "UP"
    response = api.post("/predict", batch(task(task_id=8)))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"]
