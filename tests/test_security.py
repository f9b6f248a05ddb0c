"""Security and resource bounds.

* Basic auth on every route and method (unknown routes included), compared in constant time;
  the webhook secret opens ``/webhook`` only.
* The Label Studio token goes to Label Studio only: never to another image host, never along a
  redirect, never to the ``hostname`` a ``/setup`` body names.
* No SSRF: task data cannot make the service fetch from loopback / private / link-local
  addresses (in any spelling) unless the operator allowed them.
* No pickle: no code path loads pickles or ``torch.load(weights_only=False)``; a booby-trapped
  checkpoint is refused without running its code. EPS (Ghostscript) is never decoded.
* Request size limit, also for chunked bodies over real HTTP.
* Logs and error answers never hold tokens, passwords, secrets or whole payloads.
* Every cache is bounded in bytes; the learning queue is bounded in jobs and bytes and answers
  503 with ``Retry-After`` and a message naming the limit; a refused event changes nothing.
"""

from __future__ import annotations

import ast
import base64
import http.client
import io
import json
import logging
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from werkzeug.serving import make_server

from backend.app import create_app
from backend.messages import MAX_LOG_MESSAGE, ShortLogMessages, configure_logging
from tests.conftest import API_TOKEN, FIXTURE_IMAGE_PATHS, load_fixture, png_bytes, scene_image
from tests.support.http_server import LoopbackHTTPServer, Response, wait_until
from tools.soak import metric_samples

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD, SECRET = "ls-user", "correct horse battery", "hook-secret-7f3a"
GOOD_IMAGE = FIXTURE_IMAGE_PATHS[1]


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def batch_for(image_url: str, task_id: int = 5) -> dict:
    return dict(load_fixture("predict_batch_1"), tasks=[{"id": task_id, "data": {"image": image_url}}])


def interactive_for(image_url: str) -> dict:
    body = load_fixture("predict_interactive")
    body["tasks"][0]["data"] = {"image": image_url}
    return body


@pytest.fixture
def other_host():
    """A second loopback server: "another host" (other port = other origin) serving an image."""
    with LoopbackHTTPServer() as server:
        server.routes["/x.png"] = Response(
            body=png_bytes(scene_image(3)), headers={"Content-Type": "image/png"}
        )
        yield server


# -- authentication ----------------------------------------------------------------------------------


ROUTES = [
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/versions"),
    ("GET", "/versions?project=6"),
    ("POST", "/setup"),
    ("POST", "/predict"),
    ("GET", "/predict"),
    ("PUT", "/setup"),
    ("DELETE", "/webhook/../predict"),
    ("GET", "/nowhere"),
    ("POST", "/admin"),
    ("OPTIONS", "/predict"),
    ("HEAD", "/health"),
]


@pytest.fixture
def protected(make_client):
    return make_client(basic_auth_user=USER, basic_auth_pass=PASSWORD, webhook_secret=SECRET)


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD[:-1]),
        {"Authorization": f"Bearer {SECRET}"},
        {"X-Samsem-Webhook-Secret": SECRET},
        {"Authorization": "Basic " + "A" * 10_000},
    ],
    ids=["none", "wrong-password", "wrong-user", "prefix", "webhook-bearer", "webhook-header", "huge"],
)
def test_every_route_and_method_needs_basic_auth(protected, method, path, headers):
    client, runtime = protected
    response = client.open(path, method=method, headers=headers, json={})
    assert response.status_code == 401, (method, path, response.status_code)
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    if method != "HEAD":
        assert "authentication" in response.get_json()["error"]
    assert not runtime.models_loaded


def test_credentials_are_compared_in_constant_time(protected, monkeypatch):
    import backend.auth as auth

    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(given, expected):
        compared.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    client, _ = protected
    assert client.get("/health", headers=basic(USER, "guess")).status_code == 401
    assert (b"guess", PASSWORD.encode()) in compared
    compared.clear()
    assert (
        client.post("/webhook", json={"action": "X"}, headers={"X-Samsem-Webhook-Secret": "g"}).status_code
        == 401
    )
    assert (b"g", SECRET.encode()) in compared


