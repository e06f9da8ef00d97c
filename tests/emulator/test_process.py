"""The emulator as a separate process (`python -m daemon emulator`): CLI, signals, memory."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from google.genai import types

from tests.emulator.helpers import make_client, wait_until

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


class Proc:
    def __init__(self, popen: subprocess.Popen[str], url: str) -> None:
        self.popen, self.url = popen, url


@pytest.fixture
def emulator_proc(tmp_path: Path) -> Iterator[Proc]:
    cmd = [sys.executable, "-m", "daemon", "emulator", "--port", "0", "--data-dir", str(tmp_path / "d"),
           "--pending-seconds", "0.05", "--running-seconds", "0.2"]  # fmt: skip
    popen = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline()  # bounded by the pytest timeout
        prefix = "gemini-batchd emulator listening on "
        assert line.startswith(prefix), line
        yield Proc(popen, line[len(prefix) :].strip())
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
        if popen.stdout is not None:
            popen.stdout.close()


def test_cli_serves_and_exits_on_sigterm(emulator_proc: Proc, tmp_path: Path) -> None:
    client = make_client(emulator_proc.url, api_version=None)
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"key": "k", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}) + "\n"
    )
    up = client.files.upload(file=str(src), config={"mime_type": "application/jsonl"})
    assert up.name
    job = client.batches.create(model="gemini-2.5-flash", src=up.name)
    assert job.name
    name = job.name
    job = wait_until(lambda: (j := client.batches.get(name=name)).done and j)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    emulator_proc.popen.send_signal(signal.SIGTERM)
    assert emulator_proc.popen.wait(10) == 0


def _write_big(path: Path, size: int) -> str:
    block = (b"0123456789abcdef" * 65536)[: 4 * MiB]
    h = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


def test_300mb_upload_download_peak_rss(emulator_proc: Proc, tmp_path: Path) -> None:
    size = 300 * MiB
    src = tmp_path / "big.bin"
    digest = _write_big(src, size)
    proc = psutil.Process(emulator_proc.popen.pid)
    peak = proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    client = make_client(emulator_proc.url)
    try:
        t0 = time.monotonic()
        up = client.files.upload(file=str(src), config={"mime_type": "application/octet-stream"})
        assert up.name and up.size_bytes == size
        dest = tmp_path / "back.bin"
        client.files.download(file=up.name, destination=str(dest))
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        sampler.join(5)
    assert dest.stat().st_size == size and _sha256(dest) == digest
    print(f"\n300 MiB upload+download in {elapsed:.1f}s; emulator peak RSS {peak / MiB:.1f} MiB")
    assert peak < 100 * MiB, f"emulator peak RSS {peak / MiB:.1f} MiB"
