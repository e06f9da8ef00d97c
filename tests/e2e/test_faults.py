"""Faulty machines: a read-only outbox, a full state disk, EIO on rename, a lost database.

These mount real file systems (bind mounts, tmpfs), so they need root; CI runs as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from daemon.config import parse_config
from daemon.control.client import Api
from daemon.layout import outbox_paths
from tests.e2e.conftest import (
    API_KEY,
    DaemonProcess,
    config_data,
    release,
    running_daemon,
    wait_final,
    write_config,
)
from tests.helpers import ROOT, drop, read_jsonl, request_lines, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts file systems: needs root")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only (a read-only bind mount of itself) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    _sh("mount", "--bind", str(folder), str(folder))
    try:
        _sh("mount", "-o", "remount,bind,ro", str(folder))
        yield
    finally:
        _sh("umount", str(folder))


async def test_read_only_outbox_pauses_the_rejection_and_finishes_it_when_writable(make_cfg):
    cfg = make_cfg(daemon={"io_retry_initial": 0.05, "io_retry_max": 0.2})
    cfg.outbox_dir.mkdir(parents=True, exist_ok=True)
    mounted = True
    mount_cm = read_only(cfg.outbox_dir)
    mount_cm.__enter__()
    try:
        async with running_daemon(cfg) as ctx:
            drop(cfg.inbox_dir, "bad.jsonl", [b"{not json"])
            drop(cfg.inbox_dir, "good.jsonl", request_lines(3))

            async def paused(name: str) -> bool:
                row = await ctx.store.find_input(name)
                return bool(row and row["reason"] and "Read-only" in row["reason"])

            await wait_until(lambda: paused("bad.jsonl"))
            await wait_until(lambda: paused("good.jsonl"))
            status = await anyio.to_thread.run_sync(_status, cfg.socket_path)
            assert "Read-only file system" in status["paused"]
            shown = await anyio.to_thread.run_sync(_show, cfg.socket_path, "bad.jsonl")
            assert shown["state"] == "seen"
            assert shown["reason"].startswith("cannot write the error file: Read-only")
            shown = await anyio.to_thread.run_sync(_show, cfg.socket_path, "good.jsonl")
            assert shown["state"] == "downloading"
            assert shown["reason"].startswith("cannot write the results: Read-only")
            mount_cm.__exit__(None, None, None)
            mounted = False
            done = await wait_final(ctx, "bad.jsonl")
            assert done["state"] == "rejected"
            assert done["reason"].startswith("invalid input")
            good_row = await wait_final(ctx, "good.jsonl")
            assert good_row["state"] == "succeeded"
            assert good_row["reason"] is None
            await wait_until(lambda: not ctx.io_faults.active())
        err = outbox_paths(cfg.outbox_dir, "bad.jsonl")["error"]
        assert err.exists()
        keys = [r["key"] for r in read_jsonl(outbox_paths(cfg.outbox_dir, "good.jsonl")["results"])]
        assert sorted(keys) == ["k0", "k1", "k2"]
    finally:
        if mounted:
            mount_cm.__exit__(None, None, None)


# ---- EIO on rename() during a claim batch (libfiu) ----------------------------------------------
FIU_RUN = shutil.which("fiu-run")


def _fiu_ctrl(ctrl: Path, pid: int, command: str) -> None:
    _sh("fiu-ctrl", "-f", str(ctrl), "-c", command, str(pid))


def _start_under_fiu(cfg_path: Path, ctrl: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m daemon run`` under ``fiu-run -x`` (libfiu's POSIX preload, remote control on)."""
    assert FIU_RUN is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "GEMINI_API_KEY": API_KEY,
    }
    argv = [FIU_RUN, "-x", "-f", str(ctrl), sys.executable, "-m", "daemon", "run"]
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            [*argv, "-c", str(cfg_path)], env=env, stdout=logf, stderr=subprocess.STDOUT
        )


