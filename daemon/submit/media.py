"""Local media for submission: upload each distinct ``file:NAME`` once (cached by content hash in
the ``media`` table) and write the job's ``.resolved.jsonl`` with the uploaded URIs.

Each file is opened once, without following a final link, and must be the very file validation
accepted (device, inode, size and mtime recorded in ``input_media``); that open file is hashed and
uploaded, so a file swapped (say for a link to a secret) or rewritten after validation is never sent.

A cached upload is reused only while at least :data:`MEDIA_MIN_REMAINING` of its 48 h life remains:
the Batch API's target turnaround is 24 h, so a job admitted now can still read the file.
"""

from __future__ import annotations

import errno
import mimetypes
import os
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import anyio
import orjson
import structlog

from daemon.context import Context
from daemon.layout import resolved_path
from daemon.outbox import atomic_writer
from daemon.store import MediaId
from daemon.store.rows import DueJob
from daemon.validate.reader import media_name, media_parts
from daemon.windows import sha256_of

MEDIA_MIN_REMAINING = 24 * 3600.0
FILES_TTL = 48 * 3600.0
log = structlog.get_logger(__name__)


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


class MediaChanged(OSError):
    """A media file is no longer the one validated: the job fails naming it, nothing sent."""


def _open_validated(media_dir: Path, name: str, ident: MediaId | None) -> IO[bytes]:
    """``media_dir/NAME`` open for reading, checked to be the very file validation accepted
    (device, inode, size and mtime as recorded): a link, a file outside ``media_dir`` or one
    swapped in or rewritten since raises :class:`MediaChanged`. Never follows a final link."""
    root = os.path.realpath(media_dir)
    real = os.path.realpath(os.path.join(root, name))
    if not real.startswith(root + os.sep):
        raise MediaChanged(f"media file {name!r} now leads outside media_dir; nothing uploaded")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MediaChanged(f"media file {name!r} became a link; nothing uploaded") from None
        raise MediaChanged(f"media file {name!r} cannot be read: {e.strerror}") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    got = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if not stat.S_ISREG(st.st_mode) or (ident is not None and got != tuple(ident)):
        f.close()
        log.warning("media_changed_refused", file=name)
        raise MediaChanged(
            f"media file {name!r} was replaced or changed after validation; nothing uploaded"
        )
    return f


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


async def resolve_media(ctx: Context, job: DueJob) -> Path:
    """Upload (or reuse) every distinct local media file and write the resolved source file.
    Each file is opened once and checked to be the one validated; that open file is what is
    hashed and uploaded."""
    src = Path(job["source_path"])
    refs = await anyio.to_thread.run_sync(_scan_media, src, ctx.cfg.media_dir, job["kind"])
    ids = await ctx.store.input_media(job["input_id"])
    uris: dict[str, str] = {}
    for name, (path, mime) in refs.items():
        f = await anyio.to_thread.run_sync(_open_validated, ctx.cfg.media_dir, name, ids.get(name))
        with f:
            sha = await anyio.to_thread.run_sync(sha256_of, f)
            async with ctx.media_locks.hold(sha):  # concurrent jobs sharing a file upload it once
                uris[name] = await _upload_once(ctx, sha, path, mime, f)
    dest = resolved_path(job)
    await anyio.to_thread.run_sync(_rewrite, src, dest, uris, job["kind"])
    return dest


async def _upload_once(ctx: Context, sha: str, path: Path, mime: str | None, f: IO[bytes]) -> str:
    """The URI of a usable upload of ``path``: from the cache, else uploaded now and cached."""
    gem = ctx.gemini
    assert gem is not None
    cached = await ctx.store.get_media(sha)
    if cached and cached["expires_at"] >= time.time() + MEDIA_MIN_REMAINING:
        return str(cached["uri"])
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    display = f"gemini-batchd-media:{sha[:16]}"
    up = await gem.upload_file(path, display_name=display, mime_type=mime, stream=f)
    now = time.time()
    await ctx.store.put_media(
        sha256=sha,
        file_name=up["name"],
        uri=up["uri"],
        mime_type=mime,
        size_bytes=os.fstat(f.fileno()).st_size,
        uploaded_at=now,
        expires_at=_expiry(up.get("expirationTime"), now),
    )
    return str(up["uri"])


def _expiry(text: str | None, now: float) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return now + FILES_TTL
