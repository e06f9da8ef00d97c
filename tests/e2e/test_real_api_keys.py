"""The daemon against the real API's behaviour (real-api-evidence.md §1.8-1.18, Task 3): API key
rotation, create-time "Error on line N", cleanup of result files, blank lines between requests."""

from __future__ import annotations

import signal
import sqlite3

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from daemon.control.actions import cancel_input, retry_input
from daemon.layout import outbox_paths
from daemon.store import loads
from tests.e2e.conftest import (
    DaemonProcess,
    config_data,
    running_daemon,
    wait_final,
    write_config,
)
from tests.helpers import answer_text, drop, read_jsonl, request_lines, wait_until

NOT_VISIBLE = "not visible with the current API key"


def creates(emulator) -> int:
    return sum(emulator.stats["creates_by_display_name"].values())


@pytest.mark.parametrize("mode", ["inline", "file"])
async def test_blank_lines_between_requests(make_cfg, emulator, mode):
    cfg = make_cfg(submit={"inline_max_bytes": 8 << 20 if mode == "inline" else 0})
    keyed = request_lines(3)
    bare = orjson.dumps({"contents": [{"parts": [{"text": "bare"}]}]})
    lines = [keyed[0], b"", keyed[1], b"   ", keyed[2], b""]
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "blank.jsonl", lines)
        drop(cfg.inbox_dir, "bare.jsonl", [b"", bare, b"", bare])
        row = await wait_final(ctx, "blank.jsonl")
        bare_row = await wait_final(ctx, "bare.jsonl")
        jobs = await ctx.store.jobs_of(row["id"])
    assert row["state"] == "succeeded", row["reason"]
    assert [j["mode"] for j in jobs] == [mode]
    got = read_jsonl(outbox_paths(cfg.outbox_dir, "blank.jsonl")["results"])
    assert [(g["key"], answer_text(g)) for g in got] == [
        (f"k{i}", f"echo: prompt for k{i}") for i in range(3)
    ]
    assert bare_row["state"] == "succeeded", bare_row["reason"]
    got = read_jsonl(outbox_paths(cfg.outbox_dir, "bare.jsonl")["results"])
    assert [g["key"] for g in got] == ["2", "4"]  # physical line numbers, blank lines counted


async def test_error_on_line_n_rejects_with_the_input_line(make_cfg, emulator):
    # 8 lines, parts of 2 requests: the bad line is the input's line 7 and line 3 of part 3's
    # byte range (k4, a blank line, the bad one); file mode: the API checks the file at create.
    cfg = make_cfg(submit={"inline_max_bytes": 0, "max_requests_per_job": 2})
    good = request_lines(7)
    bad = orjson.loads(good[5])
    bad["request"]["thinking_config"] = {"thinking_budget": 0}  # belongs in generation_config
    lines = [*good[:5], b"", orjson.dumps(bad), good[6]]
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "think.jsonl", lines)
        row = await wait_final(ctx, "think.jsonl")
        jobs = await ctx.store.jobs_of(row["id"])
    assert row["state"] == "rejected", row
    assert len(jobs) == 4  # one job per part, nothing retried
    err = orjson.loads(outbox_paths(cfg.outbox_dir, "think.jsonl")["error"].read_bytes())
    assert err["state"] == "rejected"
    problems = err["details"]["problems"]
    assert [p["line"] for p in problems] == [7]
    assert "no such field: 'thinking_config'" in problems[0]["reason"]
    assert "line 7" in err["reason"] and "thinking_config" in err["reason"]
    api = [j["error"] for j in err["details"]["jobs"]]
    assert [e["message"].split(":")[0] for e in api] == ["Error on line 3"]  # the API's text
    assert emulator.stats["calls"]["batches.create"] == 4
    results = read_jsonl(outbox_paths(cfg.outbox_dir, "think.jsonl")["results"])
    assert [("response" in r) for r in results] == [True] * 4 + [False] * 2 + [True]


async def test_cleanup_tolerates_403_and_the_40_character_limit(make_cfg, emulator):
    cfg = make_cfg(submit={"inline_max_bytes": 0})
    with capture_logs() as logs:
        async with running_daemon(cfg) as ctx:
            drop(cfg.inbox_dir, "a.jsonl", request_lines(2))
            row = await wait_final(ctx, "a.jsonl")
            assert row["state"] == "succeeded"
            # the upload (200) and the result file (400: id over 40 characters)
            await wait_until(lambda: emulator.stats["calls"].get("files.delete", 0) >= 2)
            job = (await ctx.store.jobs_of(row["id"]))[0]
            await ctx.gemini.delete_file(job["upload_name"])  # already gone: 403, fine
            await ctx.gemini.delete_file(job["result_file"])  # not deletable: fine
            assert ctx.gemini.calls[("files.delete", "400")] == 2
            assert ctx.gemini.calls[("files.delete", "403")] == 1
    assert emulator.stats["calls"]["files.delete"] == 4  # each once: no retries
    assert any(e["event"] == "input_finished" for e in logs)  # the capture works
    assert not [e for e in logs if e["event"] == "remote_file_not_deleted"]


