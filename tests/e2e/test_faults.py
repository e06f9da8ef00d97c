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

import pytest

from daemon.outbox import outbox_paths
from tests.e2e.conftest import API_KEY, config_data, running_daemon, wait_final, write_config
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

            async def paused() -> bool:
                row = await ctx.store.find_input("bad.jsonl")
                return bool(row and row["reason"] and "Read-only" in row["reason"])

            await wait_until(paused)
            row = await ctx.store.find_input("bad.jsonl")
            assert row is not None and row["state"] == "seen"
            assert "error file" in row["reason"]
            assert ctx.io_faults.active(), "the daemon-wide fault is shown too"
            good = await ctx.store.find_input("good.jsonl")
            assert good is not None
            mount_cm.__exit__(None, None, None)
            mounted = False
            done = await wait_final(ctx, "bad.jsonl")
            assert done["state"] == "rejected"
            assert done["reason"].startswith("invalid input")
            good_row = await wait_final(ctx, "good.jsonl")
            assert good_row["state"] == "succeeded"
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


@pytest.mark.skipif(FIU_RUN is None, reason="needs fiu-run (Debian package fiu-utils)")
async def test_eio_on_rename_during_claims_loses_no_file_without_a_restart(tmp_path, emulator):
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
        # Half of all renames fail with EIO (failinfo = errno 5) while the files are claimed.
        _fiu_ctrl(
            ctrl, proc.pid, "enable_random name=posix/io/dir/rename,probability=0.5,failinfo=5"
        )
        names = [f"f{i:02d}.jsonl" for i in range(20)]
        for n, name in enumerate(names):
            drop(root / "inbox", name, request_lines(2, prefix=f"{n}-"))
        await wait_until(lambda: output().count("claim_failed") >= 5, timeout=60)
        _fiu_ctrl(ctrl, proc.pid, "disable name=posix/io/dir/rename")
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
