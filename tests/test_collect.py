"""The collect stage against a real store and real files (no API calls: jobs are crafted)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from daemon.config import parse_config
from daemon.context import Context
from daemon.emulator import Emulator, EmulatorSettings
from daemon.gemini import GeminiClient
from daemon.layout import outbox_paths
from daemon.results import collect, fast_order, order, outbox_file
from daemon.results.collect import (
    _index_job,
    _inline_lines,
    collect_once,
    finish_input,
    plan_retries,
)
from daemon.results.media import media_ext, safe_key
from daemon.store import Store, new_input_id

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture(params=["in-memory", "per-job"])
async def ctx(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Context]:
    """Every scenario runs twice: merged in memory at the end (small inputs), and with the
    on-disk index filled job by job as each job is collected (big inputs)."""
    if request.param == "per-job":
        monkeypatch.setattr(collect, "SMALL_INPUT_REQUESTS", -1)
    cfg = parse_config(
        {
            "paths": {"root": str(tmp_path)},
            "submit": {"retry_failed_requests": 1},
            "prices": {"gemini-2.5-flash": {"input_per_mtok": 0.3, "output_per_mtok": 2.5}},
        }
    )
    async with Store.open(cfg.db_path) as store:
        yield Context(cfg=cfg, store=store)


def ok(key: str, extra_parts: list[dict[str, Any]] | None = None) -> bytes:
    parts = [{"text": f"answer:{key}"}, *(extra_parts or [])]
    return orjson.dumps(
        {
            "key": key,
            "response": {
                "candidates": [{"content": {"parts": parts}}],
                "usageMetadata": {
                    "promptTokenCount": 10,
                    "candidatesTokenCount": 20,
                    "thoughtsTokenCount": 5,
                    "totalTokenCount": 35,
                },
            },
        }
    )


def err(key: str, code: int) -> bytes:
    return orjson.dumps({"key": key, "error": {"code": code, "message": f"failure {code}"}})


class Input:
    """An input as validate would leave it: work file, parts, attempt-1 part files, jobs."""

    def __init__(self, ctx: Context, id_: str, jobs: dict[int, int]) -> None:
        self.ctx, self.id, self.jobs = ctx, id_, jobs  # jobs: part → job id of attempt 1

    @classmethod
    async def make(
        cls,
        ctx: Context,
        parts: list[list[str]],
        *,
        rel: str = "foo.jsonl",
        ranged: bool = False,
        **extra: Any,
    ) -> Input:
        id_ = new_input_id()
        work = ctx.input_dir(id_)
        work.mkdir(parents=True)
        inp = work / "input.jsonl"
        rows, line_no, off = [], 1, 0
        with open(inp, "wb") as f:
            for n, keys in enumerate(parts, start=1):
                start, first = off, line_no
                lines = [
                    orjson.dumps({"key": k, "request": {"contents": [{"parts": [{"text": k}]}]}})
                    + b"\n"
                    for k in keys
                ]
                for line in lines:
                    f.write(line)
                    off += len(line)
                    line_no += 1
                if not ranged:  # else each job submits its byte range of the input
                    (work / f"part-{n}-a1.jsonl").write_bytes(b"".join(lines))
                rows.append((n, first, line_no - 1, start, off, len(keys)))
        jobs = {}
        async with ctx.store.tx() as conn:
            await ctx.store.add_input(
                conn,
                id=id_,
                rel_path=rel,
                model=extra.pop("model", "gemini-2.5-flash"),
                state="running",
                work_path=str(inp),
                request_count=sum(len(p) for p in parts),
                **extra,
            )
            for n, first, last, start, end, count in rows:
                await ctx.store.add_part(
                    conn,
                    input_id=id_,
                    part_no=n,
                    first_line=first,
                    last_line=last,
                    start_offset=start,
                    end_offset=end,
                    request_count=count,
                    size_bytes=end - start,
                    est_tokens=10 * count,
                )
                jobs[n] = await ctx.store.add_job(
                    conn,
                    input_id=id_,
                    part_no=n,
                    attempt=1,
                    display_name=f"gemini-batchd:{id_}:{n}",
                    state="active",
                    mode="file",
                    source_path=str(inp if ranged else work / f"part-{n}-a1.jsonl"),
                    source_start=start if ranged else None,
                    source_end=end if ranged else None,
                    request_count=count,
                    est_tokens=10 * count,
                    remote_name=f"batches/{id_}-{n}",
                )
        return cls(ctx, id_, jobs)

    async def collected(self, job_id: int, lines: list[bytes], **fields: Any) -> None:
        path = self.ctx.input_dir(self.id) / f"job-{job_id}.results.jsonl"
        path.write_bytes(b"".join(x + b"\n" for x in lines))
        async with self.ctx.store.tx() as conn:
            await self.ctx.store.update_job(
                conn,
                job_id,
                state="collected",
                results_path=str(path),
                remote_state="BATCH_STATE_SUCCEEDED",
                **fields,
            )
        job = await self.ctx.store.get_job(job_id)
        assert job is not None
        await _index_job(self.ctx, job, path)

    async def done(self, job_id: int, **fields: Any) -> None:
        async with self.ctx.store.tx() as conn:
            await self.ctx.store.update_job(conn, job_id, state="done", **fields)

    async def row(self) -> dict[str, Any]:
        row = await self.ctx.store.get_input(self.id)
        assert row is not None
        return row

    async def planned(self) -> list[dict[str, Any]]:
        return [j for j in await self.ctx.store.jobs_of(self.id) if j["state"] == "planned"]

    def out(self, rel: str = "foo.jsonl") -> dict[str, Path]:
        return outbox_paths(self.ctx.cfg.outbox_dir, rel)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


async def test_succeeded_input_merges_in_order_with_summary_last(ctx: Context) -> None:
    keys1, keys2 = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(30)]
    inp = await Input.make(ctx, [keys1, keys2])
    await inp.collected(inp.jobs[2], [ok(k) for k in reversed(keys2)])
    await inp.collected(inp.jobs[1], [ok(k) for k in reversed(keys1)])
    work = ctx.input_dir(inp.id)
    per_job = collect.SMALL_INPUT_REQUESTS < 0
    # per job: both parts already put in order while "other jobs still ran" (the fast path:
    # each part answered exactly once by its first job, so no merge index at all); part 2 came
    # back first, into a file of its own; part 1 went straight into the outbox file in the
    # making, and part 2 was appended after it
    assert not (work / "merge.sqlite").exists()
    assert sorted(p.name for p in work.glob("part-*.fast")) == (["part-2.fast"] if per_job else [])
    prefix = outbox_file.prefix_path(inp.out()["results"], work)
    assert prefix.exists() is per_job
    if per_job:  # part 2 is appended by the collector's next step (not run here)
        assert [x["key"] for x in lines_of(prefix)] == keys1
    assert await collect_once(ctx) == 1
    row = await inp.row()
    assert row["state"] == "succeeded"
    out = inp.out()
    got = lines_of(out["results"])
    assert [x["key"] for x in got] == keys1 + keys2
    assert all(
        x["response"]["candidates"][0]["content"]["parts"][0]["text"] == "answer:" + x["key"]
        for x in got
    )
    summary = orjson.loads(out["summary"].read_bytes())
    assert out["summary"].stat().st_mtime_ns >= out["results"].stat().st_mtime_ns
    assert not out["error"].exists()
    assert summary["state"] == "succeeded" and summary["reused"] is False
    assert summary["requests"] == {
        "total": 80,
        "succeeded": 80,
        "failed": 0,
        "duplicates_dropped": 0,
        "unknown_dropped": 0,
    }
    assert summary["tokens"] == {
        "prompt": 800,
        "candidates": 1600,
        "thoughts": 400,
        "cached": 0,
        "total": 2800,
    }
    # 800 * 0.3 + 2000 * 2.5 per million, half price for batch
    assert summary["estimated_cost_usd"] == pytest.approx((800 * 0.3 + 2000 * 2.5) / 1e6 / 2)
    assert [j["part"] for j in summary["jobs"]] == [1, 2] and summary["attempts"] == 1
    assert summary["outbox"]["results"] == str(out["results"])
    assert orjson.loads(row["summary"])["requests"]["total"] == 80
    # kept for dedupe as a hard link; scratch files gone, job results kept for `retry`
    kept = Path(row["results_path"])
    assert os.path.samefile(kept, out["results"])
    assert not (work / "merge.sqlite").exists() and not list(work.glob("part-*"))
    assert (work / "input.jsonl").exists() and len(list(work.glob("job-*.results.jsonl"))) == 2
    assert not [p for p in out["results"].parent.iterdir() if p.name.endswith(".tmp")]
    assert await collect_once(ctx) == 0  # final: nothing more to do


async def test_parts_submitted_as_byte_ranges_take_the_fast_path(ctx: Context) -> None:
    # A canonical input's parts are byte ranges of input.jsonl: each part's keys are read from
    # its own range (not the whole file), so clean parts still go the fast way.
    keys1, keys2 = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(30)]
    inp = await Input.make(ctx, [keys1, keys2], ranged=True)
    work = ctx.input_dir(inp.id)
    assert not list(work.glob("part-*-a1.jsonl"))
    await inp.collected(inp.jobs[1], [ok(k) for k in reversed(keys1)])
    await collect._assemble_ready_parts(ctx, inp.id)
    per_job = collect.SMALL_INPUT_REQUESTS < 0
    # part 1 is already in the outbox file in the making (a hidden temporary name)
    prefix = outbox_file.prefix_path(inp.out()["results"], work)
    assert prefix.exists() is per_job
    if per_job:
        assert [x["key"] for x in lines_of(prefix)] == keys1
    await inp.collected(inp.jobs[2], [ok(k) for k in reversed(keys2)])
    # each part came back in turn: straight into the outbox file in the making, no file of its own
    assert sorted(p.name for p in work.glob("part-*.fast*")) == (
        ["part-1.fast.json", "part-2.fast.json"] if per_job else []
    )
    if per_job:
        assert [x["key"] for x in lines_of(prefix)] == keys1 + keys2
    assert not (work / "merge.sqlite").exists()
    assert await collect_once(ctx) == 1
    assert (await inp.row())["state"] == "succeeded"
    assert [x["key"] for x in lines_of(inp.out()["results"])] == keys1 + keys2
    assert not prefix.exists() and not (work / "prefix.json").exists()
    assert sorted(p.name for p in inp.out()["results"].parent.iterdir()) == [
        "foo.jsonl",
        "foo.summary.json",
    ]


async def test_retries_then_budget_then_partial(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a", "b", "c", "d"]])
    # a: retryable (13), b: permanent (3), c: unanswered, d: ok, plus noise
    await inp.collected(inp.jobs[1], [err("a", 13), err("b", 3), ok("d"), ok("d"), ok("zz")])
    assert await collect_once(ctx) == 1
    row = await inp.row()
    assert row["state"] == "queued"
    (job2,) = await inp.planned()
    assert job2["attempt"] == 2 and job2["display_name"] == f"gemini-batchd:{inp.id}:1:2"
    assert job2["request_count"] == 2 and job2["mode"] == "inline" and job2["est_tokens"] == 20
    source = Path(job2["source_path"])
    assert source.name == "part-1-a2.jsonl"
    assert [x["key"] for x in lines_of(source)] == ["a", "c"]
    assert source.read_bytes().splitlines() == [
        line
        for line in (ctx.input_dir(inp.id) / "part-1-a1.jsonl").read_bytes().splitlines()
        if orjson.loads(line)["key"] in ("a", "c")
    ]
    # attempt 2: a succeeds now, c fails again retryably → budget (1 retry) is spent
    await inp.collected(job2["id"], [ok("a"), err("c", 14)])
    assert await collect_once(ctx) == 1
    row = await inp.row()
    assert row["state"] == "partial" and await inp.planned() == []
    got = {x["key"]: x for x in lines_of(inp.out()["results"])}
    assert "response" in got["a"] and got["b"]["error"]["code"] == 3
    assert got["c"]["error"]["code"] == 14 and "response" in got["d"]
    summary = orjson.loads(inp.out()["summary"].read_bytes())
    assert summary["requests"] == {
        "total": 4,
        "succeeded": 2,
        "failed": 2,
        "duplicates_dropped": 1,
        "unknown_dropped": 1,
    }
    assert summary["attempts"] == 2 and row["results_path"] is None

    # the `retry` command ignores the budget and takes permanent errors too; attempts continue
    assert await plan_retries(ctx, inp.id, force=True) == 2
    (job3,) = await inp.planned()
    assert job3["attempt"] == 3 and job3["display_name"].endswith(":1:3")
    assert [x["key"] for x in lines_of(Path(job3["source_path"]))] == ["b", "c"]
    assert (await inp.row())["state"] == "queued"  # part files were removed: input ranges used
    await inp.collected(job3["id"], [ok("b"), ok("c")])
    await collect_once(ctx)
    assert (await inp.row())["state"] == "succeeded"
    assert [x["key"] for x in lines_of(inp.out()["results"])] == ["a", "b", "c", "d"]
    assert not inp.out()["summary"].read_bytes().count(b'"partial"')


async def test_expired_job_is_retried_then_input_expires(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a", "b"]])
    await inp.done(inp.jobs[1], remote_state="BATCH_STATE_EXPIRED")
    assert await collect_once(ctx) == 2  # the job collected (empty), the input settled
    job1 = await ctx.store.get_job(inp.jobs[1])
    assert job1 is not None and job1["state"] == "collected"
    assert Path(job1["results_path"]).read_bytes() == b""
    (job2,) = await inp.planned()
    assert job2["attempt"] == 2 and job2["request_count"] == 2
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(conn, job2["id"], remote_name="batches/x2")
    await inp.done(job2["id"], remote_state="BATCH_STATE_EXPIRED")
    await collect_once(ctx)
    row = await inp.row()
    assert row["state"] == "expired"
    out = inp.out()
    assert out["error"].exists() and not out["summary"].exists() and not out["results"].exists()
    doc = orjson.loads(out["error"].read_bytes())
    assert doc["state"] == "expired" and "expired" in doc["reason"]


async def test_refused_job_fails_with_the_api_message_and_no_retry(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a"]], rel="gemini-nope/x.jsonl", model="gemini-nope")
    api_error = {"code": 404, "status": "NOT_FOUND", "message": "models/gemini-nope is not found"}
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(conn, inp.jobs[1], remote_name=None, error=api_error)
    await inp.done(inp.jobs[1])
    await collect_once(ctx)
    row = await inp.row()
    assert row["state"] == "failed" and await inp.planned() == []
    doc = orjson.loads(inp.out("gemini-nope/x.jsonl")["error"].read_bytes())
    assert "models/gemini-nope is not found" in doc["reason"]
    assert doc["details"]["jobs"][0]["error"] == api_error
    assert not inp.out("gemini-nope/x.jsonl")["summary"].exists()


async def test_cancel_keeps_finished_parts(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a", "b"], ["c"]], cancel_requested=1)
    await inp.collected(inp.jobs[1], [ok("a"), err("b", 13)])
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(conn, inp.jobs[2], state="cancelled", remote_name=None)
    await collect_once(ctx)
    row = await inp.row()
    assert row["state"] == "cancelled" and await inp.planned() == []  # no retries when cancelled
    out = inp.out()
    got = lines_of(out["results"])
    assert [x["key"] for x in got] == ["a", "b", "c"]
    assert "response" in got[0] and got[1]["error"]["code"] == 13
    assert got[2]["error"]["status"] == "CANCELLED"
    assert out["error"].exists() and not out["summary"].exists()


async def test_finish_input_directly(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a"]])
    await inp.collected(inp.jobs[1], [ok("a")])
    await finish_input(ctx, inp.id)
    assert (await inp.row())["state"] == "succeeded"


async def test_media_are_extracted(ctx: Context) -> None:
    blob = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}}
    inp = await Input.make(ctx, [["img/1", "plain"]])
    await inp.collected(inp.jobs[1], [ok("img/1", [blob, blob]), ok("plain")])
    await collect_once(ctx)
    media = inp.out()["media"]
    names = sorted(p.name for p in media.iterdir())
    stem = safe_key("img/1")
    assert stem.startswith("img_1_") and names == [f"{stem}-1.png", f"{stem}-2.png"]
    assert (media / names[0]).read_bytes() == PNG and PNG.startswith(b"\x89PNG\r\n\x1a\n")
    summary = orjson.loads(inp.out()["summary"].read_bytes())
    assert summary["outbox"]["media"] == str(media)
    assert media_ext("image/jpeg") == "jpg" and media_ext("audio/L16;rate=24000") == "bin"


async def test_reuse_serves_earlier_results(ctx: Context) -> None:
    first = await Input.make(ctx, [["a", "b"]])
    await first.collected(first.jobs[1], [ok("b"), ok("a")])
    await collect_once(ctx)
    first_row = await first.row()
    id_ = new_input_id()
    work = ctx.input_dir(id_)
    work.mkdir(parents=True)
    os.link(first_row["work_path"], work / "input.jsonl")
    async with ctx.store.tx() as conn:
        await ctx.store.add_input(
            conn,
            id=id_,
            rel_path="again/foo.jsonl",
            model="gemini-2.5-flash",
            state="downloading",
            work_path=str(work / "input.jsonl"),
            reused_from=first.id,
        )
    assert await collect_once(ctx) == 1
    row = await ctx.store.get_input(id_)
    assert row is not None and row["state"] == "succeeded"
    out = outbox_paths(ctx.cfg.outbox_dir, "again/foo.jsonl")
    assert out["results"].read_bytes() == first.out()["results"].read_bytes()
    summary = orjson.loads(out["summary"].read_bytes())
    assert summary["reused"] is True and summary["reused_from"] == first.id
    assert summary["tokens"] == orjson.loads(first_row["summary"])["tokens"]
    assert summary["jobs"] == []
    # A reuse of that reuse names the input that was paid for, not the middle one.
    third = new_input_id()
    (ctx.input_dir(third)).mkdir(parents=True)
    async with ctx.store.tx() as conn:
        await ctx.store.add_input(
            conn,
            id=third,
            rel_path="third/foo.jsonl",
            model="gemini-2.5-flash",
            state="downloading",
            work_path=str(work / "input.jsonl"),
            reused_from=id_,
        )
    assert await collect_once(ctx) == 1
    out3 = outbox_paths(ctx.cfg.outbox_dir, "third/foo.jsonl")
    assert out3["results"].read_bytes() == first.out()["results"].read_bytes()
    assert orjson.loads(out3["summary"].read_bytes())["reused_from"] == first.id


def test_inline_operation_lines_join_on_metadata_key() -> None:
    op = {
        "name": "batches/x",
        "metadata": {
            "state": "BATCH_STATE_SUCCEEDED",
            "output": {
                "inlinedResponses": {
                    "inlinedResponses": [
                        {"response": {"candidates": []}, "metadata": {"key": "k2"}},
                        {
                            "error": {"code": 13, "message": "boom", "details": [{"x": 1}]},
                            "metadata": {"key": "k1"},
                        },
                    ]
                }
            },
        },
    }
    assert [orjson.loads(x) for x in _inline_lines(op)] == [
        {"key": "k2", "response": {"candidates": []}},
        {"key": "k1", "error": {"code": 13, "message": "boom", "details": [{"x": 1}]}},
    ]


async def test_unreachable_api_leaves_the_job_done_with_a_backoff(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a"]])
    await inp.done(inp.jobs[1], remote_state="BATCH_STATE_SUCCEEDED")
    # a real client aimed at a port where nothing listens: the download is refused
    ctx.gemini = GeminiClient(ctx.cfg, "k", base_url="http://127.0.0.1:9")
    try:
        assert await collect_once(ctx) == 0  # nothing collected, nothing lost
        job = await ctx.store.get_job(inp.jobs[1])
        assert job is not None and job["state"] == "done" and job["not_before"] > 0
        assert not Path(ctx.input_dir(inp.id) / f"job-{inp.jobs[1]}.results.jsonl").exists()
        assert (await inp.row())["state"] == "running"
        tried = sum(ctx.gemini.calls.values())
        assert await collect_once(ctx) == 0  # backing off: not even tried
        assert sum(ctx.gemini.calls.values()) == tried
    finally:
        await ctx.gemini.aclose()


async def test_big_inputs_mix_fast_parts_and_the_index(ctx: Context) -> None:
    """Part 1 comes back clean (fast path), part 2 with a duplicate and an unknown key (merge
    index): the input settles through the index, which loads both jobs' results."""
    inp = await Input.make(ctx, [["a", "b"], ["c", "d"]])
    work = ctx.input_dir(inp.id)
    assert await collect_once(ctx) == 0  # nothing finished yet
    per_job = collect.SMALL_INPUT_REQUESTS < 0
    await inp.collected(inp.jobs[1], [ok("b"), ok("a")])
    await inp.collected(inp.jobs[2], [ok("d"), ok("d"), ok("zz"), err("c", 3)])
    assert (work / "part-1.fast.json").exists() is per_job  # in order, straight in the outbox
    assert not (work / "part-2.fast.json").exists()
    assert (work / "merge.sqlite").exists() is per_job
    assert await collect_once(ctx) == 1
    got = lines_of(inp.out()["results"])
    assert [x["key"] for x in got] == ["a", "b", "c", "d"] and got[2]["error"]["code"] == 3
    summary = orjson.loads(inp.out()["summary"].read_bytes())
    assert summary["state"] == "partial"
    assert summary["requests"]["duplicates_dropped"] == 1
    assert summary["requests"]["unknown_dropped"] == 1
    assert not list(work.glob("part-*")) and not list(work.glob(".part-*"))


