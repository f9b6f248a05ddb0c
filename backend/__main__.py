"""``python -m backend``: validate the settings, then run the service under gunicorn.

Exit status 2 with a message listing every problem when the settings (environment variables) or
the files they point to are wrong. Otherwise the process becomes
``gunicorn -c backend/gunicorn_conf.py backend.wsgi:app`` (``exec``: signals go straight to
gunicorn), with the native libraries' defaults (``MALLOC_ARENA_MAX=2``, ``OPENBLAS_NUM_THREADS=1``)
unless set (see :mod:`backend.native_environment`). ``--dev`` runs Flask's development server
instead (one process, threaded; not for production), with the same defaults set before numpy loads.
``--check`` validates and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from backend.native_environment import native_environment
from backend.settings import Settings, SettingsError

logger = logging.getLogger("backend")

GUNICORN_CONF = Path(__file__).resolve().with_name("gunicorn_conf.py")


def gunicorn_command() -> list[str]:
    """The command that serves the app: ``python -m gunicorn -c <conf> backend.wsgi:app``."""
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "backend.wsgi:app"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="samsem Label Studio ML backend")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dev", action="store_true", help="Flask development server instead of gunicorn")
    mode.add_argument("--check", action="store_true", help="validate the settings and files, then exit")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        settings.validate_files()
    except SettingsError as error:
        print(f"samsem: cannot start: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(settings.describe(), indent=2))
        return 0
    if args.dev:
        os.environ.update(native_environment(os.environ))
        from backend import wsgi  # configures logging and builds the app

        logger.info("settings: %s", json.dumps(settings.describe()))
        wsgi.app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
        return 0
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("settings: %s", json.dumps(settings.describe()))
    command = gunicorn_command()
    os.execve(command[0], command, native_environment(os.environ))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
