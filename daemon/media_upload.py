"""Local media for submission: upload each distinct ``file:NAME`` once (cached by content hash in
the ``media`` table) and write the job's ``.resolved.jsonl`` with the uploaded URIs.

A cached upload is reused only while at least :data:`MEDIA_MIN_REMAINING` of its 48 h life remains:
the Batch API's target turnaround is 24 h, so a job admitted now can still read the file.
"""

from __future__ import annotations

import hashlib
import mimetypes
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson

from daemon.context import Context
from daemon.outbox import atomic_writer
from daemon.validate_io import media_name, media_parts

MEDIA_MIN_REMAINING = 24 * 3600.0
FILES_TTL = 48 * 3600.0
_locks: weakref.WeakKeyDictionary[Any, dict[str, list[Any]]] = weakref.WeakKeyDictionary()


def resolved_path(job: dict[str, Any]) -> Path:
    src = Path(job["source_path"])
    return src.with_name(f"part-{job['part_no']}-a{job['attempt']}.resolved.jsonl")


def _media_parts(line: bytes, kind: str) -> tuple[Any, list[dict[str, Any]]]:
    """A canonical ``{"key", "request"}`` line and its validated media references."""
    obj = orjson.loads(line)
    return obj, list(media_parts(obj["request"], kind))


def _scan_media(path: Path, media_dir: Path, kind: str) -> dict[str, tuple[Path, str | None]]:
    """Distinct ``file:NAME`` references of a source file → (local path, declared mime type)."""
    found: dict[str, tuple[Path, str | None]] = {}
    with path.open("rb") as f:
        for line in f:
            if not line.strip() or b"file:" not in line:
                continue
            for part in _media_parts(line, kind)[1]:
                name = media_name(part)
                mime = part.get("mimeType", part.get("mime_type"))
                if name not in found or (found[name][1] is None and mime):
                    found[name] = (media_dir / name, mime)
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _rewrite(src: Path, dest: Path, uris: dict[str, str], kind: str) -> None:
    """The resolved source: every validated ``file:NAME`` URI replaced by its upload's URI;
    written durably (the job is committed as ``creating`` with it afterwards)."""
    with src.open("rb") as fin, atomic_writer(dest) as fout:
        for line in fin:
            if not line.strip():
                continue
            if b"file:" in line:
                obj, parts = _media_parts(line, kind)
                for part in parts:
                    key = "fileUri" if "fileUri" in part else "file_uri"
                    part[key] = uris[part[key][5:]]
                line = orjson.dumps(obj) + b"\n"
            fout.write(line)


async def resolve_media(ctx: Context, job: dict[str, Any]) -> Path:
    """Upload (or reuse) every distinct local media file and write the resolved source file."""
    src = Path(job["source_path"])
    refs = await anyio.to_thread.run_sync(_scan_media, src, ctx.cfg.media_dir, job["kind"])
    uris: dict[str, str] = {}
    for name, (path, mime) in refs.items():
        sha = await anyio.to_thread.run_sync(_sha256, path)
        async with _media_lock(ctx, sha):  # concurrent jobs sharing a file upload it once
            uris[name] = await _upload_once(ctx, sha, path, mime)
    dest = resolved_path(job)
    await anyio.to_thread.run_sync(_rewrite, src, dest, uris, job["kind"])
    return dest


@asynccontextmanager
async def _media_lock(ctx: Context, sha: str) -> AsyncIterator[None]:
    locks = _locks.setdefault(ctx.store, {})
    entry = locks.setdefault(sha, [anyio.Lock(), 0])
    entry[1] += 1
    try:
        async with entry[0]:
            yield
    finally:
        entry[1] -= 1
        if not entry[1]:
            del locks[sha]


async def _upload_once(ctx: Context, sha: str, path: Path, mime: str | None) -> str:
    """The URI of a usable upload of ``path``: from the cache, else uploaded now and cached."""
    gem = ctx.gemini
    assert gem is not None
    cached = await ctx.store.get_media(sha)
    if cached and cached["expires_at"] >= time.time() + MEDIA_MIN_REMAINING:
        return str(cached["uri"])
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    up = await gem.upload_file(path, display_name=f"gemini-batchd-media:{sha[:16]}", mime_type=mime)
    now = time.time()
    await ctx.store.put_media(
        sha256=sha,
        file_name=up["name"],
        uri=up["uri"],
        mime_type=mime,
        size_bytes=path.stat().st_size,
        uploaded_at=now,
        expires_at=_expiry(up.get("expirationTime"), now),
    )
    return str(up["uri"])


def _expiry(text: str | None, now: float) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return now + FILES_TTL
