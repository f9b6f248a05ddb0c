"""WSGI entry point: ``backend.wsgi:app`` (what gunicorn serves; see ``backend/__main__.py``).

Importing this module reads the settings from the environment, configures logging and builds the
app (cheap: models are built lazily on the first prediction, in the worker, after fork).
"""

from __future__ import annotations

import logging

from backend.app import create_app
from backend.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d %(threadName)s] %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Root logging to stderr at ``level`` (idempotent: replaces earlier handlers)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)


settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings)
