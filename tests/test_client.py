"""The CLI client commands against a real control socket (and the real `python -m daemon` entry)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import structlog

from daemon.cli import build_parser
from daemon.config import Config, parse_config
from daemon.context import Context
from daemon.control import client
from daemon.states import InputState
from tests.helpers import serve_control

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def daemon_logs_to_stderr() -> Iterator[None]:
    """Server and client share this process here: keep the daemon's log lines off stdout."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    yield
    structlog.reset_defaults()


serve = serve_control


async def add(
    ctx: Context, rel_path: str, input_state: InputState, /, *, requests: int = 10, **job: Any
) -> str:
    work = ctx.cfg.state_dir / "work" / rel_path.replace("/", "_")
    work.parent.mkdir(parents=True, exist_ok=True)
    work.write_text('{"key": "a", "request": {}}\n')
    async with ctx.store.tx() as conn:
        row = await ctx.store.add_input(
            conn, rel_path=rel_path, model="m", work_path=str(work), request_count=requests
        )
        await ctx.store.set_input_state(conn, row["id"], input_state)
        if job:
            await ctx.store.add_job(
                conn,
                input_id=row["id"],
                part_no=1,
                attempt=1,
                display_name=f"gemini-batchd:{row['id']}:1",
                mode="inline",
                source_path=str(work),
                request_count=requests,
                est_tokens=1,
                **job,
            )
    return row["id"]


async def run(cfg: Config, *argv: str) -> int:
    """``gemini-batchd <argv>`` in a worker thread while the socket is served on this loop."""
    args = build_parser().parse_args(list(argv))
    return await anyio.to_thread.run_sync(client.main, cfg, args)


async def test_status_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(tmp_path) as ctx:
        await add(ctx, "a.jsonl", InputState.QUEUED, requests=12)
        assert await run(ctx.cfg, "status") == 0
        out = capsys.readouterr().out
        assert "queued requests" in out and "12" in out
        assert str(ctx.cfg.socket_path) in out
        assert await run(ctx.cfg, "status", "--json") == 0
        data = orjson.loads(capsys.readouterr().out)
        assert data["inputs"]["queued"] == 1 and data["queued_requests"] == 12


async def test_ls_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(tmp_path) as ctx:
        qid = await add(ctx, "m/q.jsonl", InputState.QUEUED)
        rid = await add(
            ctx, "r.jsonl", InputState.RUNNING, state="active", remote_name="batches/r1",
            done_count=3, failed_count=1, pending_count=6,
        )  # fmt: skip
        assert await run(ctx.cfg, "ls") == 0
        out = capsys.readouterr().out
        assert qid in out and rid in out and "m/q.jsonl" in out and "4/10 (1 failed)" in out
        assert out.index(rid) < out.index(qid)  # newest first
        assert await run(ctx.cfg, "ls", "--json", "--state", "running") == 0
        data = orjson.loads(capsys.readouterr().out)
        assert [v["id"] for v in data["inputs"]] == [rid]
        assert await run(ctx.cfg, "ls", "--state", "succeeded") == 0
        assert "no inputs in state succeeded" in capsys.readouterr().out

        assert await run(ctx.cfg, "show", "m/q.jsonl") == 0
        out = capsys.readouterr().out
        assert qid in out and "history" in out and "queued" in out
        assert await run(ctx.cfg, "show", rid, "--json") == 0
        v = orjson.loads(capsys.readouterr().out)
        assert v["jobs"][0]["remote_name"] == "batches/r1"


async def test_errors_map_to_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(tmp_path) as ctx:
        ok = await add(ctx, "ok.jsonl", InputState.SUCCEEDED)
        assert await run(ctx.cfg, "show", "nope.jsonl") == 1
        assert "no input 'nope.jsonl'" in capsys.readouterr().err
        assert await run(ctx.cfg, "show", "nope", "--json") == 1
        assert orjson.loads(capsys.readouterr().out)["error"]["code"] == 404
        assert await run(ctx.cfg, "cancel", ok) == 1
        assert "already succeeded" in capsys.readouterr().err
        assert await run(ctx.cfg, "retry", ok) == 1
        capsys.readouterr()
        assert await run(ctx.cfg, "ls", "--state", "bogus") == 2
        assert await run(ctx.cfg, "ls", "--limit", "0") == 2


