"""Links planted in the shared outbox and media folders by a producer (issue 18, security part).

Each link is made by a child process running as ``nobody`` in the spool's group (the folders are
group-writable, setgid, as ``systemd/`` lays them out); the daemon runs as root, so a followed link
would let a producer write or delete anything root can.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.control.actions import cancel_input
from daemon.emulator import Emulator, EmulatorSettings
from daemon.layout import outbox_paths
from daemon.states import FINAL_INPUT_STATES
from tests.e2e.conftest import config_data, running_daemon, wait_final
from tests.helpers import drop, read_jsonl, request_lines, wait_until
from tests.planting import (
    NOBODY,
    NOGROUP,
    as_producer,
    needs_root,
    plant_link,
    shared,
    untouched,
    victim,
)

PNG = b"\x89PNG\r\n\x1a\n"
IMAGE_MODEL = "gemini-2.5-flash-image"

pytestmark = needs_root


def _rewrite(fd: int) -> None:
    out = os.open("cat.png", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
    os.write(out, b" and a secret")
    os.close(out)


def _swap_for_link(secret: Path) -> Callable[[int], None]:
    def swap(fd: int) -> None:
        os.unlink("cat.png", dir_fd=fd)
        os.symlink(secret, "cat.png", dir_fd=fd)

    return swap


def regular(p: Path) -> Path:
    assert not p.is_symlink() and p.exists(), p
    return p


async def test_linked_media_folder_is_replaced_by_a_real_one(make_cfg, tmp_path):
    cfg = make_cfg()
    v = victim(tmp_path)
    folder = shared(cfg.outbox_dir / IMAGE_MODEL)
    plant_link(folder, "pics.media", v)
    rel = f"{IMAGE_MODEL}/pics.jsonl"
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, rel, request_lines(3))
        row = await wait_final(ctx, rel)
        assert row["state"] == "succeeded", row
        untouched(v)
        media = folder / "pics.media"
        assert media.is_dir() and not media.is_symlink()
        assert sorted(p.name for p in media.iterdir()) == ["k0-1.png", "k1-1.png", "k2-1.png"]
        assert [r["key"] for r in read_jsonl(regular(cfg.outbox_dir / rel))] == ["k0", "k1", "k2"]
        drop(cfg.inbox_dir, "after.jsonl", request_lines(2))  # the daemon goes on
        assert (await wait_final(ctx, "after.jsonl"))["state"] == "succeeded"


async def test_linked_media_folder_is_not_pruned_through(make_cfg, tmp_path):
    cfg = make_cfg()
    v = victim(tmp_path)
    plant_link(shared(cfg.outbox_dir), "notes.media", v)
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "notes.jsonl", request_lines(2))
        row = await wait_final(ctx, "notes.jsonl")
    assert row["state"] == "succeeded", row
    untouched(v)
    assert not (cfg.outbox_dir / "notes.media").is_symlink()  # the link went, not its target
    assert len(read_jsonl(regular(cfg.outbox_dir / "notes.jsonl"))) == 2


@pytest.mark.parametrize("tmp_name", [".bar.summary.json.tmp", ".bar.jsonl.tmp", "bar.jsonl"])
async def test_linked_temp_or_final_name_is_not_written_through(
    make_cfg, tmp_path, tmp_name, capsys
):
    cfg = make_cfg()
    v = victim(tmp_path)
    plant_link(shared(cfg.outbox_dir), tmp_name, v / "secret.txt")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "bar.jsonl", request_lines(2))
        row = await wait_final(ctx, "bar.jsonl")
    assert row["state"] == "succeeded", row
    untouched(v)
    summary = orjson.loads(regular(cfg.outbox_dir / "bar.summary.json").read_bytes())
    assert summary["state"] == "succeeded"
    if tmp_name.endswith(".tmp"):  # the refused link is logged, with where it pointed
        logged = [ln for ln in capsys.readouterr().out.splitlines() if "planted_link_removed" in ln]
        assert len(logged) == 1 and str(cfg.outbox_dir / tmp_name) in logged[0], logged
        assert str(v / "secret.txt") in logged[0]
    assert len(read_jsonl(regular(cfg.outbox_dir / "bar.jsonl"))) == 2


async def test_linked_error_temp_is_not_written_through(make_cfg, tmp_path):
    cfg = make_cfg()
    v = victim(tmp_path)
    plant_link(shared(cfg.outbox_dir), ".bad.error.json.tmp", v / "secret.txt")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "bad.jsonl", b'{"key": "a", "request": 7}\n')
        row = await wait_final(ctx, "bad.jsonl")
    assert row["state"] == "rejected", row
    untouched(v)
    assert orjson.loads(regular(cfg.outbox_dir / "bad.error.json").read_bytes())["state"]


async def test_linked_model_folder_is_replaced_by_a_real_one(make_cfg, tmp_path):
    cfg = make_cfg()
    v = victim(tmp_path)
    plant_link(shared(cfg.outbox_dir), "gemini-2.5-flash-lite", v)
    rel = "gemini-2.5-flash-lite/x.jsonl"
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, rel, request_lines(2))
        row = await wait_final(ctx, rel)
    assert row["state"] == "succeeded", row
    untouched(v)
    folder = cfg.outbox_dir / "gemini-2.5-flash-lite"
    assert folder.is_dir() and not folder.is_symlink()
    assert len(read_jsonl(regular(folder / "x.jsonl"))) == 2
    regular(folder / "x.summary.json")


async def test_reuse_does_not_follow_planted_links(make_cfg, tmp_path):
    cfg = make_cfg()
    v = victim(tmp_path)
    data = b"".join(line + b"\n" for line in request_lines(3))
    outbox = shared(cfg.outbox_dir)
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "a.jsonl", data)
        assert (await wait_final(ctx, "a.jsonl"))["state"] == "succeeded"
        plant_link(outbox, ".b.jsonl.tmp", v / "secret.txt")
        plant_link(outbox, ".b.summary.json.tmp", v / "other.bin")
        plant_link(outbox, "b.media", v)
        drop(cfg.inbox_dir, "b.jsonl", data)
        row = await wait_final(ctx, "b.jsonl")
    assert row["state"] == "succeeded", row
    untouched(v)
    summary = orjson.loads(regular(outbox / "b.summary.json").read_bytes())
    assert summary["reused"] is True
    assert regular(outbox / "b.jsonl").read_bytes() == (outbox / "a.jsonl").read_bytes()
    assert not (outbox / "b.media").is_symlink()


@pytest.mark.parametrize("change", ["link", "rewritten"])
async def test_media_changed_after_validation_is_not_uploaded(tmp_path, change):
    """``cat.png`` is validated, then (while its input waits for a job slot) replaced by a link
    to a secret, or rewritten in place: the input fails naming the file, nothing is uploaded."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG + b"the daemon user's secret")
    emu = Emulator(settings=EmulatorSettings(pending_seconds=3600, running_seconds=0.1))
    await emu.start()
    try:
        data = config_data(tmp_path / "root", emu.url, submit={"max_active_jobs": 1})
        from daemon.config import parse_config

        cfg = parse_config(data)
        media_dir = shared(cfg.media_dir)
        (media_dir / "cat.png").write_bytes(PNG + b"a cat")
        os.chown(media_dir / "cat.png", NOBODY, NOGROUP)
        cat = {"fileData": {"fileUri": "file:cat.png", "mimeType": "image/png"}}
        line = orjson.dumps({"key": "m", "request": {"contents": [{"parts": [cat]}]}})
        async with running_daemon(cfg) as ctx:
            drop(cfg.inbox_dir, "hold.jsonl", request_lines(1))  # takes the only job slot
            hold = await wait_until(lambda: _state(ctx, "hold.jsonl", "submitted", "running"))
            drop(cfg.inbox_dir, "cats.jsonl", [line])
            await wait_until(lambda: _state(ctx, "cats.jsonl", "queued"))
            as_producer(media_dir, _swap_for_link(secret) if change == "link" else _rewrite)
            await cancel_input(ctx, hold["id"])
            await wait_final(ctx, hold["id"])
            ctx.wake.submit.set()  # a freed slot does not wake the submitter yet (another branch)

            async def settled() -> Any:  # failed as it should, or (the bug) the secret uploaded
                row = await ctx.store.find_input("cats.jsonl")
                done = row["state"] in FINAL_INPUT_STATES or emu.stats["calls"].get("files.upload")
                return row if done else None

            row = await wait_until(settled, timeout=60)
        assert row["state"] == "failed", row
        assert row["reason"].startswith("not submitted: cannot read what it submits: "), row
        assert "'cat.png'" in row["reason"] and "nothing uploaded" in row["reason"], row
        err = orjson.loads(outbox_paths(cfg.outbox_dir, "cats.jsonl")["error"].read_bytes())
        assert "cat.png" in orjson.dumps(err).decode()
        assert not emu.stats["calls"].get("files.upload")
        assert not emu.store.files  # nothing at all reached the API's file store
    finally:
        await emu.stop()


