"""Harness for end-to-end tests against a real Label Studio server (and the real samsem service).

What it does, in the order a test needs it:

- ``ensure_label_studio``: installs ``label-studio`` 1.23.x into its OWN virtualenv (default
  ``<repo>/.venv-labelstudio``, overridden by ``LABEL_STUDIO_VENV``), reused when it already imports.
- ``ManagedProcess``: a server started in its own process group, logging to a file, stopped by
  group id (``SIGTERM``, then ``SIGKILL``) from a fixture finaliser and, as a last resort, ``atexit``.
- ``start_label_studio`` / ``start_samsem_backend``: the two servers, headless on free loopback
  ports, with throwaway data directories; both wait for ``/health``.
- ``LabelStudioClient`` / ``BackendClient``: the few REST calls the scenario makes, each failing
  with an error that names the request and quotes the answer.
- ``StepRunner``: ``with steps.step("name"):`` turns the first failure into a readable pytest
  failure carrying the last lines of both servers' logs; it also records how long each step took.

Coordinates never appear here: this module moves JSON and bytes; the test decides what they mean.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_REQUIREMENT = "label-studio>=1.23.2,<1.24"
LABEL_STUDIO_SERIES = "1.23."
VENV_ENV_VAR = "LABEL_STUDIO_VENV"
START_TIMEOUT_ENV_VAR = "LABEL_STUDIO_START_TIMEOUT"
DEFAULT_START_TIMEOUT_S = 300.0  # ~45 s on an idle 2-core machine; 100+ s when the cores are busy
LOG_TAIL_LINES = 60
# Variables a child server inherits from the test process; everything else is set explicitly so
# that a developer's HOST/PORT/USERNAME/LABEL_STUDIO_* cannot leak into the servers.
PASSED_THROUGH_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SSL_CERT_FILE")


class HarnessError(RuntimeError):
    """The end-to-end harness could not do what was asked (install, start, reach a server)."""


class ApiError(HarnessError):
    """An HTTP call answered with an unexpected status; the message names the request and answer."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:800]}")
        self.method = method
        self.url = url
        self.status = status
        self.body = body


# --------------------------------------------------------------------------- install


def label_studio_venv_path(env: Mapping[str, str] | None = None) -> Path:
    """Where Label Studio's own virtualenv lives: ``$LABEL_STUDIO_VENV`` or ``<repo>/.venv-labelstudio``."""
    env = os.environ if env is None else env
    override = env.get(VENV_ENV_VAR, "").strip()
    return Path(override).expanduser().resolve() if override else REPO_ROOT / ".venv-labelstudio"


