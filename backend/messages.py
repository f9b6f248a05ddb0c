"""Short, log-safe renderings of untrusted values for error messages and logs, and the logging
set-up of the service.

Request bodies are untrusted and may be megabytes: an error message quotes at most
:data:`MAX_QUOTE` characters of any value and at most :data:`MAX_MESSAGE` characters in all, so a
payload is never echoed whole, and a quoted value cannot forge log lines (``repr`` escapes
newlines). :func:`configure_logging` adds a last guard for every library: no log message longer
than :data:`MAX_LOG_MESSAGE` characters, and no library logging whole request URLs (with their
presigned signatures or tokens).
"""

from __future__ import annotations

import logging
import traceback

MAX_QUOTE = 80
"""Most characters of one quoted value."""
MAX_MESSAGE = 500
"""Most characters of one error message."""
MAX_LOG_MESSAGE = 2000
"""Most characters of one log message (tracebacks are formatted separately)."""
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d %(threadName)s] %(name)s: %(message)s"
ELLIPSIS = "…"
URL_LOGGERS = ("urllib3",)
"""Libraries that log whole request URLs (presigned signatures, tokens in query strings) at DEBUG."""


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to at most ``limit`` characters (an ellipsis and the original length appended)."""
    if len(text) <= limit:
        return text
    suffix = f"{ELLIPSIS}({len(text)} chars)"
    return text[: max(0, limit - len(suffix))] + suffix


def brief(value: object, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (for ``got …`` in error messages)."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not break error reporting
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


def error_summary(error: BaseException, limit: int = MAX_MESSAGE) -> str:
    """``"<ExceptionType>: <message>"`` with the message shortened (safe to log)."""
    return shorten(f"{type(error).__name__}: {error}", limit)


def stack_of(error: BaseException) -> str:
    """The traceback frames of ``error`` (file, line, code), without its possibly long message."""
    return "".join(traceback.format_tb(error.__traceback__)).rstrip()


def quiet_url_loggers() -> None:
    """Keep :data:`URL_LOGGERS` at INFO or above whatever ``LOG_LEVEL`` is (no URLs in logs)."""
    for name in URL_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


class ShortLogMessages(logging.Filter):
    """A handler filter that cuts every log message to :data:`MAX_LOG_MESSAGE` characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOG_MESSAGE:
            record.msg, record.args = shorten(message, MAX_LOG_MESSAGE), None
        return True


def configure_logging(level: str) -> None:
    """Root logging to stderr at ``level`` (idempotent: replaces earlier handlers), every message
    cut to :data:`MAX_LOG_MESSAGE` characters, URL-logging libraries kept at INFO."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ShortLogMessages())
    quiet_url_loggers()
