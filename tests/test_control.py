"""The control socket over a real Unix socket, with a real SQLite store behind it."""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from daemon.context import Context
from daemon.control.http import ControlError, bind_socket
from daemon.states import InputState
from tests.helpers import serve_control

# ---- helpers (kept local: each test file is self-contained) ----------------------------------
serve = serve_control


@asynccontextmanager
async def http(ctx: Context) -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.UnixConnector(path=str(ctx.cfg.socket_path))
    async with aiohttp.ClientSession(connector=conn, base_url="http://d") as s:
        yield s


async def call(
    s: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with s.request(method, url, **kw) as r:
        assert r.content_type == "application/json", await r.text()
        return r.status, orjson.loads(await r.read())


async def add_input(
    ctx: Context,
    rel_path: str,
    state: InputState = InputState.QUEUED,
    *,
    requests: int = 10,
    jobs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    created_at: float | None = None,
    **fields: Any,
) -> str:
    """An input with one part per job spec; returns its id."""
    work = ctx.cfg.state_dir / "work" / rel_path.replace("/", "_")
    work.parent.mkdir(parents=True, exist_ok=True)
    work.write_text('{"key": "a", "request": {}}\n')
    model = rel_path.split("/")[0] if "/" in rel_path else ctx.cfg.gemini.default_model
    async with ctx.store.tx() as conn:
        row = await ctx.store.add_input(
            conn,
            rel_path=rel_path,
            model=model,
            work_path=str(work),
            request_count=requests,
            created_at=created_at or time.time(),
            **fields,
        )
        if state is not InputState.SEEN:
            await ctx.store.set_input_state(conn, row["id"], state, note="test")
        for n, spec in enumerate(jobs, start=1):
            job = dict(spec)
            part = job.pop("part_no", n)
            attempt = job.pop("attempt", 1)
            if attempt == 1:
                await ctx.store.add_part(
                    conn,
                    input_id=row["id"],
                    part_no=part,
                    first_line=1,
                    last_line=requests or 1,
                    start_offset=0,
                    end_offset=100,
                    request_count=job.get("request_count", requests or 1),
                    size_bytes=100,
                    est_tokens=50,
                )
            await ctx.store.add_job(
                conn,
                input_id=row["id"],
                part_no=part,
                attempt=attempt,
                display_name=f"gemini-batchd:{row['id']}:{part}"
                + (f":{attempt}" if attempt > 1 else ""),
                mode="inline",
                source_path=str(work),
                request_count=job.pop("request_count", requests or 1),
                est_tokens=50,
                **job,
            )
    return row["id"]


# ---- status ------------------------------------------------------------------------------------
async def test_status_reports_counts_queue_jobs_and_errors(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        await add_input(ctx, "a.jsonl", InputState.QUEUED, requests=7, jobs=[{}])
        await add_input(ctx, "b.jsonl", InputState.SEEN, requests=None)
        now = time.time()
        await add_input(
            ctx,
            "c.jsonl",
            InputState.RUNNING,
            requests=5,
            jobs=[
                {
                    "state": "active",
                    "remote_name": "batches/c1",
                    "remote_state": "BATCH_STATE_RUNNING",
                    "submitted_at": now - 10 * 86400,
                }
            ],
        )
        await add_input(ctx, "d.jsonl", InputState.SUCCEEDED, requests=3)
        ctx.last_api_error = {"endpoint": "batches.create", "code": 429, "message": "quota"}
        async with http(ctx) as s:
            status, data = await call(s, "GET", "/v1/status")
    assert status == 200
    assert data["inputs"]["queued"] == 1
    assert data["inputs"]["seen"] == 1
    assert data["inputs"]["running"] == 1
    assert data["inputs"]["succeeded"] == 1
    assert data["inputs"]["failed"] == 0
    assert data["queued_requests"] == 7  # queued 7 + seen (unknown count) 0; running not counted
    assert data["active_jobs"] == 1
    assert data["last_api_error"]["code"] == 429
    assert data["paths"]["socket"] == str(ctx.cfg.socket_path)
    assert data["paths"]["inbox"] == str(tmp_path / "inbox")
    assert data["uptime_seconds"] >= 0
    assert [j["remote_name"] for j in data["stuck_jobs"]] == ["batches/c1"]


# ---- listing -----------------------------------------------------------------------------------
async def test_list_newest_first_with_filters_progress_and_counts(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        t = time.time()
        old = await add_input(ctx, "old.jsonl", InputState.QUEUED, created_at=t - 100)
        run = await add_input(
            ctx,
            "gemini-2.5-flash/run.jsonl",
            InputState.RUNNING,
            requests=30,
            created_at=t - 50,
            jobs=[
                {"state": "active", "remote_name": "batches/r1", "request_count": 10,
                 "done_count": 4, "failed_count": 1, "pending_count": 5},
                {"state": "active", "remote_name": "batches/r2", "request_count": 20,
                 "done_count": 20, "failed_count": 0, "pending_count": 0},
            ],
        )  # fmt: skip
        done = await add_input(
            ctx,
            "done.jsonl",
            InputState.PARTIAL,
            requests=4,
            created_at=t,
            summary={"requests": {"total": 4, "succeeded": 3, "failed": 1}},
        )
        async with http(ctx) as s:
            status, data = await call(s, "GET", "/v1/inputs")
            assert status == 200
            assert [v["id"] for v in data["inputs"]] == [done, run, old]
            by_id = {v["id"]: v for v in data["inputs"]}
            r = by_id[run]
            assert r["path"] == "gemini-2.5-flash/run.jsonl"
            assert r["model"] == "gemini-2.5-flash"
            assert r["progress"] == {"done": 24, "failed": 1, "pending": 5, "total": 30}
            assert r["jobs"] == ["batches/r1", "batches/r2"]
            assert r["created"].endswith("Z") and r["finished"] is None
            assert by_id[done]["requests"] == {"total": 4, "succeeded": 3, "failed": 1}
            assert by_id[done]["final"] is True and by_id[done]["finished"] is not None

            _, data = await call(s, "GET", "/v1/inputs?state=running")
            assert [v["id"] for v in data["inputs"]] == [run]
            _, data = await call(s, "GET", "/v1/inputs?limit=2")
            assert [v["id"] for v in data["inputs"]] == [done, run]
            _, data = await call(s, "GET", "/v1/inputs?state=failed")
            assert data["inputs"] == []


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=abc", "limit=", "state=bogus", "limit=1.5"]
)
async def test_list_rejects_malformed_query(tmp_path: Path, query: str) -> None:
    async with serve(tmp_path) as ctx, http(ctx) as s:
        status, data = await call(s, "GET", f"/v1/inputs?{query}")
        assert status == 400
        assert data["error"]["code"] == 400 and data["error"]["message"]


# ---- one input ---------------------------------------------------------------------------------
async def test_show_by_id_and_by_path_raw_or_encoded(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        first = await add_input(ctx, "gemini-2.5-flash/x.jsonl", created_at=time.time() - 5)
        latest = await add_input(
            ctx,
            "gemini-2.5-flash/x.jsonl",
            InputState.RUNNING,
            jobs=[{"state": "active", "remote_name": "batches/x1", "remote_state": "BATCH_STATE_RUNNING",
                   "done_count": 2, "pending_count": 8}],
        )  # fmt: skip
        plain = await add_input(ctx, "y.jsonl")
        async with http(ctx) as s:
            _, by_id = await call(s, "GET", f"/v1/inputs/{first}")
            assert by_id["id"] == first
            for ref in ["gemini-2.5-flash/x.jsonl", "gemini-2.5-flash%2Fx.jsonl"]:
                status, v = await call(s, "GET", f"/v1/inputs/{ref}")
                assert status == 200 and v["id"] == latest  # the path means its latest drop
            _, v = await call(s, "GET", "/v1/inputs/y.jsonl")
            assert v["id"] == plain
            _, v = await call(s, "GET", f"/v1/inputs/{latest}")
    assert [p["part_no"] for p in v["parts"]] == [1]
    (job,) = v["jobs"]
    assert job["remote_name"] == "batches/x1"
    assert job["display_name"] == f"gemini-batchd:{latest}:1"
    assert job["counts"] == {"done": 2, "failed": 0, "pending": 8}
    assert job["attempt"] == 1 and job["state"] == "active"
    assert [h["state"] for h in v["history"]] == ["seen", "running"]


async def test_unknown_input_and_unknown_path_are_json_404(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx, http(ctx) as s:
        for method, url in [
            ("GET", "/v1/inputs/nope"),
            ("GET", "/v1/inputs/no%2Fsuch.jsonl"),
            ("POST", "/v1/inputs/nope/cancel"),
            ("POST", "/v1/inputs/nope/retry"),
            ("GET", "/v2/anything"),
            ("GET", "/"),
        ]:
            status, data = await call(s, method, url)
            assert (status, data["error"]["code"]) == (404, 404), url
        status, data = await call(s, "POST", "/v1/status")
        assert (status, data["error"]["code"]) == (405, 405)
        status, _ = await call(s, "GET", "/v1/inputs/x.jsonl/cancel")
        assert status == 405


# ---- cancel / retry ----------------------------------------------------------------------------
async def test_cancel_queued_input_and_409_when_final(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        qid = await add_input(ctx, "q.jsonl", InputState.QUEUED, jobs=[{}, {}])
        rid = await add_input(
            ctx,
            "r.jsonl",
            InputState.RUNNING,
            jobs=[
                {"state": "active", "remote_name": "batches/r", "next_poll_at": time.time() + 600}
            ],
        )
        fid = await add_input(ctx, "f.jsonl", InputState.SUCCEEDED)
        async with http(ctx) as s:
            status, v = await call(s, "POST", "/v1/inputs/q.jsonl/cancel")
            assert status == 202 and v["id"] == qid and v["cancel_requested"] is True
            assert {j["state"] for j in v["jobs"]} == {"cancelled"}
            assert await ctx.wake.collect.wait(0)  # the collector finishes it as cancelled
            status, v = await call(s, "POST", f"/v1/inputs/{rid}/cancel")
            assert status == 202 and v["cancel_requested"] is True
            job = (await ctx.store.jobs_of(rid))[0]
            assert job["state"] == "active"  # the poller sees CANCELLED and moves it on
            assert job["next_poll_at"] <= time.time()  # polled now, not in ten minutes
            assert await ctx.wake.poll.wait(0)
            status, data = await call(s, "POST", f"/v1/inputs/{fid}/cancel")
            assert status == 409 and "succeeded" in data["error"]["message"]


async def test_retry_409_for_succeeded_and_unfinished(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        ok = await add_input(ctx, "ok.jsonl", InputState.SUCCEEDED)
        running = await add_input(ctx, "run.jsonl", InputState.RUNNING)
        async with http(ctx) as s:
            status, data = await call(s, "POST", f"/v1/inputs/{ok}/retry")
            assert status == 409 and "fresh" in data["error"]["message"]
            status, _ = await call(s, "POST", f"/v1/inputs/{running}/retry", json={"fresh": True})
            assert status == 409
        assert (await ctx.store.get_input(ok))["state"] == "succeeded"


async def test_retry_fresh_creates_a_new_input_from_the_same_file(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        old = await add_input(ctx, "m/f.jsonl", InputState.SUCCEEDED)
        async with http(ctx) as s:
            status, v = await call(s, "POST", "/v1/inputs/m%2Ff.jsonl/retry", json={"fresh": True})
        assert status == 202
        assert v["id"] != old and v["path"] == "m/f.jsonl" and v["model"] == "m"
        assert v["state"] == "seen" and v["fresh"] is True
        assert v["history"][0]["note"] == f"fresh rerun of {old}"
        new = await ctx.store.get_input(v["id"])
        work = Path(new["work_path"])
        assert work == ctx.cfg.state_dir / "work" / v["id"] / "input.jsonl"
        assert work.read_bytes() == Path((await ctx.store.get_input(old))["work_path"]).read_bytes()
        assert await ctx.wake.validate.wait(0)
        assert (await ctx.store.get_input(old))["state"] == "succeeded"  # untouched


@pytest.mark.parametrize(
    "body", [b"{not json", b"[1, 2]", b'{"fresh": "yes"}', b'{"fresh": true, "x": 1}', b"\xff\xfe"]
)
async def test_retry_malformed_body_is_400(tmp_path: Path, body: bytes) -> None:
    async with serve(tmp_path) as ctx:
        iid = await add_input(ctx, "p.jsonl", InputState.PARTIAL)
        async with http(ctx) as s:
            status, data = await call(s, "POST", f"/v1/inputs/{iid}/retry", data=body)
        assert status == 400 and data["error"]["code"] == 400
        assert (await ctx.store.get_input(iid))["state"] == "partial"


# ---- robustness --------------------------------------------------------------------------------
async def test_oversized_body_and_handler_failure_leave_daemon_running(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        iid = await add_input(ctx, "p.jsonl", InputState.PARTIAL)
        bad = await add_input(ctx, "bad.jsonl", InputState.SUCCEEDED)
        async with ctx.store.tx() as conn:  # a corrupt row makes the handler raise
            await conn.execute("UPDATE inputs SET summary = '{oops' WHERE id = ?", (bad,))
        async with http(ctx) as s:
            status, data = await call(
                s, "POST", f"/v1/inputs/{iid}/retry", data=b'{"fresh": true}' + b" " * 200_000
            )
            assert status == 413 and data["error"]["code"] == 413
            status, data = await call(s, "GET", f"/v1/inputs/{bad}")
            assert status == 500 and data["error"]["code"] == 500
            status, _ = await call(s, "GET", "/v1/status")
            assert status == 200


async def test_garbage_bytes_do_not_kill_the_server(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        path = str(ctx.cfg.socket_path)
        for junk in [
            b"\x00\xff\xfe garbage\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"\x16\x03\x01" * 50,
        ]:
            sock = await anyio.connect_unix(path)
            await sock.send(junk)
            with anyio.fail_after(5):
                answer = b""
                try:
                    while chunk := await sock.receive():
                        answer += chunk
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    pass
            await sock.aclose()
            # aiohttp's parser answers 400 (plain text: the request never reached the app)
            assert answer == b"" or answer.split(b" ")[1] in (b"400", b"505"), answer[:80]
        # a client that connects and vanishes mid-request
        sock = await anyio.connect_unix(path)
        await sock.send(
            b"POST /v1/inputs/x/retry HTTP/1.1\r\nHost: d\r\nContent-Length: 999\r\n\r\n{"
        )
        await sock.aclose()
        async with http(ctx) as s:
            status, data = await call(s, "GET", "/v1/status")
        assert status == 200 and data["version"]


async def test_fifty_concurrent_status_clients_all_answered(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        for i in range(20):
            await add_input(ctx, f"f{i}.jsonl", InputState.RUNNING, jobs=[{"state": "active"}])
        answers: list[int] = []

        async def one() -> None:
            conn = aiohttp.UnixConnector(path=str(ctx.cfg.socket_path))
            async with aiohttp.ClientSession(connector=conn) as s:  # one connection each
                status, data = await call(s, "GET", "http://d/v1/status")
                assert data["inputs"]["running"] == 20
                answers.append(status)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
    assert answers == [200] * 50


# ---- the socket itself -------------------------------------------------------------------------
async def test_socket_mode_0600_and_removed_on_shutdown(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        path = ctx.cfg.socket_path
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".control-")]
    assert not path.exists()


async def test_socket_group_mode_0660(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgroups()[0] if os.getgroups() else os.getgid()).gr_name
    async with serve(tmp_path, socket_group=group) as ctx:
        st = ctx.cfg.socket_path.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam(group).gr_gid


async def test_stale_socket_replaced_non_socket_refused(tmp_path: Path) -> None:
    short = Path(tempfile.mkdtemp(dir="/tmp", prefix="gbc"))
    try:
        stale = short / "c.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(stale))
        dead.close()  # a dead daemon's socket file: nobody listens
        with pytest.raises(ConnectionRefusedError):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(stale))
            finally:
                s.close()
        async with serve(tmp_path, socket=str(stale)) as ctx, http(ctx) as s:
            status, _ = await call(s, "GET", "/v1/status")
            assert status == 200
        regular = short / "not-a-socket"
        regular.write_text("keep me")
        with pytest.raises(ControlError, match="not a socket"):
            bind_socket(regular, None)
        assert regular.read_text() == "keep me"
        with pytest.raises(ControlError, match="too long"):
            bind_socket(short / ("x" * 120), None)
        with pytest.raises(ControlError, match="no group"):
            bind_socket(short / "g.sock", "no-such-group-gbd")
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_unix_socket(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        iid = await add_input(ctx, "gemini-2.5-flash/c.jsonl", InputState.QUEUED, jobs=[{}])
        sock = str(ctx.cfg.socket_path)

        async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
            return await anyio.run_process(
                ["curl", "-sS", "--unix-socket", sock, *args], check=False
            )

        r = await curl("http://d/v1/status")
        assert r.returncode == 0 and orjson.loads(r.stdout)["inputs"]["queued"] == 1
        r = await curl("http://d/v1/inputs/gemini-2.5-flash/c.jsonl")
        assert orjson.loads(r.stdout)["id"] == iid
        r = await curl("-X", "POST", "-w", "\n%{http_code}", f"http://d/v1/inputs/{iid}/cancel")
        body, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"202" and orjson.loads(body)["cancel_requested"] is True
        r = await curl("-w", "\n%{http_code}", "http://d/v1/nope")
        body, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"404" and orjson.loads(body)["error"]["code"] == 404
        r = await curl("http://d/metrics")
        assert b"gemini_batchd_inputs" in r.stdout
