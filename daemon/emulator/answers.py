"""Deterministic answers: generate responses, embeddings, PNGs, per-request error markers."""

from __future__ import annotations

import base64
import functools
import hashlib
import random
import re
import struct
import zlib
from typing import Any

import orjson

_ERROR_RE = re.compile(r"\[\[error:(\d+)\]\]")
_TRANSIENT_RE = re.compile(r"\[\[transient:(\d+)\]\]")
DEFAULT_EMBED_DIM = 768


def get(d: dict[str, Any], camel: str, default: Any = None) -> Any:
    """Read a field given in camelCase or snake_case (proto-JSON accepts both)."""
    if camel in d:
        return d[camel]
    return d.get(snake(camel), default)


@functools.lru_cache(maxsize=256)
def snake(camel: str) -> str:
    """``fileData`` → ``file_data`` (cached: a handful of field names)."""
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


def model_id(model: str) -> str:
    return model.removeprefix("models/")


def is_embedding_model(mid: str) -> bool:
    return "embedding" in mid


def is_known_model(mid: str) -> bool:
    if "unknown" in mid or "nonexistent" in mid:
        return False
    return mid.startswith("gemini-") or is_embedding_model(mid)


def texts_of(request: dict[str, Any]) -> list[str]:
    """All text parts of a generate (`contents`) or embed (`content`) request, in order."""
    out: list[str] = []
    contents = request.get("contents", request.get("content"))
    if isinstance(contents, dict):
        contents = [contents]
    if isinstance(contents, str):
        return [contents]
    for content in contents or []:
        if isinstance(content, str):
            out.append(content)
            continue
        if not isinstance(content, dict):
            continue
        for part in content.get("parts") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()


def rpc_error(code: int, message: str) -> dict[str, Any]:
    """A per-request ``google.rpc.Status``: ``code`` and ``message`` only (no ``status`` string,
    which exists only in the HTTP error envelope)."""
    return {"code": code, "message": message}


def marker_error(text: str, first_time: bool) -> dict[str, Any] | None:
    """The per-request error a `[[error:N]]`/`[[transient:N]]` marker asks for, if any."""
    if "[[" not in text:  # the common case, without a regular expression
        return None
    if m := _ERROR_RE.search(text):
        code = int(m.group(1))
        return rpc_error(code, f"Emulated error {code} requested by marker.")
    if first_time and (m := _TRANSIENT_RE.search(text)):
        code = int(m.group(1))
        return rpc_error(code, f"Emulated transient error {code}; retry the request.")
    return None


def wants_drop(text: str) -> bool:
    return "[[drop]]" in text


def wants_transient(text: str) -> bool:
    return "[[" in text and ("[[drop]]" in text or _TRANSIENT_RE.search(text) is not None)


def tiny_png(seed: bytes, size: int = 8) -> bytes:
    """A small valid RGB PNG whose colour is derived from `seed`."""
    r, g, b = hashlib.sha256(seed).digest()[:3]
    row = b"\x00" + bytes([r, g, b]) * size
    raw = row * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _wants_thinking(request: dict[str, Any]) -> bool:
    cfg = get(request, "generationConfig") or {}
    thinking = get(cfg, "thinkingConfig") if isinstance(cfg, dict) else None
    if not isinstance(thinking, dict):
        return False
    return bool(get(thinking, "thinkingBudget", 0) or get(thinking, "includeThoughts", False))


def generate_response(mid: str, request: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """A GenerateContentResponse whose text echoes the prompt text."""
    prompt = " ".join(texts)
    answer = "echo: " + prompt
    h = request_hash(request)
    # Real text parts carry an opaque `thoughtSignature` (ELL-FIX, 2026-07): bytes, base64.
    signature = base64.b64encode(hashlib.sha256(f"{mid}:{h}".encode()).digest()).decode()
    parts: list[dict[str, Any]] = [{"text": answer, "thoughtSignature": signature}]
    if "image" in mid:
        png = tiny_png(prompt.encode())
        parts.append(
            {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}
        )
    prompt_tokens = max(1, len(prompt) // 4)
    cand_tokens = max(1, len(answer) // 4)
    usage: dict[str, Any] = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": cand_tokens,
        "totalTokenCount": prompt_tokens + cand_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        "serviceTier": "SERVICE_TIER_STANDARD",  # as in real batch results (ELL-FIX)
    }
    if _wants_thinking(request):
        usage["thoughtsTokenCount"] = 8
        usage["totalTokenCount"] += 8
    return {
        "candidates": [
            {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
        ],
        "usageMetadata": usage,
        "modelVersion": mid,
        "responseId": base64.urlsafe_b64encode(bytes.fromhex(h[:36])).decode(),
    }


def embed_response(request: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """An EmbedContentResponse with deterministic values of the requested dimensionality."""
    dim = int(get(request, "outputDimensionality") or DEFAULT_EMBED_DIM)
    text = " ".join(texts)
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    values = [round(rng.uniform(-0.1, 0.1), 9) for _ in range(max(1, dim))]
    return {"embedding": {"values": values}, "tokenCount": str(max(1, len(text) // 4))}


def estimate_tokens(request: dict[str, Any]) -> int:
    return max(1, len(" ".join(texts_of(request))) // 4)
