"""Cancelled jobs, best-effort cancels and late or bare results, as the real API shows them
(evidence §1.6, §1.19): raw REST against the in-process emulator."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from daemon.emulator import Emulator
from tests.emulator.helpers import KEY

H = {"x-goog-api-key": KEY}
CREATE = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def requests(*texts: str) -> list[dict[str, Any]]:
    return [
        {"request": {"contents": [{"parts": [{"text": t}]}]}, "metadata": {"key": f"k{i}"}}
        for i, t in enumerate(texts)
    ]


async def create_inline(http: aiohttp.ClientSession, url: str, *texts: str) -> dict[str, Any]:
    body = {"batch": {"inputConfig": {"requests": {"requests": requests(*texts)}}}}
    async with http.post(url + CREATE, json=body, headers=H) as r:
        assert r.status == 200
        return await r.json()


async def create_file(http: aiohttp.ClientSession, url: str, *texts: str) -> dict[str, Any]:
    data = b"".join(
        orjson.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": t}]}]}}) + b"\n"
        for i, t in enumerate(texts)
    )
    start = {**H, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
    async with http.post(f"{url}/upload/v1beta/files", json={"file": {}}, headers=start) as r:
        upload_url = r.headers["X-Goog-Upload-URL"]
    cmd = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
    async with http.post(upload_url, data=io.BytesIO(data), headers=cmd) as r:
        name = (await r.json())["file"]["name"]
    body = {"batch": {"inputConfig": {"fileName": name}}}
    async with http.post(url + CREATE, json=body, headers=H) as r:
        assert r.status == 200
        return await r.json()


async def get(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1beta/{name}", headers=H) as r:
        assert r.status == 200
        return await r.json()


async def cancel(http: aiohttp.ClientSession, url: str, name: str) -> None:
    async with http.post(f"{url}/v1beta/{name}:cancel", headers=H) as r:
        assert r.status == 200 and await r.json() == {}


async def until_done(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while not (op := await get(http, url, name)).get("done"):
            await anyio.sleep(0.05)
    return op


async def test_cancelled_job_shape(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 600.0})
    op = await create_inline(http, emulator.url, "a", "b", "c")
    jid = op["name"].removeprefix("batches/")
    await cancel(http, emulator.url, op["name"])
    got = await get(http, emulator.url, op["name"])  # terminal at once
    assert got["done"] is True and got["metadata"]["state"] == "BATCH_STATE_CANCELLED"
    assert got["error"] == {"code": 13, "message": f"Batch {jid} failed without error."}
    assert "response" not in got and "output" not in got["metadata"]
    stats = got["metadata"]["batchStats"]
    assert stats["requestCount"] == "3" and stats["pendingRequestCount"] == "3"
    await cancel(http, emulator.url, op["name"])  # cancel of a finished job: 200, no change
    assert await get(http, emulator.url, op["name"]) == got


async def test_cancel_error_code_setting(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.settings.update({"running_seconds": 600.0, "cancel_error_code": 1})
    op = await create_inline(http, emulator.url, "a")
    await cancel(http, emulator.url, op["name"])
    emulator.settings.update({"cancel_error_code": 13})  # fixed at the cancel, not at each get
    assert (await get(http, emulator.url, op["name"]))["error"]["code"] == 1


async def test_cancel_of_a_succeeded_job_is_a_noop(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    op = await until_done(
        http, emulator.url, (await create_inline(http, emulator.url, "a"))["name"]
    )
    assert op["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    await cancel(http, emulator.url, op["name"])
    after = await get(http, emulator.url, op["name"])
    assert after["metadata"]["state"] == "BATCH_STATE_SUCCEEDED" and "error" not in after


@pytest.mark.parametrize("mode", ["inline", "file"])
async def test_ignore_cancel_marker_runs_on(
    emulator: Emulator, http: aiohttp.ClientSession, mode: str
) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 0.5})
    make = create_inline if mode == "inline" else create_file
    op = await make(http, emulator.url, "plain", "stubborn [[ignore_cancel]]")
    await cancel(http, emulator.url, op["name"])  # acknowledged ...
    assert (await get(http, emulator.url, op["name"])).get("done") is None  # ... not done
    done = await until_done(http, emulator.url, op["name"])
    assert done["metadata"]["state"] == "BATCH_STATE_SUCCEEDED" and "error" not in done
    assert done["metadata"]["batchStats"]["successfulRequestCount"] == "2"
    out = done["response"]
    assert out.get("responsesFile") or len(out["inlinedResponses"]["inlinedResponses"]) == 2


async def test_results_file_delay(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.settings.update({"results_file_delay": 3600.0})
    op = await until_done(http, emulator.url, (await create_file(http, emulator.url, "a"))["name"])
    meta = op["metadata"]
    assert meta["state"] == "BATCH_STATE_SUCCEEDED" and op["done"] is True
    assert "output" not in meta and "responsesFile" not in op["response"]
    async with http.get(f"{emulator.url}/v1beta/batches", headers=H) as r:
        (listed,) = (await r.json())["operations"]
    assert "output" not in listed["metadata"]
    emulator.settings.update({"results_file_delay": 0.0})  # the delay ends: the file appears
    op = await get(http, emulator.url, op["name"])
    jid = op["name"].removeprefix("batches/")
    assert meta["endTime"] == op["metadata"]["endTime"]
    assert op["metadata"]["output"] == {"responsesFile": f"files/batch-{jid}"}
    assert op["response"]["responsesFile"] == f"files/batch-{jid}"


async def test_results_file_delay_leaves_inline_jobs_alone(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.settings.update({"results_file_delay": 3600.0})
    op = await until_done(
        http, emulator.url, (await create_inline(http, emulator.url, "a"))["name"]
    )
    assert len(op["response"]["inlinedResponses"]["inlinedResponses"]) == 1


async def test_drop_inline_metadata(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    op = await until_done(
        http, emulator.url, (await create_inline(http, emulator.url, "a", "b"))["name"]
    )
    items = op["response"]["inlinedResponses"]["inlinedResponses"]
    assert sorted(i["metadata"]["key"] for i in items) == ["k0", "k1"]
    emulator.settings.update({"drop_inline_metadata": True})
    items = (await get(http, emulator.url, op["name"]))["response"]["inlinedResponses"][
        "inlinedResponses"
    ]
    assert len(items) == 2 and all("metadata" not in i and "response" in i for i in items)


async def test_admin_force_succeeded_ends_a_long_job_now(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 600.0})
    op = await create_inline(http, emulator.url, "a", "b")
    url = f"{emulator.url}/__emulator/{op['name']}:force"
    async with http.post(url, json={"state": "SUCCEEDED"}) as r:
        assert r.status == 200
    done = await until_done(http, emulator.url, op["name"])
    assert done["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    assert len(done["response"]["inlinedResponses"]["inlinedResponses"]) == 2
    async with http.post(url, json={"state": "SUCCEEDED"}) as r:
        assert r.status == 400  # already terminal
