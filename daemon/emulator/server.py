"""The `Emulator`: an aiohttp server in the current event loop, plus its `/__emulator/` admin API."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from daemon.emulator.app import Api, ApiError, build_app, json_response
from daemon.emulator.faults import EmulatorSettings, Faults, Stats
from daemon.emulator.state import Store

FORCEABLE = ("FAILED", "EXPIRED")


class Emulator:
    """A local Gemini API (Files + Batches) that the real google-genai SDK accepts."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: Path | None = None,
        settings: EmulatorSettings | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.settings = settings or EmulatorSettings()
        self.url = ""
        self._stats = Stats()
        self._faults = Faults(self.settings)
        self._runner: web.AppRunner | None = None
        self._tmp: str | None = None
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        assert self._store is not None, "emulator not started"
        return self._store

    @property
    def stats(self) -> dict[str, Any]:
        out = self._stats.to_dict()
        if self._store is not None:
            out |= {
                "active_jobs": len(self._store.active()),
                "jobs": len(self._store.jobs),
                "files": len(self._store.files),
            }
        return out

    def fail_next(self, endpoint: str, kind: str, count: int = 1) -> None:
        """The next `count` calls of `endpoint` get fault `kind`."""
        self._faults.fail_next(endpoint, kind, count)

    def force_next(self, state: str, count: int = 1) -> None:
        """The next `count` jobs created end in `state` (FAILED or EXPIRED)."""
        if state not in FORCEABLE:
            raise ValueError(f"state must be one of {FORCEABLE}")
        self.store.forced.extend([state] * count)

    async def start(self) -> str:
        if self.data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="gemini-emulator-")
            root = Path(self._tmp)
        else:
            root = self.data_dir
            root.mkdir(parents=True, exist_ok=True)
        self._store = Store(root, self.settings)
        self._store.cleanup_temp()
        self._store.resume_workers()
        api = Api(self._store, self._faults, self._stats)
        self._runner = web.AppRunner(
            build_app(api, self._admin), handle_signals=False, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            await self._store.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- admin API -------------------------------------------------------------------------
    async def _admin(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._admin_inner(request)
        except ApiError as e:
            err = {"code": e.code, "message": e.message, "status": e.status}
            return json_response({"error": err}, self._stats, e.code)
        except (ValueError, KeyError, TypeError) as e:
            err = {
                "code": 400,
                "message": f"bad admin request: {e!r}",
                "status": "INVALID_ARGUMENT",
            }
            return json_response({"error": err}, self._stats, 400)

    async def _admin_inner(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        raw = await request.read() if request.method == "POST" else b""
        body: dict[str, Any] = orjson.loads(raw) if raw.strip() else {}
        ok = {"ok": True}
        if request.method == "GET" and tail == "stats":
            return web.json_response(self.stats)
        if request.method == "GET" and tail == "config":
            return web.json_response(self.settings.to_dict())
        if request.method != "POST":
            raise ApiError(404, f"No admin route {request.method} {tail}")
        if tail == "config":
            self.settings.update(body)
            return web.json_response(self.settings.to_dict())
        if tail == "fail_next":
            self.fail_next(body["endpoint"], str(body["kind"]), int(body.get("count", 1)))
            return web.json_response(ok)
        if tail == "force":
            self.force_next(body["state"], int(body.get("count", 1)))
            return web.json_response(ok)
        if tail == "reset":
            self._stats.reset()
            self._faults.clear()
            self.store.forced.clear()
            return web.json_response(ok)
        if tail.startswith("batches/") and tail.endswith(":force"):
            jid = tail.removeprefix("batches/").removesuffix(":force")
            rec = self.store.jobs.get(jid)
            if rec is None:
                raise ApiError(404, f"Batch {jid} not found.")
            if body.get("state") not in (*FORCEABLE, "SUCCEEDED"):
                raise ValueError(f"state must be one of {(*FORCEABLE, 'SUCCEEDED')}")
            try:
                self.store.force(rec, body["state"])
            except ValueError as e:
                raise ApiError(400, str(e), "FAILED_PRECONDITION") from e
            return web.json_response(self.store.operation(rec))
        raise ApiError(404, f"No admin route POST {tail}")
