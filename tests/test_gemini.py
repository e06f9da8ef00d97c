"""GeminiClient against the in-process emulator over real HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp.web
import anyio
import orjson
import pytest

from daemon.gemini import ApiError, GeminiClient, RateLimiter
from daemon.windows import FileWindow
from tests import remote_helpers as rh
from tests.remote_helpers import KEY, Env, lines_for

env, emu_settings, cfg_sections = rh.env, rh.emu_settings, rh.cfg_sections

MODEL = "gemini-2.5-flash"


async def wait_done(gem: GeminiClient, name: str) -> dict:
    with anyio.fail_after(10):
        while not (op := await gem.get_batch(name)).get("done"):
            await anyio.sleep(0.02)
    return op


async def test_file_job_roundtrip(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(li) + "\n" for li in lines_for(5)))
    f = await env.gem.upload_file(src, display_name="in")
    assert f["name"].startswith("files/") and f["uri"] and f["expirationTime"]
    op = await env.gem.create_file_job(
        model=MODEL, file_name=f["name"], display_name="dn-file", embed=False
    )
    assert op["name"].startswith("batches/")
    assert op["metadata"]["state"] == "BATCH_STATE_PENDING"
    assert op["metadata"]["displayName"] == "dn-file"
    done = await wait_done(env.gem, op["name"])
    assert done["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    assert done["metadata"]["batchStats"]["successfulRequestCount"] == "5"  # raw, not via SDK
    out = tmp_path / "out.jsonl"
    await env.gem.download_file(done["metadata"]["output"]["responsesFile"], out)
    keys = {orjson.loads(line)["key"] for line in out.read_bytes().splitlines()}
    assert keys == {f"k{i}" for i in range(5)}
    assert not out.with_name("out.jsonl.part").exists()
    assert await env.gem.find_batch("dn-file") is not None
    assert await env.gem.find_batch("no-such-name") is None
    assert env.gem.calls[("batches.create", "200")] == 1
    await env.gem.delete_file(f["name"])
    await env.gem.delete_file(f["name"])  # already gone: fine


async def test_upload_of_a_byte_range(env: Env, tmp_path: Path) -> None:
    # A canonical input is submitted straight from its file: the upload carries exactly the
    # bytes of the part's range (here lines 3-5 of 8), through the SDK's IO upload path.
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(li).encode() + b"\n" for li in lines_for(8)]
    src.write_bytes(b"".join(lines))
    start = len(b"".join(lines[:2]))
    end = start + len(b"".join(lines[2:5]))
    f = await env.gem.upload_file(src, display_name="in", span=(start, end))
    assert int(f["sizeBytes"]) == end - start
    op = await env.gem.create_file_job(
        model=MODEL, file_name=f["name"], display_name="dn-range", embed=False
    )
    done = await wait_done(env.gem, op["name"])
    out = tmp_path / "out.jsonl"
    await env.gem.download_file(done["metadata"]["output"]["responsesFile"], out)
    keys = {orjson.loads(line)["key"] for line in out.read_bytes().splitlines()}
    assert keys == {"k2", "k3", "k4"}


def test_file_window_reads_only_its_range(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"0123456789")
    with FileWindow(src, 2, 7) as w:
        assert w.seek(0, os.SEEK_END) == 5 and w.tell() == 5
        w.seek(0)
        assert w.read(3) == b"234" and w.read() == b"56" and w.read() == b""
    with FileWindow(src, 2, 7) as w:
        src.write_bytes(b"0123")  # shrank after the parts were planned
        with pytest.raises(OSError, match="shorter"):
            w.read()


async def test_inline_create_keeps_every_field(env: Env) -> None:
    request = {
        "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        "generationConfig": {"temperature": 0.3, "responseMimeType": "application/json"},
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        "tools": [{"googleSearch": {}}],
        "generation_config_snake": {"x": 1},
        "someFutureField": {"nested": [1, 2, {"deep": True}]},
    }
    op = await env.gem.create_inline_job(
        model=MODEL, requests=[{"key": 7, "request": request}], display_name="dn-inline"
    )
    jid = op["name"].removeprefix("batches/")
    stored = (env.emu.store.root / "batches" / f"{jid}.in.jsonl").read_bytes()
    (item,) = [orjson.loads(line) for line in stored.splitlines()]
    assert item == {"request": request, "metadata": {"key": "7"}}  # every field, string key
    done = await wait_done(env.gem, op["name"])
    (resp,) = done["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert resp["metadata"] == {"key": "7"}


async def test_error_mapping(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(lines_for(1)[0]) + "\n")
    f = await env.gem.upload_file(src, display_name="in")

    # An unknown model: permanent, through the SDK path and the raw path; the key is redacted.
    bad_model = f"gemini-unknown-{KEY}"
    with pytest.raises(ApiError) as ei:
        await env.gem.create_file_job(
            model=bad_model, file_name=f["name"], display_name="x1", embed=False
        )
    assert ei.value.kind == "permanent" and ei.value.http_code == 404
    assert KEY not in str(ei.value) and KEY not in repr(ei.value.to_json())
    assert "[redacted]" in str(ei.value)
    with pytest.raises(ApiError) as ei:
        await env.gem.create_inline_job(model=bad_model, requests=lines_for(1), display_name="x2")
    assert ei.value.kind == "permanent" and ei.value.status == "NOT_FOUND"
    assert KEY not in str(ei.value)

    op = await env.gem.create_file_job(
        model=MODEL, file_name=f["name"], display_name="x3", embed=False
    )
    env.emu.fail_next("batches.get", "429")
    with pytest.raises(ApiError) as ei:
        await env.gem.get_batch(op["name"])
    assert ei.value.kind == "transient" and ei.value.http_code == 429
    env.emu.fail_next("batches.get", "drop")
    with pytest.raises(ApiError) as ei:
        await env.gem.get_batch(op["name"])
    assert ei.value.kind == "transient"  # a read may simply be repeated
    env.emu.fail_next("batches.get", "503")
    with pytest.raises(ApiError) as ei:
        await env.gem.get_batch(op["name"])
    assert ei.value.kind == "transient"
    with pytest.raises(ApiError) as ei:
        await env.gem.get_batch("batches/" + "0" * 36)
    assert ei.value.kind == "permanent" and ei.value.http_code == 404
    with pytest.raises(ApiError) as ei:  # not of the id form (evidence §1.8)
        await env.gem.get_batch("batches/nope")
    assert ei.value.kind == "permanent" and ei.value.http_code == 400
    assert ei.value.message == "Could not parse the batch name"
    assert env.gem.calls[("batches.get", "429")] == 1
    assert env.gem.calls[("batches.get", "dropped")] == 1


@pytest.mark.parametrize("fault", ["create_then_503", "create_then_drop"])
@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_create_fault_is_ambiguous_and_not_retried(
    env: Env, tmp_path: Path, fault: str, mode: str
) -> None:
    env.emu.fail_next("batches.create", fault)
    name = f"dn-{fault}-{mode}"
    with pytest.raises(ApiError) as ei:
        if mode == "file":
            src = tmp_path / "in.jsonl"
            src.write_text(json.dumps(lines_for(1)[0]) + "\n")
            f = await env.gem.upload_file(src, display_name="in")
            await env.gem.create_file_job(
                model=MODEL, file_name=f["name"], display_name=name, embed=False
            )
        else:
            await env.gem.create_inline_job(model=MODEL, requests=lines_for(2), display_name=name)
    assert ei.value.kind == "ambiguous"
    # Exactly one create reached the server (no SDK/aiohttp implicit resend), and it exists.
    assert env.emu.stats["creates_by_display_name"] == {name: 1}
    assert env.emu.stats["calls"]["batches.create"] == 1
    assert await env.gem.find_batch(name) is not None


async def test_wrong_key_is_permanent_and_not_echoed(env: Env) -> None:
    other = GeminiClient(env.ctx.cfg, "wrong-key-123456", base_url=env.emu.url)
    try:
        with pytest.raises(ApiError) as ei:
            await other.get_batch("batches/x")
        assert ei.value.kind == "permanent" and ei.value.http_code == 400
        assert "wrong-key-123456" not in str(ei.value)
    finally:
        await other.aclose()


async def test_connect_error_is_transient(env: Env) -> None:
    dead = GeminiClient(env.ctx.cfg, KEY, base_url="http://127.0.0.1:9")
    try:
        with pytest.raises(ApiError) as ei:
            await dead.create_inline_job(model=MODEL, requests=lines_for(1), display_name="x")
        assert ei.value.kind == "transient"
    finally:
        await dead.aclose()


async def _finished_results_file(env: Env, tmp_path: Path, n: int) -> str:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(li) + "\n" for li in lines_for(n)))
    f = await env.gem.upload_file(src, display_name="in")
    op = await env.gem.create_file_job(
        model=MODEL, file_name=f["name"], display_name="dn-dl", embed=False
    )
    done = await wait_done(env.gem, op["name"])
    return str(done["metadata"]["output"]["responsesFile"])


@pytest.mark.parametrize(("fault", "outcome"), [("drop", "dropped"), ("503", "503")])
async def test_download_faults_are_transient(
    env: Env, tmp_path: Path, fault: str, outcome: str
) -> None:
    # Downloads go through the SDK's aiohttp transport: its errors are classified too. (aiohttp
    # sends a GET again once by itself when a kept-alive connection drops: fine for a read.)
    name = await _finished_results_file(env, tmp_path, 3)
    out = tmp_path / "out.jsonl"
    env.emu.fail_next("files.download", fault, count=2 if fault == "drop" else 1)
    with pytest.raises(ApiError) as ei:
        await env.gem.download_file(name, out)
    assert ei.value.kind == "transient" and not out.exists()
    assert env.gem.calls[("files.download", outcome)] == 1
    await env.gem.download_file(name, out)  # the next attempt starts afresh
    assert len(out.read_bytes().splitlines()) == 3


async def test_download_from_nowhere_is_transient(env: Env, tmp_path: Path) -> None:
    dead = GeminiClient(env.ctx.cfg, KEY, base_url="http://127.0.0.1:9")
    try:
        with pytest.raises(ApiError) as ei:
            await dead.download_file("files/x", tmp_path / "out.jsonl")
        assert ei.value.kind == "transient"
        assert dead.calls[("files.download", "connect_error")] == 1
    finally:
        await dead.aclose()


@pytest.mark.parametrize("how", ["stalls", "is_cut_short"])
async def test_download_that_stalls_or_is_cut_short(tmp_path: Path, how: str) -> None:
    # A real HTTP server that sends the start of a 1 MB body, then stops sending (the download
    # fails once no data has come for [api] timeout) or closes the connection.
    release = anyio.Event()

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        resp = aiohttp.web.StreamResponse(headers={"Content-Length": str(1 << 20)})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        if how == "stalls":
            await release.wait()
        else:
            assert request.transport is not None
            request.transport.close()
        return resp

    app = aiohttp.web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = rh.make_cfg(tmp_path, api={"timeout": 0.5})
    gem = GeminiClient(cfg, KEY, base_url=f"http://127.0.0.1:{port}")
    out = tmp_path / "out.jsonl"
    try:
        with anyio.fail_after(10), pytest.raises(ApiError) as ei:
            await gem.download_file("files/x", out)
        assert ei.value.kind == "transient" and not out.exists()
        assert KEY not in str(ei.value)
        outcome = "timeout" if how == "stalls" else "dropped"
        assert gem.calls[("files.download", outcome)] == 1, gem.calls
    finally:
        release.set()
        await gem.aclose()
        await runner.cleanup()


async def test_rate_limiter_caps_calls_per_second() -> None:
    limiter = RateLimiter(50, burst=1)
    start = anyio.current_time()
    for _ in range(11):
        await limiter.acquire()
    assert anyio.current_time() - start >= 10 / 50 * 0.95
