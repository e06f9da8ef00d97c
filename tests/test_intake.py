"""Inbox intake: classify, settle, claim, reject, watcher, recovery, and the validator stage."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import orjson
import pytest

from daemon.config import parse_config
from daemon.context import Context
from daemon.intake.claim import Drop, adopt_orphans, claim_many, recover_claims
from daemon.intake.validate_stage import run_validator, validate_once
from daemon.intake.watch import SettleTracker, classify, run_inbox, scan_once
from daemon.states import InputState
from daemon.store import Store


async def claim(ctx: Context, path: Path, rel: str, model: str) -> str | None:
    """One settled drop claimed through the production path (a batch of one)."""
    ids = await claim_many(ctx, [Drop(path, rel, model)])
    return ids[0] if ids else None


GEN = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
GOOD = b"".join(orjson.dumps({"key": f"k{i}", "request": GEN}) + b"\n" for i in range(5))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    cfg = parse_config(
        {
            "paths": {"root": str(tmp_path)},
            "inbox": {"settle_seconds": 0.2, "rescan_seconds": 600.0},
            "submit": {"max_requests_per_job": 2},
        }
    )
    cfg.inbox_dir.mkdir(parents=True)
    async with Store.open(cfg.db_path) as store:
        yield Context(cfg=cfg, store=store, gemini=None)


def inbox_of(ctx: Context) -> Path:
    return ctx.cfg.inbox_dir


async def settle_scan(ctx: Context, clock: Clock | None = None) -> int:
    """Two scans a settle period apart (on a fake clock): what a settled inbox yields."""
    clock = clock or Clock()
    tracker = SettleTracker(ctx.cfg.inbox.settle_seconds, clock=clock)
    assert await scan_once(ctx, tracker) == 0
    clock.now += ctx.cfg.inbox.settle_seconds
    return await scan_once(ctx, tracker)


async def rows(ctx: Context) -> list[dict[str, Any]]:
    return await ctx.store.fetchall("SELECT * FROM inputs ORDER BY created_at, id")


def test_classify() -> None:
    take = ["a.jsonl", "A.JSONL", "gemini-2.5-flash/a.jsonl", "gemini-embedding-001/x.y.jsonl"]
    ignore = [
        ".a.jsonl",
        ".hidden/a.jsonl",
        "a.jsonl.tmp",
        "a.jsonl.part",
        "a.jsonl.partial",
        "a.jsonl~",
        "a.json",
        "a.txt",
        "gemini-2.5-flash/.a.jsonl",
    ]
    reject = ["Gemini Pro/a.jsonl", "UPPER/a.jsonl", "-x/a.jsonl", "a b/c.jsonl", "m/deep/a.jsonl"]
    for rel in take:
        assert classify(PurePosixPath(rel)) == "take", rel
    for rel in ignore:
        assert classify(PurePosixPath(rel)) == "ignore", rel
    for rel in reject:
        assert classify(PurePosixPath(rel)) == "reject", rel


async def test_renamed_in_file_is_claimed(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    tmp = inbox / ".a.jsonl.tmp"
    tmp.write_bytes(GOOD)
    os.rename(tmp, inbox / "a.jsonl")
    assert await settle_scan(ctx) == 1
    assert list(inbox.iterdir()) == []
    (row,) = await rows(ctx)
    assert row["state"] == "seen" and row["rel_path"] == "a.jsonl"
    assert row["model"] == ctx.cfg.gemini.default_model and row["kind"] == "generate"
    work = Path(row["work_path"])
    assert work == ctx.input_dir(row["id"]) / "input.jsonl" and work.read_bytes() == GOOD


async def test_ignored_names_are_left_alone(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    names = ["a.jsonl.tmp", ".b.jsonl", "c.json", "d.txt", "e.jsonl~", "f.jsonl.part"]
    for n in names:
        (inbox / n).write_bytes(GOOD)
    (inbox / ".hidden").mkdir()
    (inbox / ".hidden" / "g.jsonl").write_bytes(GOOD)
    (inbox / "gemini-2.5-flash" / "deep" / ".dot").mkdir(parents=True)
    (inbox / "gemini-2.5-flash" / "deep" / "h.txt").write_bytes(GOOD)
    (inbox / "gemini-2.5-flash" / "deep" / ".dot" / "i.jsonl").write_bytes(GOOD)
    assert await settle_scan(ctx) == 0
    assert sorted(p.name for p in inbox.iterdir()) == sorted(
        [*names, ".hidden", "gemini-2.5-flash"]
    )
    assert (inbox / "gemini-2.5-flash" / "deep" / ".dot" / "i.jsonl").exists()
    assert await rows(ctx) == []
    assert not ctx.cfg.outbox_dir.exists() or list(ctx.cfg.outbox_dir.rglob("*")) == []


async def test_file_being_written_waits_until_settled(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    clock = Clock()
    tracker = SettleTracker(ctx.cfg.inbox.settle_seconds, clock=clock)
    path = inbox / "slow.jsonl"
    with open(path, "wb") as f:
        for i in range(4):
            f.write(GOOD[i * 10 : (i + 1) * 10])
            f.flush()
            assert await scan_once(ctx, tracker) == 0  # size changed since the last scan
            clock.now += ctx.cfg.inbox.settle_seconds + 1
        f.write(GOOD[40:])
    assert await scan_once(ctx, tracker) == 0  # first sight of the final size
    assert tracker.next_due() == pytest.approx(ctx.cfg.inbox.settle_seconds)
    clock.now += ctx.cfg.inbox.settle_seconds / 2
    assert await scan_once(ctx, tracker) == 0  # not stable long enough
    assert path.exists()
    clock.now += ctx.cfg.inbox.settle_seconds / 2
    assert await scan_once(ctx, tracker) == 1
    assert not path.exists()
    (row,) = await rows(ctx)
    assert Path(row["work_path"]).read_bytes() == GOOD


async def test_mtime_change_alone_restarts_settling(ctx: Context) -> None:
    path = inbox_of(ctx) / "a.jsonl"
    path.write_bytes(GOOD)
    clock = Clock()
    tracker = SettleTracker(ctx.cfg.inbox.settle_seconds, clock=clock)
    assert await scan_once(ctx, tracker) == 0
    clock.now += 5
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert await scan_once(ctx, tracker) == 0
    clock.now += 5
    assert await scan_once(ctx, tracker) == 1


async def test_model_folder_routing(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    for model in ("gemini-2.5-flash-lite", "gemini-embedding-001"):
        (inbox / model).mkdir()
        (inbox / model / "x.jsonl").write_bytes(GOOD)
    (inbox / "top.jsonl").write_bytes(GOOD)
    assert await settle_scan(ctx) == 3
    got = {r["rel_path"]: (r["model"], r["kind"]) for r in await rows(ctx)}
    assert got == {
        "gemini-2.5-flash-lite/x.jsonl": ("gemini-2.5-flash-lite", "generate"),
        "gemini-embedding-001/x.jsonl": ("gemini-embedding-001", "embed"),
        "top.jsonl": (ctx.cfg.gemini.default_model, "generate"),
    }
    assert (inbox / "gemini-2.5-flash-lite").is_dir()  # folders stay


def error_file(ctx: Context, rel: str) -> dict[str, Any]:
    stem = rel[: -len(".jsonl")] if rel.endswith(".jsonl") else rel
    return orjson.loads((ctx.cfg.outbox_dir / f"{stem}.error.json").read_bytes())


async def test_bad_folder_name_is_rejected(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    (inbox / "Bad Model").mkdir()
    (inbox / "Bad Model" / "foo.jsonl").write_bytes(GOOD)
    (inbox / "Bad Model" / "notes.txt").write_bytes(b"x")
    assert await settle_scan(ctx) == 1
    (row,) = await rows(ctx)
    assert row["state"] == "rejected" and "not a model id" in row["reason"]
    assert await ctx.store.jobs_of(row["id"]) == []
    err = error_file(ctx, "Bad Model/foo.jsonl")
    assert err["state"] == "rejected" and err["file"] == "Bad Model/foo.jsonl"
    assert err["input_id"] == row["id"] and "not a model id" in err["reason"]
    assert err["created_at"].endswith("Z") and err["finished_at"].endswith("Z")
    assert Path(row["work_path"]).read_bytes() == GOOD  # the bytes are kept
    assert sorted(p.name for p in (inbox / "Bad Model").iterdir()) == ["notes.txt"]
    assert await validate_once(ctx) == 0  # nothing left for the validator


async def test_symlink_is_rejected_and_moved_out(ctx: Context, tmp_path: Path) -> None:
    inbox = inbox_of(ctx)
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(GOOD)
    os.symlink(target, inbox / "link.jsonl")
    folder_target = tmp_path / "models"
    folder_target.mkdir()
    (folder_target / "y.jsonl").write_bytes(GOOD)
    os.symlink(folder_target, inbox / "gemini-2.5-pro")
    assert await settle_scan(ctx) == 2
    assert list(inbox.iterdir()) == []
    assert target.read_bytes() == GOOD and (folder_target / "y.jsonl").read_bytes() == GOOD
    by_path = {r["rel_path"]: r for r in await rows(ctx)}
    assert set(by_path) == {"link.jsonl", "gemini-2.5-pro"}
    for rel, row in by_path.items():
        assert row["state"] == "rejected" and "symbolic link" in row["reason"]
        moved = Path(row["work_path"])
        assert moved.is_symlink() and moved.parent == ctx.cfg.state_dir / "rejected" / row["id"]
        assert "symbolic link" in error_file(ctx, rel)["reason"]


async def test_non_regular_file_is_rejected(ctx: Context) -> None:
    # Tests run as root, so chmod 000 does not make a file unreadable; a FIFO is something
    # named *.jsonl that cannot be read as a request file.
    inbox = inbox_of(ctx)
    os.mkfifo(inbox / "pipe.jsonl")
    (inbox / "gemini-2.5-flash").mkdir()
    os.mkfifo(inbox / "gemini-2.5-flash" / "pipe2.jsonl")
    assert await settle_scan(ctx) == 2
    for row in await rows(ctx):
        assert row["state"] == "rejected" and "not a regular file" in row["reason"]
        assert error_file(ctx, row["rel_path"])["state"] == "rejected"
    assert list(inbox.rglob("*.jsonl")) == []


async def test_unreadable_claimed_file_is_rejected_by_validator(ctx: Context) -> None:
    # A claimed file that vanished or cannot be opened is rejected, not retried forever.
    (inbox_of(ctx) / "a.jsonl").write_bytes(GOOD)
    assert await settle_scan(ctx) == 1
    (row,) = await rows(ctx)
    Path(row["work_path"]).unlink()
    Path(row["work_path"]).mkdir()  # opening a directory fails with EISDIR
    assert await validate_once(ctx) == 1
    row = await ctx.store.get_input(row["id"])
    assert row is not None and row["state"] == "rejected" and "cannot read" in row["reason"]
    assert error_file(ctx, "a.jsonl")["state"] == "rejected"


async def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await cond():
            await anyio.sleep(0.02)


async def test_run_inbox_picks_up_a_drop_via_the_watcher(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    (inbox / "early.jsonl").write_bytes(GOOD)
    async with anyio.create_task_group() as tg:
        await tg.start(run_inbox, ctx)
        assert not (inbox / ".gemini-batchd-watch-probe").exists()

        async def claimed(n: int) -> bool:
            return len(await rows(ctx)) >= n

        await wait_for(lambda: claimed(1))  # present at start: first scan, settle, claim
        started = time.monotonic()
        tmp = inbox / ".late.jsonl.tmp"
        tmp.write_bytes(GOOD)
        os.rename(tmp, inbox / "late.jsonl")
        # rescan_seconds is 600: only the watcher can bring this in time
        await wait_for(lambda: claimed(2), timeout=10)
        assert time.monotonic() - started < 10
        tg.cancel_scope.cancel()
    assert sorted(r["rel_path"] for r in await rows(ctx)) == ["early.jsonl", "late.jsonl"]
    assert list(inbox.iterdir()) == []


async def test_recover_half_done_claims(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    # 1) row committed but the file still in the inbox (rename lost)
    (inbox / "a.jsonl").write_bytes(GOOD)
    async with ctx.store.tx() as conn:
        await ctx.store.add_input(
            conn, id="lost-rename", rel_path="a.jsonl", model="gemini-2.5-flash",
            work_path=str(ctx.input_dir("lost-rename") / "input.jsonl"),
        )  # fmt: skip
        # 2) row whose file is gone everywhere
        await ctx.store.add_input(
            conn, id="gone", rel_path="b.jsonl", model="gemini-2.5-flash",
            work_path=str(ctx.input_dir("gone") / "input.jsonl"),
        )  # fmt: skip
        # 3) interrupted validation
        await ctx.store.add_input(
            conn, id="midway", rel_path="c.jsonl", model="gemini-2.5-flash", state="validating",
            work_path=str(ctx.input_dir("midway") / "input.jsonl"),
        )  # fmt: skip
    ctx.input_dir("midway").mkdir(parents=True)
    (ctx.input_dir("midway") / "input.jsonl").write_bytes(GOOD)
    # 4) file moved in, but the claim's commit was lost: only claim.json tells what it was
    orphan = ctx.input_dir("orphan")
    orphan.mkdir(parents=True)
    (orphan / "claim.json").write_bytes(
        orjson.dumps({"id": "orphan", "rel_path": "m/d.jsonl", "model": "m", "kind": "generate"})
    )
    (orphan / "input.jsonl").write_bytes(GOOD)
    # 5) claim.json written, the move never happened: nothing to adopt
    (ctx.input_dir("never") / "").mkdir(parents=True)
    (ctx.input_dir("never") / "claim.json").write_bytes(
        orjson.dumps({"id": "never", "rel_path": "e.jsonl", "model": "m", "kind": "generate"})
    )
    await recover_claims(ctx)
    got = {r["id"]: r for r in await rows(ctx)}
    assert set(got) == {"lost-rename", "midway", "orphan"}
    assert all(r["state"] == "seen" for r in got.values())
    assert Path(got["lost-rename"]["work_path"]).read_bytes() == GOOD
    assert not (inbox / "a.jsonl").exists()
    assert got["orphan"]["rel_path"] == "m/d.jsonl"
    assert not ctx.input_dir("never").exists()
    assert await validate_once(ctx) == 3
    assert {r["state"] for r in await rows(ctx)} == {"queued"}


async def test_adopt_orphans_drops_a_copy_whose_source_is_still_in_the_inbox(
    ctx: Context,
) -> None:
    # A cross-filesystem claim copied the file into state/work/ and crashed before deleting the
    # source and committing: adopting the copy would run the file twice.
    inbox = inbox_of(ctx)
    src = inbox / "twice.jsonl"
    src.write_bytes(GOOD)
    st = os.lstat(src)
    ident = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    ctx.work_dir.mkdir(parents=True)
    notes = []
    for input_id, rel, same in (("copy", "twice.jsonl", True), ("moved", "gone.jsonl", False)):
        d = ctx.input_dir(input_id)
        d.mkdir()
        (d / "input.jsonl").write_bytes(GOOD)
        notes.append(
            {"id": input_id, "rel_path": rel, "model": "gemini-2.5-flash", "kind": "generate",
             "dest": str(d / "input.jsonl"), "source": str(inbox / rel),
             "ident": ident if same else [*ident[:2], ident[2] + 1, ident[3]]}
        )  # fmt: skip
    note = ctx.work_dir / ".claims-test.json"
    note.write_bytes(orjson.dumps(notes))
    await adopt_orphans(ctx)
    assert [r["id"] for r in await rows(ctx)] == ["moved"]  # source gone: adopted
    assert not ctx.input_dir("copy").exists()  # source still there: the copy is dropped
    assert src.read_bytes() == GOOD and not note.exists()
    assert await settle_scan(ctx) == 1  # and the inbox file is claimed again normally
    assert {r["rel_path"] for r in await rows(ctx)} == {"gone.jsonl", "twice.jsonl"}


async def test_many_drops_are_claimed_and_validated_in_batches(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    for i in range(250):
        (inbox / f"f{i:03}.jsonl").write_bytes(GOOD)
    (inbox / "bad.jsonl").write_bytes(b"{broken\n")
    assert await settle_scan(ctx) == 251
    assert list(inbox.iterdir()) == []
    assert not list(ctx.work_dir.glob(".claims-*"))  # batch notes are removed after the commit
    assert await validate_once(ctx) == 251
    got = await rows(ctx)
    assert sorted(r["state"] for r in got).count("queued") == 250
    bad = [r for r in got if r["rel_path"] == "bad.jsonl"]
    assert (
        bad[0]["state"] == "rejected" and error_file(ctx, "bad.jsonl")["input_id"] == bad[0]["id"]
    )
    one = next(r for r in got if r["rel_path"] == "f007.jsonl")
    assert one["request_count"] == 5 and one["size_bytes"] == len(GOOD)
    assert [p["request_count"] for p in await ctx.store.parts_of(one["id"])] == [2, 2, 1]
    assert len(await ctx.store.jobs_of(one["id"])) == 3
    hist = [h["state"] for h in await ctx.store.history(one["id"])]
    assert hist == ["seen", "validating", "queued"]


async def test_claim_of_vanished_file_returns_none(ctx: Context) -> None:
    path = inbox_of(ctx) / "gone.jsonl"
    assert await claim(ctx, path, "gone.jsonl", "gemini-2.5-flash") is None
    assert await rows(ctx) == []
    assert not ctx.work_dir.exists() or list(ctx.work_dir.iterdir()) == []


async def test_validator_queues_good_and_rejects_bad(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    (inbox / "good.jsonl").write_bytes(GOOD)
    (inbox / "gemini-embedding-001").mkdir()
    emb = orjson.dumps({"content": {"parts": [{"text": "x"}]}}) + b"\n"
    (inbox / "gemini-embedding-001" / "emb.jsonl").write_bytes(emb)
    bad = GOOD + b"{broken\n" + orjson.dumps({"key": "k0", "request": GEN}) + b"\n"
    (inbox / "bad.jsonl").write_bytes(bad)
    assert await settle_scan(ctx) == 3
    async with anyio.create_task_group() as tg:
        await tg.start(run_validator, ctx)

        async def settled() -> bool:
            return all(r["state"] in ("queued", "rejected") for r in await rows(ctx))

        await wait_for(settled)
        tg.cancel_scope.cancel()
    by_path = {r["rel_path"]: r for r in await rows(ctx)}
    good = by_path["good.jsonl"]
    assert good["state"] == "queued" and good["request_count"] == 5
    assert good["sha256"] and good["size_bytes"] == len(GOOD) and good["est_tokens"] > 0
    parts = await ctx.store.parts_of(good["id"])
    jobs = await ctx.store.jobs_of(good["id"])
    assert [p["request_count"] for p in parts] == [2, 2, 1]
    assert [(j["part_no"], j["attempt"], j["state"], j["mode"]) for j in jobs] == [
        (1, 1, "planned", "inline"),
        (2, 1, "planned", "inline"),
        (3, 1, "planned", "inline"),
    ]
    assert jobs[0]["display_name"] == f"gemini-batchd:{good['id']}:1"
    assert all(Path(j["source_path"]).is_file() for j in jobs)
    embr = by_path["gemini-embedding-001/emb.jsonl"]
    assert embr["state"] == "queued" and embr["kind"] == "embed"
    assert [j["mode"] for j in await ctx.store.jobs_of(embr["id"])] == ["file"]
    badr = by_path["bad.jsonl"]
    assert badr["state"] == "rejected" and "line 6" in badr["reason"]
    assert await ctx.store.jobs_of(badr["id"]) == []
    err = error_file(ctx, "bad.jsonl")
    assert err["details"]["problem_count"] == 2
    assert [p["line"] for p in err["details"]["problems"]] == [6, 7]
    assert "duplicate key 'k0' (first on line 1)" in err["details"]["problems"][1]["reason"]
    assert Path(badr["work_path"]).read_bytes() == bad  # kept
    assert list(ctx.input_dir(badr["id"]).glob("part-*")) == []
    assert not (ctx.cfg.outbox_dir / "good.error.json").exists()
    hist = [h["state"] for h in await ctx.store.history(good["id"])]
    assert hist == ["seen", "validating", "queued"]


async def _succeeded_drop(ctx: Context, data: bytes) -> dict[str, Any]:
    """Drop ``a.jsonl``, validate it and mark it succeeded with a kept results file."""
    (inbox_of(ctx) / "a.jsonl").write_bytes(data)
    assert await settle_scan(ctx) == 1
    await validate_once(ctx)
    (first,) = await rows(ctx)
    results = ctx.results_dir / f"{first['id']}.jsonl"
    results.parent.mkdir(parents=True)
    results.write_bytes(b"{}\n")
    async with ctx.store.tx() as conn:
        await ctx.store.set_input_state(
            conn, first["id"], InputState.SUCCEEDED, results_path=str(results)
        )
    return first


async def test_same_content_after_success_is_reused(ctx: Context) -> None:
    first = await _succeeded_drop(ctx, GOOD)
    (inbox_of(ctx) / "a.jsonl").write_bytes(GOOD)
    (inbox_of(ctx) / "gemini-2.5-pro").mkdir()
    (inbox_of(ctx) / "gemini-2.5-pro" / "a.jsonl").write_bytes(GOOD)  # other model: new work
    assert await settle_scan(ctx) == 2
    await validate_once(ctx)
    by = {(r["rel_path"], r["state"]): r for r in await rows(ctx)}
    again = by[("a.jsonl", "downloading")]
    assert again["reused_from"] == first["id"] and again["sha256"] == first["sha256"]
    assert await ctx.store.jobs_of(again["id"]) == []
    assert by[("gemini-2.5-pro/a.jsonl", "queued")]["reused_from"] is None


@pytest.fixture
async def big_ctx(tmp_path: Path) -> AsyncIterator[Context]:
    """Every file counts as big: validated on two cores, its sha256 worked out after queueing."""
    cfg = parse_config(
        {
            "paths": {"root": str(tmp_path)},
            "inbox": {
                "settle_seconds": 0.2,
                "rescan_seconds": 600.0,
                "parallel_validation_bytes": 1,
            },
        }
    )
    cfg.inbox_dir.mkdir(parents=True)
    async with Store.open(cfg.db_path) as store:
        yield Context(cfg=cfg, store=store, gemini=None)


BIG = b"".join(orjson.dumps({"key": f"k{i}", "request": GEN}) + b"\n" for i in range(500))


async def test_a_big_files_digest_is_filled_in_after_it_is_queued(big_ctx: Context) -> None:
    ctx = big_ctx
    (inbox_of(ctx) / "a.jsonl").write_bytes(BIG)
    assert await settle_scan(ctx) == 1
    await validate_once(ctx)
    (row,) = await rows(ctx)
    assert row["state"] == "queued" and row["sha256"] == hashlib.sha256(BIG).hexdigest()


async def test_a_big_file_with_the_same_content_after_success_is_reused(big_ctx: Context) -> None:
    ctx = big_ctx
    first = await _succeeded_drop(ctx, BIG)
    (inbox_of(ctx) / "a.jsonl").write_bytes(BIG)
    other = BIG.replace(b'"k499"', b'"k999"')  # the same size, other bytes: new work
    assert len(other) == len(BIG)
    (inbox_of(ctx) / "b.jsonl").write_bytes(other)
    assert await settle_scan(ctx) == 2
    await validate_once(ctx)
    by = {(r["rel_path"], r["state"]): r for r in await rows(ctx)}
    again = by[("a.jsonl", "downloading")]
    assert again["reused_from"] == first["id"] and again["sha256"] == first["sha256"]
    new = by[("b.jsonl", "queued")]
    assert new["reused_from"] is None and new["sha256"] == hashlib.sha256(other).hexdigest()


async def test_a_digest_missing_after_a_crash_is_filled_in_when_the_validator_starts(
    big_ctx: Context,
) -> None:
    ctx = big_ctx
    (inbox_of(ctx) / "a.jsonl").write_bytes(BIG)
    assert await settle_scan(ctx) == 1
    await validate_once(ctx)
    (row,) = await rows(ctx)
    async with ctx.store.tx() as conn:  # as left by a crash between queueing and the digest
        await conn.execute("UPDATE inputs SET sha256 = NULL WHERE id = ?", (row["id"],))
    async with anyio.create_task_group() as tg:
        await tg.start(run_validator, ctx)

        async def filled() -> bool:
            (now,) = await rows(ctx)
            return now["sha256"] == hashlib.sha256(BIG).hexdigest()

        await wait_for(filled)
        tg.cancel_scope.cancel()


async def test_a_scan_rejects_nested_drops_and_folders_named_jsonl(ctx: Context) -> None:
    inbox = inbox_of(ctx)
    for rel in ("a/b/x.jsonl", "gemini-2.5-flash/deeper/y.jsonl"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(GOOD)
    (inbox / "f.jsonl").mkdir()
    (inbox / "f.jsonl" / "g.jsonl").write_bytes(GOOD)
    (inbox / "UP.JSONL").write_bytes(GOOD)
    (inbox / "a" / "notes.txt").write_bytes(b"x")
    assert await settle_scan(ctx) == 4
    by_path = {r["rel_path"]: r for r in await rows(ctx)}
    assert set(by_path) == {"a/b/x.jsonl", "gemini-2.5-flash/deeper/y.jsonl", "f.jsonl", "UP.JSONL"}
    for rel in ("a/b/x.jsonl", "gemini-2.5-flash/deeper/y.jsonl"):
        assert by_path[rel]["state"] == "rejected" and "nested too deep" in by_path[rel]["reason"]
        assert "nested too deep" in error_file(ctx, rel)["reason"]
    assert by_path["f.jsonl"]["state"] == "rejected" and "folder" in by_path["f.jsonl"]["reason"]
    assert (Path(by_path["f.jsonl"]["work_path"]) / "g.jsonl").read_bytes() == GOOD
    assert by_path["UP.JSONL"]["state"] == "seen" and by_path["UP.JSONL"]["reason"] is None
    assert sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file()) == [
        "a/notes.txt"
    ]
