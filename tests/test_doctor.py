"""Offline ``gemini-batchd doctor``: a good setup passes, each broken part is named (exit 1)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.cli import main
from tests.helpers import short_tmpdir

KEY = "sk-doctor-7c1e93d0a4b2"
ROOT = os.geteuid() == 0


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A complete setup: folders, a key file, a config naming them; returns the config path."""
    for var in (
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "CREDENTIALS_DIRECTORY",
        "GEMINI_BATCHD_CONFIG",
    ):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "root"
    for d in ("inbox", "outbox", "state"):
        (root / d).mkdir(parents=True)
    (tmp_path / "key").write_text(KEY + "\n")
    sock = short_tmpdir() / "c.sock"
    conf = tmp_path / "config.toml"
    conf.write_text(
        f'[paths]\nroot = "{root}"\nsocket = "{sock}"\n[gemini]\napi_key_file = "{tmp_path}/key"\n'
    )
    return conf


def doctor(conf: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    rc = main(["doctor", "-c", str(conf), "--json", *extra])
    out = capsys.readouterr().out
    assert KEY not in out
    data = orjson.loads(out)
    assert data["ok"] is (rc == 0)
    return rc, {c["name"]: c for c in data["checks"]}


def problems(checks: dict[str, Any]) -> set[str]:
    return {n for n, c in checks.items() if c["status"] == "problem"}


@contextlib.contextmanager
def tmpfs(at: Path, *opts: str) -> Iterator[None]:
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(opts or ("size=2g",)), "tmpfs", str(at)],
        check=True,
    )
    try:
        yield
    finally:
        subprocess.run(["umount", str(at)], check=True)


def test_good_setup_passes(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, checks = doctor(setup, capsys)
    assert rc == 0 and problems(checks) == set()
    assert set(checks) == {
        "config",
        "inbox",
        "outbox",
        "state",
        "media",
        "filesystems",
        "socket",
        "disk",
        "sdk",
        "api key",
    }
    assert checks["api key"]["detail"] == "present (not shown)"
    assert checks["filesystems"]["status"] == "ok"
    assert checks["socket"]["detail"].endswith("absent (no daemon running)")


def test_table_output_names_every_check(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "-c", str(setup)]) == 0
    out = capsys.readouterr().out
    assert "api key" in out and "filesystems" in out and KEY not in out


def test_missing_folder(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (setup.parent / "root" / "outbox").rmdir()
    rc, checks = doctor(setup, capsys)
    assert rc == 1 and problems(checks) == {"outbox"}
    assert "missing" in checks["outbox"]["detail"]


def test_unwritable_folder(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = setup.parent / "root" / "inbox"
    if ROOT:  # root writes through any mode: a read-only mount is what stops it
        ctx: Any = tmpfs(inbox, "ro", "size=1m")
    else:
        inbox.chmod(0o500)
        ctx = contextlib.nullcontext()
    with ctx:
        rc, checks = doctor(setup, capsys)
    assert rc == 1 and "inbox" in problems(checks)
    assert "not writable" in checks["inbox"]["detail"]


def test_other_filesystem_is_a_warning_and_strict_fails(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tmpfs(setup.parent / "root" / "outbox"):
        rc, checks = doctor(setup, capsys)
        assert rc == 0 and checks["filesystems"]["status"] == "warn"
        assert "outbox on device" in checks["filesystems"]["detail"]
        rc, checks = doctor(setup, capsys, "--strict")
        assert rc == 1


def test_low_disk_is_a_problem(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(setup.parent / "root" / "outbox", "size=8m"):
        rc, checks = doctor(setup, capsys)
    assert rc == 1 and problems(checks) == {"disk"}
    assert "outbox" in checks["disk"]["detail"]


def test_no_key(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (setup.parent / "key").unlink()
    rc, checks = doctor(setup, capsys)
    assert rc == 1 and problems(checks) == {"api key"}


def test_bad_config(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write_text(setup.read_text() + "[poll]\nmin_interval = 'fast'\n")
    rc, checks = doctor(setup, capsys)
    assert rc == 1 and problems(checks) == {"config"}
    assert "[poll] min_interval" in checks["config"]["detail"]


def _socket_path(conf: Path) -> Path:
    for line in conf.read_text().splitlines():
        if line.startswith("socket"):
            return Path(line.split('"')[1])
    raise AssertionError


def test_socket_stale_and_answering(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _socket_path(setup)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    rc, checks = doctor(setup, capsys)
    assert rc == 0 and checks["socket"]["detail"].endswith("a daemon answers")
    s.close()  # the file stays: a stale socket
    rc, checks = doctor(setup, capsys)
    assert (
        rc == 0 and checks["socket"]["status"] == "warn" and "stale" in checks["socket"]["detail"]
    )


def test_socket_path_too_long(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = setup.parent / ("s" * 120) / "c.sock"
    setup.write_text(setup.read_text().replace(str(_socket_path(setup)), str(long)))
    rc, checks = doctor(setup, capsys)
    assert rc == 1 and problems(checks) == {"socket"}
    assert "AF_UNIX allows 107" in checks["socket"]["detail"]
