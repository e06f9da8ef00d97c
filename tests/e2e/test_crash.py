"""kill -9 at each step, then restart: complete, correct results exactly once, no duplicate create,
no partial file under a final name. The daemon runs as a real child process; crash points
(``GEMINI_BATCHD_CRASH_AT``) make it SIGKILL itself exactly at a step, and mid-upload is a kill from
outside while the emulator is receiving chunks."""

from __future__ import annotations

import hashlib
import signal
import sqlite3

import orjson
import pytest

from daemon.layout import outbox_paths
from tests.e2e.conftest import DaemonProcess, config_data, write_config
from tests.helpers import answer_text, drop, read_jsonl, request_lines, wait_until

N = 50


def _config(tmp_path, emulator, *, inline: bool):
    data = config_data(
        tmp_path / "root",
        emulator.url,
        submit={"inline_max_bytes": 8 * 1024 * 1024 if inline else 0},
    )
    data["daemon"]["log_format"] = "json"
    return write_config(tmp_path / "config.toml", data), data


def _check_outcome(root, emulator, n=N) -> None:
    out = outbox_paths(root / "outbox", "crash.jsonl")
    lines = read_jsonl(out["results"])
    assert [x["key"] for x in lines] == [f"k{i}" for i in range(n)]
    assert all(answer_text(x) == f"echo: prompt for k{i}" for i, x in enumerate(lines))
    summary = orjson.loads(out["summary"].read_bytes())
    assert summary["state"] == "succeeded"
    creates = emulator.stats["creates_by_display_name"]
    assert creates and all(v == 1 for v in creates.values()), creates  # never paid twice
    leftovers = [p.name for p in (root / "outbox").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


async def _restart_and_finish(cfg_path, root, emulator, n=N) -> None:
    p = DaemonProcess(cfg_path)
    try:
        await p.wait_for_file(outbox_paths(root / "outbox", "crash.jsonl")["summary"])
        assert p.terminate() == 0, p.output()
    finally:
        p.close()
    _check_outcome(root, emulator, n)


async def _drop_and_crash(cfg_path, root, point: str, n: int) -> None:
    """Start the daemon set to SIGKILL itself at ``point``, drop ``n`` requests, see it die."""
    p = DaemonProcess(cfg_path, env={"GEMINI_BATCHD_CRASH_AT": point})
    try:
        await wait_until(lambda: (root / "state" / "gemini-batchd.sqlite").exists(), timeout=30)
        drop(root / "inbox", "crash.jsonl", request_lines(n))
        code = await p.wait_exit(timeout=90)
        assert code == -signal.SIGKILL, p.output()
    finally:
        p.close()


@pytest.mark.parametrize(
    ("point", "inline"),
    [
        ("after_claim", True),
        ("after_upload", False),
        ("after_create", True),
        ("after_create", False),
        ("while_running", False),
        ("after_download", False),
        ("mid_outbox", True),
    ],
)
async def test_kill9_at_a_step_then_restart(tmp_path, emulator, point, inline):
    cfg_path, _ = _config(tmp_path, emulator, inline=inline)
    root = tmp_path / "root"
    emulator.settings.running_seconds = 0.5
    await _drop_and_crash(cfg_path, root, point, N)
    # Whatever the crash left, no consumer sees a final name with partial content.
    out = outbox_paths(root / "outbox", "crash.jsonl")
    assert not out["summary"].exists()
    if out["results"].exists():
        assert len(read_jsonl(out["results"])) == N
    await _restart_and_finish(cfg_path, root, emulator)


@pytest.mark.parametrize("point", ["after_download", "mid_outbox"])
async def test_kill9_while_a_big_input_is_assembled_then_restart(tmp_path, emulator, point):
    # A big input (more than SMALL_INPUT_REQUESTS) in 3 parts: each part is put in order and
    # appended to the outbox file in the making as its job comes back; a kill at a job's
    # download or in the final write leaves only temporary names, and the restart finishes.
    n = 12_000
    data = config_data(
        tmp_path / "root",
        emulator.url,
        submit={"inline_max_bytes": 0, "max_requests_per_job": 4_000},
    )
    cfg_path = write_config(tmp_path / "config.toml", data)
    root = tmp_path / "root"
    await _drop_and_crash(cfg_path, root, point, n)
    out = outbox_paths(root / "outbox", "crash.jsonl")
    assert not out["results"].exists() and not out["summary"].exists()
    await _restart_and_finish(cfg_path, root, emulator, n)
    assert len(emulator.stats["creates_by_display_name"]) == 3


async def test_kill9_mid_upload_then_restart(tmp_path, emulator):
    cfg_path, _ = _config(tmp_path, emulator, inline=False)
    root = tmp_path / "root"
    n = 60_000  # ~6 MB of prompts padded to > 3 upload chunks of 8 MiB
    pad = "x" * 400
    lines = request_lines(n, text=lambda i: f"prompt for k{i} {pad}")
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: (root / "state" / "gemini-batchd.sqlite").exists(), timeout=30)
        drop(root / "inbox", "crash.jsonl", lines)
        await wait_until(
            lambda: emulator.stats["calls"].get("files.upload_chunk", 0) >= 1, interval=0.002
        )
        p.kill9()
    finally:
        p.close()
    assert emulator.stats["calls"].get("batches.create", 0) == 0  # killed before any create
    p = DaemonProcess(cfg_path)
    try:
        summary = outbox_paths(root / "outbox", "crash.jsonl")["summary"]
        await wait_until(summary.exists, timeout=120)
        assert p.terminate() == 0
    finally:
        p.close()
    out = outbox_paths(root / "outbox", "crash.jsonl")
    got = read_jsonl(out["results"])
    assert [x["key"] for x in got] == [f"k{i}" for i in range(n)]
    assert answer_text(got[-1]) == f"echo: prompt for k{n - 1} {pad}"
    assert all(v == 1 for v in emulator.stats["creates_by_display_name"].values())


async def test_kill9_between_queueing_a_big_file_and_its_digest_then_restart(tmp_path, emulator):
    # A big file (here every file: the threshold is 1 byte) is validated on two cores and its
    # sha256 is worked out after it is queued. A kill in between leaves the input without one:
    # the restart fills it in (later dedupe needs it) and finishes the work exactly once.
    data = config_data(
        tmp_path / "root",
        emulator.url,
        inbox={"parallel_validation_bytes": 1},
        submit={"inline_max_bytes": 0},
    )
    cfg_path = write_config(tmp_path / "config.toml", data)
    root = tmp_path / "root"
    await _drop_and_crash(cfg_path, root, "after_queue", N)
    db = root / "state" / "gemini-batchd.sqlite"
    with sqlite3.connect(db) as conn:
        ((state, sha),) = conn.execute("SELECT state, sha256 FROM inputs").fetchall()
    assert state == "queued" and sha is None
    await _restart_and_finish(cfg_path, root, emulator)
    with sqlite3.connect(db) as conn:
        ((sha,),) = conn.execute("SELECT sha256 FROM inputs").fetchall()
    assert sha == hashlib.sha256(b"".join(x + b"\n" for x in request_lines(N))).hexdigest()
