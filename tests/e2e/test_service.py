"""Running as a service: sd_notify over a real datagram socket, SIGTERM, the instance lock, no key leaks."""

from __future__ import annotations

import itertools
import signal
import socket
import time

import orjson

from daemon.config import load_config
from daemon.context import Context
from daemon.layout import outbox_paths
from daemon.service import _for_emulator, _reload
from tests.e2e.conftest import API_KEY, DaemonProcess, config_data, write_config
from tests.helpers import drop, read_jsonl, request_lines, short_tmpdir, wait_until


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.path = short_tmpdir() / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for m in self.drain() for line in m.splitlines())


async def test_notify_ready_after_recovery_status_watchdog_and_stopping(tmp_path, emulator):
    data = config_data(tmp_path / "root", emulator.url)
    cfg_path = write_config(tmp_path / "c.toml", data)
    root = tmp_path / "root"
    # The job runs until the test ends it (issue 13: with 3 s, a slow second start found it done
    # before READY): the resumed input must still be running when READY is sent.
    emulator.settings.running_seconds = 3600.0
    # First life: take a file and die while its job runs, so the next start has work to resume.
    p = DaemonProcess(cfg_path, env={"GEMINI_BATCHD_CRASH_AT": "while_running"})
    try:
        await wait_until(lambda: (root / "state" / "gemini-batchd.sqlite").exists(), timeout=30)
        drop(root / "inbox", "n.jsonl", request_lines(3))
        assert await p.wait_exit() == -9
    finally:
        p.close()

    ns = NotifySocket()
    first_life = len(cfg_path.with_suffix(".log").read_text())
    p = DaemonProcess(cfg_path, env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "400000"})
    try:
        await wait_until(lambda: ns.has("READY=1"), timeout=30)
        ready = next(m for m in ns.drain() if "READY=1" in m)
        assert "STATUS=" in ready and "running 1" in ready  # the resumed input is counted at READY
        t0 = time.monotonic()
        await wait_until(lambda: sum("WATCHDOG=1" in m for m in ns.drain()) >= 5, timeout=10)
        pings = [t for t, m in ns.messages if "WATCHDOG=1" in m]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.4 and time.monotonic() - t0 < 5  # half of WATCHDOG_USEC, with slack
        for rec in emulator.store.jobs.values():
            rec["running_s"] = 0.0  # now the job may end
        await wait_until(outbox_paths(root / "outbox", "n.jsonl")["summary"].exists, timeout=30)
        assert p.terminate() == 0
        assert ns.has("STOPPING=1")
        log = p.output()[first_life:]  # the second life only
        assert '"claim_adopted"' not in log
        assert log.index('"recovery_done"') < log.index('"daemon_ready"')
    finally:
        p.close()
        ns.close()


async def test_sigterm_mid_flight_exits_0_in_time_and_next_start_finishes(tmp_path, emulator):
    data = config_data(tmp_path / "root", emulator.url, submit={"inline_max_bytes": 1024})
    cfg_path = write_config(tmp_path / "c.toml", data)
    root = tmp_path / "root"
    emulator.settings.running_seconds = 1.0
    pad = "y" * 400
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: (root / "state" / "gemini-batchd.sqlite").exists(), timeout=30)
        for i in range(5):
            drop(root / "inbox", f"small{i}.jsonl", request_lines(20))
        await wait_until(lambda: emulator.stats["calls"].get("batches.get", 0) >= 1, timeout=30)
        drop(
            root / "inbox",
            "big.jsonl",
            request_lines(50_000, text=lambda i: f"prompt for k{i} {pad}"),
        )
        await wait_until(
            lambda: emulator.stats["calls"].get("files.upload_chunk", 0) >= 1,
            timeout=30,
            interval=0.002,
        )
        t0 = time.monotonic()
        code = p.terminate()
        took = time.monotonic() - t0
        assert code == 0, p.output()
        assert took < data["daemon"]["shutdown_seconds"], took
    finally:
        p.close()
    p = DaemonProcess(cfg_path)
    try:
        for name in [f"small{i}" for i in range(5)] + ["big"]:
            await wait_until(
                outbox_paths(root / "outbox", f"{name}.jsonl")["summary"].exists, timeout=120
            )
        assert p.terminate() == 0
    finally:
        p.close()
    assert len(read_jsonl(root / "outbox" / "big.jsonl")) == 50_000
    assert all(v == 1 for v in emulator.stats["creates_by_display_name"].values())
    assert len(emulator.stats["creates_by_display_name"]) == 6


