"""The samsem HTTP service as a subprocess for benchmarks: start, call, read its memory, stop.

The service runs exactly as deployed (``python -m backend``: gunicorn, one worker) with task images
read from a local directory (``LOCAL_FILES_DOCUMENT_ROOT``), so no Label Studio is needed. Memory
is read from ``/proc``: the resident set (``VmRSS``) and its peak (``VmHWM``) summed over the
gunicorn master and its workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from backend.native_environment import native_environment

REPO = Path(__file__).resolve().parents[1]
GUNICORN_CONF = REPO / "backend" / "gunicorn_conf.py"
PROJECT = "1"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Cat"/><Label value="Dog"/><Label value="Car"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Cat" smart="true"/><Label value="Dog" smart="true"/><Label value="Car" smart="true"/>
  </KeyPointLabels>
</View>"""
"""A brush project with a smart keypoint tool (what Label Studio's SAM examples use)."""
LABELS = ("Cat", "Dog", "Car")
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 900.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_images(images: list[np.ndarray], directory: Path, prefix: str = "img") -> list[str]:
    """Save ``images`` as PNG under ``directory``; returns their task URLs
    (``/data/local-files/?d=<name>``, relative to the service's ``LOCAL_FILES_DOCUMENT_ROOT``)."""
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for index, image in enumerate(images):
        name = f"{prefix}{index:04d}.png"
        Image.fromarray(image).save(directory / name, compress_level=1)
        urls.append(f"/data/local-files/?d={name}")
    return urls


def task(task_id: int, url: str) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": url}}


def click_body(task_record: Mapping[str, Any], size: tuple[int, int], xy: tuple[float, float]) -> dict:
    """``/predict`` body of one smart-keypoint click at pixel ``xy = (x, y)`` on an image of
    ``size = (H, W)`` (Label Studio sends percent coordinates)."""
    height, width = size
    point = {
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "value": {
            "x": 100.0 * xy[0] / width,
            "y": 100.0 * xy[1] / height,
            "width": 0.5,
            "keypointlabels": [LABELS[0]],
        },
        "is_positive": True,
    }
    return {
        "tasks": [dict(task_record)],
        "project": f"{PROJECT}.1700000000",
        "label_config": LABEL_CONFIG,
        "params": {"context": {"result": [point]}},
    }


def batch_body(tasks: list[dict[str, Any]]) -> dict:
    """``/predict`` body of a batch pre-annotation of ``tasks``."""
    return {"tasks": tasks, "project": f"{PROJECT}.1700000000", "label_config": LABEL_CONFIG, "params": {}}


class Service:
    """One samsem service process (gunicorn master + 1 worker) on a free local port.

    Args:
        env: service settings (environment variables) on top of this process's environment.
        log_path: where the service's stdout/stderr go.
        wsgi_app: ``module:app`` to serve instead of ``python -m backend`` (same gunicorn config and
            native libraries' settings, :func:`~backend.native_environment.native_environment`).
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, wsgi_app: str | None = None) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "backend"]
        if wsgi_app is not None:  # another app under the service's own gunicorn configuration
            self.command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), wsgi_app]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = native_environment(
            {
                **os.environ,
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "WORKERS": "1",
                "LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO),
                **env,
            }
        )
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.session = requests.Session()

    def start(self) -> Service:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process in stop()
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self._log = log
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.session.get(f"{self.url}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service did not answer /health within {START_TIMEOUT_S} s: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST JSON, return the JSON answer; RuntimeError on a non-2xx status."""
        answer = self.session.post(f"{self.url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)
        if not answer.ok:
            raise RuntimeError(f"POST {path} → {answer.status_code}: {answer.text[:500]}")
        return answer.json()

    def get(self, path: str) -> requests.Response:
        answer = self.session.get(f"{self.url}{path}", timeout=REQUEST_TIMEOUT_S)
        answer.raise_for_status()
        return answer

    def setup(self) -> str:
        """``/setup`` with :data:`LABEL_CONFIG`; returns the model version."""
        return self.post("/setup", {"project": f"{PROJECT}.1700000000", "schema": LABEL_CONFIG})[
            "model_version"
        ]

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of the samples of the Prometheus metric ``name`` (whose labels include ``labels``)."""
        wanted = [f'{key}="{value}"' for key, value in (labels or {}).items()]
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
                continue
            if all(label in line for label in wanted):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def pids(self) -> list[int]:
        """The gunicorn master and all its descendants."""
        if self.process is None:
            return []
        found, queue = [], [self.process.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            queue += [int(child) for child in children]
        return found

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system, all threads) used so far by the service's processes."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
        return total

    def memory_mib(self) -> dict[str, float]:
        """``{"rss": ..., "peak": ...}`` MiB summed over the service's processes (VmRSS, VmHWM)."""
        totals = {"rss": 0.0, "peak": 0.0}
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            for line in status:
                if line.startswith("VmRSS:"):
                    totals["rss"] += int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    totals["peak"] += int(line.split()[1]) / 1024
        return totals

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.session.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def model_env(sam_type: str, checkpoint: Path | None, embedder: str) -> dict[str, str]:
    """Service settings for the benchmark models (random embedder weights, CPU)."""
    env = {
        "SAM_MODEL_TYPE": sam_type,
        "EMBEDDER_MODEL": embedder,
        "EMBEDDER_WEIGHTS": "random",
        "DEVICE": "cpu",
    }
    if checkpoint is not None:
        env["SAM_CHECKPOINT"] = str(checkpoint)
    return env