def installed_label_studio_version(venv: Path) -> str | None:
    """``label_studio.__version__`` as that virtualenv's Python imports it, or None if it does not."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import label_studio; print(label_studio.__version__)"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if probe.returncode != 0:
        return None
    return probe.stdout.strip() or None


@dataclass(frozen=True)
class LabelStudioInstall:
    """A usable Label Studio installation.

    Attributes:
        venv: the virtualenv directory.
        version: ``label_studio.__version__``.
        reused: True when an existing installation was used as it was.
        seconds: wall time spent checking and (if needed) installing.
    """

    venv: Path
    version: str
    reused: bool
    seconds: float

    @property
    def executable(self) -> Path:
        """The ``label-studio`` console script of the virtualenv."""
        return self.venv / "bin" / "label-studio"


def ensure_label_studio(venv: Path, *, log_path: Path, timeout: float = 900.0) -> LabelStudioInstall:
    """Reuse or build a virtualenv holding ``label-studio`` 1.23.x; pip's output goes to ``log_path``.

    Raises:
        HarnessError: ``venv`` is an existing non-virtualenv directory (never overwritten), or the
            install failed (the message carries pip's last lines).
    """
    started = time.monotonic()
    version = installed_label_studio_version(venv)
    if version is not None and version.startswith(LABEL_STUDIO_SERIES):
        return LabelStudioInstall(venv, version, True, time.monotonic() - started)
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise HarnessError(
            f"{venv} exists but is not a virtualenv (no pyvenv.cfg); refusing to overwrite it. "
            f"Point {VENV_ENV_VAR} at an empty or virtualenv directory."
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    commands = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            LABEL_STUDIO_REQUIREMENT,
        ],
    ]
    with log_path.open("ab") as log:
        for command in commands:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            remaining = max(1.0, timeout - (time.monotonic() - started))
            try:
                done = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, timeout=remaining, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise HarnessError(
                    f"installing Label Studio took more than {timeout:.0f} s: {' '.join(command)}\n"
                    + tail_of_file(log_path)
                ) from exc
            if done.returncode != 0:
                raise HarnessError(
                    f"installing Label Studio failed (exit {done.returncode}): {' '.join(command)}\n"
                    + tail_of_file(log_path)
                )
    version = installed_label_studio_version(venv)
    if version is None or not version.startswith(LABEL_STUDIO_SERIES):
        raise HarnessError(
            f"after installing {LABEL_STUDIO_REQUIREMENT!r} into {venv}, label_studio imports as version "
            f"{version!r}; expected {LABEL_STUDIO_SERIES}x\n" + tail_of_file(log_path)
        )
    return LabelStudioInstall(venv, version, False, time.monotonic() - started)


# --------------------------------------------------------------------------- processes


def tail_of_file(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a text file (decoded leniently), or a note that it is missing.

    Consecutive identical lines count once (Label Studio logs every line through two handlers).
    """
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    kept: list[str] = []
    for line in data.decode("utf-8", "replace").splitlines():
        if not kept or line != kept[-1]:
            kept.append(line)
    return "\n".join(kept[-lines:])


def process_group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is ``pgid`` (Linux ``/proc``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


_LIVE_PROCESSES: set[ManagedProcess] = set()


class ManagedProcess:
    """A server process in its own session/process group, with stdout+stderr appended to a log file.

    ``stop()`` signals the whole group, so workers forked by the server (gunicorn) go too.
    Every started process is also stopped at interpreter exit if a test forgot to.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        """Start the process (once); returns self."""
        if self.popen is not None:
            raise HarnessError(f"{self.name} was already started (pid {self.popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE_PROCESSES.add(self)
        return self

    @property
    def pid(self) -> int:
        """Pid of the started process (also its process-group id)."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the process's log."""
        return tail_of_file(self.log_path, lines)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def _wait_group_gone(self, seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while True:
            if self.popen is not None:
                self.popen.poll()  # reap the leader so it does not linger as a zombie
            members = process_group_members(self.pid)
            if not members or time.monotonic() >= deadline:
                return members
            time.sleep(0.1)

    def stop(self, grace: float = 20.0) -> list[int]:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; return pids still alive.

        The returned list is empty when everything stopped (callers assert on it).
        """
        if self.popen is None:
            return []
        self._signal_group(signal.SIGTERM)
        left = self._wait_group_gone(grace)
        if left or self.popen.poll() is None:
            self._signal_group(signal.SIGKILL)
            left = self._wait_group_gone(10.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        _LIVE_PROCESSES.discard(self)
        return left


@atexit.register
def _stop_forgotten_processes() -> None:
    for process in list(_LIVE_PROCESSES):
        process.stop(grace=5.0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the servers' own checks catch races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(
    url: str,
    *,
    timeout: float,
    process: ManagedProcess | None = None,
    auth: tuple[str, str] | None = None,
    expected_status: int = 200,
) -> float:
    """Poll ``GET url`` until it answers ``expected_status``; return the seconds it took.

    Raises:
        HarnessError: ``process`` exited first, or ``timeout`` seconds passed (names the last answer).
    """
    started = time.monotonic()
    last = "no answer yet"
    while True:
        if process is not None and not process.running:
            raise HarnessError(
                f"{process.name} exited with code {process.popen.returncode if process.popen else None} "
                f"before {url} answered; last: {last}"
            )
        try:
            answer = requests.get(url, timeout=3, auth=auth)
            if answer.status_code == expected_status:
                return time.monotonic() - started
            last = f"HTTP {answer.status_code}: {answer.text[:300]}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() - started > timeout:
            raise HarnessError(f"{url} did not answer {expected_status} within {timeout:.0f} s; last: {last}")
        time.sleep(0.5)


def base_environment(home: Path) -> dict[str, str]:
    """A small environment for a child server: PATH/locale from ours, HOME in a throwaway dir."""
    env = {name: os.environ[name] for name in PASSED_THROUGH_ENV if name in os.environ}
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(
    probe: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float, what: str, interval: float = 0.5
) -> Any:
    """Call ``probe()`` until ``done(value)``; return that value.

    Raises:
        TimeoutError: after ``timeout`` seconds, naming ``what`` and the last value seen.
    """
    started = time.monotonic()
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}; last value: {value!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------- the two servers


def label_studio_start_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds to wait for Label Studio's ``/health``: ``$LABEL_STUDIO_START_TIMEOUT`` or 300.

    Raises:
        ValueError: the variable is set but not a positive number.
    """
    env = os.environ if env is None else env
    raw = env.get(START_TIMEOUT_ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_START_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{START_TIMEOUT_ENV_VAR}: expected a positive number of seconds, got {raw!r}")
    return seconds


@dataclass
class LabelStudioServer:
    """A running Label Studio: its process, base URL (no trailing slash) and the admin's credentials."""

    process: ManagedProcess
    url: str
    port: int
    username: str
    password: str
    token: str
    start_seconds: float


def label_studio_environment(
    data_dir: Path, *, url: str, username: str, password: str, token: str
) -> dict[str, str]:
    """Environment of a headless Label Studio 1.23 on loopback (see docs: ENVIRONMENT.md)."""
    return base_environment(data_dir) | {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_HOST": url,
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "ML_BLOCK_LOCAL_IP": "false",  # else it refuses an ML backend on 127.0.0.1
        "SSRF_PROTECTION_ENABLED": "false",  # else it refuses webhooks to 127.0.0.1
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(data_dir),
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }


def start_label_studio(
    install: LabelStudioInstall,
    data_dir: Path,
    *,
    log_path: Path,
    port: int | None = None,
    timeout: float | None = None,
) -> LabelStudioServer:
    """Start Label Studio headless on ``127.0.0.1:port`` with a throwaway data dir; wait for ``/health``.

    ``timeout`` (seconds) defaults to :func:`label_studio_start_timeout`.

    Also checks that it serves on the port asked for (it silently moves to another port when that
    one is busy) and that the instance answering there knows our token.

    Raises:
        HarnessError: it exited, did not answer within ``timeout`` s, or is not on ``port``.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    username, password, token = "e2e@samsem.test", secrets.token_urlsafe(12), secrets.token_hex(20)
    data_dir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess(
        "label-studio",
        [
            install.executable,
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        env=label_studio_environment(data_dir, url=url, username=username, password=password, token=token),
        cwd=data_dir,
        log_path=log_path,
    ).start()
    try:
        seconds = wait_for_http(
            f"{url}/health", timeout=timeout or label_studio_start_timeout(), process=process
        )
        check_label_studio_port(process, port)
        whoami = LabelStudioClient(url, token).whoami()
        if whoami.get("email") != username:
            raise HarnessError(f"the server on port {port} is not ours: whoami answered {whoami!r}")
    except BaseException:
        process.stop()
        raise
    return LabelStudioServer(process, url, port, username, password, token, seconds)


def check_label_studio_port(process: ManagedProcess, port: int) -> None:
    """Fail if Label Studio's log shows it moved away from ``port`` or never announced it."""
    log = tail_of_file(process.log_path, lines=400)
    if "is in use" in log:
        raise HarnessError(f"Label Studio found port {port} busy and moved to another one:\n{log}")
    if f"Starting development server at http://127.0.0.1:{port}/" not in log:
        raise HarnessError(f"Label Studio's log does not announce port {port}:\n{log}")


@dataclass
class BackendServer:
    """A running samsem service (``python -m backend``) with its basic-auth and webhook credentials."""

    process: ManagedProcess
    url: str
    port: int
    user: str
    password: str
    webhook_secret: str
    model_dir: Path
    start_seconds: float

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for requests' ``auth=``."""
        return (self.user, self.password)


def backend_environment(
    label_studio: LabelStudioServer,
    work_dir: Path,
    *,
    port: int,
    user: str,
    password: str,
    webhook_secret: str,
) -> dict[str, str]:
    """Environment of the samsem service with tiny random models, pointed at ``label_studio``."""
    return base_environment(work_dir) | {
        "SAM_MODEL_TYPE": "tiny-random",
        "EMBEDDER_MODEL": "test_vit",
        "EMBEDDER_WEIGHTS": "random",
        "MODEL_DIR": str(work_dir / "model_dir"),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "BASIC_AUTH_USER": user,
        "BASIC_AUTH_PASS": password,
        "WEBHOOK_SECRET": webhook_secret,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "THREADS": "4",
        "LOG_LEVEL": "INFO",
    }


def start_samsem_backend(
    label_studio: LabelStudioServer,
    work_dir: Path,
    *,
    log_path: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    command: Sequence[str] | None = None,
) -> BackendServer:
    """Start ``python -m backend`` (this interpreter, repo root as cwd) on a free port; wait for ``/health``.

    ``command`` replaces ``[sys.executable, "-m", "backend"]`` (same environment), e.g. for a stand-in.

    Raises:
        HarnessError: it exited or did not answer ``/health`` (with basic auth) within ``timeout`` s.
    """
    port = free_port()
    user, password, secret = "samsem-e2e", secrets.token_urlsafe(12), secrets.token_urlsafe(24)
    work_dir.mkdir(parents=True, exist_ok=True)
    env = backend_environment(
        label_studio, work_dir, port=port, user=user, password=password, webhook_secret=secret
    ) | dict(extra_env or {})
    argv = list(command) if command is not None else [sys.executable, "-m", "backend"]
    process = ManagedProcess("samsem-backend", argv, env=env, cwd=REPO_ROOT, log_path=log_path).start()
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_for_http(f"{url}/health", timeout=timeout, process=process, auth=(user, password))
    except BaseException:
        process.stop()
        raise
    return BackendServer(process, url, port, user, password, secret, Path(env["MODEL_DIR"]), seconds)


# --------------------------------------------------------------------------- HTTP clients


def _checked(answer: requests.Response, expected: Sequence[int]) -> Any:
    if answer.status_code not in expected:
        raise ApiError(answer.request.method or "?", answer.url, answer.status_code, answer.text)
    if not answer.content:
        return None
    if "json" in answer.headers.get("Content-Type", ""):
        return answer.json()
    return answer.text


class LabelStudioClient:
    """The Label Studio REST calls the end-to-end scenario makes, authenticated with a legacy token."""

    def __init__(self, url: str, token: str, *, timeout: float = 180.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, *, expected: Sequence[int] = (200, 201), **kwargs: Any) -> Any:
        """``method path`` relative to the server; the decoded JSON (or text, or None).

        Raises:
            ApiError: the status is not in ``expected``.
        """
        answer = self.session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        return _checked(answer, expected)

    def whoami(self) -> dict:
        """The current user (``email``, ``id``...)."""
        return self.call("GET", "/api/current-user/whoami")

    def create_project(self, title: str, label_config: str) -> dict:
        """A new project with that XML label config."""
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})

    def import_files(self, project_id: int, files: Mapping[str, bytes]) -> dict:
        """Upload files (name -> bytes) through the import API; each image becomes one task."""
        parts = [(name, (name, data, "application/octet-stream")) for name, data in files.items()]
        return self.call("POST", f"/api/projects/{project_id}/import", files=parts)

    def tasks(self, project_id: int) -> list[dict]:
        """All tasks of the project, in id order."""
        found = self.call("GET", "/api/tasks", params={"project": project_id, "page_size": 1000})
        tasks = found["tasks"] if isinstance(found, dict) else found
        return sorted(tasks, key=lambda task: task["id"])

    def task(self, task_id: int) -> dict:
        """One task, with ``annotations`` and ``predictions``."""
        return self.call("GET", f"/api/tasks/{task_id}")

    def download(self, path: str, *, authenticated: bool = True) -> requests.Response:
        """``GET`` a server-relative path (e.g. a task's ``/data/upload/...``), with or without the token."""
        getter = self.session.get if authenticated else requests.get
        return getter(f"{self.url}{path}", timeout=self.timeout, allow_redirects=False)

    def connect_ml_backend(
        self,
        project_id: int,
        url: str,
        *,
        title: str,
        basic_auth: tuple[str, str] | None,
        interactive: bool = True,
    ) -> dict:
        """``POST /api/ml``: Label Studio checks ``/health`` and ``/setup`` before it answers."""
        body: dict[str, Any] = {
            "project": project_id,
            "url": url,
            "title": title,
            "is_interactive": interactive,
        }
        if basic_auth is not None:
            body |= {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": basic_auth[0],
                "basic_auth_pass": basic_auth[1],
            }
        return self.call("POST", "/api/ml", json=body)

    def ml_backend(self, ml_id: int) -> dict:
        """The ML backend as Label Studio sees it (``state``, ``model_version``...)."""
        return self.call("GET", f"/api/ml/{ml_id}")

    def webhooks(self, project_id: int) -> list[dict]:
        """Webhooks of the project (Label Studio auto-creates one per connected ML backend)."""
        return self.call("GET", "/api/webhooks", params={"project": project_id})

    def update_webhook(self, webhook_id: int, **fields: Any) -> dict:
        """``PATCH`` a webhook (``headers``, ``is_active``...)."""
        return self.call("PATCH", f"/api/webhooks/{webhook_id}", json=fields)

    def create_webhook(self, project_id: int, url: str, headers: Mapping[str, str]) -> dict:
        """A webhook for every action of the project, with the payload and extra headers."""
        body = {
            "project": project_id,
            "url": url,
            "send_payload": True,
            "send_for_all_actions": True,
            "headers": dict(headers),
            "is_active": True,
        }
        return self.call("POST", "/api/webhooks", json=body)

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int]) -> dict:
        """The Data Manager's "Retrieve predictions" action on those tasks (synchronous here)."""
        return self.call(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": {"all": False, "included": list(task_ids)}},
        )

    def predictions(self, task_id: int) -> list[dict]:
        """Stored predictions of a task, oldest first."""
        found = self.call("GET", "/api/predictions", params={"task": task_id})
        return sorted(found, key=lambda prediction: prediction["id"])

    def interactive_annotating(self, ml_id: int, task_id: int, context: Mapping[str, Any]) -> dict:
        """What a smart tool gets: ``{"data": prediction}`` or ``{"errors": [...]}``."""
        return self.call(
            "POST",
            f"/api/ml/{ml_id}/interactive-annotating",
            json={"task": task_id, "context": dict(context)},
        )

    def create_annotation(self, task_id: int, result: list[dict]) -> dict:
        """Submit an annotation for a task (fires ``ANNOTATION_CREATED``)."""
        return self.call(
            "POST",
            f"/api/tasks/{task_id}/annotations",
            json={"result": result, "was_cancelled": False, "ground_truth": False},
        )

    def update_annotation(self, annotation_id: int, result: list[dict]) -> dict:
        """Replace an annotation's result (fires ``ANNOTATION_UPDATED``)."""
        return self.call("PATCH", f"/api/annotations/{annotation_id}", json={"result": result})

    def delete_annotation(self, annotation_id: int) -> None:
        """Delete an annotation (fires ``ANNOTATIONS_DELETED``)."""
        self.call("DELETE", f"/api/annotations/{annotation_id}", expected=(200, 204))

    def train(self, ml_id: int) -> None:
        """ "Start training" (sends ``START_TRAINING`` to the backend's ``/webhook``)."""
        self.call("POST", f"/api/ml/{ml_id}/train", expected=(200, 201, 204))


