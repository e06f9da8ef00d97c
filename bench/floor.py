"""The floor: what any tool must at least do with a big file — parse every line, upload, download.

A bare `orjson.loads` loop over the file, plus one streamed resumable upload of its bytes and one
streamed download of the same bytes back, over plain HTTP (http.client) to the emulator.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.common import API_KEY, MiB


def orjson_loop(path: Path) -> tuple[float, int]:
    """(seconds, lines) for `orjson.loads` of every line of the file, read in binary."""
    t0 = time.perf_counter()
    n = 0
    loads = orjson.loads
    with path.open("rb", buffering=8 * MiB) as f:
        for line in f:
            loads(line)
            n += 1
    return time.perf_counter() - t0, n


def _conn(host: str, port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(host, port, timeout=600, blocksize=MiB)


def raw_upload(host: str, port: int, path: Path) -> tuple[float, str]:
    """(seconds, file name): resumable start, then one streamed `upload, finalize` request."""
    size = path.stat().st_size
    t0 = time.perf_counter()
    conn = _conn(host, port)
    try:
        meta = json.dumps({"file": {"display_name": "floor", "mime_type": "jsonl"}})
        conn.request(
            "POST",
            "/upload/v1beta/files",
            body=meta,
            headers={
                "x-goog-api-key": API_KEY,
                "Content-Type": "application/json",
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": str(size),
                "X-Goog-Upload-Header-Content-Type": "jsonl",
            },
        )
        resp = conn.getresponse()
        resp.read()
        url = urlsplit(resp.headers["X-Goog-Upload-URL"])
        with path.open("rb") as f:
            conn.request(
                "POST",
                f"{url.path}?{url.query}",
                body=f,
                headers={
                    "Content-Length": str(size),
                    "X-Goog-Upload-Command": "upload, finalize",
                    "X-Goog-Upload-Offset": "0",
                },
            )
            resp = conn.getresponse()
            body: Any = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"upload failed: {resp.status} {body}")
        return time.perf_counter() - t0, body["file"]["name"]
    finally:
        conn.close()


def raw_download(host: str, port: int, name: str, dest: Path) -> tuple[float, int]:
    """(seconds, bytes): the file's bytes streamed to `dest` in 1 MiB reads."""
    t0 = time.perf_counter()
    conn = _conn(host, port)
    n = 0
    try:
        conn.request(
            "GET", f"/v1beta/{name}:download?alt=media", headers={"x-goog-api-key": API_KEY}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"download failed: {resp.status} {resp.read()[:200]!r}")
        with dest.open("wb") as out:
            while block := resp.read(MiB):
                out.write(block)
                n += len(block)
    finally:
        conn.close()
    return time.perf_counter() - t0, n
