"""Wire-level helpers: routing of API paths, the error envelope, JSON responses, paging."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from daemon.emulator.answers import snake
from daemon.emulator.faults import Stats

API_PATH = re.compile(
    r"^(?P<prefix>(?:/.*?)??)/(?:(?P<kind>upload|download)/)?(?P<v>v1beta|v1)/(?P<rest>.+)$"
)
FILE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
UPLOAD_GRANULARITY = 8 * 1024 * 1024
BATCH_ID = re.compile(r"^[a-z0-9]{36}$")  # the emulator's (and the real API's) batch id form
# The real 429 (langchain4j PR #3942 CI log, 2026-01-12; same text on create: python-genai #1901).
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. "
    "To monitor your current usage, head to: https://ai.dev/rate-limit. "
)
QUOTA_HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [
        {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
        }
    ],
}


class ApiError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or HTTP_STATUS.get(code, "UNKNOWN")
        self.extra = extra


class Dropped(Exception):
    """Close the connection without answering."""


Handler = Callable[["Ctx"], Awaitable[web.StreamResponse]]


class Ctx:
    """One API call: the request plus the parsed route."""

    def __init__(
        self, request: web.Request, m: re.Match[str], endpoint: str, args: tuple[str, ...]
    ):
        self.request = request
        self.owner = ""  # a hash of the caller's API key (see Api._check_key)
        self.endpoint = endpoint
        self.args = args
        self.version = m["v"]
        self.base = f"{request.scheme}://{request.host}{m['prefix']}"


def route(
    method: str, kind: str | None, rest: str, query: Any
) -> tuple[str, tuple[str, ...]] | None:
    if kind == "upload":
        if method == "POST" and rest == "files":
            return ("files.upload_chunk" if "upload_id" in query else "files.upload"), ()
        return None
    if kind == "download":
        m = re.fullmatch(r"files/([^/:]+):download", rest)
        return ("files.download", (m[1],)) if m and method == "GET" else None
    table: list[tuple[str, str, str]] = [
        ("GET", r"files", "files.list"),
        ("GET", r"files/([^/:]+)", "files.get"),
        ("DELETE", r"files/([^/:]+)", "files.delete"),
        ("GET", r"files/([^/:]+):download", "files.download"),
        ("POST", r"models/([^/:]+):batchGenerateContent", "batches.create"),
        ("POST", r"models/([^/:]+):asyncBatchEmbedContent", "batches.create_embeddings"),
        ("GET", r"batches", "batches.list"),
        ("GET", r"batches/([^/:]+)", "batches.get"),
        ("POST", r"batches/([^/:]+):cancel", "batches.cancel"),
        ("DELETE", r"batches/([^/:]+)", "batches.delete"),
        ("POST", r"batches/([^/:]+):delete", "batches.delete"),
    ]
    for meth, pattern, endpoint in table:
        if meth == method and (m := re.fullmatch(pattern, rest)):
            return endpoint, m.groups()
    return None


def json_response(
    obj: Any, stats: Stats, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = orjson.dumps(obj)
    stats.bytes_out += len(body)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def page(query: Any, items: list[Any]) -> tuple[list[Any], str | None]:
    """One page of `items`: `pageSize` absent or 0 means 10, above 100 means 100, negative is a
    400 (AIP-158); the page token is an offset."""
    try:
        size = int(query.get("pageSize") or query.get("page_size") or 0)
        start = int(query.get("pageToken") or query.get("page_token") or 0)
    except ValueError as e:
        raise ApiError(400, f"Invalid page size or token: {e}") from e
    if size < 0:
        raise ApiError(400, f"page_size must not be negative, got {size}.")
    if start < 0:
        raise ApiError(400, "Invalid page token.")
    size = min(size or 10, 100)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


def check_fields(obj: dict[str, Any], known: tuple[str, ...], at: str = "") -> None:
    """Reject keys of a proto message that are not among `known` (camelCase; snake_case is
    accepted too) with the real API's 400: `Invalid JSON payload received. Unknown name "x"
    at 'batch': Cannot find field.` plus a `BadRequest` detail. `at` is the snake_case path."""
    allowed = set(known) | {snake(k) for k in known}
    unknown = [k for k in obj if k not in allowed]
    if not unknown:
        return
    where = f" at '{at}'" if at else ""
    texts = [
        f'Invalid JSON payload received. Unknown name "{k}"{where}: Cannot find field.'
        for k in unknown
    ]
    violations = [{"field": at, "description": t} if at else {"description": t} for t in texts]
    raise ApiError(
        400,
        "\n".join(texts),
        details=[
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}
        ],
    )
