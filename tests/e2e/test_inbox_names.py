"""Drops whose names cannot work: each gets an error file and leaves the inbox (never silently left
there, never claimed and paid for to fail later), through the real daemon (watcher and rescan)."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from daemon.layout import outbox_paths
from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import drop, read_jsonl, request_lines, wait_until

NESTED = ["a/b/x.jsonl", "gemini-2.5-flash/deeper/y.jsonl", "gemini-2.5-flash/d1/d2/z.jsonl"]


def error_doc(cfg, rel: str) -> dict:
    return orjson.loads(outbox_paths(cfg.outbox_dir, rel)["error"].read_bytes())


async def test_nested_drops_and_a_folder_named_jsonl_get_error_files(make_cfg, emulator):
    cfg = make_cfg(inbox={"rescan_seconds": 3600.0})  # the watcher alone must see them
    async with running_daemon(cfg) as ctx:
        for rel in NESTED:
            drop(cfg.inbox_dir, rel, request_lines(2))
        (cfg.inbox_dir / "folder.jsonl").mkdir()
        (cfg.inbox_dir / "folder.jsonl" / "inside.txt").write_bytes(b"kept")
        (cfg.inbox_dir / "gemini-2.5-flash" / "sub.jsonl").mkdir()
        rels = [*NESTED, "folder.jsonl", "gemini-2.5-flash/sub.jsonl"]
        rows = {rel: await wait_final(ctx, rel) for rel in rels}
    for rel in NESTED:
        assert rows[rel]["state"] == "rejected", rows[rel]
        assert "nested" in rows[rel]["reason"]
        assert "nested" in error_doc(cfg, rel)["reason"]
        assert not (cfg.inbox_dir / rel).exists()
        assert Path(rows[rel]["work_path"]).read_bytes() == b"".join(
            line + b"\n" for line in request_lines(2)
        )  # the bytes are kept
    for rel in ("folder.jsonl", "gemini-2.5-flash/sub.jsonl"):
        assert rows[rel]["state"] == "rejected" and "folder" in rows[rel]["reason"]
        assert error_doc(cfg, rel)["file"] == rel
        assert not (cfg.inbox_dir / rel).exists()
    moved = Path(rows["folder.jsonl"]["work_path"])
    assert (moved / "inside.txt").read_bytes() == b"kept"  # nothing lost
    assert emulator.stats["creates_by_display_name"] == {}


async def test_upper_case_suffix_is_a_drop(make_cfg, emulator):
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "UPPER.JSONL", request_lines(3))
        row = await wait_final(ctx, "UPPER.JSONL")
    assert row["state"] == "succeeded", row
    paths = outbox_paths(cfg.outbox_dir, "UPPER.JSONL")
    assert paths["results"] == cfg.outbox_dir / "UPPER.jsonl"
    assert [x["key"] for x in read_jsonl(paths["results"])] == ["k0", "k1", "k2"]
    assert orjson.loads(paths["summary"].read_bytes())["state"] == "succeeded"


async def test_a_name_too_long_for_its_outbox_files_is_rejected_at_claim(make_cfg, emulator):
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        name_max = os.pathconf(cfg.inbox_dir, "PC_NAME_MAX")
        longest = "L" * (name_max - len(".jsonl")) + ".jsonl"  # fits the inbox, not the outbox
        fits = "F" * (name_max - len(".jsonl") - 40) + ".jsonl"
        tmp = drop(cfg.inbox_dir, ".long-name-being-written", request_lines(2))
        os.rename(tmp, cfg.inbox_dir / longest)  # helpers.drop's temp name would be too long
        drop(cfg.inbox_dir, fits, request_lines(2))
        bad = await wait_final(ctx, longest)
        good = await wait_final(ctx, fits)
        jobs = await ctx.store.jobs_of(bad["id"])
    assert bad["state"] == "rejected" and "too long" in bad["reason"], bad
    assert jobs == []  # never paid for
    err_path = outbox_paths(cfg.outbox_dir, longest)["error"]
    assert len(os.fsencode(err_path.name)) + len(".tmp") + 1 <= name_max
    assert err_path.name.startswith("L" * 100) and err_path.name.endswith(".error.json")
    err = orjson.loads(err_path.read_bytes())
    assert err["file"] == longest and "too long" in err["reason"]
    assert not (cfg.inbox_dir / longest).exists()
    assert good["state"] == "succeeded", good
    await wait_until(outbox_paths(cfg.outbox_dir, fits)["summary"].exists)
