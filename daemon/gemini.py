"""The only module that talks to the Gemini API: the google-genai SDK plus raw JSON calls.

Transport: one ``httpx2.AsyncClient`` is handed to the SDK (``httpx_async_client``) and reused for
the raw calls, so every request shares one connection pool and the SDK never falls back to its
aiohttp path, whose implicit reconnect-and-resend would repeat a ``batches.create``. SDK retries are
off client-wide (``HttpRetryOptions(attempts=1)``): the stages retry themselves, with backoff, and
never blindly retry a create. Downloads alone go through a second SDK client on the SDK's own
aiohttp transport: a download is a repeatable read, and aiohttp (a C parser, 4 MiB reads) streams a
result file 2-4 times faster than httpx (pure-Python h11, 64 KiB reads): 0.13-0.20 s against
0.40-0.50 s for 128 MB here. Its whole-request timeout is off; a download fails instead when no
data arrives for ``[api] timeout`` seconds (as httpx's per-read timeout does).

Raw calls (same headers as the SDK) are used where the SDK's typed objects lose data: ``get`` and
``list`` (the SDK drops ``batchStats``, ``error`` and request metadata) and the inline create (the
SDK's ``InlinedRequest`` re-maps ``generationConfig`` into ``config`` and drops fields it does not
know; posting the REST body ourselves keeps every field of the user's request line unchanged).

Longer than ~400 lines on purpose: every API call, its retries and its error classification in
the one module that talks to the API.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import IO, Any, Literal, cast

import aiohttp
import anyio
import httpx2
import orjson
import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.genai import version as genai_version

from daemon.config import Config
from daemon.windows import FileWindow

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
ErrorKind = Literal["transient", "permanent", "ambiguous"]

# HTTP answers after which the request can safely be sent again (the server refused or failed
# before acting). On a create, a 5xx is ambiguous instead (the job may exist).
_TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}
# Endpoints whose repetition cannot cost money or duplicate work.
_NON_IDEMPOTENT = {"batches.create"}


class ApiError(Exception):
    """An API call that failed. ``str(e)`` never contains the API key.

    ``kind``: ``transient`` (back off and retry), ``ambiguous`` (the server may have acted:
    reconcile before retrying), ``permanent`` (fail the input with ``message``).
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        endpoint: str = "",
        http_code: int | None = None,
        status: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.endpoint = endpoint
        self.http_code = http_code
        self.status = status
        self.details = details

    def __str__(self) -> str:
        code = " ".join(str(p) for p in (self.http_code, self.status) if p)
        return f"{self.endpoint or 'api'}: {code + ': ' if code else ''}{self.message}"

    def to_json(self) -> dict[str, Any]:
        """``{"code", "status", "message"}`` (plus ``details`` when the API sent any)."""
        out: dict[str, Any] = {
            "code": self.http_code,
            "status": self.status,
            "message": self.message,
        }
        if self.details:
            out["details"] = self.details
        return out


