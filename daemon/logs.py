"""Logging: structlog through stdlib logging, JSON lines for journald, secrets never written.

Everything goes through one stdlib handler with a ``structlog.stdlib.ProcessorFormatter``, so our
own entries and those of google-genai, httpx2 or aiohttp are rendered (and redacted) alike:

- JSON lines on stdout when it is not a TTY (or ``fmt="json"``), the console renderer on a TTY
  (or ``fmt="console"``);
- a ``<N>`` syslog priority prefix when stdout is the journal stream (``$JOURNAL_STREAM``), so
  journald records the right priority (``SyslogLevelPrefix=`` is on by default);
- every registered secret (the API key) replaced by ``[REDACTED]`` anywhere in the event: nested
  values, exception messages, tracebacks, and once more in the rendered line; ``key=`` URL query
  parameters and ``x-goog-api-key`` header values are masked even when the key is not registered.

Library modules only call ``get_logger(__name__)``; ``configure_logging`` is called once by the CLI
(calling it again replaces the previous configuration).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

import orjson
import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "add_secret", "configure_logging", "get_logger", "redact"]

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = (
    6  # shorter strings would mask ordinary words; a Gemini API key has 39 characters
)

QUIET_LOGGERS = (
    "watchfiles",  # logs "N changes detected" at INFO for every batch
    "httpx",
    "httpx2",
    "httpcore",
    "aiohttp.access",
)  # httpx2 logs every request at INFO

# Field names whose values are credentials whatever they contain (dict keys, header names).
_SENSITIVE_FIELDS = frozenset(
    {"x-goog-api-key", "api_key", "api-key", "apikey", "authorization", "proxy-authorization"}
)
# Belt and braces for an unregistered key: ?key=... / &key=... query parameters and header values.
_QUERY_KEY = re.compile(r"(?i)([?&;](?:key|api_?key)=)[^&;#\s'\"<>]+")
_HEADER_KEY = re.compile(
    r"(?i)((?:x-goog-api-key|authorization)['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+)?[^\s'\",;}]+"
)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_secret_re: re.Pattern[str] | None = None
_HANDLER_MARK = "_gemini_batchd_handler"


def add_secret(secret: str | None) -> None:
    """Register a secret (surrounding whitespace stripped) to be masked from now on, everywhere."""
    global _secrets, _secret_re
    value = (secret or "").strip()
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if value in _secrets:
            return
        secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))  # longest match first
        _secret_re = re.compile("|".join(re.escape(s) for s in secrets))
        _secrets = secrets


def redact(text: str) -> str:
    """*text* with registered secrets, ``key=`` query parameters and API-key headers masked."""
    if not isinstance(text, str):
        text = str(text)
    pattern = _secret_re
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _QUERY_KEY.sub(lambda m: m.group(1) + REDACTED, text)
    return _HEADER_KEY.sub(lambda m: m.group(1) + REDACTED, text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth > 20:  # a pathological nesting: give up structure, keep the guarantee
        return redact(repr(value))
    if isinstance(value, Mapping):
        return {
            (redact(k) if isinstance(k, str) else k): (
                REDACTED
                if isinstance(k, str) and k.lower() in _SENSITIVE_FIELDS and v is not None
                else _redact_value(v, depth + 1)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value  # numbers, None, bools; other objects are covered by the final pass on the line


def redact_processor(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets anywhere in the event dict (run after exception rendering)."""
    return _redact_value(event_dict)


_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """daemon(7) priority for a stdlib level: critical 2, error 3, warning 4, info 6, debug 7."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def _is_journal_stream(stream: IO[str]) -> bool:
    """True when *stream* is the journal stream systemd connected ($JOURNAL_STREAM = dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False  # not a real file (StringIO, pytest capture)
    return expected == f"{st.st_dev}:{st.st_ino}"


def _json_dumps(obj: Any, default: Any = None, **_kw: Any) -> str:
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. ints beyond 64 bits: never lose a line
        return json.dumps(obj, default=repr, ensure_ascii=False, separators=(",", ":"))


class _Formatter(structlog.stdlib.ProcessorFormatter):
    """ProcessorFormatter plus a last redaction pass over the rendered line and the journal prefix."""

    def __init__(self, *args: Any, journal: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        if self.journal:
            line = f"<{syslog_priority(record.levelno)}>{line}"
        return line


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    name = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(name, name)
    value = logging.getLevelNamesMapping().get(name)
    if value is None:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error, critical)")
    return value


def set_level(level: str | int) -> None:
    """The daemon's log level (the chatty libraries never below WARNING); used at start and on
    SIGHUP."""
    levelno = _level(level)
    logging.getLogger().setLevel(levelno)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))


# Long but flat: the processor chain for JSON and console output, in the order it runs.
def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    secrets: Sequence[str] = (),
    *,
    stream: IO[str] | None = None,
) -> None:
    """Route structlog and stdlib logging to *stream* (default: stdout), rendered and redacted.

    *fmt* is ``"auto"`` (JSON unless the stream is a TTY), ``"json"`` or ``"console"``. *secrets*
    are registered as with ``add_secret`` (secrets only accumulate). Safe to call again: the
    previous handler is replaced, other handlers (pytest's caplog) are left alone.
    """
    if fmt not in {"auto", "json", "console"}:
        raise ValueError(f"unknown log format {fmt!r} (auto, json, console)")
    levelno = _level(level)
    for secret in secrets:
        add_secret(secret)
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        try:
            fmt = "console" if out.isatty() else "json"
        except (AttributeError, ValueError):
            fmt = "json"

    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        # Structured, single-line tracebacks; no locals (a frame's locals may hold the key or a
        # whole request body).
        exceptions: Processor = ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        renderer: Processor = structlog.processors.JSONRenderer(serializer=_json_dumps)
    else:
        # A plain text traceback (no rich locals) so redaction sees it before rendering.
        exceptions = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(colors=_colors(out))

    formatter = _Formatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *pre_chain],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            exceptions,
            redact_processor,
            renderer,
        ],
        journal=_is_journal_stream(out),
    )
    handler = logging.StreamHandler(out)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()  # a StreamHandler never closes its stream
    root.addHandler(handler)
    set_level(levelno)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: tests (and a reconfiguration) must take effect on existing module loggers.
        cache_logger_on_first_use=False,
    )


def _colors(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(name: str | None = None) -> Any:
    """``structlog.get_logger(name)``: what every module uses."""
    return structlog.get_logger(name)