class BackendClient:
    """Direct calls to the samsem service (basic auth), for what Label Studio does not show."""

    def __init__(self, server: BackendServer, *, timeout: float = 120.0) -> None:
        self.server = server
        self.timeout = timeout

    def get(self, path: str, *, authenticated: bool = True) -> requests.Response:
        """``GET`` a path of the service, with or without basic auth."""
        auth = self.server.auth if authenticated else None
        return requests.get(f"{self.server.url}{path}", auth=auth, timeout=self.timeout)

    def setup(self, project: str, label_config: str) -> str:
        """``POST /setup`` as Label Studio sends it; the ``model_version`` answered."""
        body = {
            "project": project,
            "schema": label_config,
            "hostname": "",
            "access_token": "",
            "extra_params": None,
        }
        answer = requests.post(
            f"{self.server.url}/setup", json=body, auth=self.server.auth, timeout=self.timeout
        )
        return _checked(answer, (200,))["model_version"]

    def metric_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` of every sample of metric ``name`` in ``/metrics`` (Prometheus text)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = _checked(self.get("/metrics"), (200,))
        return [
            (dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def learn_jobs(self, kind: str, outcome: str = "ok") -> int:
        """``samsem_learn_jobs_total{kind,outcome}``: learning jobs of that kind finished so far."""
        samples = self.metric_samples("samsem_learn_jobs_total")
        return int(sum(value for labels, value in samples if labels == {"kind": kind, "outcome": outcome}))

    def exemplar_counts(self, project_id: int) -> dict[str, int]:
        """``samsem_exemplars{project,label}``: stored positive exemplars per label (zeros left out)."""
        return {
            labels["label"]: int(value)
            for labels, value in self.metric_samples("samsem_exemplars")
            if labels.get("project") == str(project_id) and value
        }

    def exemplar_kinds(self, project_id: int) -> dict[str, int]:
        """``samsem_exemplars_by_kind{project,kind}``: stored exemplars per kind (zeros left out)."""
        return {
            labels["kind"]: int(value)
            for labels, value in self.metric_samples("samsem_exemplars_by_kind")
            if labels.get("project") == str(project_id) and value
        }


# --------------------------------------------------------------------------- steps


@dataclass
class StepRunner:
    """Runs named steps; the first failing one fails the test with the servers' log tails.

    Use ``with steps.step("batch predictions"): ...``. ``timings`` maps each step to seconds.
    """

    processes: list[ManagedProcess] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def watch(self, process: ManagedProcess) -> None:
        """Include this process's log tail in failure reports."""
        if process not in self.processes:
            self.processes.append(process)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block; turn any exception raised in it into a readable ``pytest.fail``."""
        started = time.monotonic()
        report = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable report
            report = self.failure_report(name, exc)
        finally:
            self.timings[name] = time.monotonic() - started
        if report is not None:  # "from None": the report already tells the original error
            raise pytest.fail.Exception(report, pytrace=False) from None

    def failure_report(self, name: str, exc: BaseException) -> str:
        """The step, the error, where it was raised, and the last lines of every watched server's log."""
        where = "".join(traceback.format_tb(exc.__traceback__)[-4:])
        parts = [f"end-to-end step {name!r} failed: {type(exc).__name__}: {exc}", f"raised at:\n{where}"]
        for process in self.processes:
            state = (
                "running"
                if process.running
                else f"exited {process.popen.returncode if process.popen else '-'}"
            )
            parts.append(
                f"--- {process.name} ({state}) log tail, last {LOG_TAIL_LINES} lines of "
                f"{process.log_path} ---\n{process.log_tail()}"
            )
        return "\n\n".join(parts)

    def summary(self) -> str:
        """One line per step: seconds and name."""
        return "\n".join(f"{seconds:8.1f} s  {name}" for name, seconds in self.timings.items())
