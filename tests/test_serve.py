"""``python -m backend`` as a real process: gunicorn serves /health, /setup and /predict over HTTP
with the tiny models; bad settings stop it at once with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import API_TOKEN, TINY_ENV, load_fixture
from tests.support.processes import free_port
from tests.support.processes import stop_process_group as stop

ROOT = Path(__file__).resolve().parents[1]


def base_env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {key: os.environ[key] for key in keep if key in os.environ} | extra


def call(port: int, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_python_m_backend_serves_health_setup_and_predict(label_studio, tmp_path):
    port = free_port()
    env = base_env(
        **TINY_ENV,
        MODEL_DIR=str(tmp_path / "model_dir"),
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=API_TOKEN,
        HOST="127.0.0.1",
        PORT=str(port),
        WORKERS="1",
        THREADS="2",
    )
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and health is None:
            assert process.poll() is None, (
                f"service exited {process.returncode}:\n{log_path.read_text()[-3000:]}"
            )
            try:
                health = call(port, "/health", timeout=5)
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        assert health is not None, f"/health never answered:\n{log_path.read_text()[-3000:]}"
        assert health[0] == 200 and health[1]["status"] == "UP"
        assert health[1]["models_loaded"] is False, "models load lazily, not at start"
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_ARENA_MAX=2" in environ, "gunicorn runs with fewer malloc arenas"
        assert b"OPENBLAS_NUM_THREADS=1" in environ, "numpy's BLAS leaves the cores to torch"

        status, setup = call(port, "/setup", load_fixture("setup"))
        assert status == 200 and setup["model_version"].startswith("samsem-")

        status, predicted = call(port, "/predict", load_fixture("predict_batch_1"))
        assert status == 200, predicted
        (prediction,) = predicted["results"]
        assert prediction["model_version"] == setup["model_version"]
        assert prediction["result"] and prediction["result"][0]["original_width"] == 64

        assert call(port, "/health")[1]["models_loaded"] is True
        log_text = log_path.read_text()
        assert "gthread" in log_text.lower() or "Booting worker" in log_text, log_text[-2000:]
    finally:
        stop(process)
    assert process.returncode is not None


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"PORT": "ninety", "SAM_MODEL_TYPE": "vit_q"}, ["PORT", "SAM_MODEL_TYPE"]),
        ({"SAM_MODEL_TYPE": "vit_b", "SAM_CHECKPOINT": "/nonexistent/sam.pth"}, ["SAM_CHECKPOINT"]),
        ({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}, ["WEBHOOK_SECRET"]),
    ],
)
def test_python_m_backend_refuses_bad_settings_with_exit_status_2(tmp_path, env, names):
    run_env = base_env(**dict(TINY_ENV, MODEL_DIR=str(tmp_path), **env))
    result = subprocess.run(
        [sys.executable, "-m", "backend"], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in result.stderr


def test_python_m_backend_check_prints_settings_without_secrets(tmp_path):
    run_env = base_env(**dict(TINY_ENV, MODEL_DIR=str(tmp_path), LABEL_STUDIO_API_KEY="very-secret-key"))
    result = subprocess.run(
        [sys.executable, "-m", "backend", "--check"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["sam_model_type"] == "tiny-random" and described["label_studio_api_key"] == "***"
    assert "very-secret-key" not in result.stdout + result.stderr
