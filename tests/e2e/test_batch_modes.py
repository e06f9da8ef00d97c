"""The cookbook end to end against the emulator: embeddings, images out, local media in, per-request
retries, expiry, dedupe, token accounting, and every file in ``examples/``."""

from __future__ import annotations

import shutil
from typing import Any

import orjson
import pytest

from daemon.control.actions import retry_input
from daemon.layout import outbox_paths
from daemon.states import FINAL_INPUT_STATES
from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import ROOT, answer_text, drop, read_jsonl, request_lines, wait_until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXAMPLES = ROOT / "examples"


def gen_line(key: str, *parts: dict[str, Any]) -> bytes:
    req = {"contents": [{"role": "user", "parts": list(parts)}]}
    return orjson.dumps({"key": key, "request": req})


def summary_of(cfg, rel: str) -> dict[str, Any]:
    return orjson.loads(outbox_paths(cfg.outbox_dir, rel)["summary"].read_bytes())


async def wait_new_final(ctx, rel: str, old_id: str) -> dict[str, Any]:
    """The final row of a later drop of ``rel`` (not the input ``old_id``)."""

    async def newer() -> Any:
        row = await ctx.store.find_input(rel)
        ok = row and row["id"] != old_id and row["state"] in FINAL_INPUT_STATES
        return row if ok else None

    return await wait_until(newer, timeout=60)


async def test_embeddings_use_embed_batch_in_file_mode(make_cfg, emulator):
    cfg = make_cfg()  # default inline_max_bytes is 8 MiB: the tiny file would be inline if it could
    lines = [
        orjson.dumps(
            {
                "key": f"e{i}",
                "request": {
                    "content": {"parts": [{"text": f"document {i}"}]},
                    "outputDimensionality": 8,
                    "taskType": "RETRIEVAL_DOCUMENT",
                },
            }
        )
        for i in range(12)
    ]
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "gemini-embedding-001/e.jsonl", lines)
        row = await wait_final(ctx, "gemini-embedding-001/e.jsonl")
        jobs = await ctx.store.jobs_of(row["id"])
    assert row["state"] == "succeeded", row
    assert [j["mode"] for j in jobs] == ["file"]
    calls = emulator.stats["calls"]
    assert calls.get("batches.create_embeddings") == 1 and not calls.get("batches.create")
    results = read_jsonl(cfg.outbox_dir / "gemini-embedding-001" / "e.jsonl")
    assert [r["key"] for r in results] == [f"e{i}" for i in range(12)]
    vectors = [r["response"]["embedding"]["values"] for r in results]
    assert all(len(v) == 8 for v in vectors)
    assert len({tuple(v) for v in vectors}) == 12  # each answer is its own request's


@pytest.mark.parametrize("extract", [True, False])
async def test_image_model_writes_media_files(make_cfg, emulator, extract):
    cfg = make_cfg(outbox={"extract_media": extract})
    rel = "gemini-2.5-flash-image/pics.jsonl"
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, rel, request_lines(3))
        row = await wait_final(ctx, rel)
    assert row["state"] == "succeeded", row
    media = cfg.outbox_dir / "gemini-2.5-flash-image" / "pics.media"
    results = read_jsonl(cfg.outbox_dir / rel)
    assert [r["key"] for r in results] == ["k0", "k1", "k2"]
    if not extract:
        assert not media.exists()
        return
    # the text part comes first, the image second
    names = sorted(p.name for p in media.iterdir())
    assert names == ["k0-1.png", "k1-1.png", "k2-1.png"], names
    for name in names:
        assert (media / name).read_bytes().startswith(PNG_SIGNATURE)
    assert summary_of(cfg, rel)["outbox"]["media"] == str(media)


@pytest.mark.parametrize("mode", ["inline", "file"])
async def test_local_media_uploaded_once(make_cfg, emulator, mode):
    cfg = make_cfg(submit={"inline_max_bytes": 8 * 1024 * 1024 if mode == "inline" else 0})
    cfg.media_dir.mkdir(parents=True, exist_ok=True)
    (cfg.media_dir / "cat.png").write_bytes(PNG_SIGNATURE + b"not really a cat")
    camel = {"fileData": {"fileUri": "file:cat.png", "mimeType": "image/png"}}
    snake = {"file_data": {"file_uri": "file:cat.png", "mime_type": "image/png"}}
    lines = [
        gen_line(f"m{i}", camel if i % 2 else snake, {"text": f"describe {i}"}) for i in range(100)
    ]
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "cats.jsonl", lines)
        row = await wait_final(ctx, "cats.jsonl")
        jobs = await ctx.store.jobs_of(row["id"])
    assert row["state"] == "succeeded", row
    assert [j["mode"] for j in jobs] == [mode]
    uploads = emulator.stats["calls"].get("files.upload")
    assert uploads == (1 if mode == "inline" else 2)  # the media once (+ the input file)
    results = read_jsonl(cfg.outbox_dir / "cats.jsonl")
    assert [r["key"] for r in results] == [f"m{i}" for i in range(100)]
    assert all("response" in r for r in results)


