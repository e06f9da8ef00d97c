"""A state database lost after a kill -9 (deleted, truncated to nothing, its -wal removed) or
corrupt: the daemon refuses to start (exit 78, one line naming the way out), and
``gemini-batchd recover`` rebuilds the store from ``state/work/`` and the remote jobs, so that a
normal start finishes the in-flight inputs without creating any job a second time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from daemon.layout import outbox_paths
from tests.e2e.conftest import API_KEY, DaemonProcess, config_data, release, write_config
from tests.helpers import ROOT, drop, read_jsonl, request_lines, wait_until


def _cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "GEMINI_API_KEY": API_KEY,
    }
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "-c", str(cfg_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _setup(tmp_path: Path, emu) -> tuple[Path, Path]:
    data = config_data(tmp_path / "root", emu.url, submit={"inline_max_bytes": 0})
    data["daemon"]["log_format"] = "json"
    return write_config(tmp_path / "config.toml", data), tmp_path / "root"


async def _in_flight_then_kill9(cfg_path: Path, root: Path, emu) -> None:
    """One input finished, two whose jobs were created remotely (still running), then kill -9."""
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: (root / "state" / "gemini-batchd.sqlite").exists(), timeout=30)
        drop(root / "inbox", "done.jsonl", request_lines(2, prefix="d"))
        await wait_until(lambda: len(emu.stats["creates_by_display_name"]) == 1, timeout=60)
        release(emu)
        await p.wait_for_file(outbox_paths(root / "outbox", "done.jsonl")["summary"])
        emu.settings.running_seconds = 3600.0
        drop(root / "inbox", "a.jsonl", request_lines(4, prefix="a"))
        drop(root / "inbox", "gemini-2.5-pro/b.jsonl", request_lines(3, prefix="b"))
        await wait_until(lambda: len(emu.stats["creates_by_display_name"]) == 3, timeout=60)
        p.kill9()
    finally:
        p.close()
    # Newer jobs of someone else (listed newest first) put ours past the first page of 100.
    line = {"key": "x", "request": {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}}
    for i in range(120):
        emu.store.create_job(
            embed=False,
            model="models/gemini-2.5-flash",
            display_name=f"someone-else-{i}",
            input_file=None,
            inline=[line],
            tokens=1,
            request_count=1,
        )


def _lose(db: Path, how: str) -> None:
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    if how == "deleted":
        for f in (db, wal, shm):
            f.unlink(missing_ok=True)
    elif how == "truncated":
        os.truncate(db, 0)
        wal.unlink(missing_ok=True)
        shm.unlink(missing_ok=True)
    elif how == "wal_removed":
        assert wal.exists()
        wal.unlink()
        shm.unlink(missing_ok=True)


async def _refused(cfg_path: Path, needle: str) -> None:
    p = DaemonProcess(cfg_path)
    try:
        code = await p.wait_exit(timeout=60)
        out = p.output()
    finally:
        p.close()
    assert code == 78, out
    assert needle in out and "gemini-batchd recover" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("how", ["deleted", "truncated", "wal_removed"])
async def test_lost_database_is_refused_then_recovered_without_a_second_create(
    tmp_path, slow_emulator, how
):
    cfg_path, root = _setup(tmp_path, slow_emulator)
    await _in_flight_then_kill9(cfg_path, root, slow_emulator)
    _lose(root / "state" / "gemini-batchd.sqlite", how)
    await _refused(cfg_path, "state/work")
    await _refused(cfg_path, "state/work")  # and again: no silent fresh start on a retry
    lists = slow_emulator.stats["calls"].get("batches.list", 0)
    done = await anyio.to_thread.run_sync(_cli, cfg_path, "recover")  # the emulator is in this loop
    assert slow_emulator.stats["calls"]["batches.list"] - lists >= 2, "paged through the list"
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(1 finished, 2 in flight); adopted 2 remote jobs, 0 left" in done.stdout, done.stdout
    release(slow_emulator)
    p = DaemonProcess(cfg_path)
    try:
        await p.wait_for_file(outbox_paths(root / "outbox", "a.jsonl")["summary"])
        await p.wait_for_file(outbox_paths(root / "outbox", "gemini-2.5-pro/b.jsonl")["summary"])
        shown = await anyio.to_thread.run_sync(_cli, cfg_path, "show", "--json", "done.jsonl")
        assert '"state":"succeeded"' in shown.stdout.replace(" ", ""), shown.stdout
        assert p.terminate() == 0, p.output()
    finally:
        p.close()
    a = read_jsonl(outbox_paths(root / "outbox", "a.jsonl")["results"])
    b = read_jsonl(outbox_paths(root / "outbox", "gemini-2.5-pro/b.jsonl")["results"])
    assert [x["key"] for x in a] == [f"a{i}" for i in range(4)]
    assert [x["key"] for x in b] == [f"b{i}" for i in range(3)]
    creates = slow_emulator.stats["creates_by_display_name"]
    assert len(creates) == 3 and all(v == 1 for v in creates.values()), creates


async def test_corrupt_database_gets_one_line_and_exit_78(tmp_path, slow_emulator):
    cfg_path, root = _setup(tmp_path, slow_emulator)
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: "daemon_ready" in p.output(), timeout=30)
        assert p.terminate() == 0
    finally:
        p.close()
    db = root / "state" / "gemini-batchd.sqlite"
    db.write_bytes(b"this is not a database, it was overwritten" * 200)
    p = DaemonProcess(cfg_path)
    try:
        code = await p.wait_exit(timeout=60)
        out = p.output().strip().splitlines()
    finally:
        p.close()
    assert code == 78
    assert "Traceback" not in "\n".join(out)
    last = out[-1]
    assert "corrupt" in last and "gemini-batchd recover" in last, out


async def test_recover_moves_a_corrupt_database_aside_and_leaves_a_sound_one_alone(
    tmp_path, slow_emulator
):
    cfg_path, root = _setup(tmp_path, slow_emulator)
    state = root / "state"
    state.mkdir(parents=True)
    (state / "gemini-batchd.sqlite").write_bytes(b"garbage " * 512)
    done = await anyio.to_thread.run_sync(_cli, cfg_path, "recover")
    assert done.returncode == 0, done.stderr
    assert "is corrupt" in done.stderr and "recovered 0 inputs" in done.stdout
    assert [p.name.split(".lost-")[0] for p in state.glob("*.lost-*")] == ["gemini-batchd.sqlite"]
    again = await anyio.to_thread.run_sync(_cli, cfg_path, "recover")
    assert again.returncode == 0 and "nothing to recover" in again.stdout, again
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: "daemon_ready" in p.output(), timeout=60)
        assert p.terminate() == 0, p.output()
    finally:
        p.close()