async def test_fast_parts_survive_a_lost_summary(ctx: Context) -> None:
    """A part put in order whose summary vanished (a crash) is put in order again at settle
    time; an ordered file that no longer matches its summary is not trusted (redone too)."""
    inp = await Input.make(ctx, [["a", "b"], ["c"]])
    work = ctx.input_dir(inp.id)
    await inp.collected(inp.jobs[2], [ok("c")])  # back first: a file of its own
    await inp.collected(inp.jobs[1], [ok("b"), err("a", 3)])  # straight into the outbox file
    if collect.SMALL_INPUT_REQUESTS < 0:  # per job (a small input is merged in memory)
        assert (work / "part-2.fast").exists() and not (work / "part-1.fast").exists()
        (work / "part-1.fast.json").unlink()
        (work / "part-2.fast").write_bytes(b"stale\n")
        # the fast path still covers the input: both parts are put in order again
        row, jobs = await inp.row(), await ctx.store.jobs_of(inp.id)
        assert await order.fast_parts(ctx, row, jobs) is not None
        assert (work / "part-1.fast.json").exists()
        redone = orjson.loads((work / "part-2.fast.json").read_bytes())
        assert redone["in_prefix"] or (work / "part-2.fast").read_bytes() != b"stale\n"
    assert await collect_once(ctx) == 1
    assert not (work / "merge.sqlite").exists()
    got = lines_of(inp.out()["results"])
    assert [x["key"] for x in got] == ["a", "b", "c"] and got[0]["error"]["code"] == 3
    summary = orjson.loads(inp.out()["summary"].read_bytes())
    assert summary["state"] == "partial" and summary["requests"]["failed"] == 1
    assert summary["tokens"]["total"] == 70