def test_the_webhook_secret_opens_the_webhook_only(protected):
    client, _ = protected
    hook = {"X-Samsem-Webhook-Secret": SECRET}
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=hook).status_code == 200
    assert client.post("/predict", json=load_fixture("predict_batch_1"), headers=hook).status_code == 401
    assert client.post("/setup", json=load_fixture("setup"), headers=hook).status_code == 401
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 401
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=basic()).status_code == 200


# -- the Label Studio token stays with Label Studio ---------------------------------------------------


def authorization_headers(server: LoopbackHTTPServer) -> list[str | None]:
    return [request.header("Authorization") for request in server.requests]


def assert_no_token_in(server: LoopbackHTTPServer) -> None:
    for request in server.requests:
        seen = json.dumps([request.path, request.headers, request.body.decode("latin-1")])
        assert API_TOKEN not in seen, f"the Label Studio token reached {request.path}"
        assert not (request.header("Authorization") or "").startswith(("Token", "Bearer"))


def test_the_token_is_never_sent_to_another_image_host(make_client, other_host, label_studio):
    client, _ = make_client(
        allowed_image_hosts=(f"127.0.0.1:{other_host.port}",), allow_private_image_hosts=True
    )
    response = client.post("/predict", json=batch_for(other_host.url("/x.png")))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"]
    # userinfo naming Label Studio's address must not fool the origin check
    sneaky = f"http://127.0.0.1:{label_studio.server.port}@127.0.0.1:{other_host.port}/x.png"
    assert client.post("/predict", json=batch_for(sneaky, task_id=6)).status_code == 200
    assert len(other_host.requests) == 2
    assert_no_token_in(other_host)


def test_a_redirect_from_label_studio_to_another_host_drops_the_token(make_client, other_host, label_studio):
    label_studio.add_route(
        "/data/upload/6/moved.png", Response(status=302, headers={"Location": other_host.url("/x.png")})
    )
    client, _ = make_client()
    response = client.post("/predict", json=batch_for("/data/upload/6/moved.png"))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"]
    assert len(other_host.requests) == 1
    assert_no_token_in(other_host)


def test_the_hostname_and_token_in_a_setup_body_are_never_used(make_client, other_host):
    client, _ = make_client()
    setup = dict(load_fixture("setup"), hostname=other_host.base_url, access_token="setup-access-token-XYZ")
    assert client.post("/setup", json=setup).status_code == 200
    assert client.post("/predict", json=batch_for(GOOD_IMAGE)).status_code == 200
    assert other_host.requests == []


def test_start_training_sends_the_token_to_label_studio_only(make_client, other_host, label_studio):
    tasks = [
        {
            "id": 31,
            "data": {"image": other_host.url("/x.png")},
            "annotations": [{"id": 310, "result": [{"x": 1}]}],
        }
    ]
    label_studio.add_json("/api/tasks/", {"tasks": tasks, "total": 1})
    client, runtime = make_client(
        allowed_image_hosts=(f"127.0.0.1:{other_host.port}",), allow_private_image_hosts=True
    )
    body = dict(
        load_fixture("webhook_start_training"),
        project={"id": 6, "label_config": load_fixture("setup")["schema"]},
    )
    assert client.post("/webhook", json=body).status_code == 200
    assert runtime.queue.join(timeout=60) and runtime.queue.failed == 0
    assert label_studio.requests_to("/api/tasks/")[-1].header("Authorization") == f"Token {API_TOKEN}"
    assert len(other_host.requests) == 1, "the task image was fetched from the other host"
    assert_no_token_in(other_host)


# -- no SSRF through task data -----------------------------------------------------------------------