class RateLimiter:
    """Async rate cap (GCRA): at most ``rate`` calls per second, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (max(1, burst or int(rate)) - 1) * self.interval
        self._tat = 0.0
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = anyio.current_time()
            tat = max(self._tat, now)
            wait = tat - now - self.tolerance
            self._tat = tat + self.interval
        if wait > 0:
            await anyio.sleep(wait)


class _StallWatch:
    """A download's destination: writes to ``out``, and cancels ``scope`` once no data has come
    for ``timeout`` seconds (from the request on, then from the last chunk)."""

    def __init__(self, out: Any, scope: anyio.CancelScope, timeout: float) -> None:
        self.out, self.scope, self.timeout = out, scope, timeout
        scope.deadline = anyio.current_time() + timeout

    async def write(self, chunk: bytes) -> None:
        self.scope.deadline = anyio.current_time() + self.timeout
        await self.out.write(chunk)


def _model_path(model: str) -> str:
    if model.startswith(("models/", "tunedModels/")):
        return model
    return f"models/{model}"


def _redact(value: Any, secret: str) -> Any:
    if not secret:
        return value
    if isinstance(value, str):
        return value.replace(secret, "[redacted]")
    if isinstance(value, dict):
        return {k: _redact(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secret) for v in value]
    return value


def _gone_or_undeletable(e: ApiError) -> bool:
    if e.http_code in (403, 404):
        return True
    return e.http_code == 400 and "cannot be more than 40 characters" in e.message


def sdk_state_to_wire(state: Any) -> str | None:
    """``JobState.JOB_STATE_RUNNING`` (SDK) → ``BATCH_STATE_RUNNING`` (wire)."""
    if state is None:
        return None
    name = getattr(state, "name", None) or str(state)
    return "BATCH_STATE_" + name.removeprefix("JOB_STATE_").removeprefix("BATCH_STATE_")


class GeminiClient:
    """Async access to the Files and Batches APIs with one rate cap and error classification."""

    def __init__(self, cfg: Config, api_key: str, *, base_url: str | None = None) -> None:
        self.cfg = cfg
        self._key = api_key
        self.base_url = (base_url or cfg.gemini.base_url or DEFAULT_BASE_URL).rstrip("/") + "/"
        self.api_version = cfg.gemini.api_version
        self.timeout = cfg.api.timeout
        self.calls: Counter[tuple[str, str]] = Counter()
        self._limiter = RateLimiter(cfg.api.max_rps)
        self._http = httpx2.AsyncClient(timeout=self.timeout)
        label = f"google-genai-sdk/{genai_version.__version__} gl-python/{sys.version.split()[0]}"
        self._headers = {
            "Content-Type": "application/json",
            "x-goog-api-key": api_key,
            "user-agent": label,
            "x-goog-api-client": label,
        }
        for var in ("GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE"):
            os.environ.pop(var, None)  # the daemon speaks the Gemini Developer API only
        self._sdk = genai.Client(
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=self.base_url,
                api_version=self.api_version,
                timeout=int(self.timeout * 1000),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=self._http,
            ),
        )
        # Downloads only (see the module docstring): no total timeout, the stall timeout is ours.
        self._download_sdk = genai.Client(
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=self.base_url,
                api_version=self.api_version,
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    def key_fingerprint(self, salt: bytes) -> str:
        """Which API key this client uses, as ``HMAC-SHA256(salt, key)`` cut to 16 hex digits.

        Safe to store: an HMAC cannot be inverted, the random per-state-folder salt defeats
        precomputed tables, and guessing a key (39 characters, ~200 bits) to match 64 bits is
        out of reach; 64 bits still tell two keys apart with certainty in practice."""
        return hmac.new(salt, self._key.encode(), hashlib.sha256).hexdigest()[:16]

    async def aclose(self) -> None:
        await self._sdk.aio.aclose()
        await self._download_sdk.aio.aclose()
        await self._http.aclose()

    # ---- plumbing -------------------------------------------------------------------------
    def _error(self, endpoint: str, exc: BaseException) -> ApiError:
        """Classify any exception from the SDK or the transport."""
        code: int | None = None
        status: str | None = None
        details: Any = None
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, genai_errors.APIError):
            code, status, message = exc.code, exc.status, exc.message or str(exc)
            body = exc.details if isinstance(exc.details, dict) else {}
            details = (body.get("error") or {}).get("details") if body else None
            if code in _TRANSIENT_CODES:
                kind: ErrorKind = "transient"
                if endpoint in _NON_IDEMPOTENT and code != 429:
                    kind = "ambiguous"
            elif code is not None and 400 <= code < 500:
                kind = "permanent"
            else:
                kind = "ambiguous" if endpoint in _NON_IDEMPOTENT else "transient"
            outcome = str(code)
        elif isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
            kind, message, outcome = "transient", f"cannot connect: {exc}", "connect_error"
        elif isinstance(exc, httpx2.TimeoutException):
            kind, message, outcome = "ambiguous", f"timed out after {self.timeout:g}s", "timeout"
        elif isinstance(exc, httpx2.TransportError):
            kind, message, outcome = "ambiguous", f"connection lost: {exc!r}", "dropped"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            kind, message, outcome = "transient", f"cannot connect: {exc}", "connect_error"
        elif isinstance(exc, TimeoutError):
            kind, message, outcome = "ambiguous", f"no data for {self.timeout:g}s", "timeout"
        elif isinstance(exc, aiohttp.ClientError):
            kind, message, outcome = "ambiguous", f"connection lost: {exc!r}", "dropped"
        elif isinstance(exc, json.JSONDecodeError | pydantic.ValidationError):
            # An answer we cannot read: the server did act (a create may have happened).
            kind, message, outcome = "ambiguous", f"unreadable answer: {exc}", "bad_answer"
        elif isinstance(exc, ValueError | TypeError):
            kind, message, outcome = "permanent", f"rejected by the client: {exc}", "invalid"
        else:  # e.g. KeyError from the SDK when the upload URL is missing
            kind, message, outcome = "transient", f"unexpected answer: {exc!r}", "error"
        if kind == "ambiguous" and endpoint not in _NON_IDEMPOTENT:
            kind = "transient"  # repeating a read or an upload is harmless
        self.calls[(endpoint, outcome)] += 1
        return ApiError(
            kind,
            _redact(message, self._key),
            endpoint=endpoint,
            http_code=code,
            status=status,
            details=_redact(details, self._key),
        )

    async def _call(self, endpoint: str, fn: Callable[[], Any]) -> Any:
        await self._limiter.acquire()
        try:
            result = await fn()
        except (
            genai_errors.APIError,
            httpx2.HTTPError,
            aiohttp.ClientError,
            TimeoutError,
            ValueError,
            TypeError,
            KeyError,
        ) as e:
            raise self._error(endpoint, e) from None
        self.calls[(endpoint, "200")] += 1
        return result

    def _url(self, path: str) -> str:
        return f"{self.base_url}{self.api_version}/{path}"

    async def _raw(
        self, endpoint: str, method: str, path: str, *, body: Any = None, params: Any = None
    ) -> dict[str, Any]:
        """One JSON request with the SDK's headers; errors classified as for SDK calls."""

        async def go() -> dict[str, Any]:
            content = orjson.dumps(body) if body is not None else None
            resp = await self._http.request(
                method,
                self._url(path),
                headers=self._headers,
                content=content,
                params=params,
                timeout=self.timeout,
            )
            text = resp.content
            if resp.status_code != 200:
                try:
                    data = orjson.loads(text)
                except orjson.JSONDecodeError:
                    data = {"message": text.decode(errors="replace")[:500]}
                err = data.get("error", data) if isinstance(data, dict) else {}
                raise genai_errors.APIError(resp.status_code, {"error": err})
            return orjson.loads(text) if text else {}

        return await self._call(endpoint, go)

    # ---- files ----------------------------------------------------------------------------
    async def upload_file(
        self,
        path: Path,
        *,
        display_name: str,
        mime_type: str = "application/jsonl",
        span: tuple[int, int] | None = None,
        stream: IO[bytes] | None = None,
    ) -> dict[str, Any]:
        """Resumable upload (streamed from disk by the SDK) of ``path``, or of its bytes
        ``span[0]:span[1]``, or of the open file ``stream`` (read from its start on each try:
        the very file the caller checked); returns the File as camelCase JSON."""
        config = types.UploadFileConfig(mime_type=mime_type, display_name=display_name)
        if stream is not None:
            opened = cast(io.IOBase, stream)

            async def from_stream() -> Any:
                opened.seek(0)
                return await self._sdk.aio.files.upload(file=opened, config=config)

            f = await self._call("files.upload", from_stream)
        elif span is None:
            f = await self._call(
                "files.upload", lambda: self._sdk.aio.files.upload(file=str(path), config=config)
            )
        else:

            async def go() -> Any:
                with FileWindow(path, *span) as window:  # a fresh window for each attempt
                    return await self._sdk.aio.files.upload(file=window, config=config)

            f = await self._call("files.upload", go)
        return f.model_dump(mode="json", by_alias=True, exclude_none=True)  # type: ignore[no-any-return]

    async def delete_file(self, name: str) -> bool:
        """Delete a Files API file; False for one that is gone or cannot be deleted, which is
        fine: 404, 403 ("...or it may not exist", the real answer for a missing file) and the 400
        for ids over 40 characters (every result file ``files/batch-<36>``: they expire on their
        own)."""
        try:
            await self._call("files.delete", lambda: self._sdk.aio.files.delete(name=name))
        except ApiError as e:
            if not _gone_or_undeletable(e):
                raise
            return False
        return True

    async def get_file(self, name: str) -> dict[str, Any]:
        """A Files API file (``files.get``) as camelCase JSON."""
        f = await self._call("files.get", lambda: self._sdk.aio.files.get(name=name))
        return f.model_dump(mode="json", by_alias=True, exclude_none=True)  # type: ignore[no-any-return]

    async def download_file(self, file_name: str, dest: Path) -> None:
        """Stream a (generated) file to ``dest`` via ``dest.part``; ``dest`` appears whole or not."""
        part = dest.with_name(dest.name + ".part")
        # An async file: the SDK awaits each chunk's write, which runs in a worker thread, so a
        # big download never blocks the event loop on the disk.
        async with await anyio.open_file(part, "wb") as out:

            async def go() -> None:
                await out.seek(0)
                await out.truncate()
                with anyio.CancelScope() as scope:
                    sink = _StallWatch(out, scope, self.timeout)
                    # the stubs say IOBase; the SDK awaits a write that returns an awaitable
                    await self._download_sdk.aio.files.download(file=file_name, destination=sink)  # type: ignore[call-overload]
                if scope.cancelled_caught:
                    raise TimeoutError

            await self._call("files.download", go)
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
        part.replace(dest)

    # ---- batches --------------------------------------------------------------------------
    async def create_file_job(
        self, *, model: str, file_name: str, display_name: str, embed: bool
    ) -> dict[str, Any]:
        """Create a batch from an uploaded JSONL file; returns ``{"name", "metadata": {...}}``."""
        if embed:
            job = await self._call(
                "batches.create",
                lambda: self._sdk.aio.batches.create_embeddings(
                    model=model,
                    src=types.EmbeddingsBatchJobSource(file_name=file_name),
                    config=types.CreateEmbeddingsBatchJobConfig(display_name=display_name),
                ),
            )
        else:
            job = await self._call(
                "batches.create",
                lambda: self._sdk.aio.batches.create(
                    model=model,
                    src=file_name,
                    config=types.CreateBatchJobConfig(display_name=display_name),
                ),
            )
        return {
            "name": job.name,
            "metadata": {
                "state": sdk_state_to_wire(job.state),
                "displayName": job.display_name,
                "createTime": job.create_time.isoformat() if job.create_time else None,
            },
        }

    async def create_inline_job(
        self, *, model: str, requests: Iterable[dict[str, Any]], display_name: str
    ) -> dict[str, Any]:
        """Create an inline batch from ``{"key": K, "request": R}`` lines; returns the Operation.

        Posted as REST JSON (not via the SDK's InlinedRequest) so that every field of R is kept
        exactly as the user wrote it; the key travels as string metadata.
        """
        items = [{"request": r["request"], "metadata": {"key": str(r["key"])}} for r in requests]
        body = {
            "batch": {
                "displayName": display_name,
                "inputConfig": {"requests": {"requests": items}},
            }
        }
        return await self._raw(
            "batches.create", "POST", f"{_model_path(model)}:batchGenerateContent", body=body
        )

    async def get_batch(self, name: str) -> dict[str, Any]:
        """The raw Operation JSON (with ``batchStats``, ``error`` and inline output)."""
        return await self._raw("batches.get", "GET", name)

    async def list_page(self, *, page_size: int = 100, page_token: str | None = None) -> dict:
        """One ``batches.list`` page: ``{"operations": [...], "nextPageToken"?: ...}``."""
        params: dict[str, Any] = {"pageSize": page_size}
        if page_token:
            params["pageToken"] = page_token
        return await self._raw("batches.list", "GET", "batches", params=params)

    async def list_batches(self, *, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every remote Operation, all pages (no inline results: the list omits them)."""
        token: str | None = None
        while True:
            page = await self.list_page(page_size=page_size, page_token=token)
            for op in page.get("operations") or []:
                yield op
            token = page.get("nextPageToken") or None
            if not token:
                return

    async def find_batch(self, display_name: str) -> dict[str, Any] | None:
        """The remote job named ``display_name``, searching the whole list, or None."""
        async for op in self.list_batches():
            if (op.get("metadata") or {}).get("displayName") == display_name:
                return op
        return None

    async def cancel_batch(self, name: str) -> None:
        await self._call("batches.cancel", lambda: self._sdk.aio.batches.cancel(name=name))

    async def delete_batch(self, name: str) -> None:
        try:
            await self._call("batches.delete", lambda: self._sdk.aio.batches.delete(name=name))
        except ApiError as e:
            if e.http_code != 404:
                raise
