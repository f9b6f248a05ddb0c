"""Request authentication: HTTP basic auth on every route, a shared secret for ``/webhook``.

Label Studio sends basic-auth credentials (set on the model's connection form) with ``/health``,
``/setup`` and ``/predict``, but its webhooks carry only the webhook's own headers. So
``/webhook`` accepts any of:

* the header ``X-Samsem-Webhook-Secret: <WEBHOOK_SECRET>`` (add it to the project's webhook in
  Label Studio: Settings → Webhooks → the ML backend's webhook → Headers);
* ``Authorization: Bearer <WEBHOOK_SECRET>`` or ``Authorization: Token <WEBHOOK_SECRET>``;
* valid basic-auth credentials.

With neither basic auth nor a webhook secret configured, every request is accepted. All
comparisons are constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping

import flask

from backend.settings import Settings

WEBHOOK_SECRET_HEADER = "X-Samsem-Webhook-Secret"
WEBHOOK_PATH = "/webhook"
REALM = "samsem"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header ``name`` from any mapping, case-insensitively (werkzeug Headers or a dict)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def _basic_credentials(header_value: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic <base64>`` value, None if malformed."""
    if not header_value:
        return None
    scheme, _, encoded = header_value.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def basic_auth_ok(header_value: str | None, user: str, password: str) -> bool:
    """True when ``header_value`` (the ``Authorization`` header) carries exactly ``user`` and
    ``password``. Both parts are compared in constant time; malformed values are False."""
    credentials = _basic_credentials(header_value)
    if credentials is None:
        return False
    user_ok = _same(credentials[0], user)
    password_ok = _same(credentials[1], password)
    return user_ok and password_ok


def _bearer_or_token(header_value: str | None) -> str | None:
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "token") and token.strip() else None


def webhook_auth_ok(headers: Mapping[str, str], settings: Settings) -> bool:
    """Whether a ``/webhook`` request with ``headers`` is authenticated (see module docstring)."""
    secret = settings.webhook_secret
    if not settings.basic_auth_enabled and not secret:
        return True
    authorization = _header(headers, "Authorization")
    if secret:
        given = _header(headers, WEBHOOK_SECRET_HEADER)
        if given is not None and _same(given, secret):
            return True
        token = _bearer_or_token(authorization)
        if token is not None and _same(token, secret):
            return True
    return settings.basic_auth_enabled and basic_auth_ok(
        authorization, settings.basic_auth_user or "", settings.basic_auth_pass or ""
    )


def _basic_auth_problem(header_value: str | None) -> str:
    if not header_value:
        return "authentication required: missing Authorization header (HTTP basic auth)"
    if _basic_credentials(header_value) is None:
        return "authentication required: malformed Authorization header (expected HTTP basic auth)"
    return "authentication failed: wrong user name or password"


def _webhook_problem(headers: Mapping[str, str], settings: Settings) -> str:
    if settings.webhook_secret is None:
        return _basic_auth_problem(_header(headers, "Authorization")) + " for /webhook"
    if _header(headers, WEBHOOK_SECRET_HEADER) is None and _header(headers, "Authorization") is None:
        return (
            f"webhook authentication required: missing {WEBHOOK_SECRET_HEADER} header; add it with the "
            "value of WEBHOOK_SECRET to the project's webhook in Label Studio"
        )
    return f"webhook authentication failed: wrong {WEBHOOK_SECRET_HEADER} / credentials"


def _unauthorized(message: str, *, basic: bool) -> flask.Response:
    response = flask.jsonify({"error": message})
    response.status_code = 401
    if basic:
        response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
    return response


def install_auth(app: flask.Flask, settings: Settings) -> None:
    """Register a ``before_request`` hook enforcing the settings' authentication on ``app``.

    ``/webhook`` (with or without trailing slash) uses :func:`webhook_auth_ok`; every other path,
    ``/health`` and ``/metrics`` included, requires basic auth when it is configured. Failures
    answer 401 JSON ``{"error": ...}`` naming what is missing, with ``WWW-Authenticate: Basic``
    when basic auth is configured.
    """
    if not settings.basic_auth_enabled and not settings.webhook_secret:
        return

    def check_auth() -> flask.Response | None:
        request = flask.request
        if request.path.rstrip("/") == WEBHOOK_PATH:
            if webhook_auth_ok(request.headers, settings):
                return None
            return _unauthorized(
                _webhook_problem(request.headers, settings), basic=settings.basic_auth_enabled
            )
        if not settings.basic_auth_enabled:
            return None
        authorization = request.headers.get("Authorization")
        if basic_auth_ok(authorization, settings.basic_auth_user or "", settings.basic_auth_pass or ""):
            return None
        return _unauthorized(_basic_auth_problem(authorization), basic=True)

    app.before_request(check_auth)