async def test_big_inputs_put_parts_in_order_as_jobs_come_back(ctx: Context) -> None:
    inp = await Input.make(ctx, [["a", "b"], ["c"]])
    work = ctx.input_dir(inp.id)
    assert await collect_once(ctx) == 0  # nothing finished yet
    assert not (work / "merge.sqlite").exists()
    await inp.collected(inp.jobs[1], [ok("b"), ok("a")])
    per_job = collect.SMALL_INPUT_REQUESTS < 0
    # part 1 is in order as soon as its job is back, while part 2's job still runs: straight in
    # the outbox file in the making (a hidden temporary name), and part 2 after it
    prefix = outbox_file.prefix_path(inp.out()["results"], work)
    assert prefix.exists() is per_job and not list(work.glob("part-*.fast"))
    if per_job:
        assert [x["key"] for x in lines_of(prefix)] == ["a", "b"]
    await inp.collected(inp.jobs[2], [ok("c")])
    if per_job:
        assert [x["key"] for x in lines_of(prefix)] == ["a", "b", "c"]
    assert await collect_once(ctx) == 1
    assert [x["key"] for x in lines_of(inp.out()["results"])] == ["a", "b", "c"]


async def test_many_inputs_settle_in_one_pass_same_name_newest_last(ctx: Context) -> None:
    """Small inputs settle several at once; two drops of one name still settle oldest first,
    so the outbox holds the newest drop's results."""
    inputs = [
        await Input.make(ctx, [[f"k{i}-{j}" for j in range(3)]], rel=f"f{i}.jsonl")
        for i in range(12)
    ]
    old = await Input.make(ctx, [[f"old{j}" for j in range(3000)]], rel="same.jsonl")  # slower
    new = await Input.make(ctx, [["new"]], rel="same.jsonl")
    for inp in [*inputs, old, new]:
        (job,) = inp.jobs.values()
        keys = [
            orjson.loads(x)["key"]
            for x in (ctx.input_dir(inp.id) / "input.jsonl").read_bytes().splitlines()
        ]
        await inp.collected(job, [ok(k) for k in keys])
    assert await collect_once(ctx) == 14
    for i, inp in enumerate(inputs):
        assert (await inp.row())["state"] == "succeeded"
        assert [x["key"] for x in lines_of(inp.out(f"f{i}.jsonl")["results"])] == [
            f"k{i}-{j}" for j in range(3)
        ]
    assert [x["key"] for x in lines_of(new.out("same.jsonl")["results"])] == ["new"]
    summary = orjson.loads(new.out("same.jsonl")["summary"].read_bytes())
    assert summary["input_id"] == new.id
    history = await ctx.store.history(new.id)
    assert [h["state"] for h in history][-2:] == ["downloading", "succeeded"]


