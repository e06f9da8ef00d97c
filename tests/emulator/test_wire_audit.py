"""Wire shapes checked against the real API (reference + public API schema), one test per finding."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from daemon.emulator import Emulator
from tests.emulator.helpers import KEY, wait_until
from tests.emulator.test_rest import upload, wait_op

H = {"x-goog-api-key": KEY}
GEN = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
EMB = "/v1beta/models/gemini-embedding-001:asyncBatchEmbedContent"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, *, data: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    kw: dict[str, Any] = {"data": io.BytesIO(data)} if data is not None else {"json": body}
    async with http.post(url, headers=H, **kw) as r:
        return r.status, await r.json()


def inline(*texts: str) -> dict[str, Any]:
    reqs = [
        {"request": {"contents": [{"parts": [{"text": t}]}]}, "metadata": {"key": f"k{i}"}}
        for i, t in enumerate(texts)
    ]
    return {"requests": {"requests": reqs}}


async def test_inline_embedding_output_is_inlined_responses(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    # EmbedContentBatchOutput has `inlinedResponses` (like GenerateContentBatchOutput); the SDK
    # renames it to inlined_embed_content_responses itself (_transformers.t_recv_batch_job_destination).
    reqs = [{"request": {"content": {"parts": [{"text": "a"}]}, "outputDimensionality": 3}}]
    body = {"batch": {"inputConfig": {"requests": {"requests": reqs}}}}
    status, op = await post(http, emulator.url + EMB, body)
    assert status == 200 and op["metadata"]["@type"].endswith(".v1main.EmbedContentBatch")
    op = await wait_op(http, emulator.url, op["name"])
    out = op["metadata"]["output"]
    assert list(out) == ["inlinedResponses"]
    (item,) = out["inlinedResponses"]["inlinedResponses"]
    assert len(item["response"]["embedding"]["values"]) == 3
    assert op["response"]["@type"].endswith(".v1main.EmbedContentBatchOutput")
    assert op["response"]["inlinedResponses"] == out["inlinedResponses"]


async def test_inline_error_is_rpc_status(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    status, op = await post(
        http, emulator.url + GEN, {"batch": {"inputConfig": inline("x [[error:13]]")}}
    )
    assert status == 200
    op = await wait_op(http, emulator.url, op["name"])
    (item,) = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert item["metadata"] == {"key": "k0"}
    assert set(item["error"]) == {"code", "message"} and item["error"]["code"] == 13


async def test_empty_lists_are_omitted(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    for path in ("/v1beta/files", "/v1beta/batches"):
        async with http.get(emulator.url + path, headers=H) as r:
            assert r.status == 200 and await r.json() == {}


def test_sdk_accepts_empty_lists(client: genai.Client) -> None:
    assert list(client.files.list()) == []
    assert list(client.batches.list(config={"page_size": 10})) == []


async def test_page_size_rules(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    for i in range(101):
        await upload(http, emulator.url, b"x", {"displayName": f"f{i}", "mimeType": "text/plain"})

    async def files(query: str) -> tuple[int, dict[str, Any]]:
        async with http.get(f"{emulator.url}/v1beta/files?{query}", headers=H) as r:
            return r.status, await r.json()

    status, body = await files("pageSize=0")  # 0 means the default, 10
    assert status == 200 and len(body["files"]) == 10 and body["nextPageToken"]
    status, body = await files("pageSize=500")  # coerced to the maximum, 100
    assert status == 200 and len(body["files"]) == 100 and body["nextPageToken"]
    status, body = await files(f"pageSize=100&pageToken={body['nextPageToken']}")
    assert status == 200 and len(body["files"]) == 1 and "nextPageToken" not in body
    status, body = await files("pageSize=-1")
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("batch_body", "at", "name"),
    [
        ({"batch": {"inputConfig": inline("a")}, "bogus": 1}, "", "bogus"),
        ({"batch": {"inputConfig": inline("a"), "displayname": "x"}}, "batch", "displayname"),
        (
            {"batch": {"inputConfig": {**inline("a"), "fileNames": "files/x"}}},
            "batch.input_config",
            "fileNames",
        ),
        (
            {"batch": {"inputConfig": {"requests": {"requests": [], "extra": 1}}}},
            "batch.input_config.requests",
            "extra",
        ),
        (
            {
                "batch": {
                    "inputConfig": {
                        "requests": {
                            "requests": [
                                {"request": {"contents": "a"}},
                                {"request": {"contents": "b"}, "key": "k"},
                            ]
                        }
                    }
                }
            },
            "batch.input_config.requests.requests[1]",
            "key",
        ),
    ],
)
async def test_unknown_envelope_field_is_rejected(
    emulator: Emulator, http: aiohttp.ClientSession, batch_body: Any, at: str, name: str
) -> None:
    status, body = await post(http, emulator.url + GEN, batch_body)
    where = f" at '{at}'" if at else ""
    text = f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.'
    assert status == 400
    assert body["error"]["status"] == "INVALID_ARGUMENT" and body["error"]["message"] == text
    (detail,) = body["error"]["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    expected = {"field": at, "description": text} if at else {"description": text}
    assert detail["fieldViolations"] == [expected]
    assert emulator.stats["jobs"] == 0


async def test_known_fields_in_both_spellings_and_priority(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    f = await upload(http, emulator.url, b'{"key": "a", "request": {"contents": "hi"}}\n', {})
    body = {
        "batch": {
            "display_name": "snake",
            "input_config": {"file_name": f["name"]},
            "priority": "7",
            "webhookConfig": {"uris": ["https://x/y"], "user_metadata": {"a": 1}},
        }
    }
    status, op = await post(http, emulator.url + GEN, body)
    assert status == 200, op
    assert op["metadata"]["priority"] == "7" and op["metadata"]["displayName"] == "snake"
    status, op = await post(http, emulator.url + GEN, {"batch": {"inputConfig": inline("a")}})
    assert status == 200 and "priority" not in op["metadata"]  # default 0 is omitted
    status, err = await post(
        http, emulator.url + GEN, {"batch": {"inputConfig": inline("a"), "priority": "high"}}
    )
    assert status == 400 and "batch.priority" in err["error"]["message"]


async def test_zero_size_bytes_is_omitted(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    f = await upload(http, emulator.url, b"", {"mimeType": "text/plain"})
    assert "sizeBytes" not in f
    g = await upload(http, emulator.url, b"abc", {"mimeType": "text/plain"})
    assert g["sizeBytes"] == "3"


async def test_create_body_over_20_mib_is_refused(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    big = "x" * (20 * 1024 * 1024)
    data = (
        b'{"batch": {"inputConfig": {"requests": {"requests": [{"request": {"contents": "%s"}}]}}}}'
        % big.encode()
    )
    status, body = await post(http, emulator.url + GEN, None, data=data)
    assert status == 400
    assert body["error"]["message"] == "Request payload size exceeds the limit: 20971520 bytes."
    assert emulator.stats["jobs"] == 0


def test_file_id_limit_is_on_by_default_as_issue_1759(
    sync_emulator: Emulator, client: genai.Client, tmp_path: Path
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"key": "a", "request": {"contents": "hi"}}\n')
    up = client.files.upload(file=str(src), config={"mime_type": "application/jsonl"})
    job = client.batches.create(model="gemini-2.5-flash", src=up.name or "")
    job = wait_until(lambda: (j := client.batches.get(name=job.name or "")).done and j)
    out = job.dest.file_name if job.dest else None
    assert out and len(out.removeprefix("files/")) == 42
    with pytest.raises(errors.ClientError) as e:
        client.files.get(name=out)
    assert e.value.code == 400 and "cannot be more than 40 characters" in (e.value.message or "")
    with pytest.raises(errors.ClientError):
        client.files.delete(name=out)
    assert b'"key":"a"' in client.files.download(file=out)  # the SDK's download path still works
    assert client.files.get(name=up.name or "").name == up.name  # 12-char ids are fine
    sync_emulator.settings.file_id_limit = False  # the deviation: production without the limit
    assert client.files.get(name=out).source == types.FileSource.GENERATED
