"""Submission against the emulator: admission, intent-before-create, adoption, backoff, media."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.states import display_name
from daemon.store import loads
from daemon.submit.submitter import recover_submissions, submit_once
from tests import remote_helpers as rh
from tests.remote_helpers import Env, lines_for, wait_for

env, emu_settings, cfg_sections = rh.env, rh.emu_settings, rh.cfg_sections


async def job(e: Env, job_id: int) -> dict[str, Any]:
    row = await e.ctx.store.get_job(job_id)
    assert row is not None
    return row


async def submit_until(e: Env, pred: Any, timeout: float = 10) -> None:
    """Run submit rounds (backoffs are ~0.2 s in these tests) until ``pred()`` holds."""

    async def check() -> bool:
        await submit_once(e.ctx)
        return bool(await pred())

    await wait_for(check, timeout)


def test_display_name() -> None:
    assert display_name("abc", 2, 1) == "gemini-batchd:abc:2"
    assert display_name("abc", 2, 3) == "gemini-batchd:abc:2:3"


@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_planned_job_goes_active(env: Env, mode: str) -> None:
    iid, (jid,) = await env.add_input(lines_for(3), mode=mode)
    assert await submit_once(env.ctx) == 1
    row = await job(env, jid)
    assert row["state"] == "active" and row["remote_name"].startswith("batches/")
    assert row["remote_state"] == "BATCH_STATE_PENDING"
    assert row["submitted_at"] and row["next_poll_at"] > row["submitted_at"]
    assert row["poll_interval"] == env.ctx.cfg.poll.min_interval
    assert (row["upload_name"] is not None) == (mode == "file")
    inp = await env.ctx.store.get_input(iid)
    assert inp is not None and inp["state"] == "submitted"
    assert env.emu.stats["creates_by_display_name"] == {row["display_name"]: 1}
    assert await env.ctx.wake.poll.wait(0)
    assert await submit_once(env.ctx) == 0  # nothing left to do


@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_queue_full_backs_off_then_succeeds(env: Env, mode: str) -> None:
    iid, (jid,) = await env.add_input(lines_for(2), mode=mode)
    env.emu.fail_next("batches.create", "429")
    await submit_once(env.ctx)
    row = await job(env, jid)
    assert row["state"] == ("planned" if mode == "inline" else "creating")
    assert row["not_before"] > time.time() - 1 and row["remote_name"] is None
    assert row["check_remote"] == 0 and row["error"] is None  # a 429: nothing was created
    inp = await env.ctx.store.get_input(iid)
    assert inp is not None and inp["state"] == "queued"
    assert inp["reason"].startswith("API busy (429 RESOURCE_EXHAUSTED), retrying in")
    assert env.ctx.last_api_error and env.ctx.last_api_error["code"] == 429
    await submit_until(env, lambda: _state_is(env, jid, "active"))
    assert env.emu.stats["calls"].get("batches.list", 0) == 0  # no adoption walk needed
    assert env.emu.stats["creates_by_display_name"] == {row["display_name"]: 1}


async def _state_is(e: Env, jid: int, state: str) -> bool:
    return (await job(e, jid))["state"] == state


@pytest.mark.parametrize("fault", ["create_then_503", "create_then_drop"])
@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_ambiguous_create_is_adopted_not_repeated(env: Env, fault: str, mode: str) -> None:
    _, (jid,) = await env.add_input(lines_for(2), mode=mode)
    env.emu.fail_next("batches.create", fault)
    await submit_once(env.ctx)
    row = await job(env, jid)
    assert row["state"] == "creating" and row["check_remote"] == 1
    await submit_until(env, lambda: _state_is(env, jid, "active"))
    row = await job(env, jid)
    assert env.emu.stats["creates_by_display_name"] == {row["display_name"]: 1}
    assert env.emu.stats["calls"]["batches.create"] == 1
    remote = await env.gem.find_batch(row["display_name"])
    assert remote is not None and remote["name"] == row["remote_name"]
    assert row["error"] is None


async def test_recovery_adopts_or_creates_once(env: Env) -> None:
    _, (j1, j2) = await env.add_input(lines_for(2), mode="inline", parts=2)
    _, (j3,) = await env.add_input(lines_for(1), mode="file")
    r1 = await job(env, j1)
    # Crash after the create happened for part 1 and before it for part 2; j3 died mid-upload.
    made = await env.gem.create_inline_job(
        model="gemini-2.5-flash", requests=lines_for(2), display_name=r1["display_name"]
    )
    async with env.ctx.store.tx() as conn:
        for jid in (j1, j2):
            await env.ctx.store.update_job(conn, jid, state="creating")
        await env.ctx.store.update_job(conn, j3, state="uploading")
    await recover_submissions(env.ctx)
    assert (await job(env, j1))["remote_name"] == made["name"]
    assert (await job(env, j2))["state"] == "active"
    assert (await job(env, j3))["state"] == "planned"
    creates = env.emu.stats["creates_by_display_name"]
    assert creates[r1["display_name"]] == 1
    assert creates[(await job(env, j2))["display_name"]] == 1
    await submit_once(env.ctx)
    assert (await job(env, j3))["state"] == "active"


@pytest.mark.parametrize("cfg_sections", [{"submit": {"max_active_jobs": 2}}])
async def test_max_active_jobs(env: Env) -> None:
    iid, ids = await env.add_input(lines_for(1), mode="inline", parts=3)
    assert await submit_once(env.ctx) == 2
    states = [(await job(env, j))["state"] for j in ids]
    assert states == ["active", "active", "planned"]
    inp = await env.ctx.store.get_input(iid)
    assert inp is not None and inp["reason"] == "waiting: 2/2 active jobs"
    assert await submit_once(env.ctx) == 0
    async with env.ctx.store.tx() as conn:
        await env.ctx.store.update_job(conn, ids[0], state="done")
    assert await submit_once(env.ctx) == 1
    assert (await job(env, ids[2]))["state"] == "active"


@pytest.mark.parametrize("cfg_sections", [{"submit": {"max_enqueued_tokens": 25}}])
async def test_token_cap_per_model(env: Env) -> None:
    _, small = await env.add_input(lines_for(1), mode="inline", parts=3, est_tokens=10)
    _, (big,) = await env.add_input(lines_for(1), mode="inline", est_tokens=100)
    _, (other,) = await env.add_input(
        lines_for(1), mode="inline", est_tokens=10, model="gemini-2.5-pro"
    )
    await submit_once(env.ctx)
    assert [(await job(env, j))["state"] for j in small] == ["active", "active", "planned"]
    assert (await job(env, big))["state"] == "planned"
    assert (await job(env, other))["state"] == "active"  # another model has its own budget
    async with env.ctx.store.tx() as conn:
        for j in small[:2]:
            await env.ctx.store.update_job(conn, j, state="done")
    await submit_once(env.ctx)
    assert (await job(env, small[2]))["state"] == "active"
    async with env.ctx.store.tx() as conn:
        await env.ctx.store.update_job(conn, small[2], state="done")
    await submit_once(env.ctx)
    assert (await job(env, big))["state"] == "active"  # bigger than the cap: admitted alone


async def test_permanent_refusal_ends_job_with_error(env: Env) -> None:
    _, (jid,) = await env.add_input(lines_for(1), mode="inline", model="gemini-unknown-model")
    await submit_once(env.ctx)
    row = await job(env, jid)
    assert row["state"] == "done" and row["remote_state"] is None
    err = loads(row["error"])
    assert err["code"] == 404 and err["status"] == "NOT_FOUND" and "not found" in err["message"]
    assert await env.ctx.wake.collect.wait(0)


async def test_cancel_requested_planned_jobs_are_cancelled(env: Env) -> None:
    iid, (jid,) = await env.add_input(lines_for(1), mode="inline")
    async with env.ctx.store.tx() as conn:
        await env.ctx.store.update_input(conn, iid, cancel_requested=1)
    await submit_once(env.ctx)
    assert (await job(env, jid))["state"] == "cancelled"
    assert env.emu.stats["calls"].get("batches.create", 0) == 0


@pytest.mark.parametrize("case", ["never_sent", "maybe_sent", "exists"])
async def test_cancel_requested_creating_jobs_are_settled_not_created(env: Env, case: str) -> None:
    # A `creating` job of a cancelled input: one that never reached the API is cancelled; one
    # that may have (an ambiguous create) is looked up first: adopted if it exists, else
    # cancelled. It is never created anew, and never left `creating` for ever.
    iid, (jid,) = await env.add_input(lines_for(2), mode="inline")
    name = (await job(env, jid))["display_name"]
    if case == "exists":
        await env.gem.create_inline_job(
            model="gemini-2.5-flash", requests=lines_for(2), display_name=name
        )
    async with env.ctx.store.tx() as conn:
        await env.ctx.store.update_job(
            conn, jid, state="creating", submit_retries=1, check_remote=int(case != "never_sent")
        )
        await env.ctx.store.update_input(conn, iid, cancel_requested=1)
    await submit_once(env.ctx)
    row = await job(env, jid)
    assert row["state"] == ("active" if case == "exists" else "cancelled")
    creates = env.emu.stats["creates_by_display_name"]
    assert creates == ({name: 1} if case == "exists" else {})


@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_local_media_uploaded_once_and_rewritten(env: Env, mode: str) -> None:
    media = env.ctx.cfg.media_dir
    media.mkdir(parents=True)
    (media / "cat.png").write_bytes(b"\x89PNG fake cat")
    (media / "dog.jpg").write_bytes(b"fake dog")

    def line(i: int, name: str) -> dict[str, Any]:
        part = {"fileData": {"fileUri": f"file:{name}", "mimeType": "image/png"}}
        if name.endswith(".jpg"):
            part = {"file_data": {"file_uri": f"file:{name}"}}
        return {"key": f"m{i}", "request": {"contents": [{"parts": [{"text": "hi"}, part]}]}}

    lines = [line(i, "cat.png") for i in range(10)] + [line(10, "dog.jpg")]
    _, (j1, j2) = await env.add_input(lines, mode=mode, parts=2, media_count=11)
    await submit_once(env.ctx)
    assert [(await job(env, j))["state"] for j in (j1, j2)] == ["active", "active"]
    uploads = env.emu.stats["calls"]["files.upload"]
    assert uploads == 2 + (2 if mode == "file" else 0)  # each media file once, cached for part 2
    rows = await env.ctx.store.fetchall("SELECT * FROM media ORDER BY mime_type")
    assert [r["mime_type"] for r in rows] == ["image/jpeg", "image/png"]
    resolved = (await job(env, j1))["source_path"].replace(".jsonl", ".resolved.jsonl")
    text = Path(resolved).read_text()
    assert "file:" not in text
    for li in map(orjson.loads, text.splitlines()):
        parts = li["request"]["contents"][0]["parts"]
        uri = parts[1].get("fileData", parts[1].get("file_data"))
        assert (uri.get("fileUri") or uri.get("file_uri")) in {r["uri"] for r in rows}
    assert json.dumps(lines[0]["request"]["contents"][0]["parts"][0]) in json.dumps(
        orjson.loads(text.splitlines()[0])
    )


async def test_only_validated_media_references_are_uploaded(env: Env) -> None:
    # Validation checks file: references in contents[].parts[] only; the upload must look at
    # exactly those (a file: URI elsewhere, e.g. a path out of media_dir in systemInstruction,
    # is neither read nor rewritten: the API gets it as written and refuses that request).
    media = env.ctx.cfg.media_dir
    media.mkdir(parents=True)
    (media / "cat.png").write_bytes(b"\x89PNG fake cat")
    (env.ctx.cfg.root / "secret.txt").write_bytes(b"not for upload")
    outside = {"fileData": {"fileUri": "file:../secret.txt", "mimeType": "text/plain"}}
    line = {
        "key": "m1",
        "request": {
            "systemInstruction": {"parts": [outside]},
            "contents": [{"parts": [{"fileData": {"fileUri": "file:cat.png"}}]}],
        },
    }
    _, (jid,) = await env.add_input([line], mode="inline", media_count=1)
    await submit_once(env.ctx)
    assert (await job(env, jid))["state"] == "active"
    assert env.emu.stats["calls"]["files.upload"] == 1  # cat.png only
    resolved = (await job(env, jid))["source_path"].replace(".jsonl", ".resolved.jsonl")
    got = orjson.loads(Path(resolved).read_bytes())
    assert got["request"]["systemInstruction"]["parts"][0] == outside
    uri = got["request"]["contents"][0]["parts"][0]["fileData"]["fileUri"]
    assert not uri.startswith("file:")


async def test_creating_row_without_history_is_looked_up_first(env: Env) -> None:
    _, (jid,) = await env.add_input(lines_for(1), mode="inline")
    name = (await job(env, jid))["display_name"]
    made = await env.gem.create_inline_job(
        model="gemini-2.5-flash", requests=lines_for(1), display_name=name
    )
    async with env.ctx.store.tx() as conn:
        await env.ctx.store.update_job(conn, jid, state="creating")
    assert await submit_once(env.ctx) == 1  # no recovery ran: still adopted, not created again
    assert (await job(env, jid))["remote_name"] == made["name"]
    assert env.emu.stats["creates_by_display_name"] == {name: 1}


@pytest.mark.parametrize("cfg_sections", [{"submit": {"max_active_jobs": 23}}])
async def test_concurrent_rounds_never_exceed_active_cap(env: Env) -> None:
    ids: list[int] = []
    for _ in range(8):  # 40 jobs: more than one round's bound of queued jobs
        ids += (await env.add_input(lines_for(1), mode="inline", parts=5))[1]
    assert await submit_once(env.ctx) == 23
    states = [(await job(env, j))["state"] for j in ids]
    assert states == ["active"] * 23 + ["planned"] * 17  # admitted in input/part order
    assert env.emu.stats["calls"]["batches.create"] == 23
    assert all(v == 1 for v in env.emu.stats["creates_by_display_name"].values())
    history = await env.ctx.store.fetchall(
        "SELECT input_id, COUNT(*) AS n FROM history WHERE state = 'submitted' GROUP BY input_id"
    )
    assert [h["n"] for h in history] == [1] * 5  # one entry per input, however many parts


@pytest.mark.parametrize("cfg_sections", [{"submit": {"max_enqueued_tokens": 100}}])
async def test_concurrent_uploads_respect_token_cap(env: Env) -> None:
    _, ids = await env.add_input(lines_for(3), mode="file", parts=14, est_tokens=10)
    env.emu.fail_next("files.upload", "503")  # one upload fails and backs off; the rest go on
    await submit_once(env.ctx)
    states = [(await job(env, j))["state"] for j in ids]
    assert states.count("active") == 9 and states[10:] == ["planned"] * 4
    assert env.emu.stats["calls"]["batches.create"] == 9


async def test_run_submitter_pipelines_rounds(env: Env) -> None:
    import anyio

    from daemon.submit.submitter import run_submitter

    ids: list[int] = []
    for _ in range(10):
        ids += (await env.add_input(lines_for(2), mode="inline", parts=5))[1]
    env.emu.fail_next("batches.create", "create_then_503")
    async with anyio.create_task_group() as tg:
        await tg.start(run_submitter, env.ctx)

        async def all_active() -> bool:
            n = await env.ctx.store.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'active'")
            return bool(n == len(ids))

        await wait_for(all_active)
        tg.cancel_scope.cancel()
    creates = env.emu.stats["creates_by_display_name"]
    assert len(creates) == 50 and all(v == 1 for v in creates.values())  # the ambiguous one adopted


async def test_backlog_makes_pollers_yield_until_it_ends(env: Env) -> None:
    """More admitted jobs than a round starts: the submitter flags a backlog; a poller or
    collector yielding to it resumes as soon as the backlog is gone, not after its timeout."""
    import anyio

    from daemon.submit.submitter import Submitter

    ids: list[int] = []
    for _ in range(8):  # 40 jobs: more than one round's bound of queued jobs
        ids += (await env.add_input(lines_for(1), mode="inline", parts=5))[1]
    resumed_at: list[float] = []

    async def poller() -> None:
        await env.ctx.backpressure.yield_to_submission(env.ctx.wake.poll, 60.0)
        resumed_at.append(time.monotonic())

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            sub = Submitter(env.ctx, tg)
            await sub.round()
            assert env.ctx.backpressure.backlog
            tg.start_soon(poller)
            while sub._more or sub.busy:
                await env.ctx.wake.submit.wait(0.05)
                await sub.round()
    assert not env.ctx.backpressure.backlog
    assert len(resumed_at) == 1
    states = [(await job(env, j))["state"] for j in ids]
    assert states == ["active"] * 40
    assert env.emu.stats["calls"]["batches.create"] == 40


@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_a_source_gone_after_planning_fails_the_job_not_the_daemon(
    env: Env, mode: str
) -> None:
    # The file a job submits vanished (or was cut short) after validation: the job fails with
    # a clear reason; the submitter (and with it the whole service) keeps running.
    _iid, (jid,) = await env.add_input(lines_for(3), mode=mode)
    Path((await job(env, jid))["source_path"]).unlink()
    assert await submit_once(env.ctx) == 0
    row = await job(env, jid)
    assert row["state"] == "done" and "UNREADABLE" in row["error"]
    assert env.emu.stats["creates_by_display_name"] == {}
