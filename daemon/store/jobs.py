"""Rows of parts and jobs (one job per attempt of a part), and API key fingerprints."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aiosqlite

from daemon.states import LOST_JOB_ERROR, InputState, JobState
from daemon.store.base import Row, _plain, dumps
from daemon.store.inputs import InputRows
from daemon.store.rows import DueJob


class JobRows(InputRows):
    # over InputRows: a job's change moves its input in the same transaction
    """Parts, jobs and the key fingerprints they were created with."""

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

    async def plan_parts(
        self,
        conn: aiosqlite.Connection,
        parts: Iterable[tuple[Any, ...]],
        jobs: Iterable[tuple[Any, ...]],
    ) -> None:
        """Insert a validated input's parts and their first (``planned``) jobs: ``parts`` rows are
        ``(input, part, first line, last line, start, end, requests, size, tokens)``, ``jobs``
        rows ``(input, part, attempt, display name, mode, source, source start, source end,
        requests, tokens, state, created, updated)``."""
        await conn.executemany(
            "INSERT INTO parts (input_id, part_no, first_line, last_line, start_offset, "
            "end_offset, request_count, size_bytes, est_tokens) VALUES (?,?,?,?,?,?,?,?,?)",
            list(parts),
        )
        await conn.executemany(
            "INSERT INTO jobs (input_id, part_no, attempt, display_name, mode, source_path, "
            "source_start, source_end, request_count, est_tokens, state, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            list(jobs),
        )

    # ---- submission ------------------------------------------------------------------------
    async def in_flight_by_model(self) -> tuple[int, dict[str, int]]:
        """Jobs uploading, creating or active: how many, and their estimated tokens per model."""
        rows = await self.fetchall(
            "SELECT i.model AS model, COUNT(*) AS n, COALESCE(SUM(j.est_tokens), 0) AS tokens "
            "FROM jobs j JOIN inputs i ON i.id = j.input_id "
            "WHERE j.state IN ('uploading', 'creating', 'active') GROUP BY i.model"
        )
        return sum(r["n"] for r in rows), {r["model"]: r["tokens"] for r in rows}

    async def cancel_unstarted(self) -> int:
        """Jobs of cancelled inputs that cannot exist remotely → ``cancelled``: ``planned`` ones,
        and ``creating`` ones whose bookkeeping says no create reached the API; returns how many."""
        async with self.tx() as conn:
            cur = await conn.execute(
                "UPDATE jobs SET state = 'cancelled', updated_at = ? WHERE (state = 'planned' OR "
                "(state = 'creating' AND check_remote = 0)) "
                "AND input_id IN (SELECT id FROM inputs WHERE cancel_requested != 0)",
                (time.time(),),
            )
            return cur.rowcount

    async def due_for_submit(self, now: float, limit: int) -> list[DueJob]:
        """Up to ``limit`` due jobs, with their input's ``model``, ``kind``, ``media_count`` and
        ``cancel_requested``: ``creating`` ones first (by input age), then ``planned`` ones in
        the order they were planned (by job id, which the ``jobs_state`` index yields in order:
        no sort of the backlog)."""
        rows = await self._typed(
            _DUE + "WHERE j.state = 'creating' AND j.not_before <= ? "
            "ORDER BY i.created_at, i.id, j.part_no, j.attempt LIMIT ?",
            (now, limit),
        )
        if len(rows) < limit:
            rows += await self._typed(
                _DUE + "WHERE j.state = 'planned' AND j.not_before <= ? ORDER BY j.id LIMIT ?",
                (now, limit - len(rows)),
            )
        return rows

    async def creating_jobs(self) -> list[DueJob]:
        """Every ``creating`` job, with the input fields of :meth:`due_for_submit`."""
        return await self._typed(_DUE + "WHERE j.state = 'creating' ORDER BY j.id")

    async def commit_intents(
        self,
        jobs: list[DueJob],
        upload_ids: list[int],
        waiting_reason: Mapping[str, str],
        key_fp: str | None,
    ) -> list[DueJob]:
        """One transaction: each planned job → ``uploading`` (``upload_ids``) or ``creating``,
        their inputs → ``uploading`` where needed, and the waiting reasons. Returns the jobs that
        were still planned and not cancelled (only those may be started)."""
        if not jobs and not waiting_reason:
            return []
        now = time.time()
        async with self.tx() as conn:
            if waiting_reason:
                await self.set_reasons(conn, waiting_reason)
            if not jobs:
                return []
            marks = ", ".join("?" for _ in jobs)
            umarks = ", ".join("?" for _ in upload_ids) or "NULL"
            async with conn.execute(
                f"UPDATE jobs SET state = CASE WHEN id IN ({umarks}) THEN 'uploading' "
                f"ELSE 'creating' END, updated_at = ? WHERE id IN ({marks}) AND state = 'planned' "
                "AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.id = jobs.input_id "
                "AND i.cancel_requested != 0) RETURNING id, state",
                [*upload_ids, now, *(j["id"] for j in jobs)],
            ) as cur:
                started = {r[0]: r[1] for r in await cur.fetchall()}
            jobs = [j for j in jobs if j["id"] in started]
            for job in jobs:
                job["state"] = started[job["id"]]
                job["key_fp"] = key_fp
            if key_fp is not None:
                await self.mark_key(conn, list(started), key_fp)
            uploading = {j["input_id"] for j in jobs if j["state"] == JobState.UPLOADING.value}
            if uploading:
                await self.advance(conn, uploading, InputState.UPLOADING, now)
        return jobs

    async def activate(self, conn: aiosqlite.Connection, items: list[Activation]) -> None:
        """Created jobs → ``active`` with their remote names; their inputs → ``submitted``."""
        rows = []
        for job_id, _, op, at, interval in items:
            meta = op.get("metadata") or {}
            rows.append(
                (
                    *(op["name"], meta.get("state") or "BATCH_STATE_PENDING"),
                    *(meta.get("createTime"), at, interval, at + interval, at, job_id),
                )
            )
        await conn.executemany(
            "UPDATE jobs SET state = 'active', remote_name = ?, remote_state = ?, "
            "remote_create_time = ?, submitted_at = ?, poll_interval = ?, next_poll_at = ?, "
            "not_before = 0, error = NULL, submit_retries = 0, check_remote = NULL, "
            "submit_error = NULL, updated_at = ? WHERE id = ?",
            rows,
        )
        now = max(item[3] for item in items)
        await self.advance(
            conn, (item[1] for item in items), InputState.SUBMITTED, now, clear_reason=True
        )

    async def replan_uploading(self) -> None:
        """At start: uploads cut short begin again (nothing was created for them)."""
        async with self.tx() as conn:
            await conn.execute(
                "UPDATE jobs SET state = 'planned', not_before = 0, updated_at = ? "
                "WHERE state = 'uploading'",
                (time.time(),),
            )

    async def check_remote_first(self, job_ids: Iterable[int]) -> None:
        """These jobs may exist remotely (a restart found them ``creating``): look them up before
        any create, now (``not_before = 0``)."""
        now = time.time()
        async with self.tx() as conn:
            await conn.executemany(
                "UPDATE jobs SET check_remote = 1, not_before = 0, updated_at = ? WHERE id = ?",
                [(now, i) for i in job_ids],
            )

    async def next_submit_due(self, now: float) -> float | None:
        """When the next backoff of a planned or creating job ends (after ``now``), if any."""
        value = await self.scalar(
            "SELECT MIN(not_before) FROM jobs WHERE state IN ('planned', 'creating') "
            "AND not_before > ?",
            (now,),
        )
        return None if value is None else float(value)

    # ---- tracking ----------------------------------------------------------------------------
    async def due_for_poll(self, now: float) -> list[Row]:
        """Active jobs due to be asked, with their input's ``input_reason`` and ``input_cancel``."""
        return await self.fetchall(
            "SELECT j.*, i.reason AS input_reason, i.cancel_requested AS input_cancel "
            "FROM jobs j JOIN inputs i ON i.id = j.input_id "
            "WHERE j.state = 'active' AND COALESCE(j.next_poll_at, 0) <= ? AND j.not_before <= ? "
            "ORDER BY j.next_poll_at, j.id",
            (now, now),
        )

    async def count_active(self) -> int:
        return int(await self.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'active'") or 0)

    async def next_poll_at(self) -> float | None:
        """The earliest ``next_poll_at`` of an active job."""
        value = await self.scalar("SELECT MIN(next_poll_at) FROM jobs WHERE state = 'active'")
        return None if value is None else float(value)

    async def update_jobs(
        self, conn: aiosqlite.Connection, changes: Iterable[tuple[Mapping[str, Any], int]]
    ) -> None:
        """Write each ``(fields, job id)``, one ``executemany`` per set of columns."""
        now = time.time()
        by_cols: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for fields, job_id in changes:
            row = {**fields, "updated_at": now}
            by_cols.setdefault(tuple(row), []).append((*(_plain(v) for v in row.values()), job_id))
        for cols, rows in by_cols.items():
            sets = ", ".join(f"{c} = ?" for c in cols)
            await conn.executemany(f"UPDATE jobs SET {sets} WHERE id = ?", rows)

    async def poll_soon(self, input_id: str) -> None:
        """The input's active jobs are asked at the next round, not at their scheduled time."""
        async with self.tx() as conn:
            await conn.execute(
                "UPDATE jobs SET next_poll_at = ? WHERE input_id = ? AND state = 'active'",
                (time.time(), input_id),
            )

    async def cancel_planned_of(self, conn: aiosqlite.Connection, input_id: str) -> None:
        """The input's ``planned`` jobs → ``cancelled`` (nothing was spent on them)."""
        now = time.time()
        await conn.execute(
            "UPDATE jobs SET state = 'cancelled', updated_at = ?, finished_at = ? "
            "WHERE input_id = ? AND state = 'planned'",
            (now, now, input_id),
        )

    async def release_held(self, input_id: str) -> int:
        """``retry`` of an input whose jobs are held after a 404 (not visible with the key in
        use): they count as lost now, so the collector plans their requests again; returns how
        many."""
        async with self.tx() as conn:
            async with conn.execute(
                "UPDATE jobs SET state = 'done', error = ?, finished_at = ?, updated_at = ? "
                "WHERE input_id = ? AND state = 'active' AND error LIKE '%\"not_visible\":true%' "
                "RETURNING id",
                (dumps(LOST_JOB_ERROR), time.time(), time.time(), input_id),
            ) as cur:
                n = len(list(await cur.fetchall()))
            if n:
                await self.update_input(conn, input_id, reason="resubmitting (retry)")
        return n

    # ---- collection ------------------------------------------------------------------------
    async def due_for_collect(self, now: float, min_input_requests: int | None = None) -> list[Row]:
        """``done`` jobs whose backoff is over, with their input's ``input_requests``; with
        ``min_input_requests``, only big ones (file mode, or inputs with more requests)."""
        big = (
            " AND (j.mode = 'file' OR i.request_count > ?)"
            if min_input_requests is not None
            else ""
        )
        params = (now,) if min_input_requests is None else (now, min_input_requests)
        return await self.fetchall(
            "SELECT j.*, i.request_count AS input_requests FROM jobs j "
            "JOIN inputs i ON i.id = j.input_id WHERE j.state = 'done' AND j.not_before <= ?"
            f"{big} ORDER BY j.id",
            params,
        )

    async def mark_collected(
        self, conn: aiosqlite.Connection, items: Iterable[tuple[str, str | None, float, float, int]]
    ) -> None:
        """Jobs → ``collected``: ``(results path, remote result file, finished, now, job id)``."""
        await conn.executemany(
            "UPDATE jobs SET state = 'collected', results_path = ?, result_file = ?, "
            "finished_at = ?, updated_at = ? WHERE id = ?",
            list(items),
        )

    async def jobs_of_inputs(self, input_ids: Iterable[str]) -> list[Row]:
        ids = list(input_ids)
        marks = ", ".join("?" for _ in ids)
        return await self.fetchall(
            f"SELECT * FROM jobs WHERE input_id IN ({marks}) ORDER BY part_no, attempt", ids
        )


_DUE = (
    "SELECT j.*, i.model AS model, i.kind AS kind, i.media_count AS media_count, "
    "i.cancel_requested AS cancel_requested FROM jobs j JOIN inputs i ON i.id = j.input_id "
)
Activation = tuple[int, str, dict[str, Any], float, float]  # job, input, Operation, at, interval