async def test_missing_local_media_rejects_the_input(make_cfg, emulator):
    cfg = make_cfg()
    cfg.media_dir.mkdir(parents=True, exist_ok=True)
    (cfg.media_dir / "cat.png").write_bytes(PNG_SIGNATURE)
    cat = {"fileData": {"fileUri": "file:cat.png", "mimeType": "image/png"}}
    nope = {"fileData": {"fileUri": "file:nope.png", "mimeType": "image/png"}}
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "m.jsonl", [gen_line("a", cat), gen_line("b", nope)])
        row = await wait_final(ctx, "m.jsonl")
    assert row["state"] == "rejected", row
    err = orjson.loads((cfg.outbox_dir / "m.error.json").read_bytes())
    problems = err["details"]["problems"]
    assert [p["line"] for p in problems] == [2], problems
    assert "nope.png" in orjson.dumps(problems).decode()
    assert not emulator.stats["calls"].get("files.upload")
    assert not emulator.stats["calls"].get("batches.create")


async def test_transient_and_dropped_requests_are_retried_permanent_kept(make_cfg, emulator):
    cfg = make_cfg()

    def text(i: int) -> str:
        marker = {3: "[[transient:13]]", 4: "[[transient:13]]", 5: "[[error:3]]"}
        marker |= {6: "[[error:3]]", 7: "[[drop]]"}
        return f"prompt for k{i} {marker.get(i, '')}".strip()

    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "r.jsonl", request_lines(10, text=text))
        row = await wait_final(ctx, "r.jsonl")
    assert row["state"] == "partial", row
    results = read_jsonl(cfg.outbox_dir / "r.jsonl")
    assert [r["key"] for r in results] == [f"k{i}" for i in range(10)]
    for i, r in enumerate(results):
        if i in (5, 6):
            assert "response" not in r and r["error"]["code"] == 3, r
        else:
            assert answer_text(r) == f"echo: {text(i)}", r
    assert emulator.stats["creates_by_display_name"] == {
        f"gemini-batchd:{row['id']}:1": 1,
        f"gemini-batchd:{row['id']}:1:2": 1,
    }
    summary = summary_of(cfg, "r.jsonl")
    assert summary["state"] == "partial"
    assert summary["requests"]["total"] == 10
    assert summary["requests"]["succeeded"] == 8 and summary["requests"]["failed"] == 2
    assert summary["attempts"] == 2
    assert sorted(j["attempt"] for j in summary["jobs"]) == [1, 2]
    assert [j["requests"] for j in sorted(summary["jobs"], key=lambda j: j["attempt"])] == [10, 3]


async def test_expired_job_is_resubmitted_once(make_cfg, emulator):
    cfg = make_cfg()
    emulator.force_next("EXPIRED")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "x.jsonl", request_lines(5))
        row = await wait_final(ctx, "x.jsonl")
    assert row["state"] == "succeeded", row
    assert emulator.stats["creates_by_display_name"] == {
        f"gemini-batchd:{row['id']}:1": 1,
        f"gemini-batchd:{row['id']}:1:2": 1,
    }
    assert [r["key"] for r in read_jsonl(cfg.outbox_dir / "x.jsonl")] == [f"k{i}" for i in range(5)]
    assert summary_of(cfg, "x.jsonl")["attempts"] == 2


async def test_expired_twice_ends_expired_with_error_file(make_cfg, emulator):
    cfg = make_cfg(submit={"retry_failed_requests": 1})
    emulator.force_next("EXPIRED", count=2)
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "foo.jsonl", request_lines(4))
        row = await wait_final(ctx, "foo.jsonl")
    assert row["state"] == "expired", row
    assert sum(emulator.stats["creates_by_display_name"].values()) == 2
    paths = outbox_paths(cfg.outbox_dir, "foo.jsonl")
    err = orjson.loads(paths["error"].read_bytes())
    assert err["state"] == "expired" and err["attempts"] == 2
    assert not paths["summary"].exists()