def loopback_spellings(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/x.png",
        f"http://localhost:{port}/x.png",
        f"http://127.1:{port}/x.png",
        f"http://2130706433:{port}/x.png",
        f"http://0x7f000001:{port}/x.png",
        f"http://0177.0.0.1:{port}/x.png",
        f"http://[::1]:{port}/x.png",
        f"http://[::ffff:127.0.0.1]:{port}/x.png",
        f"http://0.0.0.0:{port}/x.png",
        f"https://127.0.0.1:{port}/x.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://[fd00::1]/x.png",
    ]


@pytest.mark.parametrize("allowed", [(), ("*",)], ids=["no-allow-list", "allow-any-public-host"])
def test_task_data_cannot_reach_internal_addresses(make_client, other_host, allowed):
    client, runtime = make_client(allowed_image_hosts=allowed)
    for url in loopback_spellings(other_host.port):
        response = client.post("/predict", json=batch_for(url))
        assert response.status_code == 200 and response.get_json()["results"][0]["result"] == [], url
        refused = client.post("/predict", json=interactive_for(url))
        assert 400 <= refused.status_code < 500, (url, refused.status_code)
    webhook = load_fixture("webhook_annotation_created_brush")
    webhook["task"]["data"] = {"image": f"http://127.0.0.1:{other_host.port}/x.png"}
    assert client.post("/webhook", json=webhook).status_code == 200
    assert runtime.queue.join(timeout=60) and runtime.queue.failed == 1
    assert other_host.requests == [], "no request reached the internal server"


# -- no pickle, no Ghostscript -----------------------------------------------------------------------


RISKY_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("marshal", "loads"),
    ("dill", "load"),
    ("joblib", "load"),
    ("shelve", "open"),
}


