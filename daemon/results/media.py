"""Inline media in responses (``inlineData`` parts) → files under ``outbox/<stem>.media/``.

Each answer's media are named ``<key>-<n>.<ext>`` (``n`` counts the answer's inline parts from 1,
over all candidates) and written atomically.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from daemon.outbox import atomic_writer

_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def media_ext(mime_type: str | None) -> str:
    """File extension for a MIME type (parameters ignored); ``bin`` when unknown."""
    base = (mime_type or "").split(";")[0].strip().lower()
    return _EXT.get(base, "bin")


def safe_key(key: str) -> str:
    """``key`` as a file-name stem. Keys that need changing get a short hash so that two keys
    never map to the same name (``a/b`` and ``a_b``)."""
    clean = _UNSAFE.sub("_", key).lstrip(".")[:100]
    if clean == key and clean:
        return clean
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{clean[:80]}_{digest}" if clean else digest


def inline_parts(response: Any) -> Iterator[tuple[str | None, str]]:
    """``(mime type, base64 data)`` of every inline-data part of a response (camel or snake)."""
    if not isinstance(response, dict):
        return
    for cand in response.get("candidates") or []:
        content = cand.get("content") if isinstance(cand, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts or []:
            if not isinstance(part, dict):
                continue
            blob = part.get("inlineData", part.get("inline_data"))
            if isinstance(blob, dict) and isinstance(blob.get("data"), str):
                yield blob.get("mimeType", blob.get("mime_type")), blob["data"]


def _decode(data: str) -> bytes:
    if "-" in data or "_" in data:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    return base64.b64decode(data + "=" * (-len(data) % 4))


def extract_media(line: bytes, media_dir: Path) -> list[str]:
    """Write the inline media of one ``{"key", "response"}`` line; returns the file names."""
    if b"inlineData" not in line and b"inline_data" not in line:
        return []
    obj = orjson.loads(line)
    key = str(obj.get("key"))
    names = []
    for n, (mime, data) in enumerate(inline_parts(obj.get("response")), start=1):
        try:
            payload = _decode(data)
        except (binascii.Error, ValueError):
            continue  # not base64: leave it in the results line only
        name = f"{safe_key(key)}-{n}.{media_ext(mime)}"
        with atomic_writer(media_dir / name) as f:
            f.write(payload)
        names.append(name)
    return names
