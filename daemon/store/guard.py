"""Before the daemon opens its store: is it the store that ``state/work/`` belongs to?

Starting on a lost database would start silently fresh: in-flight inputs would never finish and
their paid remote jobs would be orphaned. So the start is refused (exit 78, one line naming the
way out: ``gemini-batchd recover``) when

* the database is missing or empty (0 bytes) while ``state/work/`` holds claimed inputs;
* the last run did not close the store (``state/store-open`` is still there: a kill -9 or a power
  loss) and the database's ``-wal`` is gone: the commits it held are lost;
* the database has no schema, or lacks the row of an input folder in ``state/work/`` that no
  claim note accounts for (rows lost);
* it is not a database, or SQLite finds it malformed (a corrupt store).

``state/store-open`` is written once the store is open and removed when it is closed, so it is
there after an unclean stop only (when SQLite always leaves its ``-wal`` behind).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import orjson

from daemon.layout import BATCH_NOTE_PREFIX, CLAIM_FILE, INPUT_FILE
from daemon.store import StoreError

OPEN_MARKER = "store-open"
RECOVER_HINT = (
    "run `gemini-batchd recover` to rebuild it from state/work/ and the remote jobs "
    "(or move state/work/ away to start empty)"
)


class LostStore(StoreError):
    """The database does not hold the work ``state/work/`` has (deleted, emptied, rolled back)."""


class CorruptStore(StoreError):
    """The database cannot be read."""


def work_inputs(work: Path) -> set[str]:
    """Ids of the claimed inputs in ``state/work/`` (folders holding an ``input.jsonl``)."""
    if not work.is_dir():
        return set()
    return {
        e.name
        for e in os.scandir(work)
        if not e.name.startswith(".")
        and e.is_dir(follow_symlinks=False)
        and os.path.lexists(os.path.join(e.path, INPUT_FILE))
    }


def noted_inputs(work: Path) -> set[str]:
    """Ids named by claim notes (claims cut short by a crash: claim recovery adopts them)."""
    ids: set[str] = set()
    if not work.is_dir():
        return ids
    for e in os.scandir(work):
        if e.name.startswith(BATCH_NOTE_PREFIX) and e.is_file(follow_symlinks=False):
            note = Path(e.path)
        elif e.is_dir(follow_symlinks=False):
            note = Path(e.path) / CLAIM_FILE
        else:
            continue
        with contextlib.suppress(OSError, orjson.JSONDecodeError, TypeError, KeyError):
            data = orjson.loads(note.read_bytes())
            ids.update(n["id"] for n in (data if isinstance(data, list) else [data]))
    return ids


def check_store(db: Path, work: Path) -> None:
    """Raise :class:`LostStore` or :class:`CorruptStore` (see the module doc); else return."""
    inputs = work_inputs(work)
    size = db.stat().st_size if db.exists() else None
    if not size:
        if inputs:
            what = "missing" if size is None else "empty (0 bytes)"
            raise LostStore(_lost(db, f"is {what}", len(inputs)))
        return
    wal = db.with_name(db.name + "-wal")
    if (db.parent / OPEN_MARKER).exists() and not wal.exists():
        raise LostStore(
            f"state database {db}: its write-ahead log {wal.name} was removed after an unclean "
            f"stop, so its latest commits are lost; {RECOVER_HINT}"
        )
    known = _known_ids(db)
    # That read closed the last connection: SQLite checkpointed the -wal into the database and
    # removed it, so the unclean stop is dealt with (the daemon writes the marker again).
    mark_closed(db.parent)
    missing = inputs - (known or set()) - noted_inputs(work)
    if missing:
        what = "has no schema" if known is None else f"has no row for {len(missing)} of them"
        raise LostStore(_lost(db, what, len(inputs)))


def _lost(db: Path, what: str, n: int) -> str:
    return f"state database {db} {what} but state/work/ holds {n} claimed inputs; {RECOVER_HINT}"


def _known_ids(db: Path) -> set[str] | None:
    """The input ids the database holds (None: no schema yet)."""
    try:
        conn = sqlite3.connect(db, timeout=5.0)
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 0:
                return None
            return {r[0] for r in conn.execute("SELECT id FROM inputs")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise
        raise CorruptStore(corrupt_message(db, e)) from None


def corrupt_message(db: Path, e: BaseException) -> str:
    hint = RECOVER_HINT.replace("rebuild it", "move it aside and rebuild it")
    return f"state database {db} is corrupt ({e}); {hint}"


def mark_open(state_dir: Path) -> None:
    """The store is open (removed by :func:`mark_closed`; left behind by an unclean stop)."""
    (state_dir / OPEN_MARKER).write_bytes(f"{os.getpid()}\n".encode())


def mark_closed(state_dir: Path) -> None:
    (state_dir / OPEN_MARKER).unlink(missing_ok=True)
