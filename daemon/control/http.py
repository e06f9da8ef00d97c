"""The control socket: HTTP/1.1 + JSON over a Unix socket (SPEC §6), served by aiohttp.

``run_control`` runs inside the daemon's task group and never touches signals. The socket is
bound under a temporary name, given its mode (0600, or 0660 and ``[paths] socket_group``) and
then renamed into place, so it is never reachable with looser permissions. The service holds the
``state/lock`` flock before starting us, so an existing socket file is a dead daemon's: replaced.

``{ref}`` in ``/v1/inputs/{ref}`` is an input id or its path relative to the inbox (raw slashes
or ``%2F``); ``/cancel`` and ``/retry`` are recognised as suffixes. Every error is answered as
``{"error": {"code", "message"}}``; a failing handler gives 500 and the daemon keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

from daemon import __version__
from daemon.context import Context
from daemon.control.actions import ActionError, cancel_input, retry_input
from daemon.control.guard import ConnectionGuard
from daemon.control.metrics import NOT_SUBMITTED, Metrics
from daemon.control.views import input_detail, input_view, iso_ms
from daemon.states import ACTIVE_JOB_STATES, InputState
from daemon.store import Row, loads

log = structlog.get_logger(__name__)

MAX_BODY = 64 * 1024  # requests carry at most {"fresh": true}
MAX_LIMIT = 1000
CTX = web.AppKey("ctx", Context)
STARTED = web.AppKey("started_at", float)
METRICS = web.AppKey("metrics", Metrics)
GUARD = web.AppKey("guard", ConnectionGuard)
ACTIONS = ("cancel", "retry")


class ControlError(Exception):
    """The socket cannot be set up (path too long, occupied by a non-socket, unknown group)."""


# ---- responses ----------------------------------------------------------------------------------
def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(code: int, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status=code)


@web.middleware
async def _track(request: web.Request, handler: Any) -> web.StreamResponse:
    """A connection with a request in progress is neither timed out nor evicted."""
    guard = request.app.get(GUARD)
    if guard is None:
        return await handler(request)
    conn = guard.request_started(request.transport)
    try:
        return await handler(request)
    finally:
        guard.request_ended(conn)


async def _read_body(request: web.Request) -> bytes:
    """The request body, which must arrive within ``[control] header_timeout`` (else 408)."""
    with anyio.move_on_after(request.app[CTX].cfg.control.header_timeout):
        return await request.read()
    raise web.HTTPRequestTimeout(text="the request body did not arrive in time")


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.text and not e.text.startswith(f"{e.status}:"):
            message = e.text  # ours
        elif e.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif e.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = e.reason
        return _error(e.status, message)
    except ActionError as e:
        return _error(e.code, e.message)
    except Exception:
        log.exception("control_handler_failed", path=request.path, method=request.method)
        return _error(500, "internal error (see the daemon's log)")


# ---- handlers ---------------------------------------------------------------------------------
def _connections(app: web.Application) -> dict[str, Any]:
    guard = app.get(GUARD)
    return {
        "connections": None if guard is None else len(guard.open),
        "max_connections": app[CTX].cfg.control.max_connections,
        "refused": None if guard is None else guard.refused,
    }


async def get_status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    cfg = ctx.cfg
    counts = await ctx.store.counts_by_state()
    active = await ctx.store.count_jobs_in(ACTIVE_JOB_STATES)
    stuck = await ctx.store.stuck_jobs(cfg.poll.stuck_after)
    return _json(
        {
            "version": __version__,
            "pid": os.getpid(),
            "started": iso_ms(request.app[STARTED]),
            "uptime_seconds": round(time.time() - request.app[STARTED], 3),
            "paths": {
                "inbox": str(cfg.inbox_dir),
                "outbox": str(cfg.outbox_dir),
                "state": str(cfg.state_dir),
                "socket": str(cfg.socket_path),
            },
            "inputs": {s.value: counts.get(s.value, 0) for s in InputState},
            "queued_requests": await ctx.store.requests_in(NOT_SUBMITTED),
            "active_jobs": active,
            "max_active_jobs": cfg.submit.max_active_jobs,
            "control": _connections(request.app),
            "last_api_error": ctx.last_api_error,
            "paused": ctx.io_faults.summary(),  # a full / read-only disk or EIO, or None
            "io_faults": ctx.io_faults.active(),
            "stuck_jobs": [
                {
                    "input_id": j["input_id"],
                    "display_name": j["display_name"],
                    "remote_name": j["remote_name"],
                    "remote_state": j["remote_state"],
                    "submitted": iso_ms(j["submitted_at"]),
                }
                for j in stuck
            ],
            "not_visible_jobs": [
                {
                    "input_id": j["input_id"],
                    "remote_name": j["remote_name"],
                    "message": loads(j["error"])["message"],
                }
                for j in await ctx.store.not_visible_jobs()
            ],
        }
    )


async def list_inputs(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    state = request.query.get("state") or None
    if state is not None and state not in {s.value for s in InputState}:
        raise web.HTTPBadRequest(text=f"unknown state {state!r}")
    raw_limit = request.query.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise web.HTTPBadRequest(text=f"limit must be an integer, got {raw_limit!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise web.HTTPBadRequest(text=f"limit must be between 1 and {MAX_LIMIT}")
    rows = [_with_fault(ctx, r) for r in await ctx.store.list_inputs(state, limit)]
    jobs_by_input: dict[str, list[Row]] = {r["id"]: [] for r in rows}
    if rows:
        for j in await ctx.store.jobs_of_inputs(jobs_by_input):
            jobs_by_input[j["input_id"]].append(j)
    return _json({"inputs": [input_view(r, jobs_by_input[r["id"]]) for r in rows]})


async def _find(ctx: Context, ref: str) -> Row:
    row = await ctx.store.find_input(ref)
    if row is None:
        raise web.HTTPNotFound(text=f"no input {ref!r} (neither an id nor a path in the inbox)")
    return _with_fault(ctx, row)


def _with_fault(ctx: Context, row: Row) -> Row:
    """The input's disk fault as its reason, also when the store could not take that write (a
    full state disk)."""
    fault = ctx.io_faults.active().get(f"input:{row['id']}")
    if fault is None or (row["reason"] or "").startswith(fault):
        return row
    return row | {"reason": fault}


async def input_route(request: web.Request) -> web.Response:
    """``/v1/inputs/{ref}`` and ``/v1/inputs/{ref}/{cancel|retry}``."""
    ctx = request.app[CTX]
    ref = request.match_info["ref"]
    head, _, last = ref.rpartition("/")
    if head and last in ACTIONS:
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        row = await _find(ctx, head)
        if last == "cancel":
            await _read_body(request)  # allowed but ignored; still bounded by client_max_size
            row = await cancel_input(ctx, row["id"])
        else:
            row = await retry_input(ctx, row["id"], fresh=await _fresh_flag(request))
        return _json(await input_detail(ctx, row), status=202)
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    return _json(await input_detail(ctx, await _find(ctx, ref)))


async def _fresh_flag(request: web.Request) -> bool:
    fresh = request.query.get("fresh")
    body = await _read_body(request)
    if body.strip():
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise web.HTTPBadRequest(text=f"body is not JSON: {e}") from None
        if not isinstance(data, dict) or set(data) - {"fresh"}:
            raise web.HTTPBadRequest(text='body must be {"fresh": true|false} or empty')
        value = data.get("fresh", False)
        if not isinstance(value, bool):
            raise web.HTTPBadRequest(text="fresh must be true or false")
        return value
    if fresh is None:
        return False
    if fresh.lower() not in {"1", "true", "0", "false"}:
        raise web.HTTPBadRequest(text="fresh must be true or false")
    return fresh.lower() in {"1", "true"}


async def get_metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    body = await request.app[METRICS].render(request.app[CTX])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(ctx: Context, *, started_at: float) -> web.Application:
    """The aiohttp application (also used directly by tests)."""
    app = web.Application(middlewares=[_track, _errors], client_max_size=MAX_BODY)
    app[CTX] = ctx
    app[STARTED] = started_at
    if ctx.metrics is None:
        ctx.metrics = Metrics(started_at=started_at)
    app[METRICS] = ctx.metrics
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/inputs", list_inputs)
    app.router.add_route("*", "/v1/inputs/{ref:.+}", input_route)
    app.router.add_get("/metrics", get_metrics)
    return app


# ---- the socket -------------------------------------------------------------------------------
def bind_socket(path: Path, group: str | None) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600 (0660 and ``group``), replacing a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket; not replacing it")
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ControlError(f"[paths] socket_group: no group {group!r}") from None
    tmp = path.parent / f".control-{os.getpid()}.sock"
    if len(os.fsencode(tmp)) > 107 or len(os.fsencode(path)) > 107:
        raise ControlError(f"socket path too long for AF_UNIX (max 107 bytes): {path}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o660 if group else 0o600)
        if group:
            os.chown(tmp, -1, gid)
        sock.listen(128)
        os.replace(tmp, path)  # atomically replaces a stale socket of a dead daemon
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    sock.setblocking(False)
    return sock


async def run_control(
    ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control API on ``cfg.socket_path`` until cancelled; then remove the socket."""
    path = ctx.cfg.socket_path
    started_at = time.time()
    app = make_app(ctx, started_at=started_at)
    limits = ctx.cfg.control
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=limits.idle_timeout
    )

    def protocol() -> Any:
        assert runner.server is not None  # set up below, before the first connection
        return runner.server()

    guard = app[GUARD] = ConnectionGuard(limits, protocol)
    await runner.setup()
    sock: socket.socket | None = None
    server: asyncio.Server | None = None
    inode = -1
    try:
        sock = bind_socket(path, ctx.cfg.paths.socket_group)
        inode = path.lstat().st_ino
        server = await asyncio.get_running_loop().create_server(guard, sock=sock)
        log.info("control_listening", socket=str(path))
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            if server is not None:
                server.close()
            await runner.cleanup()
            if sock is not None:
                sock.close()
                with contextlib.suppress(OSError):
                    if path.lstat().st_ino == inode:  # never remove a socket that is not ours
                        path.unlink()