async def test_second_instance_on_the_same_state_is_refused(tmp_path, emulator):
    cfg_path = write_config(tmp_path / "c.toml", config_data(tmp_path / "root", emulator.url))
    first = DaemonProcess(cfg_path)
    try:
        sock = tmp_path / "root"
        await wait_until(
            lambda: (sock / "state" / "lock").exists() and "daemon_ready" in first.output(),
            timeout=30,
        )
        second = DaemonProcess(cfg_path)
        try:
            code = await second.wait_exit(timeout=30)
            assert code == 1
            assert "refusing to start" in second.output()
        finally:
            second.close()
        assert first.proc.poll() is None  # the first one is untouched
        assert first.terminate() == 0
    finally:
        first.close()


async def test_api_key_never_in_logs_db_or_outbox(tmp_path, emulator):
    data = config_data(tmp_path / "root", emulator.url, daemon={"log_level": "debug"})
    cfg_path = write_config(tmp_path / "c.toml", data)
    root = tmp_path / "root"
    emulator.fail_next("batches.create", "503")  # an API error on the way, logged
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: (root / "state" / "gemini-batchd.sqlite").exists(), timeout=30)
        drop(root / "inbox", "s.jsonl", request_lines(5))
        drop(root / "inbox", "bad.jsonl", b"{nope\n")
        await wait_until(outbox_paths(root / "outbox", "s.jsonl")["summary"].exists, timeout=60)
        assert p.terminate() == 0
    finally:
        p.close()
    needle = API_KEY.encode()
    assert needle not in p.log.read_bytes()
    for path in root.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
    assert orjson.loads((root / "outbox" / "s.summary.json").read_bytes())["state"] == "succeeded"


async def test_sighup_reloads_config_and_keeps_running(tmp_path, emulator):
    data = config_data(tmp_path / "root", emulator.url)
    cfg_path = write_config(tmp_path / "c.toml", data)
    root = tmp_path / "root"
    p = DaemonProcess(cfg_path)
    try:
        await wait_until(lambda: '"daemon_ready"' in p.output(), timeout=30)
        data["daemon"]["log_level"] = "warning"
        write_config(cfg_path, data)
        p.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: '"config_reloaded"' in p.output(), timeout=10)
        drop(root / "inbox", "after-hup.jsonl", request_lines(3))
        await wait_until(
            outbox_paths(root / "outbox", "after-hup.jsonl")["summary"].exists, timeout=30
        )
        # the new level took effect: info events of that file's work were not logged
        after = p.output()[p.output().index('"config_reloaded"') :]
        assert '"job_created"' not in after and '"input_finished"' not in after
        # a broken config on HUP is refused; the daemon keeps its old one and goes on working
        cfg_path.write_text("[poll]\nworkers = -1\n")
        p.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: '"reload_failed"' in p.output(), timeout=10)
        assert "[poll] workers" in p.output()
        drop(root / "inbox", "after-bad-hup.jsonl", request_lines(2))
        await wait_until(
            outbox_paths(root / "outbox", "after-bad-hup.jsonl")["summary"].exists, timeout=30
        )
        assert p.proc.poll() is None  # HUP is not a stop
        assert p.terminate() == 0
    finally:
        p.close()


def test_reload_applies_the_start_adjustments_again(tmp_path) -> None:
    # `run --emulator` polls faster than the config says; a SIGHUP re-read keeps that.
    data = config_data(tmp_path / "root", "http://127.0.0.1:9")
    data["poll"].update(min_interval=5.0, max_interval=60.0)
    cfg = load_config(write_config(tmp_path / "c.toml", data))
    ctx = Context(cfg=_for_emulator(cfg), store=None)  # type: ignore[arg-type]
    assert ctx.cfg.poll.min_interval == 0.5
    _reload(ctx, _for_emulator)
    assert ctx.cfg.poll.min_interval == 0.5
    _reload(ctx)  # without the adjustment: the file's value
    assert ctx.cfg.poll.min_interval == 5.0
