"""The control socket under a flood of idle and half-sent connections: the real CLI still answers,
and the server closes those connections after its timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import anyio
import orjson

from daemon.config import parse_config
from tests.e2e.conftest import API_KEY, config_data, running_daemon, write_config
from tests.helpers import ROOT

IDLE, HALF = 120, 80
CAP = 64


def _open(path: str, n: int, data: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if data:
            s.sendall(data)
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    """Reads until EOF (answers such as a 503 are allowed first); False if the read times out."""
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def test_idle_and_half_sent_connections_are_closed_and_the_cli_answers(tmp_path, emulator):
    data = config_data(
        tmp_path / "root",
        emulator.url,
        control={"header_timeout": 2.0, "idle_timeout": 2.0, "max_connections": CAP},
    )
    cfg = parse_config(data)
    conf = write_config(tmp_path / "config.toml", data)
    async with running_daemon(cfg):
        path = str(cfg.socket_path)
        idle = await anyio.to_thread.run_sync(_open, path, IDLE, b"")
        half = await anyio.to_thread.run_sync(
            _open, path, HALF, b"GET /v1/status HTTP/1.1\r\nHost: d\r\n"
        )
        # kept alive after one whole request: closed by the idle timeout
        kept = await anyio.to_thread.run_sync(
            _open, path, 5, b"GET /v1/status HTTP/1.1\r\nHost: d\r\n\r\n"
        )
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "GEMINI_API_KEY": API_KEY,
        }
        proc = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "daemon", "status", "--json", "-c", str(conf)],
                capture_output=True,
                env=env,
                timeout=60,
            )
        )
        assert proc.returncode == 0, proc.stderr.decode()
        status = orjson.loads(proc.stdout)
        assert status["control"]["connections"] <= CAP, status["control"]
        assert status["control"]["max_connections"] == CAP
        deadline = time.monotonic() + 30.0  # a safety net: the timeouts are 2 s
        closed = [
            await anyio.to_thread.run_sync(_closed_by_server, s, deadline)
            for s in idle + half + kept
        ]
        for s in idle + half + kept:
            s.close()
    assert closed == [True] * (IDLE + HALF + 5)