def risky_calls_in(path: Path) -> list[str]:
    """Calls that may unpickle: pickle/marshal/... loads, torch.load without weights_only=True,
    numpy loads with allow_pickle=True, yaml.load without a safe loader, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{path.name}:{node.lineno}"
        weights_only = keywords.get("weights_only")
        if (owner, name) == ("torch", "load") and not (
            isinstance(weights_only, ast.Constant) and weights_only.value is True
        ):
            found.append(f"{where} torch.load without weights_only=True")
        elif (owner, name) in RISKY_CALLS or name in ("eval", "exec") and isinstance(func, ast.Name):
            found.append(f"{where} {owner}.{name}")
        elif name in ("load", "loadtxt") and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value:
                found.append(f"{where} numpy load with allow_pickle=True")
        elif (owner, name) == ("yaml", "load") and "Safe" not in ast.dump(node):
            found.append(f"{where} yaml.load without SafeLoader")
    return found


def test_no_code_path_can_unpickle():
    files = [
        p for folder in ("backend", "samsem_plugin", "tools") for p in sorted((ROOT / folder).rglob("*.py"))
    ]
    assert len(files) > 20
    found = [problem for path in files for problem in risky_calls_in(path)]
    assert found == []


def test_the_scanner_sees_risky_calls(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle, torch, numpy as np\n"
        "pickle.loads(b'')\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\n"
        "np.load('x', allow_pickle=True)\n"
        "eval('1')\n"
    )
    assert len(risky_calls_in(sample)) == 5


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("reader", ["sam", "embedder"])
@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
def test_a_booby_trapped_checkpoint_is_refused_without_running_its_code(tmp_path, reader, form):
    from samsem_plugin.backbones import read_state_dict
    from samsem_plugin.errors import WeightsError
    from samsem_plugin.sam_models import read_sam_checkpoint

    marker = tmp_path / "marker.txt"
    path = tmp_path / "weights.pth"
    trap = _RunsCodeWhenUnpickled(str(marker))
    if form == "torch.save":
        torch.save({"model": {"w": torch.zeros(2)}, "payload": trap}, path)
    else:
        path.write_bytes(pickle.dumps({"model": trap}, protocol=2))
    read = read_sam_checkpoint if reader == "sam" else read_state_dict
    with pytest.raises(WeightsError):
        read(path)
    assert not marker.exists(), "the pickle ran code"


def test_postscript_images_are_never_handed_to_ghostscript(make_client, label_studio, monkeypatch):
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", lambda self, *a, **k: called.append(1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n"
    label_studio.add_route("/data/upload/6/doc.eps", Response(body=eps))
    client, _ = make_client()
    refused = client.post("/predict", json=interactive_for("/data/upload/6/doc.eps"))
    assert refused.status_code == 422 and "not an image" in refused.get_json()["error"]
    assert called == []


# -- request size limits -----------------------------------------------------------------------------


@pytest.fixture
def served(make_client):
    """The app (MAX_REQUEST_MB=1) behind a real threaded HTTP server on 127.0.0.1."""
    client, runtime = make_client(max_request_mb=1)
    server = make_server("127.0.0.1", 0, create_app(runtime.settings, runtime), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    thread.join(timeout=10)


def post_raw(port: int, path: str, chunks, headers: dict[str, str]) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", path, body=chunks, headers=headers, encode_chunked="Content-Length" not in headers
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup"])
def test_bodies_over_the_limit_are_refused_with_413_also_when_chunked(served, path):
    def chunks():
        yield b'{"tasks": [], "pad": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    status, body = post_raw(
        served, path, chunks(), {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    )
    assert status == 413 and "too large" in body["error"].lower()
    big = b'{"pad": "' + b"x" * (1 << 20) + b'"}'
    status, body = post_raw(
        served, path, big, {"Content-Type": "application/json", "Content-Length": str(len(big))}
    )
    assert status == 413 and "too large" in body["error"].lower()
    status, body = post_raw(served, "/health", b"", {"Content-Length": "0"})
    assert status == 405  # the server still answers


# -- logs and answers never hold secrets or whole payloads -------------------------------------------


def test_logs_and_answers_hold_no_secret_and_no_whole_payload(make_client, label_studio, other_host, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(ShortLogMessages())  # as configure_logging does for the service
    client, runtime = make_client(
        basic_auth_user=USER,
        basic_auth_pass=PASSWORD,
        webhook_secret=SECRET,
        allowed_image_hosts=(f"127.0.0.1:{other_host.port}",),
        allow_private_image_hosts=True,
    )
    signed = other_host.url("/missing.png") + "?X-Amz-Signature=SIGNATURE-SECRET-1&token=QUERY-TOKEN-2&x=1"
    with_password = f"http://admin:URL-PASSWORD-3@127.0.0.1:{other_host.port}/missing.png"
    marker = "PAYLOAD-MARKER-" + "z" * 3000
    answers = []
    setup = dict(load_fixture("setup"), access_token="SETUP-ACCESS-TOKEN-4")
    answers.append(client.post("/setup", json=setup, headers=basic()))
    for url in (
        signed,
        with_password,
        "/data/upload/6/" + marker + ".png",
        "data:image/png;base64," + marker,
    ):
        answers.append(client.post("/predict", json=batch_for(url), headers=basic()))
        answers.append(client.post("/predict", json=interactive_for(url), headers=basic()))
    hook = load_fixture("webhook_annotation_created_brush")
    hook["project"]["token"] = "PROJECT-TOKEN-5"
    hook["annotation"]["result"][0]["value"]["brushlabels"] = [marker]
    hook["task"]["data"] = {"image": GOOD_IMAGE}
    answers.append(client.post("/webhook", json=hook, headers={"X-Samsem-Webhook-Secret": SECRET}))
    hook["annotation"]["id"] = 2
    hook["task"]["data"] = {"image": signed}
    answers.append(client.post("/webhook", json=hook, headers={"X-Samsem-Webhook-Secret": SECRET}))
    answers.append(
        client.post("/webhook", json={"action": marker}, headers={"X-Samsem-Webhook-Secret": SECRET})
    )
    answers.append(
        client.post(
            "/webhook",
            json={"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": marker}},
            headers={"X-Samsem-Webhook-Secret": SECRET},
        )
    )
    answers.append(client.get("/health", headers=basic(USER, "wrong-" + PASSWORD)))
    answers.append(client.post("/webhook", json=hook, headers={"X-Samsem-Webhook-Secret": "wrong-" + SECRET}))
    assert runtime.queue.join(timeout=60)
    answers.append(client.get("/metrics", headers=basic()))
    secrets = [
        API_TOKEN,
        PASSWORD,
        SECRET,
        "SIGNATURE-SECRET-1",
        "QUERY-TOKEN-2",
        "URL-PASSWORD-3",
        "SETUP-ACCESS-TOKEN-4",
        "PROJECT-TOKEN-5",
    ]
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    answered = "".join(answer.get_data(as_text=True) for answer in answers)
    for secret in secrets:
        assert secret not in text, f"{secret} in the log"
        assert secret not in answered, f"{secret} in an answer"
    assert marker not in text and marker not in answered, "a whole payload value was echoed"
    assert max(len(r.getMessage()) for r in caplog.records) <= MAX_LOG_MESSAGE


def test_the_service_logging_cuts_long_messages_and_drops_url_logs():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("urllib3").level)
    try:
        configure_logging("DEBUG")
        stream = io.StringIO()
        for handler in root.handlers:
            handler.setStream(stream)
        logging.getLogger("backend.test").info("long %s", "y" * 50_000)
        logging.getLogger("urllib3.connectionpool").debug('"GET /x.png?X-Amz-Signature=SIG HTTP/1.1" 200')
        written = stream.getvalue()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("urllib3").setLevel(saved[2])
    assert "long yyy" in written and len(written) < MAX_LOG_MESSAGE + 200
    assert "X-Amz-Signature" not in written


# -- resource bounds ---------------------------------------------------------------------------------


def real_bytes(value, seen=None) -> int:
    """Bytes of every numpy array / torch tensor reachable from ``value`` (attributes, items)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return 0 if value.dtype == object else int(value.nbytes)
    if isinstance(value, torch.Tensor):
        return int(value.element_size() * value.nelement())
    if isinstance(value, dict):
        return sum(real_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(real_bytes(item, seen) for item in value)
    attributes = getattr(value, "__dict__", None)
    return sum(real_bytes(item, seen) for item in attributes.values()) if attributes else 0


def test_every_cache_is_bounded_by_its_setting_and_metered(label_studio, tmp_path):
    from backend.runtime import Runtime, build_models
    from tests.conftest import tiny_settings

    settings = tiny_settings(
        tmp_path, label_studio.url, sam_cache_mb=1, embed_cache_mb=2, image_cache_mb=3, proposal_cache_mb=4
    )
    models = build_models(settings)
    runtime = Runtime(settings, models_factory=lambda _settings: models)
    client = create_app(settings, runtime).test_client()
    assert client.post("/predict", json=batch_for(GOOD_IMAGE)).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    capacity = {labels["cache"]: v for labels, v in metric_samples(text, "samsem_cache_capacity_bytes")}
    held = {labels["cache"]: v for labels, v in metric_samples(text, "samsem_cache_bytes")}
    assert capacity == {"sam": 1 << 20, "embedder": 2 << 20, "image": 3 << 20, "proposals": 4 << 20}
    assert all(0 < held[name] <= capacity[name] for name in capacity), held
    runtime.close()


def test_cached_values_are_counted_at_their_real_size(make_client):
    client, runtime = make_client()
    for path in FIXTURE_IMAGE_PATHS:
        assert client.post("/predict", json=batch_for(path)).status_code == 200
    models = runtime.models
    caches = {
        "image": runtime.fetcher.cache,
        "sam": models.proposer.cache,
        "embedder": models.embedder.cache,
        "proposals": models.pipeline.proposal_cache,
    }
    for name, cache in caches.items():
        values = [value for value, _ in cache._items.values()]  # the cached values themselves
        assert values, f"{name} cache holds something"
        assert cache.nbytes <= cache.max_bytes
        assert cache.nbytes >= 0.95 * sum(real_bytes(value) for value in values), f"{name} under-counts"


def test_a_label_config_beyond_one_mib_is_refused(make_client):
    client, _ = make_client()
    huge = load_fixture("setup")["schema"].replace("<View>", "<View>" + "<!--" + "x" * (1 << 20) + "-->", 1)
    response = client.post("/setup", json=dict(load_fixture("setup"), schema=huge))
    assert response.status_code == 400 and "at most" in response.get_json()["error"]


@pytest.fixture
def held_queue(make_client, monkeypatch):
    """A client whose learning jobs wait for ``release`` (set it to let them run)."""
    client, runtime = make_client(queue_max=3, queue_max_mb=1)
    release = threading.Event()
    learn = runtime.learning.learn_annotation

    def held(*args):
        assert release.wait(60)
        return learn(*args)

    monkeypatch.setattr(runtime.learning, "learn_annotation", held)
    yield client, runtime, release
    release.set()


def annotation_event(annotation_id: int, pad: int = 0) -> dict:
    body = load_fixture("webhook_annotation_created_brush")
    body["annotation"]["id"] = annotation_id
    body["task"]["data"] = {"image": GOOD_IMAGE}
    if pad:
        body["padding"] = "p" * pad
    return body


def start_one_job(client, runtime) -> None:
    """Queue annotation 1 and wait until the worker holds it (running, waiting for release)."""
    assert client.post("/webhook", json=annotation_event(1)).status_code == 200
    assert wait_until(lambda: runtime.queue.in_flight == 1 and runtime.queue.qsize() == 0, timeout=30)


def test_a_full_queue_answers_503_with_retry_after_and_changes_nothing(held_queue):
    client, runtime, release = held_queue
    start_one_job(client, runtime)
    for annotation_id in (2, 3, 4):
        client.post("/webhook", json=annotation_event(annotation_id))
    assert runtime.queue.qsize() == 3
    refused = client.post("/webhook", json=annotation_event(5))
    assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
    error = refused.get_json()["error"]
    assert "queue full" in error and "LEARN_QUEUE_MAX=3" in error and "START_TRAINING" in error
    release.set()
    assert runtime.queue.join(timeout=60) and runtime.queue.failed == 0
    learnt = runtime.store.annotation_ids("1", runtime.space)
    assert learnt == ["1", "2", "3", "4"], "the refused event (5) was not learnt, the others were"
    assert client.post("/webhook", json=annotation_event(5)).status_code == 200, "accepted once drained"


def test_a_bulk_webhook_is_queued_whole_or_not_at_all(held_queue):
    client, runtime, release = held_queue
    start_one_job(client, runtime)
    client.post("/webhook", json=annotation_event(2))
    client.post("/webhook", json=annotation_event(3))
    first, second = annotation_event(11), annotation_event(12)
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "annotations": [first["annotation"], second["annotation"]],
        "tasks": [first["task"]],
        "project": first["project"],
    }
    waiting = runtime.queue.qsize()
    assert waiting == 2
    assert client.post("/webhook", json=bulk).status_code == 503
    assert runtime.queue.qsize() == waiting, "no part of the bulk event was queued"


def test_the_queue_is_bounded_in_bytes_too(held_queue):
    client, runtime, release = held_queue
    start_one_job(client, runtime)
    assert client.post("/webhook", json=annotation_event(2, pad=600_000)).status_code == 200
    refused = client.post("/webhook", json=annotation_event(3, pad=600_000))
    assert refused.status_code == 503 and "LEARN_QUEUE_MB=1" in refused.get_json()["error"]
    assert runtime.queue.waiting_bytes < 1 << 20
