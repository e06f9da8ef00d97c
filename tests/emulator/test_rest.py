"""Raw REST against the in-process emulator: wire shapes the SDK hides, upload edge cases, persistence."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from daemon.emulator import Emulator, EmulatorSettings
from tests.emulator.helpers import KEY

H = {"x-goog-api-key": KEY}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def upload(
    http: aiohttp.ClientSession, url: str, data: bytes, meta: dict[str, Any]
) -> dict[str, Any]:
    headers = {**H, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
    async with http.post(f"{url}/upload/v1beta/files", json={"file": meta}, headers=headers) as r:
        assert r.status == 200
        upload_url = r.headers["X-Goog-Upload-URL"]
    assert upload_url.startswith(url) and "upload_id=" in upload_url
    cmd = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
    async with http.post(upload_url, data=data, headers=cmd) as r:
        assert r.status == 200 and r.headers["X-Goog-Upload-Status"] == "final"
        return (await r.json())["file"]


async def wait_op(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    with anyio.fail_after(10):
        while True:
            async with http.get(f"{url}/v1beta/{name}", headers=H) as r:
                op = await r.json()
            if op.get("done"):
                return op
            await anyio.sleep(0.05)


async def test_resumable_upload_offsets(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    url = emulator.url
    headers = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
    start = {"file": {"displayName": "camel", "mimeType": "jsonl", "sizeBytes": "10"}}
    async with http.post(f"{url}/upload/v1/files?key={KEY}", json=start, headers=headers) as r:
        assert r.status == 200 and r.headers["X-Goog-Upload-Status"] == "active"
        up = r.headers["X-Goog-Upload-URL"]
    for _ in range(2):  # a repeated chunk is idempotent
        h = {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"}
        async with http.post(up, data=b"01234", headers=h) as r:
            assert r.status == 200 and r.headers["X-Goog-Upload-Status"] == "active"
    h = {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "7"}
    async with http.post(up, data=b"789", headers=h) as r:  # a gap is refused
        assert r.status == 400 and r.headers["X-Goog-Upload-Status"] == "final"
        assert (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
    h = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "5"}
    async with http.post(up, data=b"56789", headers=h) as r:
        assert r.headers["X-Goog-Upload-Status"] == "final"
        f = (await r.json())["file"]
    assert f["displayName"] == "camel" and f["mimeType"] == "jsonl" and f["sizeBytes"] == "10"
    assert f["source"] == "UPLOADED" and f["state"] == "ACTIVE" and "downloadUri" not in f
    assert len(f["name"]) == len("files/") + 12
    created = datetime.fromisoformat(f["createTime"])
    assert (datetime.fromisoformat(f["expirationTime"]) - created).total_seconds() == 48 * 3600
    async with http.get(f"{url}/v1/{f['name']}:download?alt=media", headers=H) as r:
        assert await r.read() == b"0123456789"


async def test_operation_shapes_and_bare_lines(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    url = emulator.url
    emulator.settings.shuffle_results = False
    emulator.settings.file_id_limit = False  # to read the generated file's record
    lines = [
        {"key": "a", "request": {"contents": [{"parts": [{"text": "one"}]}]}},
        {"contents": [{"parts": [{"text": "bare"}]}]},
        {"key": "c", "request": {"contents": [{"parts": [{"text": "x [[error:13]]"}]}]}},
    ]
    f = await upload(
        http,
        url,
        b"".join(orjson.dumps(x) + b"\n" for x in lines),
        {"mime_type": "application/jsonl"},
    )
    body = {"batch": {"display_name": "raw", "input_config": {"file_name": f["name"]}}}
    async with http.post(
        f"{url}/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body, headers=H
    ) as r:
        assert r.status == 200
        op = await r.json()
    meta = op["metadata"]
    jid = op["name"].split("/")[1]
    assert re.fullmatch(r"[a-z0-9]{36}", jid)
    assert (
        meta["@type"].endswith("GenerateContentBatch")
        and meta["model"] == "models/gemini-2.5-flash"
    )
    assert meta["state"] == "BATCH_STATE_PENDING" and "done" not in op
    assert meta["batchStats"] == {"requestCount": "3", "pendingRequestCount": "3"}
    assert meta["inputConfig"] == {"fileName": f["name"]} and meta["displayName"] == "raw"

    op = await wait_op(http, url, op["name"])
    meta = op["metadata"]
    assert meta["state"] == "BATCH_STATE_SUCCEEDED" and "endTime" in meta
    assert meta["batchStats"] == {
        "requestCount": "3",
        "successfulRequestCount": "2",
        "failedRequestCount": "1",
    }
    assert meta["output"] == {"responsesFile": f"files/batch-{jid}"}
    assert op["response"]["responsesFile"] == f"files/batch-{jid}"
    async with http.get(f"{url}/v1beta/files/batch-{jid}", headers=H) as r:
        out = await r.json()
    assert out["source"] == "GENERATED" and out["mimeType"] == "application/jsonl"
    async with http.get(out["downloadUri"], headers=H) as r:
        got = [orjson.loads(x) for x in (await r.read()).splitlines()]
    assert (
        got[0]["key"] == "a"
        and got[0]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "echo: one"
    )
    assert (
        "key" not in got[1] and "response" in got[1]
    )  # bare request line: no key (UNVERIFIED real behaviour)
    # a google.rpc.Status: code + message, no `status` string (that is only in HTTP envelopes)
    assert got[2] == {"key": "c", "error": {"code": 13, "message": got[2]["error"]["message"]}}

    async with http.get(f"{url}/v1beta/batches/{'0' * 36}", headers=H) as r:
        assert r.status == 404
        assert set((await r.json())["error"]) == {"code", "message", "status"}
    async with http.post(f"{url}/v1beta/batches/{jid}:cancel", headers=H) as r:
        assert r.status == 200 and await r.json() == {}  # cancel of a finished job: a no-op
    async with http.delete(f"{url}/v1beta/batches/{jid}", headers=H) as r:
        assert r.status == 200 and await r.json() == {}


async def test_running_progress_counts(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.settings.pending_seconds, emulator.settings.running_seconds = 0.0, 2.0
    reqs = [
        {"request": {"contents": [{"parts": [{"text": f"t{i}"}]}]}, "metadata": {"key": str(i)}}
        for i in range(10)
    ]
    body = {"batch": {"inputConfig": {"requests": {"requests": reqs}}}}
    async with http.post(
        f"{emulator.url}/v1/models/gemini-2.5-flash:batchGenerateContent", json=body, headers=H
    ) as r:
        op = await r.json()
    assert op["metadata"]["batchStats"]["requestCount"] == "10"
    seen = set()
    with anyio.fail_after(10):
        while "done" not in op:
            await anyio.sleep(0.1)
            async with http.get(f"{emulator.url}/v1/{op['name']}", headers=H) as r:
                op = await r.json()
            stats = op["metadata"]["batchStats"]
            assert all(isinstance(v, str) and v != "0" for v in stats.values())
            seen.add(stats.get("successfulRequestCount"))
    assert len(seen) >= 3, seen  # progress grew in steps while RUNNING


async def test_state_survives_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    data = tmp_path / "data"
    settings = EmulatorSettings(pending_seconds=0.05, running_seconds=0.1)
    async with Emulator(data_dir=data, settings=settings) as emu:
        f = await upload(
            http, emu.url, b'{"key": "k", "request": {"contents": "hi"}}\n', {"mime_type": "jsonl"}
        )
        body = {"batch": {"inputConfig": {"fileName": f["name"]}}}
        async with http.post(
            f"{emu.url}/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body, headers=H
        ) as r:
            done_job = (await r.json())["name"]
        await wait_op(http, emu.url, done_job)
        emu.settings.pending_seconds = 0.5
        async with http.post(
            f"{emu.url}/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body, headers=H
        ) as r:
            pending_job = (await r.json())["name"]
    t0 = time.monotonic()
    async with Emulator(data_dir=data, settings=settings) as emu:
        async with http.get(f"{emu.url}/v1beta/{f['name']}", headers=H) as r:
            assert r.status == 200
        op = await wait_op(http, emu.url, done_job)
        assert op["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
        op = await wait_op(http, emu.url, pending_job)
        assert op["metadata"]["state"] == "BATCH_STATE_SUCCEEDED" and time.monotonic() - t0 < 5
        assert emu.stats["jobs"] == 2 and emu.stats["files"] == 3
