"""The store: SQLite through aiosqlite, the single source of truth for every stage.

Two connections. Writes go through :meth:`Store.tx` on the writer connection, which holds an
``anyio.Lock`` and runs ``BEGIN IMMEDIATE … COMMIT`` (aiosqlite shares one transaction between tasks,
so unserialised transactions would interleave). Reads go through a second, read-only connection: in WAL
mode it sees only committed state, so a task never acts on another task's uncommitted (perhaps later
rolled back) rows. The task inside a transaction reads through the writer, and so sees its own writes.
Stages read and write rows as plain dicts.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import anyio
import orjson

from daemon.states import FINAL_INPUT_STATES, InputState, JobState
from daemon.store.schema import MIGRATIONS

Row = dict[str, Any]
MediaId = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns of a media file


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer version)."""


def new_input_id() -> str:
    """A short, time-sortable id: milliseconds in hex plus randomness."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class Store:
    """Owns the one SQLite connection. Use ``async with Store.open(path) as store``."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._lock = anyio.Lock()
        self._reader: aiosqlite.Connection | None = None
        self._tx_task: int | None = None  # the task inside tx(), which reads through the writer

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Store]:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=FULL",  # a lost commit after a create could mean paying twice
                "PRAGMA foreign_keys=ON",
                "PRAGMA busy_timeout=5000",
            ):
                await conn.execute(pragma)
            store = cls(conn, path)
            await store._migrate()
            async with store._open_reader():
                yield store
        finally:
            # Shielded: a close abandoned by cancellation would finish in aiosqlite's thread after
            # the event loop is gone ("Event loop is closed").
            with anyio.CancelScope(shield=True):
                await conn.close()

    @asynccontextmanager
    async def _open_reader(self) -> AsyncIterator[None]:
        reader = await aiosqlite.connect(
            f"file:{quote(str(self.path))}?mode=ro", uri=True, isolation_level=None, timeout=5.0
        )
        try:
            reader.row_factory = sqlite3.Row
            await reader.execute("PRAGMA busy_timeout=5000")
            await reader.execute("PRAGMA query_only=ON")
            self._reader = reader
            yield
        finally:
            self._reader = None
            with anyio.CancelScope(shield=True):
                await reader.close()

    def _read_conn(self) -> aiosqlite.Connection:
        """The reader, except for the task inside :meth:`tx` (it must see its own writes)."""
        if self._reader is None or self._tx_task == _task_id():
            return self.conn
        return self._reader

    async def _migrate(self) -> None:
        (version,) = await self._one_value("PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this gemini-batchd knows "
                f"({len(MIGRATIONS)}); upgrade gemini-batchd"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            async with self.tx() as conn:
                for statement in MIGRATIONS[number - 1]:
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")

    async def _one_value(self, sql: str, params: Iterable[Any] = ()) -> tuple[Any, ...]:
        async with self.conn.execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (BEGIN IMMEDIATE … COMMIT), serialised across tasks."""
        async with self._lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            self._tx_task = _task_id()
            try:
                yield self.conn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._rollback()
                raise
            else:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.conn.execute("COMMIT")
                    except sqlite3.Error:  # e.g. a full disk: the transaction may still be open
                        await self._rollback()
                        raise
            finally:
                self._tx_task = None

    async def _rollback(self) -> None:
        """Roll back if a transaction is open; SQLite may have done it itself (a full disk),
        and a failing ROLLBACK must not hide the error that caused it."""
        if self.conn.in_transaction:
            try:
                await self.conn.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass

    # ---- generic reads ----------------------------------------------------------------------
    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        async with self._read_conn().execute(sql, tuple(params)) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        async with self._read_conn().execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        return dict(row) if row is not None else None

    async def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))

    # ---- inputs -----------------------------------------------------------------------------
    async def add_input(self, conn: aiosqlite.Connection, **fields: Any) -> Row:
        """Insert an input row inside the caller's transaction; records the first history entry."""
        now = time.time()
        fields.setdefault("id", new_input_id())
        fields.setdefault("state", InputState.SEEN.value)
        fields.setdefault("created_at", now)
        fields["updated_at"] = now
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        await conn.execute(
            f"INSERT INTO inputs ({cols}) VALUES ({marks})",
            tuple(_plain(v) for v in fields.values()),
        )
        await self.add_history(conn, fields["id"], fields["state"], None, at=now)
        return fields

    async def add_history(
        self,
        conn: aiosqlite.Connection,
        input_id: str,
        state: str,
        note: str | None,
        *,
        at: float | None = None,
    ) -> None:
        await conn.execute(
            "INSERT INTO history (input_id, at, state, note) VALUES (?, ?, ?, ?)",
            (input_id, at or time.time(), str(state), note),
        )

    async def set_input_state(
        self,
        conn: aiosqlite.Connection,
        input_id: str,
        state: InputState,
        *,
        note: str | None = None,
        **fields: Any,
    ) -> None:
        """Move an input to ``state`` (inside the caller's transaction), with a history entry
        when the state changes. Extra ``fields`` are written in the same statement."""
        now = time.time()
        old = await self._state_of(conn, input_id)
        fields["state"] = state.value
        fields["updated_at"] = now
        if state in FINAL_INPUT_STATES and "finished_at" not in fields:
            fields["finished_at"] = now
        await self._update(conn, "inputs", "id", input_id, fields)
        if old != state.value:
            await self.add_history(conn, input_id, state.value, note, at=now)

    async def _state_of(self, conn: aiosqlite.Connection, input_id: str) -> str | None:
        async with conn.execute("SELECT state FROM inputs WHERE id = ?", (input_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def update_input(self, conn: aiosqlite.Connection, input_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        await self._update(conn, "inputs", "id", input_id, fields)

    async def mark_cancelled_outside(
        self, conn: aiosqlite.Connection, input_ids: Iterable[str], reason: str
    ) -> list[str]:
        """Inputs whose job the API reports CANCELLED without the daemon having asked:
        ``cancel_requested = 2`` (no resubmission, unstarted parts dropped) and ``reason``.
        Inputs already cancelled by request are left alone; returns the ids marked."""
        marked = []
        for input_id in dict.fromkeys(input_ids):
            async with conn.execute(
                "UPDATE inputs SET cancel_requested = 2, reason = ?, updated_at = ? "
                "WHERE id = ? AND cancel_requested = 0 RETURNING state",
                (reason, time.time(), input_id),
            ) as cur:
                row = await cur.fetchone()
            if row is not None:
                await self.add_history(conn, input_id, row[0], reason)
                marked.append(input_id)
        return marked

    async def cancel_requested_at(self, input_id: str, note: str) -> float | None:
        """When the input's latest history entry with ``note`` (the cancel request) was made."""
        return await self.scalar(
            "SELECT MAX(at) FROM history WHERE input_id = ? AND note = ?", (input_id, note)
        )

    async def clear_reason(self, conn: aiosqlite.Connection, input_id: str, prefix: str) -> None:
        """Forget the input's reason if it still starts with ``prefix`` (a wait that is over)."""
        await conn.execute(
            "UPDATE inputs SET reason = NULL, updated_at = ? WHERE id = ? AND substr(reason, 1, ?) = ?",
            (time.time(), input_id, len(prefix), prefix),
        )

    async def get_input(self, input_id: str) -> Row | None:
        return await self.fetchone("SELECT * FROM inputs WHERE id = ?", (input_id,))

    async def find_input(self, ref: str) -> Row | None:
        """An input by id, or by its path relative to the inbox (its latest drop)."""
        row = await self.get_input(ref)
        if row is None:
            row = await self.fetchone(
                "SELECT * FROM inputs WHERE rel_path = ? ORDER BY created_at DESC, id DESC LIMIT 1",
                (ref.strip("/"),),
            )
        return row

    async def newer_final_drop(self, row: Row) -> str | None:
        """The id of a later drop of the same path that has already ended (published), if any."""
        finals = sorted(s.value for s in FINAL_INPUT_STATES)
        marks = ", ".join("?" for _ in finals)
        value = await self.scalar(
            "SELECT id FROM inputs WHERE rel_path = ? AND id != ? "
            "AND (created_at > ? OR (created_at = ? AND id > ?)) "
            f"AND state IN ({marks}) ORDER BY created_at DESC, id DESC LIMIT 1",
            (row["rel_path"], row["id"], row["created_at"], row["created_at"], row["id"], *finals),
        )
        return None if value is None else str(value)

    async def inputs_in(self, *states: InputState) -> list[Row]:
        marks = ", ".join("?" for _ in states)
        return await self.fetchall(
            f"SELECT * FROM inputs WHERE state IN ({marks}) ORDER BY created_at, id",
            [s.value for s in states],
        )

    async def list_inputs(self, state: str | None = None, limit: int = 100) -> list[Row]:
        if state:
            return await self.fetchall(
                "SELECT * FROM inputs WHERE state = ? ORDER BY created_at DESC, id DESC LIMIT ?",
                (state, limit),
            )
        return await self.fetchall(
            "SELECT * FROM inputs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
        )

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self.fetchall("SELECT state, COUNT(*) AS n FROM inputs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    async def history(self, input_id: str) -> list[Row]:
        return await self.fetchall(
            "SELECT at, state, note FROM history WHERE input_id = ? ORDER BY id", (input_id,)
        )

    # ---- parts and jobs ---------------------------------------------------------------------
    async def add_part(self, conn: aiosqlite.Connection, **fields: Any) -> None:
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        await conn.execute(
            f"INSERT INTO parts ({cols}) VALUES ({marks})",
            tuple(_plain(v) for v in fields.values()),
        )

    async def add_job(self, conn: aiosqlite.Connection, **fields: Any) -> int:
        """Insert a job row (state ``planned`` unless given); returns its id."""
        now = time.time()
        fields.setdefault("state", JobState.PLANNED.value)
        fields.setdefault("created_at", now)
        fields["updated_at"] = now
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        cur = await conn.execute(
            f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(_plain(v) for v in fields.values())
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def update_job(self, conn: aiosqlite.Connection, job_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        await self._update(conn, "jobs", "id", job_id, fields)

    async def get_job(self, job_id: int) -> Row | None:
        return await self.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def parts_of(self, input_id: str) -> list[Row]:
        return await self.fetchall(
            "SELECT * FROM parts WHERE input_id = ? ORDER BY part_no", (input_id,)
        )

    async def add_job_attempt(
        self, conn: aiosqlite.Connection, first: Row, attempt: int, display_name: str
    ) -> int:
        """A ``planned`` row for a later ``attempt`` of ``first``'s part (recovery: one that
        exists remotely and is adopted at once); returns its id."""
        now = time.time()
        cur = await conn.execute(
            "INSERT INTO jobs (input_id, part_no, attempt, display_name, state, mode, source_path, "
            "source_start, source_end, request_count, est_tokens, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, 'planned', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *(first["input_id"], first["part_no"], attempt, display_name, first["mode"]),
                *(first["source_path"], first["source_start"], first["source_end"]),
                *(first["request_count"], first["est_tokens"], now, now),
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def jobs_of(self, input_id: str) -> list[Row]:
        return await self.fetchall(
            "SELECT * FROM jobs WHERE input_id = ? ORDER BY part_no, attempt", (input_id,)
        )

    async def jobs_in(self, *states: JobState) -> list[Row]:
        marks = ", ".join("?" for _ in states)
        return await self.fetchall(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", [s.value for s in states]
        )

    # ---- API key fingerprints ---------------------------------------------------------------
    async def key_salt(self) -> bytes:
        """This state folder's random salt for API key fingerprints (made on first use)."""
        async with self.tx() as conn:
            async with conn.execute("SELECT salt FROM key_salt WHERE id = 1") as cur:
                row = await cur.fetchone()
            if row is not None:
                return bytes(row[0])
            salt = secrets.token_bytes(32)
            await conn.execute("INSERT INTO key_salt (id, salt) VALUES (1, ?)", (salt,))
            return salt

    async def mark_key(self, conn: aiosqlite.Connection, job_ids: list[int], fp: str) -> None:
        """Record that these jobs are (about to be) created with the key whose fingerprint is
        ``fp``."""
        await conn.executemany(
            "UPDATE jobs SET key_fp = ? WHERE id = ?", [(fp, i) for i in job_ids]
        )

    async def other_active_job(self, key_fp: str | None, not_in: list[str]) -> str | None:
        """The remote name of the newest active job created with ``key_fp`` (NULL matches NULL)
        that is not among ``not_in``, or None."""
        marks = ", ".join("?" for _ in not_in) or "NULL"
        return await self.scalar(
            "SELECT remote_name FROM jobs WHERE state = 'active' AND key_fp IS ? AND remote_name "
            f"IS NOT NULL AND remote_name NOT IN ({marks}) ORDER BY submitted_at DESC LIMIT 1",
            (key_fp, *not_in),
        )

    async def not_visible_jobs(self) -> list[Row]:
        """Active jobs held after a 404 (:mod:`daemon.track.missing`)."""
        return await self.fetchall(
            "SELECT input_id, display_name, remote_name, error FROM jobs WHERE state = 'active' "
            "AND error LIKE '%\"not_visible\":true%' ORDER BY id"
        )

    @staticmethod
    async def clear_input_reasons(
        conn: aiosqlite.Connection, input_ids: list[str], prefix: str
    ) -> None:
        """Clear the reason of these inputs if it starts with ``prefix``."""
        await conn.executemany(
            "UPDATE inputs SET reason = NULL, updated_at = ? WHERE id = ? AND substr(reason, 1, ?) = ?",
            [(time.time(), i, len(prefix), prefix) for i in input_ids],
        )

    # ---- media cache ------------------------------------------------------------------------
    async def get_media(self, sha256: str) -> Row | None:
        return await self.fetchone("SELECT * FROM media WHERE sha256 = ?", (sha256,))

    async def put_media(self, **fields: Any) -> None:
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        async with self.tx() as conn:
            await conn.execute(
                f"INSERT OR REPLACE INTO media ({cols}) VALUES ({marks})",
                tuple(_plain(v) for v in fields.values()),
            )

    async def add_input_media(
        self, conn: aiosqlite.Connection, input_id: str, ids: Mapping[str, MediaId]
    ) -> None:
        """Record (in the caller's transaction) the file each media name was at validation."""
        await conn.executemany(
            "INSERT OR REPLACE INTO input_media (input_id, name, dev, ino, size, mtime_ns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(input_id, name, *ident) for name, ident in ids.items()],
        )

    async def input_media(self, input_id: str) -> dict[str, MediaId]:
        """Media name → (device, inode, size, mtime_ns) recorded at the input's validation."""
        rows = await self.fetchall(
            "SELECT name, dev, ino, size, mtime_ns FROM input_media WHERE input_id = ?",
            (input_id,),
        )
        return {r["name"]: (r["dev"], r["ino"], r["size"], r["mtime_ns"]) for r in rows}

    # ---- helpers ----------------------------------------------------------------------------
    @staticmethod
    async def _update(
        conn: aiosqlite.Connection, table: str, key: str, value: Any, fields: Mapping[str, Any]
    ) -> None:
        if not fields:
            return
        sets = ", ".join(f"{c} = ?" for c in fields)
        await conn.execute(
            f"UPDATE {table} SET {sets} WHERE {key} = ?",
            (*[_plain(v) for v in fields.values()], value),
        )


def _task_id() -> int:
    return anyio.get_current_task().id


def _plain(value: Any) -> Any:
    """Enums to their values, paths to text, dicts/lists to JSON."""
    if isinstance(value, InputState | JobState):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict | list):
        return dumps(value)
    return value