async def test_dedupe_reuses_identical_drops_and_fresh_pays_again(make_cfg, emulator):
    cfg = make_cfg()
    data = b"".join(line + b"\n" for line in request_lines(6))
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "a.jsonl", data)
        first = await wait_final(ctx, "a.jsonl")
        assert first["state"] == "succeeded"
        assert sum(emulator.stats["creates_by_display_name"].values()) == 1

        drop(cfg.inbox_dir, "a.jsonl", data)  # same name again
        again = await wait_new_final(ctx, "a.jsonl", first["id"])
        drop(cfg.inbox_dir, "b.jsonl", data)  # another name
        other = await wait_final(ctx, "b.jsonl")
        for row, rel in ((again, "a.jsonl"), (other, "b.jsonl")):
            assert row["state"] == "succeeded", row
            s = summary_of(cfg, rel)
            # served from an earlier identical drop (the first, or a reuse of it)
            assert s["reused"] is True and s["reused_from"] in (first["id"], again["id"]), s
            assert (cfg.outbox_dir / rel).read_bytes() == (
                ctx.results_dir / f"{first['id']}.jsonl"
            ).read_bytes()
        assert sum(emulator.stats["creates_by_display_name"].values()) == 1  # nothing paid

        drop(cfg.inbox_dir, "gemini-2.5-flash-lite/a.jsonl", data)  # another model: new work
        lite = await wait_final(ctx, "gemini-2.5-flash-lite/a.jsonl")
        assert (
            lite["state"] == "succeeded"
            and not summary_of(cfg, "gemini-2.5-flash-lite/a.jsonl")["reused"]
        )
        assert f"gemini-batchd:{lite['id']}:1" in emulator.stats["creates_by_display_name"]

        fresh = await retry_input(ctx, first["id"], fresh=True)
        assert fresh["id"] != first["id"]
        done = await wait_final(ctx, fresh["id"])
        assert done["state"] == "succeeded"
        assert summary_of(cfg, "a.jsonl")["reused"] is False
    creates = emulator.stats["creates_by_display_name"]
    assert creates.get(f"gemini-batchd:{fresh['id']}:1") == 1
    assert sum(creates.values()) == 3


async def test_token_totals_and_estimated_cost(make_cfg, emulator):
    prices = {"gemini-2.5-flash": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    cfg = make_cfg(gemini={"default_model": "gemini-2.5-flash"}, prices=prices)
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "t.jsonl", request_lines(25, text=lambda i: "word " * (i + 1)))
        row = await wait_final(ctx, "t.jsonl")
    assert row["state"] == "succeeded", row
    results = read_jsonl(cfg.outbox_dir / "t.jsonl")
    fields = {
        "prompt": "promptTokenCount",
        "candidates": "candidatesTokenCount",
        "thoughts": "thoughtsTokenCount",
        "total": "totalTokenCount",
    }
    expect = {
        name: sum(r["response"]["usageMetadata"].get(f, 0) for r in results)
        for name, f in fields.items()
    }
    summary = summary_of(cfg, "t.jsonl")
    tokens = summary["tokens"]
    assert expect["prompt"] > 0 and expect["candidates"] > 0
    assert {k: tokens[k] for k in fields} == expect
    out = expect["candidates"] + expect["thoughts"]
    cost = (expect["prompt"] * 1.0 + out * 2.0) / 1e6 * 0.5
    assert summary["estimated_cost_usd"] == pytest.approx(round(cost, 6))


async def test_every_example_runs(make_cfg, emulator):
    # inline_max_bytes between the small example and the questions: one of each mode
    cfg = make_cfg(submit={"inline_max_bytes": 2000})
    files = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*.jsonl"))
    assert len(files) == 5, files
    shutil.copytree(EXAMPLES / "media", cfg.media_dir)
    async with running_daemon(cfg) as ctx:
        for rel in files:
            drop(cfg.inbox_dir, str(rel), (EXAMPLES / rel).read_bytes())
        rows = {str(rel): await wait_final(ctx, str(rel)) for rel in files}
        modes = {
            rel: [j["mode"] for j in await ctx.store.jobs_of(r["id"])] for rel, r in rows.items()
        }
    for rel, row in rows.items():
        assert row["state"] == "succeeded", row
        keys = [orjson.loads(line)["key"] for line in (EXAMPLES / rel).read_bytes().splitlines()]
        assert [r["key"] for r in read_jsonl(cfg.outbox_dir / rel)] == keys
    assert modes["questions.jsonl"] == ["file"] and modes["inline-small.jsonl"] == ["inline"]
    assert modes["gemini-embedding-001/embed.jsonl"] == ["file"]
    draw = cfg.outbox_dir / "gemini-2.5-flash-image" / "draw.media"
    assert sorted(p.name for p in draw.iterdir()) == ["robot-1.png", "sunset-1.png"]
