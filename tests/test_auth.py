"""basic_auth_ok, webhook_auth_ok and install_auth on a tiny Flask app with every route."""

from __future__ import annotations

import base64

import flask
import pytest

from backend.auth import WEBHOOK_SECRET_HEADER, basic_auth_ok, install_auth, webhook_auth_ok
from backend.settings import Settings

USER, PASSWORD, SECRET = "annotator", "pä:ss word", "hook-secret-123"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "header, expected",
    [
        (basic(USER, PASSWORD), True),
        ("basic " + basic(USER, PASSWORD).split(" ", 1)[1], True),  # scheme is case-insensitive
        (basic(USER, "wrong"), False),
        (basic("someone", PASSWORD), False),
        (basic(USER, PASSWORD + "x"), False),
        (basic(USER, ""), False),
        (None, False),
        ("", False),
        ("Basic", False),
        ("Basic !!!not-base64!!!", False),
        ("Basic " + base64.b64encode(b"no-colon").decode(), False),
        ("Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), False),  # not UTF-8
        ("Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), False),
    ],
)
def test_basic_auth_ok(header, expected):
    assert basic_auth_ok(header, USER, PASSWORD) is expected


BOTH = Settings(basic_auth_user=USER, basic_auth_pass=PASSWORD, webhook_secret=SECRET)
SECRET_ONLY = Settings(webhook_secret=SECRET)
OPEN = Settings()


@pytest.mark.parametrize(
    "settings, headers, expected",
    [
        (OPEN, {}, True),
        (BOTH, {WEBHOOK_SECRET_HEADER: SECRET}, True),
        (BOTH, {WEBHOOK_SECRET_HEADER.lower(): SECRET}, True),  # plain dict, other case
        (BOTH, {"Authorization": f"Bearer {SECRET}"}, True),
        (BOTH, {"Authorization": f"Token {SECRET}"}, True),
        (BOTH, {"Authorization": basic(USER, PASSWORD)}, True),
        (BOTH, {}, False),
        (BOTH, {WEBHOOK_SECRET_HEADER: "wrong"}, False),
        (BOTH, {WEBHOOK_SECRET_HEADER: ""}, False),
        (BOTH, {"Authorization": "Bearer wrong"}, False),
        (BOTH, {"Authorization": basic(USER, "wrong")}, False),
        (SECRET_ONLY, {WEBHOOK_SECRET_HEADER: SECRET}, True),
        (SECRET_ONLY, {}, False),
        (SECRET_ONLY, {"Authorization": basic(USER, PASSWORD)}, False),
    ],
)
def test_webhook_auth_ok(settings, headers, expected):
    assert webhook_auth_ok(headers, settings) is expected


ROUTES = [
    ("GET", "/"),
    ("GET", "/health"),
    ("POST", "/setup"),
    ("POST", "/predict"),
    ("GET", "/metrics"),
    ("GET", "/versions"),
]


def make_app(settings: Settings) -> flask.Flask:
    app = flask.Flask("auth-test")
    for method, path in [*ROUTES, ("POST", "/webhook")]:
        app.add_url_rule(path, path, lambda path=path: {"route": path}, methods=[method])
    install_auth(app, settings)
    return app


def call(app: flask.Flask, method: str, path: str, headers: dict[str, str] | None = None):
    return app.test_client().open(path, method=method, headers=headers or {}, json={})


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize(
    "headers, status, message",
    [
        ({}, 401, "missing Authorization"),
        ({"Authorization": "Basic @@@"}, 401, "malformed"),
        ({"Authorization": basic(USER, "nope")}, 401, "wrong user name or password"),
        ({WEBHOOK_SECRET_HEADER: SECRET}, 401, "missing Authorization"),  # the secret opens /webhook only
        ({"Authorization": basic(USER, PASSWORD)}, 200, None),
    ],
)
def test_every_route_requires_basic_auth(method, path, headers, status, message):
    response = call(make_app(BOTH), method, path, headers)
    assert response.status_code == status
    if status == 401:
        assert message in response.get_json()["error"]
        assert response.headers["WWW-Authenticate"] == 'Basic realm="samsem"'
    else:
        assert response.get_json() == {"route": path}


@pytest.mark.parametrize(
    "settings, headers, status, message",
    [
        (BOTH, {WEBHOOK_SECRET_HEADER: SECRET}, 200, None),
        (BOTH, {"Authorization": basic(USER, PASSWORD)}, 200, None),
        (BOTH, {}, 401, f"missing {WEBHOOK_SECRET_HEADER}"),
        (BOTH, {WEBHOOK_SECRET_HEADER: "nope"}, 401, "wrong"),
        (SECRET_ONLY, {"Authorization": f"Bearer {SECRET}"}, 200, None),
        (SECRET_ONLY, {}, 401, "WEBHOOK_SECRET"),
        (OPEN, {}, 200, None),
    ],
)
def test_webhook_route(settings, headers, status, message):
    paths = ["/webhook", "/webhook/"] if status == 401 else ["/webhook"]  # no route for the slash form
    for path in paths:
        response = call(make_app(settings), "POST", path, headers)
        assert response.status_code == status
        if message is not None:
            assert message in response.get_json()["error"]


@pytest.mark.parametrize("settings", [OPEN, SECRET_ONLY])
@pytest.mark.parametrize("method, path", ROUTES)
def test_routes_are_open_without_basic_auth(settings, method, path):
    assert call(make_app(settings), method, path).status_code == 200
