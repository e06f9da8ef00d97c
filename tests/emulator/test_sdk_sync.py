"""The real sync google-genai SDK against the emulator over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from google import genai
from google.genai import errors, types

from daemon.emulator import Emulator
from tests.emulator.helpers import KEY, make_client, wait_until


def write_jsonl(path: Path, n: int, extra: str = "") -> Path:
    with path.open("w") as f:
        for i in range(n):
            req = {"contents": [{"parts": [{"text": f"prompt {i}{extra}"}], "role": "user"}]}
            f.write(json.dumps({"key": f"k{i}", "request": req}) + "\n")
    return path


def raw_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_done(client: genai.Client, name: str) -> types.BatchJob:
    return wait_until(lambda: (job := client.batches.get(name=name)).done and job)


def read_results(client: genai.Client, file_name: str, dest: Path) -> dict[str, dict]:
    client.files.download(file=file_name, destination=str(dest))
    lines = [json.loads(line) for line in dest.read_text().splitlines()]
    return {line["key"]: line for line in lines}


@pytest.mark.parametrize("api_version", ["v1beta", None])
def test_file_job_roundtrip(
    sync_emulator: Emulator, tmp_path: Path, api_version: str | None
) -> None:
    client = make_client(sync_emulator.url, api_version)
    sync_emulator.settings.file_id_limit = False  # to read the generated file's record
    src = write_jsonl(tmp_path / "in.jsonl", 5)
    uploaded = client.files.upload(
        file=str(src), config={"mime_type": "application/jsonl", "display_name": "my-input"}
    )
    assert uploaded.name and uploaded.name.startswith("files/") and len(uploaded.name) == 6 + 12
    assert uploaded.size_bytes == src.stat().st_size
    assert uploaded.download_uri is None and uploaded.source == types.FileSource.UPLOADED
    assert client.files.get(name=uploaded.name).display_name == "my-input"

    job = client.batches.create(
        model="gemini-2.5-flash", src=uploaded.name, config={"display_name": "file-job"}
    )
    assert job.state == types.JobState.JOB_STATE_PENDING and job.name and len(job.name) == 8 + 36
    job = wait_done(client, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest and job.dest.file_name == f"files/batch-{job.name.split('/')[1]}"
    out = client.files.get(name=job.dest.file_name)
    assert out.source == types.FileSource.GENERATED and out.download_uri
    assert out.mime_type == "application/jsonl"

    results = read_results(client, job.dest.file_name, tmp_path / "out.jsonl")
    client.files.download(
        file=out, destination=str(tmp_path / "out2.jsonl")
    )  # a File object works too
    assert (tmp_path / "out2.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()
    assert sorted(results) == [f"k{i}" for i in range(5)]
    for i in range(5):
        raw = results[f"k{i}"]["response"]
        # as real lines (ELL-FIX); the SDK 3.6.1 model does not know the field (extra_forbidden)
        assert raw["usageMetadata"].pop("serviceTier") == "SERVICE_TIER_STANDARD"
        assert raw["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
        resp = types.GenerateContentResponse.model_validate(raw)
        assert resp.text == f"echo: prompt {i}"
        assert resp.usage_metadata and resp.usage_metadata.prompt_token_count
    assert sync_emulator.stats["creates_by_display_name"] == {"file-job": 1}
    # batchStats as the API spells it: int64 strings, "requestCount" for the total, zeros omitted
    code, op = raw_get(f"{sync_emulator.url}/v1beta/{job.name}?key={KEY}")
    assert code == 200
    assert op["metadata"]["batchStats"] == {"requestCount": "5", "successfulRequestCount": "5"}

    client.files.delete(name=uploaded.name)
    with pytest.raises(errors.ClientError) as e:
        client.files.get(name=uploaded.name)
    assert e.value.code == 403 and e.value.status == "PERMISSION_DENIED"


def test_inline_job_echoes_metadata(client: genai.Client) -> None:
    src = [
        {"contents": [{"parts": [{"text": f"q{i}"}], "role": "user"}], "metadata": {"key": f"r{i}"}}
        for i in range(4)
    ]
    src.append({"contents": "boom [[error:13]]", "metadata": {"key": "bad"}})
    job = client.batches.create(
        model="gemini-2.5-flash", src=src, config={"display_name": "inline"}
    )
    assert job.name
    job = wait_done(client, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest and job.dest.inlined_responses
    by_key = {r.metadata["key"]: r for r in job.dest.inlined_responses if r.metadata}
    assert sorted(by_key) == ["bad", "r0", "r1", "r2", "r3"]
    for i in range(4):
        resp = by_key[f"r{i}"].response
        assert resp and resp.text == f"echo: q{i}"
    bad = by_key["bad"]
    assert bad.response is None and bad.error and bad.error.code == 13


def test_image_model_returns_png(client: genai.Client) -> None:
    job = client.batches.create(
        model="gemini-2.5-flash-image",
        src=[{"contents": "a red square", "metadata": {"key": "img"}}],
    )
    assert job.name
    job = wait_done(client, job.name)
    assert job.dest and job.dest.inlined_responses
    resp = job.dest.inlined_responses[0].response
    assert (
        resp and resp.candidates and resp.candidates[0].content and resp.candidates[0].content.parts
    )
    blob = resp.candidates[0].content.parts[1].inline_data
    assert blob and blob.mime_type == "image/png" and blob.data and blob.data.startswith(b"\x89PNG")


def test_embeddings_inline_and_file(client: genai.Client, tmp_path: Path) -> None:
    job = client.batches.create_embeddings(
        model="gemini-embedding-001",
        src={
            "inlined_requests": {
                "contents": ["hello", "world"],
                "config": {"output_dimensionality": 8},
            }
        },
        config={"display_name": "emb-inline"},
    )
    assert job.name
    job = wait_done(client, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest and job.dest.inlined_embed_content_responses
    vectors = [
        r.response.embedding.values
        for r in job.dest.inlined_embed_content_responses
        if r.response and r.response.embedding
    ]
    assert len(vectors) == 2 and all(v and len(v) == 8 for v in vectors)

    src = tmp_path / "emb.jsonl"
    lines = [
        {
            "key": f"e{i}",
            "request": {"output_dimensionality": 3, "content": {"parts": [{"text": str(i)}]}},
        }
        for i in range(3)
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    up = client.files.upload(file=str(src), config={"mime_type": "jsonl"})
    assert up.name and up.mime_type == "jsonl"
    job = client.batches.create_embeddings(model="gemini-embedding-001", src={"file_name": up.name})
    assert job.name
    job = wait_done(client, job.name)
    assert job.dest and job.dest.file_name
    results = read_results(client, job.dest.file_name, tmp_path / "emb-out.jsonl")
    assert sorted(results) == ["e0", "e1", "e2"]
    assert all(len(r["response"]["embedding"]["values"]) == 3 for r in results.values())
    # deterministic: same text, same vector
    again = client.batches.create_embeddings(
        model="gemini-embedding-001",
        src={"inlined_requests": {"contents": ["hello"], "config": {"output_dimensionality": 8}}},
    )
    assert again.name
    again = wait_done(client, again.name)
    assert again.dest and again.dest.inlined_embed_content_responses
    assert again.dest.inlined_embed_content_responses[0].response.embedding.values in vectors  # type: ignore[union-attr]


def test_list_paging_cancel_delete(sync_emulator: Emulator, client: genai.Client) -> None:
    sync_emulator.settings.pending_seconds = 60
    names = []
    for i in range(5):
        job = client.batches.create(
            model="gemini-2.5-flash", src=[{"contents": f"x{i}"}], config={"display_name": f"j{i}"}
        )
        assert job.name
        names.append(job.name)
    listed = [j.name for j in client.batches.list(config={"page_size": 2})]
    assert listed == names[::-1]
    assert sync_emulator.stats["calls"]["batches.list"] == 3

    client.batches.cancel(name=names[0])
    job = client.batches.get(name=names[0])
    assert job.state == types.JobState.JOB_STATE_CANCELLED and job.done
    client.batches.cancel(name=names[0])  # cancel of a finished job: a no-op, no error
    assert client.batches.get(name=names[0]).state == types.JobState.JOB_STATE_CANCELLED

    client.batches.delete(name=names[1])
    with pytest.raises(errors.ClientError) as e:
        client.batches.get(name=names[1])
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"
    assert len(list(client.batches.list(config={"page_size": 100}))) == 4

    for i in range(3):
        (p := Path(sync_emulator.store.root) / f"f{i}.jsonl").write_text("{}\n")
        client.files.upload(file=str(p), config={"mime_type": "application/jsonl"})
    files = list(client.files.list(config={"page_size": 2}))
    assert len(files) == 3
    assert sync_emulator.stats["calls"]["files.list"] == 2


def test_wrong_and_missing_key(sync_emulator: Emulator) -> None:
    bad = make_client(sync_emulator.url, None, key="wrong")
    with pytest.raises(errors.ClientError) as e:
        bad.batches.list(config={"page_size": 10})
    assert e.value.code == 400 and e.value.status == "INVALID_ARGUMENT"
    assert "API key not valid" in (e.value.message or "")
    status, body = raw_get(f"{sync_emulator.url}/v1beta/batches")
    assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED"
    status, body = raw_get(f"{sync_emulator.url}/v1beta/batches?key={KEY}")
    assert status == 200 and body == {}  # proto3 JSON: an empty list is omitted


def test_unknown_model_and_embedding_model_for_generate(client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as e:
        client.batches.create(model="nonexistent-model", src=[{"contents": "x"}])
    assert e.value.code == 404 and "is not found for API version v1beta" in (e.value.message or "")
    with pytest.raises(errors.ClientError) as e:
        client.batches.create(model="gemini-embedding-001", src=[{"contents": "x"}])
    assert e.value.code == 400 and e.value.status == "INVALID_ARGUMENT"
