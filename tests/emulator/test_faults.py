"""Behaviour controls driven through the real sync SDK: faults, forced states, limits, markers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

from daemon.emulator import Emulator
from tests.emulator.helpers import wait_until


def admin(emu: Emulator, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{emu.url}/__emulator/{path}", data=data, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def done(client: genai.Client, name: str) -> types.BatchJob:
    return wait_until(lambda: (job := client.batches.get(name=name)).done and job)


def inline(client: genai.Client, *texts: str, name: str = "job") -> types.BatchJob:
    src = [{"contents": t, "metadata": {"key": f"r{i}"}} for i, t in enumerate(texts)]
    job = client.batches.create(model="gemini-2.5-flash", src=src, config={"display_name": name})
    assert job.name
    return job


@pytest.mark.parametrize(
    ("kind", "exc", "code"),
    [
        ("429", errors.ClientError, 429),
        ("500", errors.ServerError, 500),
        ("503", errors.ServerError, 503),
    ],
)
def test_http_fault_once(
    sync_emulator: Emulator, client: genai.Client, kind: str, exc: type, code: int
) -> None:
    admin(sync_emulator, "fail_next", {"endpoint": "batches.list", "kind": kind, "count": 1})
    with pytest.raises(exc) as e:
        client.batches.list(config={"page_size": 10})
    assert e.value.code == code
    assert list(client.batches.list(config={"page_size": 10})) == []


def test_drop_closes_connection(sync_emulator: Emulator, client: genai.Client) -> None:
    sync_emulator.fail_next("batches.list", "drop")
    with pytest.raises(Exception) as e:
        client.batches.list(config={"page_size": 10})
    assert not isinstance(e.value, errors.APIError)
    assert "disconnect" in repr(e.value).lower() or "closed" in repr(e.value).lower()
    assert list(client.batches.list(config={"page_size": 10})) == []


@pytest.mark.parametrize("kind", ["create_then_503", "create_then_drop"])
def test_create_then_fault_creates_the_job(
    sync_emulator: Emulator, client: genai.Client, kind: str
) -> None:
    sync_emulator.fail_next("batches.create", kind)
    with pytest.raises(Exception) as e:
        inline(client, "hi", name="ambiguous")
    if kind == "create_then_503":
        assert isinstance(e.value, errors.ServerError) and e.value.code == 503
    jobs = list(client.batches.list(config={"page_size": 10}))
    assert [j.display_name for j in jobs] == ["ambiguous"]
    assert sync_emulator.stats["creates_by_display_name"] == {"ambiguous": 1}


def test_fault_rates_via_config(sync_emulator: Emulator, client: genai.Client) -> None:
    settings = admin(sync_emulator, "config", {"fault_rates": {"files.list": {"503": 1.0}}})
    assert settings["fault_rates"] == {"files.list": {"503": 1.0}}
    for _ in range(3):
        with pytest.raises(errors.ServerError):
            client.files.list()
    admin(sync_emulator, "config", {"fault_rates": {}})
    assert list(client.files.list()) == []
    assert sync_emulator.stats["calls"]["files.list"] == 4


def test_upload_chunk_fault_fails_fast(
    sync_emulator: Emulator, client: genai.Client, tmp_path: Path
) -> None:
    (src := tmp_path / "x.jsonl").write_text("{}\n")
    sync_emulator.fail_next("files.upload_chunk", "503")
    with pytest.raises(errors.ServerError):
        client.files.upload(file=str(src), config={"mime_type": "application/jsonl"})
    assert sync_emulator.stats["calls"]["files.upload_chunk"] == 1


@pytest.mark.parametrize("state", ["FAILED", "EXPIRED"])
def test_forced_terminal_states(sync_emulator: Emulator, client: genai.Client, state: str) -> None:
    admin(sync_emulator, "force", {"state": state, "count": 1})
    job = done(client, inline(client, "a").name or "")
    assert job.state == types.JobState[f"JOB_STATE_{state}"] and job.dest is None
    assert done(client, inline(client, "b").name or "").state == types.JobState.JOB_STATE_SUCCEEDED

    sync_emulator.settings.pending_seconds = 60
    running = inline(client, "c")
    assert running.name
    op = admin(sync_emulator, f"batches/{running.name.split('/')[1]}:force", {"state": state})
    assert op["metadata"]["state"] == f"BATCH_STATE_{state}" and op["done"] and op["error"]["code"]
    assert client.batches.get(name=running.name).state == types.JobState[f"JOB_STATE_{state}"]


def test_queue_limits(sync_emulator: Emulator, client: genai.Client) -> None:
    sync_emulator.settings.pending_seconds = 60
    admin(sync_emulator, "config", {"max_active_jobs": 2})
    inline(client, "a")
    inline(client, "b")
    with pytest.raises(errors.ClientError) as e:
        inline(client, "c")
    assert e.value.code == 429 and e.value.status == "RESOURCE_EXHAUSTED"
    assert admin(sync_emulator, "stats")["active_jobs"] == 2

    admin(
        sync_emulator,
        "config",
        {"max_active_jobs": 100, "max_enqueued_tokens": {"gemini-2.5-pro": 30}},
    )
    job = client.batches.create(model="gemini-2.5-pro", src=[{"contents": "x" * 100}])
    with pytest.raises(errors.ClientError) as e:
        client.batches.create(model="gemini-2.5-pro", src=[{"contents": "y" * 40}])
    assert e.value.code == 429
    assert job.name
    client.batches.cancel(name=job.name)
    client.batches.create(model="gemini-2.5-pro", src=[{"contents": "y" * 40}])


def test_per_request_markers(sync_emulator: Emulator, client: genai.Client) -> None:
    texts = ["ok", "bad [[error:3]]", "flaky [[transient:14]]", "lost [[drop]]"]
    first = done(client, inline(client, *texts).name or "")
    assert first.dest and first.dest.inlined_responses
    by_key = {r.metadata["key"]: r for r in first.dest.inlined_responses if r.metadata}
    assert sorted(by_key) == ["r0", "r1", "r2"]  # the [[drop]] request is not answered
    assert by_key["r0"].response and by_key["r0"].response.text == "echo: ok"
    assert by_key["r1"].error and by_key["r1"].error.code == 3
    assert by_key["r2"].error and by_key["r2"].error.code == 14

    again = done(client, inline(client, *texts).name or "")
    assert again.dest and again.dest.inlined_responses
    by_key = {r.metadata["key"]: r for r in again.dest.inlined_responses if r.metadata}
    assert sorted(by_key) == ["r0", "r1", "r2", "r3"]
    assert by_key["r1"].error and by_key["r1"].error.code == 3  # [[error]] is permanent
    assert by_key["r2"].response and by_key["r2"].response.text == "echo: flaky [[transient:14]]"
    assert by_key["r3"].response


def test_no_shuffle_keeps_order(sync_emulator: Emulator, client: genai.Client) -> None:
    admin(sync_emulator, "config", {"shuffle_results": False})
    texts = [f"t{i}" for i in range(30)]
    job = done(client, inline(client, *texts).name or "")
    assert job.dest and job.dest.inlined_responses
    assert [r.metadata["key"] for r in job.dest.inlined_responses if r.metadata] == [
        f"r{i}" for i in range(30)
    ]


def test_admin_stats_and_reset(
    sync_emulator: Emulator, client: genai.Client, tmp_path: Path
) -> None:
    (src := tmp_path / "x.jsonl").write_bytes(b"z" * 1000)
    up = client.files.upload(file=str(src), config={"mime_type": "application/jsonl"})
    stats = admin(sync_emulator, "stats")
    assert stats["calls"] == {"files.upload": 1, "files.upload_chunk": 1}
    assert stats["bytes_in"] >= 1000 and stats["files"] == 1
    assert up.name
    client.files.download(file=up.name, destination=str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b"z" * 1000
    assert admin(sync_emulator, "stats")["bytes_out"] >= 1000
    admin(sync_emulator, "reset", {})
    assert admin(sync_emulator, "stats")["calls"] == {}


def test_config_rejects_bad_settings(sync_emulator: Emulator) -> None:
    for bad in (
        {"nope": 1},
        {"pending_seconds": "x"},
        {"fault_rates": {"batches.get": {"teapot": 1}}},
    ):
        req = urllib.request.Request(
            f"{sync_emulator.url}/__emulator/config", data=json.dumps(bad).encode(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400
        e.value.close()
    assert admin(sync_emulator, "config", {"pending_seconds": 1})["pending_seconds"] == 1.0