async def test_cancel_and_retry_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(tmp_path) as ctx:
        qid = await add(ctx, "q.jsonl", InputState.QUEUED, state="planned")
        ok = await add(ctx, "ok.jsonl", InputState.SUCCEEDED)
        assert await run(ctx.cfg, "cancel", "q.jsonl") == 0
        assert f"cancel requested: {qid}" in capsys.readouterr().out
        assert (await ctx.store.get_input(qid))["cancel_requested"] == 1
        assert await run(ctx.cfg, "retry", "--fresh", "--json", "ok.jsonl") == 0
        new = orjson.loads(capsys.readouterr().out)
        assert new["id"] != ok and new["state"] == "seen" and new["fresh"] is True
        assert await run(ctx.cfg, "retry", "--fresh", ok) == 0
        assert "fresh rerun: new input" in capsys.readouterr().out


async def test_no_daemon_exits_69_with_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = Path(tempfile.mkdtemp(dir="/tmp", prefix="gbk"))
    try:
        missing = short / "missing.sock"
        cfg = parse_config({"paths": {"root": str(tmp_path), "socket": str(missing)}})
        assert await run(cfg, "status") == 69
        assert str(missing) in capsys.readouterr().err
        dead = short / "dead.sock"  # a socket file nobody listens on
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(dead))
        s.close()
        assert await run(cfg, "ls", "--socket", str(dead)) == 69
        assert str(dead) in capsys.readouterr().err
        # the real entry point, as a user runs it
        r = await anyio.run_process(
            [sys.executable, "-m", "daemon", "show", "x", "--socket", str(missing)],
            env={**os.environ, "PYTHONPATH": str(REPO), "GEMINI_BATCHD_CONFIG": ""},
            cwd=tmp_path,
            check=False,
        )
        assert r.returncode == 69 and str(missing).encode() in r.stderr
    finally:
        shutil.rmtree(short, ignore_errors=True)


async def test_entry_point_against_served_socket(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        iid = await add(ctx, "x.jsonl", InputState.QUEUED)
        r = await anyio.run_process(
            [sys.executable, "-m", "daemon", "ls", "--json", "--socket", str(ctx.cfg.socket_path)],
            env={**os.environ, "PYTHONPATH": str(REPO), "GEMINI_BATCHD_CONFIG": ""},
            cwd=tmp_path,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert [v["id"] for v in orjson.loads(r.stdout)["inputs"]] == [iid]


async def _finish_when_seen(
    ctx: Context, capsys: pytest.CaptureFixture[str], ids: list[str], marker: str
) -> str:
    """Wait until the live display shows ``marker``, then make every input final."""
    seen = ""
    with anyio.fail_after(15):
        while marker not in seen:
            seen += capsys.readouterr().out
            await anyio.sleep(0.05)
    async with ctx.store.tx() as conn:
        for iid in ids:
            await conn.execute(
                "UPDATE jobs SET done_count = 10, pending_count = 0, state = 'collected' "
                "WHERE input_id = ?",
                (iid,),
            )
            await ctx.store.set_input_state(
                conn,
                iid,
                InputState.SUCCEEDED,
                summary={"requests": {"total": 10, "succeeded": 10, "failed": 0}},
            )
    return seen


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make rich draw its live display into the captured stdout as on a terminal."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("COLUMNS", "160")


@pytest.mark.usefixtures("terminal")
async def test_show_follow_until_final(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(tmp_path) as ctx:
        iid = await add(
            ctx, "f.jsonl", InputState.RUNNING, state="active", remote_name="batches/f",
            done_count=2, pending_count=8,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def follow() -> None:
                codes.append(await run(ctx.cfg, "show", "--follow", iid))

            tg.start_soon(follow)
            seen = await _finish_when_seen(ctx, capsys, [iid], "2/10")
        assert codes == [0]
        seen += capsys.readouterr().out
        assert "10/10" in seen and "succeeded" in seen


@pytest.mark.usefixtures("terminal")
async def test_ls_watch_until_all_final(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(tmp_path) as ctx:
        ids = [
            await add(
                ctx, f"w{i}.jsonl", InputState.RUNNING, state="active",
                remote_name=f"batches/w{i}", done_count=i + 1, pending_count=9 - i,
            )
            for i in range(3)
        ]  # fmt: skip
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def watch() -> None:
                codes.append(await run(ctx.cfg, "ls", "--watch", "--state", "running"))

            tg.start_soon(watch)
            await _finish_when_seen(ctx, capsys, ids, "3/10")
        assert codes == [0]
        assert time.monotonic() - t0 < 15
        out = capsys.readouterr().out
        assert all(i in out for i in ids)  # the final table lists them
        assert out.count("succeeded") >= 3
