"""daemon.logs: JSON lines, journald priorities, and that the API key never reaches a log line."""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon import logs
from daemon.logs import REDACTED, add_secret, configure_logging, get_logger, redact


def new_secret() -> str:
    return "AIza" + uuid.uuid4().hex  # secrets accumulate process-wide: each test uses its own


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_on_a_non_tty_stream() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)  # StringIO is no TTY: auto means JSON
    log = get_logger("daemon.test")
    log.info("job_polled", job_id="batches/1", done=3)
    log.debug("not shown at info")
    [entry] = lines(out)
    assert entry["event"] == "job_polled"
    assert entry["job_id"] == "batches/1"
    assert entry["done"] == 3
    assert entry["level"] == "info"
    assert entry["logger"] == "daemon.test"
    assert entry["timestamp"].endswith("Z")  # ISO, UTC


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    structlog.contextvars.bind_contextvars(input_id="in-1")
    try:
        get_logger("daemon.test").warning("stuck", after=3600)
    finally:
        structlog.contextvars.clear_contextvars()
    captured = capsys.readouterr()
    assert captured.err == ""
    entry = json.loads(captured.out)
    assert (entry["event"], entry["level"], entry["input_id"]) == ("stuck", "warning", "in-1")


def test_console_renderer_on_a_tty() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        configure_logging("info", "auto", stream=tty)
        get_logger("daemon.test").info("hello_console", x=1)
        tty.flush()
        text = os.read(master, 4096).decode()
    os.close(master)
    assert "hello_console" in text
    assert not text.lstrip().startswith("{")  # not JSON