async def _state(ctx, rel: str, *states: str):
    row = await ctx.store.find_input(rel)
    return row if row and row["state"] in states else None


async def test_a_folder_planted_at_a_final_name_is_moved_aside(make_cfg):
    cfg = make_cfg()
    outbox = shared(cfg.outbox_dir)
    as_producer(outbox, lambda fd: os.mkdir("dir.summary.json", dir_fd=fd))
    as_producer(outbox, lambda fd: os.mkdir("dir.jsonl", dir_fd=fd))
    as_producer(outbox / "dir.jsonl", lambda fd: os.mkdir("inside", dir_fd=fd))
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "dir.jsonl", request_lines(2))
        row = await wait_final(ctx, "dir.jsonl", timeout=30)
        assert row["state"] == "succeeded", row
        drop(cfg.inbox_dir, "after.jsonl", request_lines(2))  # the daemon goes on
        assert (await wait_final(ctx, "after.jsonl"))["state"] == "succeeded"
    assert len(read_jsonl(regular(outbox / "dir.jsonl"))) == 2
    regular(outbox / "dir.summary.json")
    aside = sorted(p.name for p in outbox.iterdir() if ".planted-" in p.name)
    assert [n.split(".planted-")[0] for n in aside] == [".dir.jsonl", ".dir.summary.json"]
    assert [p.name for p in outbox.glob(".dir.jsonl.planted-*/*")] == ["inside"]


async def test_watcher_probe_is_not_written_through_a_planted_link(make_cfg, tmp_path):
    # The inbox is shared with producers too: the probe the watcher touches at start must not
    # follow a link planted at its name.
    from daemon.intake.watch import PROBE_NAME

    cfg = make_cfg()
    v = victim(tmp_path)
    plant_link(shared(cfg.inbox_dir), PROBE_NAME, v / "secret.txt")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "p.jsonl", request_lines(1))
        assert (await wait_final(ctx, "p.jsonl"))["state"] == "succeeded"
    untouched(v)
    assert not (cfg.inbox_dir / PROBE_NAME).is_symlink()
