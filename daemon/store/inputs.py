"""Rows of inputs and their history; the one writer of ``inputs.state`` (:meth:`InputRows.transition`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiosqlite

from daemon.states import FINAL_INPUT_STATES, InputState
from daemon.store.base import Row, StoreBase, _plain, dumps, new_input_id


class InputRows(StoreBase):
    """Inputs (one per dropped file) and their history."""

    async def add_input(
        self, conn: aiosqlite.Connection, *, note: str | None = None, **fields: Any
    ) -> Row:
        """Insert an input row inside the caller's transaction; records the first history entry
        (with ``note``)."""
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
        await self.add_history(conn, fields["id"], fields["state"], note, at=now)
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

    # ---- the one writer of inputs.state (batched: one statement per kind of row) ----------
    async def transition(
        self, conn: aiosqlite.Connection, moves: Iterable[Move], *, now: float | None = None
    ) -> None:
        """Move inputs (inside the caller's transaction), each with its history entry, in one
        ``executemany`` per kind of change; a move's ``fields`` go into the same UPDATE."""
        now = time.time() if now is None else now
        groups: dict[tuple[str, tuple[str, ...]], list[tuple[Any, ...]]] = {}
        history = []
        for m in moves:
            fields = dict(m.fields)
            if m.state in FINAL_INPUT_STATES:
                fields.setdefault("finished_at", now)
            groups.setdefault((m.state.value, tuple(fields)), []).append(
                (m.state.value, now, *(_plain(v) for v in fields.values()), m.input_id)
            )
            history.append((m.input_id, now, m.state.value, m.note))
        for (_, cols), rows in groups.items():
            sets = "".join(f", {c} = ?" for c in cols)
            await conn.executemany(
                f"UPDATE inputs SET state = ?, updated_at = ?{sets} WHERE id = ?", rows
            )
        await conn.executemany(
            "INSERT INTO history (input_id, at, state, note) VALUES (?, ?, ?, ?)", history
        )

    async def advance(
        self,
        conn: aiosqlite.Connection,
        input_ids: Iterable[str],
        state: InputState,
        now: float,
        *,
        clear_reason: bool = False,
    ) -> None:
        """Move inputs forward to ``state`` (with a history entry) unless they are already
        further along; optionally clear their reason (a waiting reason stays while another part
        of the input still waits for admission)."""
        ids = sorted(set(input_ids))
        before = ", ".join(f"'{s}'" for s in _BEFORE[state])
        await conn.executemany(
            "INSERT INTO history (input_id, at, state, note) "
            f"SELECT id, ?, ?, NULL FROM inputs WHERE id = ? AND state IN ({before})",
            [(now, state.value, i) for i in ids],
        )
        reason = (
            ", reason = CASE WHEN reason LIKE 'waiting:%' AND EXISTS (SELECT 1 FROM jobs "
            "WHERE jobs.input_id = inputs.id AND jobs.state = 'planned') THEN reason ELSE NULL END"
            if clear_reason
            else ""
        )
        await conn.executemany(
            f"UPDATE inputs SET state = CASE WHEN state IN ({before}) THEN ? ELSE state END"
            f"{reason}, updated_at = ? WHERE id = ?",
            [(state.value, now, i) for i in ids],
        )

    async def claim_inputs(
        self, conn: aiosqlite.Connection, claimed: Iterable[Claimed], now: float
    ) -> None:
        """Insert the ``seen`` rows of files just moved into ``state/work/`` (one statement)."""
        rows = list(claimed)
        await conn.executemany(
            "INSERT INTO inputs (id, rel_path, model, kind, state, reason, error, work_path, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, 'seen', ?, ?, ?, ?, ?)",
            [
                (*c[:5], None if c.error is None else dumps(c.error), c.work_path, now, now)
                for c in rows
            ],
        )
        await conn.executemany(
            "INSERT INTO history (input_id, at, state, note) VALUES (?, ?, 'seen', NULL)",
            [(c.input_id, now) for c in rows],
        )

    async def delete_input(self, input_id: str) -> None:
        async with self.tx() as conn:
            await conn.execute("DELETE FROM inputs WHERE id = ?", (input_id,))

    async def input_ids(self) -> set[str]:
        return {r["id"] for r in await self.fetchall("SELECT id FROM inputs")}

    async def state_in_tx(self, conn: aiosqlite.Connection, input_id: str) -> str | None:
        """The input's state as the caller's transaction sees it."""
        return await self._state_of(conn, input_id)

    async def set_reasons(self, conn: aiosqlite.Connection, reasons: Mapping[str, str]) -> None:
        """Each input's ``reason`` (input id → text), written only where it changes."""
        now = time.time()
        await conn.executemany(
            "UPDATE inputs SET reason = ?, updated_at = ? WHERE id = ? AND reason IS NOT ?",
            [(r, now, i, r) for i, r in reasons.items()],
        )

    # ---- dedupe and digests ------------------------------------------------------------------
    async def successes_with_digest(self, shas: Iterable[str]) -> list[Row]:
        """Succeeded inputs whose sha256 is one of ``shas`` and whose results are kept, newest
        first (candidates for reuse)."""
        shas = sorted(shas)
        marks = ", ".join("?" for _ in shas)
        return await self.fetchall(
            f"SELECT id, model, sha256, results_path FROM inputs WHERE sha256 IN ({marks}) "
            "AND state = ? AND results_path IS NOT NULL ORDER BY finished_at DESC",
            (*shas, InputState.SUCCEEDED.value),
        )

    async def success_sizes(self, sizes: Iterable[int]) -> set[tuple[str, int]]:
        """``(model, size)`` of succeeded inputs with kept results whose size is in ``sizes``."""
        sizes = sorted(sizes)
        marks = ", ".join("?" for _ in sizes)
        rows = await self.fetchall(
            f"SELECT DISTINCT model, size_bytes FROM inputs WHERE size_bytes IN ({marks}) "
            "AND state = ? AND results_path IS NOT NULL",
            (*sizes, InputState.SUCCEEDED.value),
        )
        return {(r["model"], r["size_bytes"]) for r in rows}

    async def set_digest(self, input_id: str, digest: str) -> None:
        async with self.tx() as conn:
            await conn.execute(
                "UPDATE inputs SET sha256 = ? WHERE id = ? AND sha256 IS NULL", (digest, input_id)
            )

    async def undigested_inputs(self) -> list[Row]:
        """Validated inputs whose deferred sha256 a crash left out (``id``, ``work_path``)."""
        return await self.fetchall(
            "SELECT id, work_path FROM inputs WHERE sha256 IS NULL AND size_bytes IS NOT NULL "
            "AND state NOT IN (?, ?, ?)",
            (InputState.SEEN.value, InputState.VALIDATING.value, InputState.REJECTED.value),
        )

    async def settled_inputs(self) -> list[Row]:
        """Unfinished inputs whose every job is collected or cancelled (or a reuse waiting to
        be finished): the ones the collector settles next."""
        skip = [s.value for s in FINAL_INPUT_STATES] + ["seen", "validating"]
        marks = ", ".join("?" for _ in skip)
        return await self.fetchall(
            f"""SELECT * FROM inputs i WHERE i.state NOT IN ({marks}) AND (
              (EXISTS (SELECT 1 FROM jobs j WHERE j.input_id = i.id)
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.input_id = i.id
                               AND j.state NOT IN ('collected', 'cancelled')))
              OR (i.reused_from IS NOT NULL AND i.state = 'downloading'
                  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.input_id = i.id)))
              ORDER BY i.created_at, i.id""",
            skip,
        )


_BEFORE = {
    InputState.UPLOADING: ("queued",),
    InputState.SUBMITTED: ("queued", "uploading"),
    InputState.RUNNING: ("queued", "uploading", "submitted"),
}


@dataclass(frozen=True, slots=True)
class Move:
    """One input to move to ``state``, with its history ``note``; ``fields`` (column → value)
    are written in the same UPDATE."""

    input_id: str
    state: InputState
    note: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


class Claimed(NamedTuple):
    """A file just moved into ``state/work/<id>/`` (``reason`` set: it is to be rejected)."""

    input_id: str
    rel_path: str
    model: str
    kind: str
    reason: str | None
    error: Any
    work_path: str
