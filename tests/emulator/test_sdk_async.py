"""The real async google-genai SDK (aiohttp default, and httpx2) against the in-process emulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx2
import pytest
from google import genai
from google.genai import errors, types

from daemon.emulator import Emulator
from tests.emulator.helpers import KEY


async def wait_done(client: genai.Client, name: str, timeout: float = 10) -> types.BatchJob:
    with anyio.fail_after(timeout):
        while not (job := await client.aio.batches.get(name=name)).done:
            await anyio.sleep(0.05)
    return job


@pytest.fixture(params=["aiohttp", "httpx2"])
async def aclient(
    request: pytest.FixtureRequest, emulator: Emulator
) -> AsyncIterator[genai.Client]:
    extra: dict = {}
    hc = None
    if request.param == "httpx2":
        hc = httpx2.AsyncClient(timeout=30)
        extra["httpx_async_client"] = hc
    client = genai.Client(
        api_key=KEY,
        http_options=types.HttpOptions(base_url=emulator.url, api_version="v1beta", **extra),
    )
    try:
        yield client
    finally:
        await client.aio.aclose()
        if hc is not None:
            await hc.aclose()


async def test_async_file_roundtrip(
    aclient: genai.Client, emulator: Emulator, tmp_path: Path
) -> None:
    src = tmp_path / "in.jsonl"
    n = 20
    with src.open("w") as f:
        for i in range(n):
            req = {
                "contents": [{"parts": [{"text": f"hello {i}"}]}],
                "generation_config": {"temperature": 0.1},
            }
            f.write(json.dumps({"key": f"k{i}", "request": req}) + "\n")
    up = await aclient.aio.files.upload(file=str(src), config={"mime_type": "application/jsonl"})
    assert up.name
    job = await aclient.aio.batches.create(
        model="gemini-2.5-flash", src=up.name, config={"display_name": "a"}
    )
    assert job.name
    job = await wait_done(aclient, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.dest and job.dest.file_name
    dest = tmp_path / "out.jsonl"
    await aclient.aio.files.download(file=job.dest.file_name, destination=str(dest))
    lines = [json.loads(x) for x in dest.read_text().splitlines()]
    keys = [x["key"] for x in lines]
    assert sorted(keys) == sorted(f"k{i}" for i in range(n))
    assert keys != [f"k{i}" for i in range(n)], "results are shuffled by default"
    for line in lines:
        text = line["response"]["candidates"][0]["content"]["parts"][0]["text"]
        assert text == f"echo: hello {line['key'][1:]}"


async def test_async_inline_list_cancel_delete(aclient: genai.Client, emulator: Emulator) -> None:
    src = [{"contents": f"q{i}", "metadata": {"key": f"m{i}"}} for i in range(3)]
    job = await aclient.aio.batches.create(model="gemini-2.5-flash", src=src)
    assert job.name
    done = await wait_done(aclient, job.name)
    assert done.dest and done.dest.inlined_responses
    got = {
        r.metadata["key"]: r.response.text
        for r in done.dest.inlined_responses
        if r.metadata and r.response
    }
    assert got == {f"m{i}": f"echo: q{i}" for i in range(3)}

    emulator.settings.pending_seconds = 60
    slow = await aclient.aio.batches.create(model="gemini-2.5-flash", src=src)
    assert slow.name
    names = [j.name async for j in await aclient.aio.batches.list(config={"page_size": 1})]
    assert names == [slow.name, job.name]
    await aclient.aio.batches.cancel(name=slow.name)
    assert (
        await aclient.aio.batches.get(name=slow.name)
    ).state == types.JobState.JOB_STATE_CANCELLED
    await aclient.aio.batches.delete(name=slow.name)
    with pytest.raises(errors.ClientError) as e:
        await aclient.aio.batches.get(name=slow.name)
    assert e.value.code == 404