async def test_key_rotation_never_resubmits(make_cfg, emulator):
    emulator.settings.scope_by_key = True
    emulator.settings.running_seconds = 4.0  # running while the daemon restarts twice
    cfg = make_cfg()
    async with running_daemon(cfg, api_key="key-A-0123456789") as ctx:
        drop(cfg.inbox_dir, "rot.jsonl", request_lines(3))
        drop(cfg.inbox_dir, "rot2.jsonl", request_lines(2, prefix="m"))

        async def active() -> bool:
            rows = [await ctx.store.find_input(n) for n in ("rot.jsonl", "rot2.jsonl")]
            return all(r and r["state"] in ("submitted", "running") for r in rows)

        await wait_until(active)
        ref = (await ctx.store.find_input("rot.jsonl"))["id"]
    assert creates(emulator) == 2
    async with running_daemon(cfg, api_key="key-B-9876543210") as ctx:

        async def invisible() -> dict | None:
            row = await ctx.store.get_input(ref)
            return row if NOT_VISIBLE in (row["reason"] or "") else None

        row = await wait_until(invisible)
        assert row["state"] in ("submitted", "running")
        job = (await ctx.store.jobs_of(ref))[0]
        assert job["state"] == "active" and NOT_VISIBLE in loads(job["error"])["message"]
        assert "key-B" not in (row["reason"] or "") and "key-A" not in job["error"]
        notes = [h["note"] or "" for h in await ctx.store.history(ref)]
        assert sum(NOT_VISIBLE in n for n in notes) == 1  # noted once in `show`'s history
        status = await _socket_get(ctx, "/v1/status")
        assert job["remote_name"] in [j["remote_name"] for j in status["not_visible_jobs"]]
        assert creates(emulator) == 2  # nothing resubmitted
    async with running_daemon(cfg, api_key="key-A-0123456789") as ctx:
        row = await wait_final(ctx, ref)
        assert row["state"] == "succeeded" and not row["reason"]
        job = (await ctx.store.jobs_of(ref))[0]
        assert job["error"] is None
        await wait_final(ctx, "rot2.jsonl")
    got = read_jsonl(outbox_paths(cfg.outbox_dir, "rot.jsonl")["results"])
    assert [g["key"] for g in got] == ["k0", "k1", "k2"]  # each key answered once
    assert creates(emulator) == 2
    # the fingerprint is not the key (nor a plain hash of it) and stays the same per key
    fps = {j["key_fp"] for j in await _all_jobs(cfg)}
    assert len(fps) == 1 and all("key-A" not in fp for fp in fps)


async def test_retry_resubmits_a_job_of_another_key_deliberately(make_cfg, emulator):
    emulator.settings.scope_by_key = True
    emulator.settings.running_seconds = 60.0
    cfg = make_cfg()
    async with running_daemon(cfg, api_key="key-A-0123456789") as ctx:
        drop(cfg.inbox_dir, "r.jsonl", request_lines(2))
        row = await wait_until(
            lambda: _state_in(ctx, "r.jsonl", ("submitted", "running")), timeout=30
        )
    emulator.settings.running_seconds = 0.1
    async with running_daemon(cfg, api_key="key-B-9876543210") as ctx:
        await wait_until(lambda: _reason_has(ctx, row["id"], NOT_VISIBLE))
        await retry_input(ctx, row["id"])
        done = await wait_final(ctx, row["id"])
    assert done["state"] == "succeeded"
    assert creates(emulator) == 2  # the deliberate resubmission, once


async def test_many_lost_jobs_at_once_are_held_not_resubmitted(make_cfg, emulator):
    """Every active job 404s at once (none of them visible to the key that made them): held,
    not resubmitted, since the API does not answer for any of them."""
    emulator.settings.running_seconds = 60.0
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        for i in range(6):
            drop(cfg.inbox_dir, f"m{i}.jsonl", request_lines(1, prefix=f"m{i}-"))

        async def all_active() -> bool:
            rows = await ctx.store.list_inputs()
            return len(rows) == 6 and all(r["state"] in ("submitted", "running") for r in rows)

        await wait_until(all_active)
        for rec in list(emulator.store.jobs.values()):
            emulator.store.delete_job(rec["id"])

        async def held() -> bool:
            rows = await ctx.store.list_inputs()
            return all("not found" in (r["reason"] or "") for r in rows)

        await wait_until(held)
        jobs = [j for r in await ctx.store.list_inputs() for j in await ctx.store.jobs_of(r["id"])]
        assert {j["state"] for j in jobs} == {"active"}
    assert creates(emulator) == 6


