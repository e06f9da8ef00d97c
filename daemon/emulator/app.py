"""HTTP routes of the Gemini API emulator (aiohttp): Files, Batches and the `/__emulator/` admin API."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from daemon.emulator import answers, input_check
from daemon.emulator.faults import CREATE_ENDPOINTS, Faults, Stats
from daemon.emulator.state import TERMINAL, Store, new_id, sha256_b64
from daemon.emulator.wire import (
    API_PATH,
    BATCH_ID,
    FILE_ID,
    QUOTA_HELP,
    QUOTA_MESSAGE,
    UPLOAD_GRANULARITY,
    ApiError,
    Ctx,
    Dropped,
    Handler,
    check_fields,
    json_response,
    page,
    route,
)
from daemon.emulator.worker import count_lines

log = logging.getLogger(__name__)
SMALL_INPUT = 16 * 1024 * 1024
# The guide's inline limit ("total request size < 20 MB"); the error text is the Google front
# end's generic one (UNVERIFIED for this endpoint).
MAX_CREATE_BODY = 20 * 1024 * 1024
BATCH_FIELDS = (
    "name",
    "model",
    "displayName",
    "inputConfig",
    "output",
    "createTime",
    "endTime",
    "updateTime",
    "batchStats",
    "state",
    "priority",
    "webhookConfig",
)


class Api:
    """The API handlers, bound to one store, fault injector and stats."""

    def __init__(self, store: Store, faults: Faults, stats: Stats) -> None:
        self.store, self.faults, self.stats = store, faults, stats
        self.settings = store.settings
        self.handlers: dict[str, Handler] = {
            "files.upload": self.upload_start,
            "files.upload_chunk": self.upload_chunk,
            "files.get": self.file_get,
            "files.list": self.file_list,
            "files.delete": self.file_delete,
            "files.download": self.file_download,
            "batches.create": self.create,
            "batches.create_embeddings": self.create,
            "batches.get": self.batch_get,
            "batches.list": self.batch_list,
            "batches.cancel": self.batch_cancel,
            "batches.delete": self.batch_delete,
        }

    # ---- dispatch ------------------------------------------------------------------------
    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        m = API_PATH.match(request.path)
        found = m and route(request.method, m["kind"], m["rest"], request.query)
        upload_headers = {"X-Goog-Upload-Status": "final"} if m and m["kind"] == "upload" else {}
        try:
            if not m or not found:
                raise ApiError(404, f"Method not found: {request.method} {request.path}")
            endpoint, args = found
            self.stats.calls[endpoint] += 1
            ctx = Ctx(request, m, endpoint, args)
            if endpoint != "files.upload_chunk":
                ctx.owner = owner_of(self._check_key(request))
            fault = self.faults.pick(endpoint)
            if fault == "429":
                raise ApiError(429, QUOTA_MESSAGE, details=[QUOTA_HELP])
            if fault in ("500", "503"):
                code = int(fault)
                raise ApiError(code, f"Emulated fault {fault} on {endpoint}.")
            if fault == "drop":
                raise Dropped
            response = await self.handlers[endpoint](ctx)
            if fault == "create_then_503":
                raise ApiError(503, "The service is currently unavailable.")
            if fault == "create_then_drop":
                raise Dropped
            return response
        except ApiError as e:
            err = {"code": e.code, "message": e.message, "status": e.status, **e.extra}
            return json_response({"error": err}, self.stats, e.code, upload_headers)
        except Dropped:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        except (web.HTTPException, asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:  # a bug in the emulator: answer like the real API's 500
            log.exception("emulator error on %s %s", request.method, request.path)
            err = {"code": 500, "message": f"Internal error: {e!r}", "status": "INTERNAL"}
            return json_response({"error": err}, self.stats, 500, upload_headers)

    def _check_key(self, request: web.Request) -> str:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            raise ApiError(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if self.settings.api_key is not None and key != self.settings.api_key:
            raise ApiError(
                400,
                "API key not valid. Please pass a valid API key.",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
        return key

    def _visible(self, rec: dict[str, Any], ctx: Ctx) -> bool:
        """With ``scope_by_key``, a job or file is seen only by the key that created it."""
        return not self.settings.scope_by_key or rec.get("owner", "") == ctx.owner

    async def _json_body(self, request: web.Request, limit: int | None = None) -> dict[str, Any]:
        raw = await request.read()
        self.stats.bytes_in += len(raw)
        if limit is not None and len(raw) > limit:
            raise ApiError(400, f"Request payload size exceeds the limit: {limit} bytes.")
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, f"Invalid JSON payload received. {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid JSON payload received. Expected an object.")
        return body

    # ---- files ---------------------------------------------------------------------------
    def _file(self, fid: str, ctx: Ctx) -> dict[str, Any]:
        rec = self.store.files.get(fid)
        if rec is None or not self._visible(rec, ctx):
            if self.settings.missing_file_status == 404:
                raise ApiError(404, f"File files/{fid} not found.")
            raise ApiError(
                403, f"You do not have permission to access the File {fid} or it may not exist."
            )
        return rec

    async def upload_start(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.request
        if req.headers.get("X-Goog-Upload-Protocol", "resumable") != "resumable":
            raise ApiError(400, "Only the resumable upload protocol is emulated.")
        body = await self._json_body(req)
        meta = body.get("file") or {}
        fid = str(answers.get(meta, "name") or "").removeprefix("files/") or new_id(12)
        if not FILE_ID.match(fid):
            raise ApiError(400, f"Invalid file name files/{fid}.")
        if fid in self.store.files:
            raise ApiError(409, f"File files/{fid} already exists.")
        mime = answers.get(meta, "mimeType") or req.headers.get("X-Goog-Upload-Header-Content-Type")
        size = answers.get(meta, "sizeBytes") or req.headers.get(
            "X-Goog-Upload-Header-Content-Length"
        )
        uid = new_id(40)
        self.store.save_upload(
            {
                "upload_id": uid,
                "file_id": fid,
                "display_name": answers.get(meta, "displayName"),
                "mime_type": mime or "application/octet-stream",
                "size": int(size) if size is not None else None,
                "received": 0,
                "done": False,
                "owner": ctx.owner,
            }
        )
        url = f"{ctx.base}/upload/{ctx.version}/files?upload_id={uid}&upload_protocol=resumable"
        headers = {
            "X-Goog-Upload-URL": url,
            "X-Goog-Upload-Control-URL": url,
            "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Chunk-Granularity": str(UPLOAD_GRANULARITY),
        }
        return web.Response(status=200, headers=headers)

    async def upload_chunk(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.request
        final = {"X-Goog-Upload-Status": "final"}
        sess = self.store.uploads.get(req.query["upload_id"])
        if sess is None:
            raise ApiError(404, "No such upload session.")
        if sess["done"]:  # a repeated finalize: answer the same file again
            ctx.owner = sess.get("owner", "")
            body = {"file": self.store.file_json(self._file(sess["file_id"], ctx), ctx.base)}
            return json_response(body, self.stats, headers=final)
        command = [c.strip() for c in req.headers.get("X-Goog-Upload-Command", "").split(",")]
        part = self.store.root / "uploads" / f"{sess['upload_id']}.part"
        if "upload" in command:
            try:
                offset = int(req.headers["X-Goog-Upload-Offset"])
            except (KeyError, ValueError) as e:
                raise ApiError(400, "Missing or invalid X-Goog-Upload-Offset.") from e
            have = part.stat().st_size if part.exists() else 0
            if offset > have:
                raise ApiError(
                    400, f"Invalid X-Goog-Upload-Offset {offset}: only {have} bytes received."
                )
            with part.open("r+b" if part.exists() else "wb") as f:
                f.seek(offset)  # a repeated offset rewrites the same bytes: idempotent
                async for block in req.content.iter_chunked(1 << 20):
                    f.write(block)
                    self.stats.bytes_in += len(block)
            sess["received"] = max(have, part.stat().st_size)
        received = part.stat().st_size if part.exists() else 0
        if "finalize" not in command:
            headers = {
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Size-Received": str(received),
            }
            return web.Response(status=200, headers=headers)
        if sess["size"] is not None and received != sess["size"]:
            raise ApiError(400, f"Upload finalized with {received} bytes, {sess['size']} declared.")
        fid = sess["file_id"]
        if not part.exists():
            part.touch()
        part.replace(self.store.file_path(fid))
        sha = await asyncio.to_thread(sha256_b64, self.store.file_path(fid))
        rec = {
            "id": fid,
            "display_name": sess["display_name"],
            "mime_type": sess["mime_type"],
            "size": received,
            "create": time.time(),
            "sha256": sha,
            "source": "UPLOADED",
            "owner": sess.get("owner", ""),
        }
        self.store.save_file(rec)
        sess["done"] = True
        self.store.save_upload(sess)
        return json_response(
            {"file": self.store.file_json(rec, ctx.base)}, self.stats, headers=final
        )

    def _check_id_length(self, fid: str, request: str) -> None:
        if self.settings.file_id_limit and len(fid) > 40:
            raise ApiError(
                400,
                f"* {request}.name: File ID (name excluding 'files/') cannot be more than 40 "
                "characters.\n",
            )

    async def file_get(self, ctx: Ctx) -> web.StreamResponse:
        self._check_id_length(ctx.args[0], "GetFileRequest")
        rec = self._file(ctx.args[0], ctx)
        return json_response(self.store.file_json(rec, ctx.base), self.stats)

    async def file_list(self, ctx: Ctx) -> web.StreamResponse:
        recs = [r for r in self.store.files.values() if self._visible(r, ctx)]
        recs.sort(key=lambda r: r["create"], reverse=True)
        items, token = page(ctx.request.query, recs)
        body: dict[str, Any] = {}
        if items:  # proto3 JSON omits an empty repeated field: no files → `{}`
            body["files"] = [self.store.file_json(r, ctx.base) for r in items]
        if token:
            body["nextPageToken"] = token
        return json_response(body, self.stats)

    async def file_delete(self, ctx: Ctx) -> web.StreamResponse:
        self._check_id_length(ctx.args[0], "DeleteFileRequest")
        self._file(ctx.args[0], ctx)
        self.store.delete_file(ctx.args[0])
        return json_response({}, self.stats)

    async def file_download(self, ctx: Ctx) -> web.StreamResponse:
        rec = self._file(ctx.args[0], ctx)
        self.stats.bytes_out += rec["size"]
        headers = {
            "Content-Type": rec["mime_type"]
            if "/" in rec["mime_type"]
            else "application/octet-stream"
        }
        return web.FileResponse(self.store.file_path(rec["id"]), headers=headers)

    # ---- batches ---------------------------------------------------------------------------
    def _job(self, jid: str, ctx: Ctx) -> dict[str, Any]:
        if not BATCH_ID.match(jid):  # L4J-IT: `batches/test-batch`
            raise ApiError(400, "Could not parse the batch name")
        rec = self.store.jobs.get(jid)
        if rec is None or not self._visible(rec, ctx):  # another key's job: 404 (SRCLIB #289)
            raise ApiError(404, f"Batch {jid} not found.")
        return rec

    async def create(self, ctx: Ctx) -> web.StreamResponse:
        embed = ctx.endpoint == "batches.create_embeddings"
        mid = answers.model_id(ctx.args[0])
        method = "asyncBatchEmbedContent" if embed else "batchGenerateContent"
        if not answers.is_known_model(mid):
            raise ApiError(
                404,
                f"models/{mid} is not found for API version {ctx.version}, or is not supported for "
                f"{method}. Call ListModels to see the list of available models and their supported methods.",
            )
        if answers.is_embedding_model(mid) != embed:
            raise ApiError(400, f"models/{mid} does not support {method}.")
        body = await self._json_body(ctx.request, MAX_CREATE_BODY)
        check_fields(body, ("batch",))
        batch = body.get("batch")
        if not isinstance(batch, dict):
            raise ApiError(400, "Invalid request: the `batch` field is required.")
        check_fields(batch, BATCH_FIELDS, "batch")
        cfg = answers.get(batch, "inputConfig") or {}
        if not isinstance(cfg, dict):
            raise ApiError(400, "Invalid value at 'batch.input_config': expected an object.")
        check_fields(cfg, ("fileName", "requests"), "batch.input_config")
        priority = self._priority(answers.get(batch, "priority"))
        file_name = answers.get(cfg, "fileName")
        requests = answers.get(cfg, "requests")
        inline: list[dict[str, Any]] | None = None
        count: int | None = None
        if bool(file_name) == bool(requests):
            raise ApiError(
                400, "Exactly one of input_config.file_name and input_config.requests is required."
            )
        if file_name:
            fid = str(file_name).removeprefix("files/")
            rec = self.store.files.get(fid)
            if rec is None or not self._visible(rec, ctx):  # L4J-IT: not 403 here
                raise ApiError(404, "Requested entity was not found.")
            tokens = max(1, rec["size"] // 4)
            path = self.store.file_path(fid)
            if self.settings.validate_input_at_create:
                problem = await asyncio.to_thread(input_check.check_input_file, path, embed=embed)
                if problem:
                    raise ApiError(400, problem)
            if rec["size"] <= SMALL_INPUT:  # count now so the PENDING job shows requestCount
                count = await asyncio.to_thread(count_lines, path)
        else:
            if isinstance(requests, dict):
                check_fields(requests, ("requests",), "batch.input_config.requests")
            items = requests.get("requests") if isinstance(requests, dict) else None
            if not isinstance(items, list) or not items:
                raise ApiError(400, "input_config.requests.requests must be a non-empty list.")
            inline = []
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    check_fields(
                        item, ("request", "metadata"), f"batch.input_config.requests.requests[{i}]"
                    )
                if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                    raise ApiError(400, "Each inlined request needs a `request` object.")
                entry = {"request": item["request"]}
                if "metadata" in item:
                    entry["metadata"] = item["metadata"]
                inline.append(entry)
            tokens = sum(answers.estimate_tokens(i["request"]) for i in inline)
            count = len(inline)
        self._check_limits(mid, tokens)
        display = answers.get(batch, "displayName")
        job = self.store.create_job(
            embed=embed,
            model=f"models/{mid}",
            display_name=display,
            input_file=f"files/{fid}" if file_name else None,
            inline=inline,
            tokens=tokens,
            request_count=count,
            priority=priority,
            owner=ctx.owner,
        )
        self.stats.creates_by_display_name[display or ""] += 1
        return json_response(self.store.operation(job), self.stats)

    @staticmethod
    def _priority(value: Any) -> int:
        """`batch.priority` (int64: a JSON number or a decimal string), 0 when absent."""
        if value is None:
            return 0
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError) as e:
            raise ApiError(
                400,
                f"Invalid value at 'batch.priority' (TYPE_INT64), {orjson.dumps(value).decode()}",
            ) from e

    def _check_limits(self, mid: str, tokens: int) -> None:
        active = self.store.active()
        if len(active) >= self.settings.max_active_jobs:
            raise ApiError(
                429,
                f"Too many concurrent batch jobs (limit {self.settings.max_active_jobs}).",
                details=[QUOTA_HELP],
            )
        limit = self.settings.max_enqueued_tokens.get(mid)
        if limit is not None:
            queued = sum(r["tokens"] for r in active if r["model"] == f"models/{mid}")
            if queued + tokens > limit:
                raise ApiError(
                    429,
                    f"Enqueued token limit exceeded for models/{mid}: {queued} enqueued + {tokens} "
                    f"requested > {limit}.",
                    details=[QUOTA_HELP],
                )

    async def batch_get(self, ctx: Ctx) -> web.StreamResponse:
        return json_response(self.store.operation(self._job(ctx.args[0], ctx)), self.stats)

    async def batch_list(self, ctx: Ctx) -> web.StreamResponse:
        recs = [r for r in self.store.jobs.values() if self._visible(r, ctx)]
        recs.sort(key=lambda r: r["create"], reverse=True)
        items, token = page(ctx.request.query, recs)
        body: dict[str, Any] = {}
        if items:  # proto3 JSON omits an empty repeated field: no batches → `{}`
            body["operations"] = [self.store.operation(r, with_inline=False) for r in items]
        if token:
            body["nextPageToken"] = token
        return json_response(body, self.stats)

    async def batch_cancel(self, ctx: Ctx) -> web.StreamResponse:
        # Best effort and 200 `{}` in every case: a finished job is left as it is, and a job
        # with an `[[ignore_cancel]]` request runs on (see Store.cancel).
        rec = self._job(ctx.args[0], ctx)
        if self.store.state_of(rec) not in TERMINAL:
            ignored = await asyncio.to_thread(self.store.ignores_cancel, rec)
            self.store.cancel(rec, ignored=ignored)
        return json_response({}, self.stats)

    async def batch_delete(self, ctx: Ctx) -> web.StreamResponse:
        self._job(ctx.args[0], ctx)
        self.store.delete_job(ctx.args[0])
        return json_response({}, self.stats)


def owner_of(key: str) -> str:
    """What a job or file records of the key that created it (a hash, not the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_app(
    api: Api, admin: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/__emulator/{tail:.*}", admin)
    app.router.add_route("*", "/{tail:.*}", api.dispatch)
    return app


__all__ = ["CREATE_ENDPOINTS", "Api", "ApiError", "build_app", "json_response"]