# CI installs fiu-utils (.ci/run): there a missing fiu-run fails the test instead of skipping it.
@pytest.mark.skipif(
    FIU_RUN is None and not os.environ.get("CI"), reason="needs fiu-run (Debian package fiu-utils)"
)
@pytest.mark.parametrize(
    ("point", "marker"),
    [
        ("posix/io/dir/rename", "claim_failed"),  # one file of a batch does not move
        ("posix/io/sync/fsync", '"io_fault"'),  # outbox writes (and claim batches) fail
    ],
)
async def test_eio_during_claims_loses_no_file_without_a_restart(tmp_path, emulator, point, marker):
    data = config_data(tmp_path / "root", emulator.url)
    data["daemon"] |= {"log_format": "json", "io_retry_initial": 0.05, "io_retry_max": 0.2}
    cfg_path = write_config(tmp_path / "config.toml", data)
    root = tmp_path / "root"
    ctrl = tmp_path / "fiu"
    log_path = tmp_path / "daemon.log"
    proc = _start_under_fiu(cfg_path, ctrl, log_path)
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        await wait_until(lambda: "daemon_ready" in output(), timeout=60)
        # Half of the calls (renames, or fsyncs) fail with EIO (failinfo = errno 5) while the files are claimed.
        _fiu_ctrl(ctrl, proc.pid, f"enable_random name={point},probability=0.5,failinfo=5")
        names = [f"f{i:02d}.jsonl" for i in range(20)]
        for n, name in enumerate(names):
            drop(root / "inbox", name, request_lines(2, prefix=f"{n}-"))
        await wait_until(lambda: output().count(marker) >= 5, timeout=60)
        _fiu_ctrl(ctrl, proc.pid, f"disable name={point}")
        for name in names:
            summary = outbox_paths(root / "outbox", name)["summary"]
            try:
                await wait_until(summary.exists, timeout=60)
            except TimeoutError:
                raise AssertionError(f"no {summary.name}:\n{output()[-4000:]}") from None
        assert proc.poll() is None, "the same daemon, never restarted"
        for n, name in enumerate(names):
            keys = [r["key"] for r in read_jsonl(outbox_paths(root / "outbox", name)["results"])]
            assert keys == [f"{n}-0", f"{n}-1"]
        creates = emulator.stats["creates_by_display_name"]
        assert len(creates) == len(names) and all(v == 1 for v in creates.values()), creates
        assert list((root / "inbox").iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


# ---- a full state disk (a small tmpfs) -----------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    _sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield
    finally:
        _sh("umount", "-l", str(folder))


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler to delete."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    n = 0
    with contextlib.suppress(OSError):  # and the inodes' last blocks
        while True:
            (folder / f"filler-{n}").write_bytes(b"\0" * 512)
            n += 1
    return filler


def unfill(folder: Path) -> None:
    for p in folder.glob("filler*"):
        p.unlink()


def _status(socket_path: Path) -> dict[str, Any]:
    api = Api(socket_path)
    try:
        return api.call("GET", "/v1/status")
    finally:
        api.close()


def _show(socket_path: Path, ref: str) -> dict[str, Any]:
    api = Api(socket_path)
    try:
        return api.input(ref)
    finally:
        api.close()


async def test_full_state_disk_pauses_and_resumes_with_each_key_answered_once(
    tmp_path, slow_emulator
):
    root = tmp_path / "root"
    cfg = parse_config(
        config_data(root, slow_emulator.url, daemon={"io_retry_initial": 0.05, "io_retry_max": 0.2})
    )
    with small_tmpfs(cfg.state_dir, "16m"):
        async with running_daemon(cfg) as ctx:
            drop(cfg.inbox_dir, "a.jsonl", request_lines(5, prefix="a"))

            async def running() -> bool:
                row = await ctx.store.find_input("a.jsonl")
                return bool(row and row["state"] == "running")

            await wait_until(running)
            fill(cfg.state_dir)
            drop(cfg.inbox_dir, "b.jsonl", request_lines(5, prefix="b"))
            release(slow_emulator)
            # The poller cannot record the job's end, the claim of b cannot copy it in.
            await wait_until(lambda: {"stage:poll", "stage:claim"} <= set(ctx.io_faults.active()))
            status = await anyio.to_thread.run_sync(_status, cfg.socket_path)
            assert "database or disk is full" in status["paused"]
            assert "No space left on device" in status["io_faults"]["stage:claim"]
            assert (await ctx.store.find_input("a.jsonl") or {})["state"] == "running"
            assert os.listdir(cfg.inbox_dir) == ["b.jsonl"], "b waits in the inbox"
            unfill(cfg.state_dir)
            a = await wait_final(ctx, "a.jsonl")
            b = await wait_final(ctx, "b.jsonl")
            assert (a["state"], b["state"]) == ("succeeded", "succeeded")
            await wait_until(lambda: not ctx.io_faults.active(), timeout=30)
        for name, prefix in (("a.jsonl", "a"), ("b.jsonl", "b")):
            keys = [r["key"] for r in read_jsonl(outbox_paths(cfg.outbox_dir, name)["results"])]
            assert sorted(keys) == [f"{prefix}{i}" for i in range(5)]
        creates = slow_emulator.stats["creates_by_display_name"]
        assert len(creates) == 2 and all(v == 1 for v in creates.values()), creates


async def test_read_only_outbox_no_crash_loop_across_restarts_of_the_daemon_process(
    tmp_path, emulator
):
    data = config_data(tmp_path / "root", emulator.url)
    data["daemon"] |= {"log_format": "json", "io_retry_initial": 0.05, "io_retry_max": 0.2}
    cfg_path = write_config(tmp_path / "config.toml", data)
    root = tmp_path / "root"
    error_file = outbox_paths(root / "outbox", "bad.jsonl")["error"]
    log_path = cfg_path.with_suffix(".log")
    with read_only(root / "outbox"):
        for attempt in range(2):  # the first run, then a restart while still read-only
            seen = log_path.stat().st_size if log_path.exists() else 0
            p = DaemonProcess(cfg_path)
            new = lambda: p.output()[seen:]  # noqa: B023, E731 (this run's lines; the log is shared)
            try:
                await wait_until(lambda: "daemon_ready" in new(), timeout=60)  # noqa: B023
                if attempt == 0:
                    drop(root / "inbox", "bad.jsonl", [b"{not json"])
                await wait_until(lambda: '"io_fault"' in new(), timeout=60)  # noqa: B023
                assert p.proc.poll() is None, p.output()
                assert p.terminate() == 0, p.output()
            finally:
                p.close()
        assert not error_file.exists()
    p = DaemonProcess(cfg_path)
    try:
        await p.wait_for_file(error_file)
        assert p.terminate() == 0, p.output()
    finally:
        p.close()
    assert orjson.loads(error_file.read_bytes())["reason"].startswith("invalid input: line 1")