async def _socket_get(ctx, url: str):
    conn = aiohttp.UnixConnector(path=str(ctx.cfg.socket_path))
    async with aiohttp.ClientSession(connector=conn) as s, s.get(f"http://d{url}") as r:
        return orjson.loads(await r.read())


async def _state_in(ctx, ref: str, states: tuple[str, ...]):
    row = await ctx.store.find_input(ref)
    return row if row and row["state"] in states else None


async def _reason_has(ctx, input_id: str, text: str) -> bool:
    row = await ctx.store.get_input(input_id)
    return text in (row["reason"] or "")


async def _all_jobs(cfg):
    from daemon.store import Store

    async with Store.open(cfg.db_path) as store:
        return await store.fetchall("SELECT * FROM jobs")


async def test_error_on_line_n_maps_part_file_lines_by_key(make_cfg, emulator):
    """Bare requests are submitted from part files (canonical lines, no blank lines): the API's
    line N is found again in the input by its key."""
    cfg = make_cfg(submit={"inline_max_bytes": 0, "max_requests_per_job": 2})
    bare = [orjson.dumps({"contents": [{"parts": [{"text": f"p{i}"}]}]}) for i in range(4)]
    bad = orjson.dumps({"contents": "x", "thinking_config": {}})
    lines = [bare[0], bare[1], b"", bare[2], b"", bad, bare[3]]  # bad: input line 6
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "bare.jsonl", lines)
        row = await wait_final(ctx, "bare.jsonl")
        jobs = await ctx.store.jobs_of(row["id"])
    assert row["state"] == "rejected", row["reason"]
    assert all(j["source_path"] != row["work_path"] for j in jobs)  # part files
    err = orjson.loads(outbox_paths(cfg.outbox_dir, "bare.jsonl")["error"].read_bytes())
    assert [p["line"] for p in err["details"]["problems"]] == [6]
    assert [j["error"]["message"].split(":")[0] for j in err["details"]["jobs"]] == [
        "Error on line 2"
    ]


async def test_create_cut_short_is_not_repeated_under_another_key(tmp_path, emulator):
    """kill -9 right after a create with key A (its name never stored); restarted with key B,
    whose list cannot show A's job: the create is not repeated. Key A back: adopted."""
    emulator.settings.scope_by_key = True
    emulator.settings.running_seconds = 0.3
    root = tmp_path / "root"
    data = config_data(root, emulator.url)
    cfg_path = write_config(tmp_path / "config.toml", data)
    db = root / "state" / "gemini-batchd.sqlite"
    key_a = {"GEMINI_API_KEY": "key-A-0123456789"}
    p = DaemonProcess(cfg_path, env=key_a | {"GEMINI_BATCHD_CRASH_AT": "after_create"})
    try:
        await wait_until(db.exists, timeout=30)
        drop(root / "inbox", "cut.jsonl", request_lines(2))
        assert await p.wait_exit(timeout=90) == -signal.SIGKILL, p.output()
    finally:
        p.close()
    assert creates(emulator) == 1

    def reason() -> str:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return str(con.execute("SELECT reason FROM inputs").fetchone()[0])

    p = DaemonProcess(cfg_path, env={"GEMINI_API_KEY": "key-B-9876543210"})
    try:
        await wait_until(lambda: NOT_VISIBLE in reason(), timeout=60)
        assert p.terminate() == 0, p.output()
    finally:
        p.close()
    assert creates(emulator) == 1  # not created again with key B
    p = DaemonProcess(cfg_path, env=key_a)
    try:
        await p.wait_for_file(outbox_paths(root / "outbox", "cut.jsonl")["summary"])
        assert p.terminate() == 0, p.output()
    finally:
        p.close()
    assert creates(emulator) == 1
    assert [
        g["key"] for g in read_jsonl(outbox_paths(root / "outbox", "cut.jsonl")["results"])
    ] == [
        "k0",
        "k1",
    ]


async def test_cancel_ends_an_input_whose_job_is_not_visible(make_cfg, emulator):
    emulator.settings.scope_by_key = True
    emulator.settings.running_seconds = 60.0
    cfg = make_cfg()
    async with running_daemon(cfg, api_key="key-A-0123456789") as ctx:
        drop(cfg.inbox_dir, "c.jsonl", request_lines(2))
        row = await wait_until(lambda: _state_in(ctx, "c.jsonl", ("submitted", "running")))
    async with running_daemon(cfg, api_key="key-B-9876543210") as ctx:
        await wait_until(lambda: _reason_has(ctx, row["id"], NOT_VISIBLE))
        await cancel_input(ctx, row["id"])  # the API cannot cancel it for key B (404)
        done = await wait_final(ctx, row["id"])
    assert done["state"] == "cancelled"
    assert creates(emulator) == 1
