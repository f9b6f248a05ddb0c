"""gunicorn configuration for ``python -m backend`` (read by gunicorn with ``-c``).

Workers, threads, bind address and log level come from the same environment variables as the app
(``WORKERS``, ``THREADS``, ``HOST``, ``PORT``, ``LOG_LEVEL``). No ``preload_app``: each worker
imports the app after fork and builds its models lazily (CUDA must not start before fork).
"""

from __future__ import annotations

import sys
from pathlib import Path

from backend.settings import Settings

_settings = Settings.from_env()

pythonpath = str(Path(__file__).resolve().parents[1])
bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
preload_app = False
# Batch predictions on CPU and the first model load can take minutes; the gthread worker keeps
# heart-beating while request threads work, so this only bounds a truly stuck worker.
timeout = 600
graceful_timeout = 30
keepalive = 5
loglevel = _settings.log_level.lower()
accesslog = "-"
errorlog = "-"
control_socket_disable = True


def worker_exit(server, worker) -> None:
    """Let the running learning job finish and close the memory store when a worker stops."""
    wsgi = sys.modules.get("backend.wsgi")
    if wsgi is not None:
        wsgi.app.extensions["samsem_runtime"].close()
