"""The emulator answers as the real API does (real-api-evidence.md §1.8-1.18): missing files,
malformed batch names, create-time line errors, per-key visibility, the 429 body, result lines."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from daemon.emulator import Emulator, EmulatorSettings
from daemon.emulator.wire import QUOTA_HELP, QUOTA_MESSAGE

GEN = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
LINE = {"key": "a", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[Emulator]:
    settings = EmulatorSettings(pending_seconds=0.05, running_seconds=0.1)  # any key accepted
    async with Emulator(data_dir=tmp_path / "emu", settings=settings) as e:
        yield e


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str = "A", **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, headers={"x-goog-api-key": key}, **kw) as r:
        raw = await r.read()
        return r.status, (orjson.loads(raw) if raw and "json" in r.content_type else {})


async def upload(http: aiohttp.ClientSession, url: str, data: bytes, key: str = "A") -> str:
    headers = {
        "x-goog-api-key": key,
        "X-Goog-Upload-Protocol": "resumable",
        "X-Goog-Upload-Command": "start",
    }
    async with http.post(f"{url}/upload/v1beta/files", json={"file": {}}, headers=headers) as r:
        up = r.headers["X-Goog-Upload-URL"]
    cmd = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
    async with http.post(up, data=io.BytesIO(data), headers=cmd) as r:
        return str((await r.json())["file"]["name"])


async def create(
    http: aiohttp.ClientSession, url: str, file_name: str, key: str = "A"
) -> tuple[int, dict[str, Any]]:
    body = {"batch": {"inputConfig": {"fileName": file_name}}}
    return await call(http, "POST", url + GEN, key, json=body)


async def wait_done(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    with anyio.fail_after(10):
        while True:
            _, op = await call(http, "GET", f"{url}/v1beta/{name}")
            if op.get("done"):
                return op
            await anyio.sleep(0.02)


async def test_missing_file_is_403_or_404_by_setting(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    url = emu.url
    name = await upload(http, url, orjson.dumps(LINE) + b"\n")
    assert (await call(http, "DELETE", f"{url}/v1beta/{name}"))[0] == 200
    for method, path in (("GET", name), ("DELETE", name), ("GET", f"{name}:download")):
        status, body = await call(http, method, f"{url}/v1beta/{path}")
        fid = name.removeprefix("files/")
        assert (status, body["error"]["status"]) == (403, "PERMISSION_DENIED"), path
        assert body["error"]["message"] == (
            f"You do not have permission to access the File {fid} or it may not exist."
        )
    # a create from a missing file names the entity (L4J-IT)
    status, body = await create(http, url, name)
    assert status == 404 and "Requested entity was not found" in body["error"]["message"]
    emu.settings.missing_file_status = 404
    status, body = await call(http, "GET", f"{url}/v1beta/{name}")
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND")
    with pytest.raises(ValueError):
        emu.settings.update({"missing_file_status": 500})


async def test_result_file_id_limit_and_download(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    url = emu.url
    _, op = await create(http, url, await upload(http, url, orjson.dumps(LINE) + b"\n"))
    out = (await wait_done(http, url, op["name"]))["response"]["responsesFile"]
    for method in ("GET", "DELETE"):
        status, body = await call(http, method, f"{url}/v1beta/{out}")
        assert status == 400 and "cannot be more than 40 characters" in body["error"]["message"]
    async with http.get(
        f"{url}/v1beta/{out}:download?alt=media", headers={"x-goog-api-key": "A"}
    ) as r:
        line = orjson.loads(await r.read())
    # result lines as captured (ELL-FIX): serviceTier in usage, a thoughtSignature on text parts
    assert line["response"]["usageMetadata"]["serviceTier"] == "SERVICE_TIER_STANDARD"
    part = line["response"]["candidates"][0]["content"]["parts"][0]
    assert part["text"] == "echo: hi" and isinstance(part["thoughtSignature"], str)


async def test_malformed_batch_name_cannot_be_parsed(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    url = emu.url
    for method, path in (
        ("GET", "batches/test-batch"),
        ("POST", "batches/test-batch:cancel"),
        ("DELETE", "batches/job-pending"),
    ):
        status, body = await call(http, method, f"{url}/v1beta/{path}")
        assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT", path
        assert body["error"]["message"] == "Could not parse the batch name"
    status, body = await call(http, "GET", f"{url}/v1beta/batches/{'x' * 36}")
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND")


async def test_bad_lines_fail_the_create(emu: Emulator, http: aiohttp.ClientSession) -> None:
    url = emu.url
    bad = {"key": "b", "request": {"contents": "x", "thinking_config": {"thinkingBudget": 1}}}
    data = b"\n".join(
        [
            orjson.dumps(LINE),
            b"",  # a blank line is skipped but counted
            orjson.dumps(bad),
            b"{not json",
            b"[1, 2]",
            orjson.dumps({"contents": "bare", "systemInstruction": {"parts": []}}),
            orjson.dumps({"key": "c", "request": LINE["request"], "extra": 1}),
        ]
    )
    name = await upload(http, url, data + b"\n")
    status, body = await create(http, url, name)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    col = orjson.dumps(bad).find(b'"thinking_config"') + 1
    lines = body["error"]["message"].split("\n")
    assert (
        lines[0]
        == f"Error on line 3: invalid JSON, near column {col}: no such field: 'thinking_config'"
    )
    assert [m.split(":")[0] for m in lines] == [
        "Error on line 3",
        "Error on line 4",
        "Error on line 5",
        "Error on line 7",
    ]
    assert lines[3].endswith("no such field: 'extra'")
    assert emu.stats["jobs"] == 0
    emu.settings.validate_input_at_create = False  # the old behaviour: per-line error output
    status, op = await create(http, url, name)
    assert status == 200
    assert (await wait_done(http, url, op["name"]))["metadata"]["batchStats"]["failedRequestCount"]


async def test_big_valid_file_is_accepted(
    emu: Emulator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Several read blocks (lines cut at block edges), all valid: the create succeeds."""
    line = orjson.dumps({"key": "k", "request": {"contents": "p" * 500}}) + b"\n"
    data = line * (20 * 1024 * 1024 // len(line))
    name = await upload(http, emu.url, data + b'{"key": "z", "request": {"oops": 1}}\n')
    status, body = await create(http, emu.url, name)
    n = data.count(b"\n") + 1
    assert status == 400 and body["error"]["message"].startswith(f"Error on line {n}: ")
    name = await upload(http, emu.url, data)
    t0 = time.monotonic()
    assert (await create(http, emu.url, name))[0] == 200
    print(f"create of {len(data) >> 20} MiB valid lines: {time.monotonic() - t0:.2f} s")


async def test_scope_by_key(emu: Emulator, http: aiohttp.ClientSession) -> None:
    url = emu.url
    emu.settings.scope_by_key = True
    name = await upload(http, url, orjson.dumps(LINE) + b"\n", key="A")
    assert (await call(http, "GET", f"{url}/v1beta/{name}", "B"))[0] == 403
    assert (await create(http, url, name, key="B"))[0] == 404
    _, op = await create(http, url, name, key="A")
    job = op["name"]
    for method, path in (("GET", job), ("POST", f"{job}:cancel"), ("DELETE", job)):
        status, body = await call(http, method, f"{url}/v1beta/{path}", "B")
        assert (status, body["error"]["status"]) == (404, "NOT_FOUND"), path
    assert await call(http, "GET", f"{url}/v1beta/batches", "B") == (200, {})
    _, listed = await call(http, "GET", f"{url}/v1beta/batches", "A")
    assert [o["name"] for o in listed["operations"]] == [job]
    out = (await wait_done(http, url, job))["response"]["responsesFile"]
    assert (await call(http, "GET", f"{url}/v1beta/{out}:download?alt=media", "B"))[0] == 403
    assert (await call(http, "GET", f"{url}/v1beta/{out}:download?alt=media", "A"))[0] == 200
    emu.settings.scope_by_key = False
    assert (await call(http, "GET", f"{url}/v1beta/{job}", "B"))[0] == 200


async def test_429_carries_the_help_detail(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.fail_next("batches.list", "429")
    status, body = await call(http, "GET", f"{emu.url}/v1beta/batches")
    assert status == 429
    assert body == {
        "error": {
            "code": 429,
            "message": QUOTA_MESSAGE,
            "status": "RESOURCE_EXHAUSTED",
            "details": [QUOTA_HELP],
        }
    }
    assert QUOTA_HELP["links"][0]["url"] == "https://ai.google.dev/gemini-api/docs/rate-limits"
    emu.settings.max_active_jobs = 0
    name = await upload(http, emu.url, orjson.dumps(LINE) + b"\n")
    status, body = await create(http, emu.url, name)
    assert status == 429 and body["error"]["details"] == [QUOTA_HELP]


def test_cli_flags_for_the_deviations() -> None:
    import argparse

    from daemon.emulator.cli import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = settings_from_args(parser.parse_args([]))
    assert isinstance(default, EmulatorSettings)
    assert (default.file_id_limit, default.missing_file_status) == (True, 403)
    assert (default.validate_input_at_create, default.scope_by_key) == (True, False)
    args = "--no-file-id-limit --missing-file-status 404 --no-validate-at-create --scope-by-key"
    s = settings_from_args(parser.parse_args(args.split()))
    assert isinstance(s, EmulatorSettings)
    assert (s.file_id_limit, s.missing_file_status) == (False, 404)
    assert (s.validate_input_at_create, s.scope_by_key) == (False, True)