def test_priority_prefix_when_stdout_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("debug", "json", stream=stream)
        log = get_logger("daemon.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        logging.getLogger("google_genai.models").warning("foreign")
        stream.flush()
        stream.seek(0)
        got = stream.read().splitlines()
    prefixes = [line[: line.index("{")] for line in got]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    assert json.loads(got[2][3:])["event"] == "w"


def test_no_prefix_when_journal_stream_is_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    with open(tmp_path / "out", "w+") as stream:
        configure_logging("info", "json", stream=stream)
        get_logger("daemon.test").info("plain")
        stream.flush()
        stream.seek(0)
        assert stream.read().startswith("{")


def test_secret_in_exception_nested_values_and_traceback_is_redacted() -> None:
    secret = new_secret()
    out = io.StringIO()
    configure_logging("info", "json", secrets=[secret + "\n"], stream=out)  # key files end in \n
    log = get_logger("daemon.test")

    def call_api(api_key: str) -> None:
        try:
            raise ConnectionError(f"upstream refused {api_key}")
        except ConnectionError as exc:
            raise RuntimeError(f"create failed for key {api_key}") from exc

    try:
        call_api(secret)
    except RuntimeError:
        log.exception(
            "create_failed",
            request={"headers": [("x-goog-api-key", secret)], "note": f"k={secret}"},
            attempts=(1, secret),
        )
    text = out.getvalue()
    assert secret not in text
    [entry] = lines(out)
    assert entry["request"]["note"] == f"k={REDACTED}"
    assert entry["request"]["headers"] == [["x-goog-api-key", REDACTED]]
    assert entry["attempts"] == [1, REDACTED]
    chain = {e["exc_type"]: e["exc_value"] for e in entry["exception"]}
    assert chain == {
        "RuntimeError": f"create failed for key {REDACTED}",
        "ConnectionError": f"upstream refused {REDACTED}",
    }
    assert "api_key" not in text  # frames carry no locals


def test_console_traceback_is_redacted() -> None:
    secret = new_secret()
    out = io.StringIO()
    configure_logging("info", "console", secrets=[secret], stream=out)
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        get_logger("daemon.test").exception("boom")
    text = out.getvalue()
    assert "Traceback (most recent call last)" in text
    assert f"ValueError: bad key {REDACTED}" in text
    assert secret not in text


def test_secret_added_after_configuration() -> None:
    secret = new_secret()
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = get_logger("daemon.test")
    log.info("before", value=secret)
    add_secret(secret)
    log.info("after", value=secret)
    before, after = lines(out)
    assert before["value"] == secret  # proves the masking below is add_secret's doing
    assert after["value"] == REDACTED


def test_stdlib_logger_goes_through_the_same_renderer_and_is_redacted() -> None:
    secret = new_secret()
    out = io.StringIO()
    configure_logging("info", "json", secrets=[secret], stream=out)
    std = logging.getLogger("google_genai.x")
    try:
        raise OSError(f"GET https://generativelanguage.googleapis.com/v1beta/batches?key={secret}")
    except OSError:
        std.error("request to %s failed", f"https://host/v1beta/files?key={secret}", exc_info=True)
    std.info("with extra", extra={"detail": {"key_header": secret}})
    assert secret not in out.getvalue()
    first, second = lines(out)
    assert first["logger"] == "google_genai.x"
    assert first["level"] == "error"
    assert "timestamp" in first
    assert first["event"] == f"request to https://host/v1beta/files?key={REDACTED} failed"
    assert first["exception"][0]["exc_value"].endswith(f"batches?key={REDACTED}")
    assert second["detail"] == {"key_header": REDACTED}


def test_http_client_loggers_are_quiet() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    for name in ("httpx", "httpx2", "httpcore", "aiohttp.access"):
        logging.getLogger(name).info("HTTP Request: POST ... 200 OK")
    logging.getLogger("httpx2").warning("retrying")
    assert [e["event"] for e in lines(out)] == ["retrying"]


def test_configure_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("warning", "json", stream=second)
    log = get_logger("daemon.test")
    log.info("dropped")
    log.warning("once")
    assert first.getvalue() == ""
    assert [e["event"] for e in lines(second)] == ["once"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", stream=io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml", stream=io.StringIO())


def test_redact_masks_query_keys_and_header_values_even_when_unregistered() -> None:
    unregistered = "AIzaNotRegistered" + uuid.uuid4().hex
    assert redact(f"https://h/v1beta/models?key={unregistered}&alt=sse") == (
        f"https://h/v1beta/models?key={REDACTED}&alt=sse"
    )
    assert redact(f"GET /x?alt=json&key={unregistered}") == f"GET /x?alt=json&key={REDACTED}"
    assert redact(f"x-goog-api-key: {unregistered}") == f"x-goog-api-key: {REDACTED}"
    assert (
        redact(f"{{'X-Goog-Api-Key': '{unregistered}'}}") == f"{{'X-Goog-Api-Key': '{REDACTED}'}}"
    )
    assert (
        redact(f'{{"x-goog-api-key": "{unregistered}"}}') == f'{{"x-goog-api-key": "{REDACTED}"}}'
    )
    # The request key of an input line is data, not a credential.
    assert redact('{"key": "row-1", "request": {}}') == '{"key": "row-1", "request": {}}'
    assert redact("monkey=1 turkey=2") == "monkey=1 turkey=2"


def test_redact_masks_registered_secrets_everywhere() -> None:
    secret = new_secret()
    add_secret(secret)
    assert redact(f"a{secret}b {secret}") == f"a{REDACTED}b {REDACTED}"
    add_secret("abc")  # too short to be a key: would mask ordinary words
    assert redact("abcdef") == "abcdef"


def test_set_level_moves_the_quiet_libraries_too() -> None:
    # SIGHUP from `error` to `info`: the root logger follows, and the chatty libraries go back
    # to WARNING (they stayed at ERROR when only the root level was set).
    configure_logging("error", "json", stream=io.StringIO())
    assert logging.getLogger("httpx").level == logging.ERROR
    logs.set_level("info")
    assert logging.getLogger().level == logging.INFO
    assert all(logging.getLogger(n).level == logging.WARNING for n in logs.QUIET_LOGGERS)
