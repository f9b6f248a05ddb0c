"""WSGI entry point: ``backend.wsgi:app`` (what gunicorn serves; see ``backend/__main__.py``).

Importing this module reads the settings from the environment, configures logging and builds the
app (cheap: models are built lazily on the first prediction, in the worker, after fork).
"""

from __future__ import annotations

from backend.app import create_app
from backend.messages import configure_logging
from backend.settings import Settings

settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings)
