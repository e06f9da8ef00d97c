"""Job engine: big file jobs stream in a worker thread without blocking the server; 48 h expiry."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator

import aiohttp
import anyio
import orjson
import pytest

from daemon.emulator import Emulator, worker
from tests.emulator.helpers import KEY

H = {"x-goog-api-key": KEY}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def upload(http: aiohttp.ClientSession, url: str, data: bytes) -> str:
    headers = {**H, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
    async with http.post(
        f"{url}/upload/v1beta/files", json={"file": {"mime_type": "jsonl"}}, headers=headers
    ) as r:
        upload_url = r.headers["X-Goog-Upload-URL"]
    cmd = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
    async with http.post(upload_url, data=io.BytesIO(data), headers=cmd) as r:
        return (await r.json())["file"]["name"]


async def test_big_file_job_streams_without_blocking(
    emulator: Emulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "BUCKET_BYTES", 256 * 1024)  # exercise the bucketed shuffle
    emulator.settings.running_seconds = 0.0
    n = 40_000
    lines = (
        orjson.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"p{i}"}]}]}})
        for i in range(n)
    )
    name = await upload(http, emulator.url, b"\n".join(lines) + b"\n")
    body = {"batch": {"inputConfig": {"fileName": name}}}
    url = emulator.url
    async with http.post(
        f"{url}/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body, headers=H
    ) as r:
        op = await r.json()
    worst = 0.0
    with anyio.fail_after(60):
        while "done" not in op:
            t0 = time.monotonic()
            async with http.get(f"{url}/v1beta/{op['name']}", headers=H) as r:
                op = await r.json()
            worst = max(worst, time.monotonic() - t0)
            await anyio.sleep(0.02)
    assert worst < 0.5, f"a get took {worst:.2f}s while the worker ran"
    assert op["metadata"]["batchStats"] == {
        "requestCount": str(n),
        "successfulRequestCount": str(n),
    }
    keys = []
    async with http.get(
        f"{url}/v1beta/{op['response']['responsesFile']}:download?alt=media", headers=H
    ) as r:
        async for raw in r.content:
            line = orjson.loads(raw)
            text = line["response"]["candidates"][0]["content"]["parts"][0]["text"]
            assert text == f"echo: p{line['key'][1:]}"
            keys.append(line["key"])
    assert len(keys) == n and len(set(keys)) == n and keys[:100] != [f"k{i}" for i in range(100)]


async def test_jobs_expire_after_48h(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.settings.pending_seconds = 3600
    body = {"batch": {"inputConfig": {"requests": {"requests": [{"request": {"contents": "x"}}]}}}}
    async with http.post(
        f"{emulator.url}/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body, headers=H
    ) as r:
        op = await r.json()
    jid = op["name"].split("/")[1]
    emulator.store.jobs[jid]["create"] -= 49 * 3600  # as if created 49 h ago (createTime is stored)
    async with http.get(f"{emulator.url}/v1beta/{op['name']}", headers=H) as r:
        op = await r.json()
    assert op["metadata"]["state"] == "BATCH_STATE_EXPIRED" and op["done"] is True
    assert op["error"]["code"] == 4 and "output" not in op["metadata"]
    assert emulator.stats["active_jobs"] == 0
