"""The daemon's lifecycle: lock, store, recovery, one task group, READY, signals, shutdown deadline.

Shape (after APScheduler 4): every stage is started with ``tg.start`` and reports ready through its
``task_status``; only when all are up (recovery done, watcher live) do we send ``READY=1``. Shutdown is
the cancellation of that one task group, bounded by ``[daemon] shutdown_seconds`` in one place.
Nothing here is lost by being cancelled: every stage commits its intent before its side effect, and the
next start resumes from what the store says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon import __version__, fsio, systemd
from daemon.config import Config, ConfigError, load_config, read_api_key
from daemon.context import Context
from daemon.io_faults import IOFaults
from daemon.logs import set_level
from daemon.store import Store, StoreError, guard
from daemon.supervise import supervised, with_retry

log = structlog.get_logger(__name__)

EX_CONFIG = 78


class AlreadyRunning(Exception):
    """Another daemon holds the state folder's lock."""


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``state/lock`` (one daemon per state folder)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(
                f"another gemini-batchd (pid {pid}) is running on {state_dir}; refusing to start"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _make_dirs(cfg: Config) -> None:
    fsio.share(cfg.outbox_dir)  # producers can write there: no planted link is followed
    for d in (cfg.inbox_dir, cfg.outbox_dir, cfg.state_dir / "work", cfg.state_dir / "results"):
        d.mkdir(parents=True, exist_ok=True)
    cfg.socket_path.parent.mkdir(parents=True, exist_ok=True)


async def _status_line(ctx: Context) -> str:
    counts = await ctx.store.counts_by_state()
    waiting = sum(counts.get(s, 0) for s in ("seen", "validating", "queued"))
    running = sum(counts.get(s, 0) for s in ("uploading", "submitted", "running", "downloading"))
    done = sum(counts.get(s, 0) for s in ("succeeded", "partial"))
    bad = sum(counts.get(s, 0) for s in ("failed", "expired", "cancelled", "rejected"))
    line = f"queued {waiting}, running {running}, done {done}, failed {bad}"
    paused = ctx.io_faults.summary()
    return f"{paused}; {line}" if paused else line


async def _run_status(ctx: Context, health: dict[str, float]) -> None:
    """Keep systemd's STATUS= line current and record that the store answers (watchdog health)."""
    last = ""
    while True:
        with anyio.move_on_after(10):
            line = await _status_line(ctx)
            health["store_ok_at"] = time.monotonic()
            if line != last:
                systemd.status(line)
                last = line
        await anyio.sleep(2)


async def _run_signals(
    ctx: Context,
    scope: anyio.CancelScope,
    stopping: threading.Event,
    adjust: Callable[[Config], Config],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The one place that handles signals: TERM/INT stop, HUP reloads and rescans."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                _reload(ctx, adjust)
                continue
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            systemd.stopping()
            stopping.set()
            scope.cancel()
            return


def _as_is(cfg: Config) -> Config:
    return cfg


def _reload(ctx: Context, adjust: Callable[[Config], Config] = _as_is) -> None:
    """SIGHUP: re-read the config (``adjust``ed as at start); settings that are safe to change
    take effect, then rescan."""
    try:
        new = adjust(load_config(ctx.cfg.source)) if ctx.cfg.source else ctx.cfg
    except ConfigError as e:
        log.error("reload_failed", error=str(e))
        return
    if new.paths != ctx.cfg.paths:
        log.warning("reload_paths_ignored", hint="folder changes need a restart")
        new = new.replace(paths=ctx.cfg.paths)
    ctx.cfg = new
    set_level(new.daemon.log_level)
    ctx.wake.scan.set()
    log.warning("config_reloaded", source=new.source, log_level=new.daemon.log_level)


async def run_service(
    ctx_factory: Any,
    cfg: Config,
    *,
    task_status: TaskStatus[Context] = anyio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    stopping: threading.Event | None = None,
    adjust: Callable[[Config], Config] = _as_is,
) -> None:
    """Run every stage until cancelled. ``ctx_factory(cfg)`` is an async context manager yielding
    the :class:`Context` (store and API client opened); tests pass their own. ``adjust`` is
    applied to the config again when SIGHUP re-reads it (``cfg`` already went through it)."""
    from daemon.control.http import run_control
    from daemon.intake.claim import recover_claims
    from daemon.intake.validate_stage import reset_validating, run_validator
    from daemon.intake.watch import run_inbox
    from daemon.results.collect import run_collector
    from daemon.submit.submitter import recover_submissions, run_submitter
    from daemon.track.poll import run_pollers

    _make_dirs(cfg)
    stopping = stopping or threading.Event()
    async with ctx_factory(cfg) as ctx, anyio.create_task_group() as tg:
        ctx.io_faults = IOFaults(cfg.daemon.io_retry_initial, cfg.daemon.io_retry_max)
        if handle_signals:  # first: a SIGTERM during recovery or start-up is a clean stop too
            await tg.start(_run_signals, ctx, tg.cancel_scope, stopping, adjust)
        await with_retry(ctx, "recovery", recover_claims)
        await with_retry(ctx, "recovery", recover_submissions)
        log.info("recovery_done", **await ctx.store.counts_by_state())
        health = {"store_ok_at": time.monotonic()}
        await tg.start(run_control, ctx)
        # A stage stopped by a full / read-only disk is started again once it takes writes.
        await tg.start(supervised, ctx, "validate", run_validator, reset_validating)
        await tg.start(supervised, ctx, "submit", run_submitter, recover_submissions)
        await tg.start(supervised, ctx, "poll", run_pollers)
        await tg.start(supervised, ctx, "collect", run_collector)
        # run_inbox reports started once the watcher is live and the first scan ran.
        await tg.start(supervised, ctx, "inbox", run_inbox)
        tg.start_soon(_run_status, ctx, health)
        interval = systemd.watchdog_interval()
        if interval:
            tg.start_soon(
                lambda: systemd.run_watchdog(
                    lambda: time.monotonic() - health["store_ok_at"] < 6 * interval + 10,
                    interval=interval,
                )
            )
        line = await _status_line(ctx)
        systemd.ready(line)
        log.info("daemon_ready", version=__version__, inbox=str(cfg.inbox_dir), status=line)
        task_status.started(ctx)


@contextlib.asynccontextmanager
async def open_context(
    cfg: Config, *, api_key: str, base_url: str | None = None
) -> AsyncIterator[Context]:
    """The production context: the store and the API client."""
    from daemon.gemini import GeminiClient

    try:
        async with Store.open(cfg.db_path) as store:
            try:
                guard.mark_open(cfg.state_dir)
            except OSError as e:  # a read-only state folder: only the -wal check is lost
                log.warning("store_marker_not_written", error=str(e))
            gemini = GeminiClient(cfg, api_key, base_url=base_url)
            try:
                fp = gemini.key_fingerprint(await store.key_salt())
                yield Context(cfg=cfg, store=store, gemini=gemini, key_fp=fp)
            finally:
                with anyio.CancelScope(shield=True):
                    await gemini.aclose()
    finally:
        with contextlib.suppress(OSError):
            guard.mark_closed(cfg.state_dir)


def _shutdown_deadline(
    stopping: threading.Event, finished: threading.Event, seconds: float
) -> None:
    """The one hard deadline: once a stop was asked for, leave after ``seconds`` even if some step
    has not reached its safe point (the next start reconciles it)."""

    def watch() -> None:
        stopping.wait()
        if not finished.wait(seconds):
            log.error("shutdown_deadline_exceeded", seconds=seconds)
            os._exit(1)

    threading.Thread(target=watch, name="shutdown-deadline", daemon=True).start()


def main_run(cfg: Config, *, emulator: bool = False) -> int:
    """``gemini-batchd run``: the foreground daemon (what systemd runs)."""
    from daemon.logs import configure_logging

    try:
        api_key = read_api_key(cfg)
    except ConfigError as e:
        print(f"gemini-batchd: bad config: {e}", file=sys.stderr)
        return EX_CONFIG
    if api_key is None and not emulator:
        print(
            "gemini-batchd: no API key: set GEMINI_API_KEY, [gemini] api_key_file, or a systemd "
            "credential named gemini-api-key (or use --emulator for a dry run)",
            file=sys.stderr,
        )
        return EX_CONFIG
    configure_logging(
        cfg.daemon.log_level, cfg.daemon.log_format, secrets=[api_key] if api_key else []
    )
    try:
        with state_lock(cfg.state_dir):
            guard.check_store(cfg.db_path, cfg.state_dir / "work")
            return anyio.run(_main_async, cfg, api_key, emulator, backend="asyncio")
    except AlreadyRunning as e:
        print(f"gemini-batchd: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"gemini-batchd: {e}", file=sys.stderr)
        return EX_CONFIG
    except Exception as e:
        corrupt = _corruption(e)
        if corrupt is None:
            raise
        print(f"gemini-batchd: {guard.corrupt_message(cfg.db_path, corrupt)}", file=sys.stderr)
        return EX_CONFIG


def _corruption(e: BaseException) -> sqlite3.DatabaseError | None:
    """The SQLite corruption error in ``e`` (or its group), if that is what ended the daemon."""
    if isinstance(e, BaseExceptionGroup):
        return next(filter(None, map(_corruption, e.exceptions)), None)
    if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
        return e
    return None


def _for_emulator(cfg: Config) -> Config:
    """Emulated jobs finish in about a second: poll accordingly so a dry run shows results at
    once."""
    return cfg.replace(
        poll=dataclasses.replace(cfg.poll, min_interval=min(cfg.poll.min_interval, 0.5))
    )


async def _main_async(cfg: Config, api_key: str | None, emulator: bool) -> int:
    base_url = cfg.gemini.base_url
    emu = None
    adjust = _as_is
    if emulator:
        from daemon.emulator import Emulator

        emu = Emulator(data_dir=cfg.state_dir / "emulator")
        base_url = await emu.start()
        api_key = api_key or "emulator-key"
        adjust = _for_emulator
        cfg = adjust(cfg)
        log.info("emulator_started", url=base_url)
    assert api_key is not None
    key = api_key
    stopping, finished = threading.Event(), threading.Event()
    _shutdown_deadline(stopping, finished, cfg.daemon.shutdown_seconds)

    def factory(c: Config) -> Any:
        return open_context(c, api_key=key, base_url=base_url)

    try:
        await run_service(factory, cfg, stopping=stopping, adjust=adjust)
    finally:
        if emu is not None:
            with anyio.CancelScope(shield=True):
                await emu.stop()
        finished.set()
    log.info("daemon_stopped")
    return 0
