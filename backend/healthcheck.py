"""Container health probe: ``python -m backend.healthcheck`` exits 0 when ``/health`` answers UP.

Reads only ``PORT`` (default 9090) and, when set, ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` from the
environment, so it works under the same settings as the service it probes (Docker ``HEALTHCHECK``).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request


def probe(port: int, user: str | None = None, password: str | None = None, timeout: float = 3.0) -> str:
    """GET ``http://127.0.0.1:{port}/health``; returns "" when UP, else a one-line reason."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
            body = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"health probe failed: {error}"
    if body.get("status") != "UP":
        return f"health probe: status {body.get('status')!r}"
    return ""


def main() -> int:
    port = int(os.environ.get("PORT", "9090"))
    problem = probe(port, os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS"))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
