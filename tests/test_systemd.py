"""daemon.systemd against a fake systemd: a real AF_UNIX datagram socket bound at NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import anyio
import pytest

from daemon import systemd


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    def pending(self) -> list[str]:
        """Every datagram received so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    async def next(self) -> str:
        await anyio.wait_readable(self.sock)
        return self.sock.recv(4096).decode()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    d = tempfile.mkdtemp(
        dir="/tmp"
    )  # sun_path is at most 108 bytes: pytest's tmp_path can be longer
    path = os.path.join(d, "n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield FakeSystemd(sock)
    finally:
        sock.close()
        shutil.rmtree(d)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    name = f"gemini-batchd-test-{os.getpid()}-{id(monkeypatch)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield FakeSystemd(sock)
    finally:
        sock.close()


def test_ready_with_status_is_one_datagram(notify_socket: FakeSystemd) -> None:
    assert systemd.ready("x") is True
    assert notify_socket.pending() == ["READY=1\nSTATUS=x"]


def test_helpers_send_their_keys(notify_socket: FakeSystemd) -> None:
    assert systemd.ready()
    assert systemd.status("2 queued\n1 running")  # a STATUS= value must stay one line
    assert systemd.watchdog_ping()
    assert systemd.extend_timeout(2.5)
    assert systemd.stopping()
    assert notify_socket.pending() == [
        "READY=1",
        "STATUS=2 queued 1 running",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=2500000",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket(abstract_socket: FakeSystemd) -> None:
    assert systemd.notify("READY=1", "STATUS=abstract") is True
    assert abstract_socket.pending() == ["READY=1\nSTATUS=abstract"]


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.watchdog_ping() is False


def test_send_error_returns_false_and_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(d, "nobody-listens"))
        assert systemd.ready("x") is False
        monkeypatch.setenv("NOTIFY_SOCKET", "/" + "x" * 200)  # longer than sun_path
        assert systemd.ready("x") is False
        monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # systemd >= 253 transport: unsupported
        assert systemd.ready("x") is False
    finally:
        shutil.rmtree(d)


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert systemd.watchdog_interval() == 30.0  # no WATCHDOG_PID: ours
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


async def test_run_watchdog_pings_only_while_healthy(notify_socket: FakeSystemd) -> None:
    healthy = True
    checks = 0

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        return healthy

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: systemd.run_watchdog(
                    is_healthy, interval=0.05, task_status=task_status
                )
            )
            for _ in range(3):
                assert await notify_socket.next() == "WATCHDOG=1"

            healthy = False
            notify_socket.pending()  # drop a ping that may have raced the flip
            start = checks
            while checks < start + 4:  # four health checks made while unhealthy...
                await anyio.sleep(0.01)
            assert notify_socket.pending() == []  # ...and not one ping sent

            healthy = True
            assert await notify_socket.next() == "WATCHDOG=1"  # resumes when healthy again
            tg.cancel_scope.cancel()  # and is cancellable


async def test_run_watchdog_treats_a_raising_check_as_unhealthy(notify_socket: FakeSystemd) -> None:
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: systemd.run_watchdog(broken, interval=0.01))
            while calls < 3:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert notify_socket.pending() == []


async def test_run_watchdog_without_interval_returns_after_started(
    notify_socket: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(systemd.run_watchdog, lambda: True)
        # the task group exits only because run_watchdog returned on its own
    assert notify_socket.pending() == []


async def test_run_watchdog_uses_watchdog_usec(
    notify_socket: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(systemd.run_watchdog, lambda: True)
            assert await notify_socket.next() == "WATCHDOG=1"
            assert await notify_socket.next() == "WATCHDOG=1"
            tg.cancel_scope.cancel()