async def test_a_round_takes_big_jobs_that_become_due_meanwhile(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job that ends while a round is at another job is taken in that round (its download
    # overlapping the other's ordering), unless it is a small inline one (the next round); the
    # round ends once nobody is at a big input's job; with a submission backlog nothing is added.
    small = collect.SMALL_INPUT_REQUESTS > 0  # the in-memory run: a 4-request input is small
    # The safety net far off (issue 13): only the nudge can wake the round within the test's wait,
    # however slow the box.
    monkeypatch.setattr(collect.DueJobs, "LOOK_EVERY", 120.0)
    inp = await Input.make(ctx, [["a"], ["b"], ["c"], ["d"]])
    await inp.done(inp.jobs[1])
    due = collect.DueJobs(ctx)
    assert await due.fill() == 1
    job1 = await due.next()
    assert job1 is not None and job1["id"] == inp.jobs[1]
    async with ctx.store.tx() as conn:  # while job 1 is collected, jobs 2 and 3 (inline) end
        await ctx.store.update_job(conn, inp.jobs[3], mode="inline")
    await inp.done(inp.jobs[3])
    await inp.done(inp.jobs[2])
    ctx.wake.collect.set()  # as a poller does when it sees jobs end
    with anyio.fail_after(60):  # the nudge, not the safety net
        job = await due.next()
    assert job is not None and job["id"] == inp.jobs[2]
    if not small:
        job3 = await due.next()
        assert job3 is not None and job3["id"] == inp.jobs[3]
        due.done(job3)
    due.done(job)
    due.done(job1)
    assert await due.next() is None  # nobody at a job: the round is over
    assert (inp.jobs[3] in due.taken) is not small
    await inp.done(inp.jobs[4])
    busy = collect.DueJobs(ctx)
    busy.big_busy = 1  # another worker at a job, but submission has a backlog
    ctx.backpressure.set_backlog(True)
    assert await busy.next() is None


async def test_the_next_parts_keys_are_read_while_its_job_runs(ctx: Context) -> None:
    # per job: once part 1 is in order, the keys of part 2 (its job still running) are read
    # ahead, and putting part 2 in order takes them instead of reading them again; a small
    # input (in memory) is merged at the end, so nothing is read ahead for it
    per_job = collect.SMALL_INPUT_REQUESTS < 0
    inp = await Input.make(ctx, [["a", "b"], ["c", "d"], ["e"]], ranged=True)
    fast_order._PREPARED.clear()
    await inp.collected(inp.jobs[1], [ok("b"), ok("a")])
    src = str(ctx.input_dir(inp.id) / "input.jsonl")
    if per_job:
        ((where, keys),) = fast_order._PREPARED.items()
        assert where[0] == src and keys == {"c": 0, "d": 1}
    else:
        assert not fast_order._PREPARED
    await inp.collected(inp.jobs[2], [ok("d"), ok("c")])  # takes them, reads part 3's ahead
    assert list(fast_order._PREPARED.values()) == ([{"e": 0}] if per_job else [])
    await inp.done(inp.jobs[3])
    await inp.collected(inp.jobs[3], [ok("e")])  # no part 4: nothing left read ahead
    assert not fast_order._PREPARED
    assert await collect_once(ctx) == 1
    assert [x["key"] for x in lines_of(inp.out()["results"])] == ["a", "b", "c", "d", "e"]


# ---- a file job the API answered inline (bifrost #3951), against the real emulator ----------
_KEY_HEADER = {"x-goog-api-key": "k"}


async def inline_job(url: str, keys: list[str]) -> str:
    """A finished inline job at the emulator answering ``keys``; returns its name."""
    reqs = [
        {"request": {"contents": [{"parts": [{"text": k}]}]}, "metadata": {"key": k}} for k in keys
    ]
    body = {"batch": {"inputConfig": {"requests": {"requests": reqs}}}}
    async with aiohttp.ClientSession() as s:
        create = f"{url}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
        async with s.post(create, json=body, headers=_KEY_HEADER) as r:
            name = (await r.json())["name"]
        with anyio.fail_after(20):
            while True:
                async with s.get(f"{url}/v1beta/{name}", headers=_KEY_HEADER) as r:
                    if (await r.json()).get("done"):
                        return str(name)
                await anyio.sleep(0.02)


async def test_file_job_answered_inline_is_read_from_inlined_responses(ctx: Context) -> None:
    settings = EmulatorSettings(pending_seconds=0.0, running_seconds=0.0)
    async with Emulator(settings=settings) as emu:
        inp = await Input.make(ctx, [["a", "b"]])  # a file job, as the daemon submitted it
        name = await inline_job(emu.url, ["a", "b"])  # ... that the API answered inline
        async with ctx.store.tx() as conn:
            await ctx.store.update_job(conn, inp.jobs[1], remote_name=name)
        await inp.done(inp.jobs[1], remote_state="BATCH_STATE_SUCCEEDED")
        ctx.gemini = GeminiClient(ctx.cfg, "k", base_url=emu.url)
        try:
            assert await collect_once(ctx) >= 1
        finally:
            await ctx.gemini.aclose()
        assert emu.stats["calls"].get("files.download", 0) == 0
    row = await inp.row()
    assert row["state"] == "succeeded", row
    got = lines_of(inp.out()["results"])
    assert [r["key"] for r in got] == ["a", "b"] and all("response" in r for r in got)
