"""The per-input answer index, on disk: which result line answers each input key.

Synchronous (run it in a worker thread). Everything large lives in a SQLite file
(``state/work/<input>/merge.sqlite``), so memory stays flat whatever the number of requests:
Python only ever holds one line and one batch of rows. The collector folds each job's results in
as soon as the job is collected (overlapping with jobs still running), so settling an input only
has to read the answers in order. The file is a cache of the job results files: whatever does not
match is rebuilt.

Longer than ~400 lines: one class over one scratch database whose statements share its schema.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from daemon.results.lines import (
    RETRYABLE_GRPC,
    RETRYABLE_HTTP,
    RETRYABLE_STATUS,
    TOKEN_FIELDS,
    Answer,
    Part,
    ResultsFile,
    canonical_line,
    derive_key,
    fast_key,
    is_retryable,
    iter_lines,
    parse_result,
    results_files,
)

__all__ = [
    "RETRYABLE_GRPC",
    "RETRYABLE_HTTP",
    "RETRYABLE_STATUS",
    "TOKEN_FIELDS",
    "Answer",
    "MergeIndex",
    "Part",
    "Rebuild",
    "ResultsFile",
    "Stopped",
    "canonical_line",
    "derive_key",
    "fast_key",
    "is_retryable",
    "iter_lines",
    "remove_index",
    "results_files",
]

_BATCH = 2000


class Stopped(Exception):
    """The caller asked a long-running pass to stop (shutdown)."""


_VERSION = "2"
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class Rebuild(Exception):
    """The on-disk index does not match what it is asked to hold: start it afresh."""


def _lock(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path), threading.Lock())


class MergeIndex:
    """Key → best answer for one input, kept on disk and filled job by job.

    ``keys`` holds every input key with its position (``ord``) in input order; ``best`` holds,
    per position, the best answer line seen so far (a success beats an error; among equals the
    later attempt, then the later job wins; inside one job the first line wins, the others are
    counted as duplicates). :meth:`add_results` folds one job's results file in; it is idempotent
    (a job already loaded is skipped), so collecting each job as it finishes and building at the
    end agree. The file is a cache: :meth:`build` starts it afresh when it does not match. While
    open, an index holds a per-path lock (the collector and a command never interleave).
    """

    def __init__(self, path: Path, stop: threading.Event | None = None) -> None:
        self.path = path
        self.stop = stop or threading.Event()
        self.memory = str(path) == ":memory:"
        self._lock = threading.Lock() if self.memory else _lock(path)
        deadline = time.monotonic() + 600
        while not self._lock.acquire(timeout=0.1):
            self._check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"merge index busy: {path}")
        try:
            self._check()
            self.db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=60
            )
            pragmas = ["PRAGMA cache_size=-8000", "PRAGMA temp_store=FILE"]  # bounds memory
            if not self.memory:
                # WAL + NORMAL: a crash (or power loss) loses at most the last transactions,
                # never corrupts; :meth:`add_results` reloads whatever is missing.
                pragmas += ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"]
            for pragma in pragmas:
                self.db.execute(pragma)
            self._schema()
        except BaseException:
            self._lock.release()
            raise
        self.files: dict[int, Path] = {
            job: Path(p) for job, p in self.db.execute("SELECT job_id, path FROM loaded")
        }

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            self._lock.release()

    def _check(self) -> None:
        if self.stop.is_set():
            raise Stopped

    def _schema(self) -> None:
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
            CREATE TABLE IF NOT EXISTS keys (ord INTEGER PRIMARY KEY, key TEXT NOT NULL,
                                             part INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS loaded (job_id INTEGER PRIMARY KEY, path TEXT,
                attempt INT, size INT, unknown INT, duplicates INT);
            CREATE TABLE IF NOT EXISTS ranges (part INTEGER PRIMARY KEY, lo INT, hi INT);
            CREATE TABLE IF NOT EXISTS ordered (part INTEGER PRIMARY KEY, path TEXT, size INT,
                                                valid INT, media INT);
            CREATE TABLE IF NOT EXISTS best (ord INTEGER PRIMARY KEY, job_id INT, attempt INT,
                ok INT, retry INT, code INT, off INT, len INT, p INT, c INT, t INT, ca INT,
                tot INT);
            """
        )

    def _meta(self, k: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return row[0] if row else None

    @property
    def duplicates(self) -> int:
        return int(self.db.execute("SELECT TOTAL(duplicates) FROM loaded").fetchone()[0])

    @property
    def unknown(self) -> int:
        return int(self.db.execute("SELECT TOTAL(unknown) FROM loaded").fetchone()[0])

    # ---- build ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        path: Path,
        input_path: Path,
        parts: list[Part],
        results: list[ResultsFile],
        stop: threading.Event | None = None,
    ) -> MergeIndex:
        """The index of ``input_path``'s keys and exactly the answers of ``results``: reuses
        what earlier :meth:`add_results` calls loaded, starts afresh when that does not fit.
        ``path`` ``:memory:`` keeps a small index off disk."""
        for fresh in (False, True):
            if fresh:
                remove_index(path)
            try:
                index = cls(path, stop)
            except sqlite3.DatabaseError:
                if fresh:
                    raise
                continue
            try:
                index.ensure_keys(input_path, parts)
                wanted = {rf.job_id for rf in results}
                if set(index.files) - wanted:
                    raise Rebuild("the index holds results of jobs no longer listed")
                for rf in sorted(results, key=lambda r: (r.attempt, r.job_id)):
                    index.add_results(rf)
                return index
            except (Rebuild, sqlite3.DatabaseError):
                index.close()
                if fresh:
                    raise
            except BaseException:
                index.close()
                raise
        raise AssertionError("unreachable")

    def ensure_keys(self, input_path: Path, parts: list[Part]) -> None:
        """Load the input's keys once (in input order); a different part plan is a rebuild."""
        if not parts:  # no plan known: the whole input is one part
            parts = [Part(1)]
        plan = orjson.dumps([(p.part_no, p.start, p.end, p.first_line) for p in parts]).decode()
        known = self._meta("plan")
        if known is not None:
            if known != plan or self._meta("version") != _VERSION:
                raise Rebuild("the part plan changed")
            return
        db = self.db
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM keys")
            rows: list[tuple[int, str, int]] = []
            ord_ = 0
            for part in parts:
                lo = ord_ + 1
                for key in self.part_keys(input_path, part):
                    ord_ += 1
                    rows.append((ord_, key, part.part_no))
                    if len(rows) >= _BATCH:
                        self._check()
                        db.executemany("INSERT INTO keys VALUES (?, ?, ?)", rows)
                        rows.clear()
                if ord_ >= lo:
                    db.execute(
                        "INSERT OR REPLACE INTO ranges VALUES (?, ?, ?)", (part.part_no, lo, ord_)
                    )
            db.executemany("INSERT INTO keys VALUES (?, ?, ?)", rows)
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS keys_key ON keys(key)")
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("plan", plan), ("version", _VERSION)]
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def part_keys(input_path: Path, part: Part) -> Iterator[str]:
        """The keys of ``part`` in input order (canonical part files: mostly without a parse)."""
        if part.source is not None and part.source.exists():
            with open(part.source, "rb") as f:
                rest = b""
                while block := f.read(1 << 20):
                    lines = (rest + block).split(b"\n")
                    rest = lines.pop()
                    for raw in lines:
                        key = fast_key(raw)
                        if key is not None:
                            yield key
                        elif raw.strip():
                            yield derive_key(orjson.loads(raw), 0)
                if rest.strip():
                    key = fast_key(rest)
                    yield key if key is not None else derive_key(orjson.loads(rest), 0)
        else:
            for line_no, raw in iter_lines(input_path, part.start, part.end, part.first_line):
                key = fast_key(raw)
                yield key if key is not None else canonical_line(raw, line_no)[0]

    @staticmethod
    def part_lines(input_path: Path, part: Part) -> Iterator[tuple[str, bytes]]:
        """``(key, canonical line)`` for each request of ``part``, in input order."""
        if part.source is not None and part.source.exists():
            for _n, raw in iter_lines(part.source):
                key = fast_key(raw)
                if key is None:
                    key = derive_key(orjson.loads(raw), 0)
                yield key, raw.rstrip(b"\r\n")
        else:
            for line_no, raw in iter_lines(input_path, part.start, part.end, part.first_line):
                yield canonical_line(raw, line_no)

    # Long: the index's hot loop (one executemany per block of lines) and the best-answer update
    # of the same transaction; not yet split (left for a session with the 1 GB bench at hand).
    def add_results(self, rf: ResultsFile) -> bool:
        """Fold one job's results file in (keys must be loaded). False if it already was;
        :class:`Rebuild` if a different file was loaded for that job."""
        size = rf.path.stat().st_size
        row = self.db.execute("SELECT size FROM loaded WHERE job_id = ?", (rf.job_id,)).fetchone()
        if row is not None:
            if row[0] != size:
                raise Rebuild(f"results of job {rf.job_id} changed")
            return False
        db = self.db
        db.execute("BEGIN")
        try:
            db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS stage (line INTEGER PRIMARY KEY, key TEXT, ok INT,"
                " retry INT, code INT, off INT, len INT, p INT, c INT, t INT, ca INT, tot INT)"
            )
            db.execute("DELETE FROM stage")
            rows: list[tuple[Any, ...]] = []
            lines = 0
            sql = "INSERT INTO stage VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            with open(rf.path, "rb") as f:
                off = 0
                for raw in f:
                    line_off, off = off, off + len(raw)
                    line = raw.rstrip(b"\r\n")
                    if not line.strip():
                        continue
                    key, ok, retry, code, *usage = parse_result(line)
                    rows.append((key, ok, retry, code, line_off, len(line), *usage))
                    lines += 1
                    if len(rows) >= _BATCH:
                        self._check()
                        db.executemany(sql, rows)
                        rows.clear()
            db.executemany(sql, rows)
            self._check()
            # Inside one job the first line of a key wins (the rest are duplicates); across
            # jobs a success beats an error, then the later (attempt, job) wins.
            before = db.total_changes
            db.execute(
                """
                INSERT INTO best
                SELECT k.ord, :job, :attempt, s.ok, s.retry, s.code, s.off, s.len,
                       s.p, s.c, s.t, s.ca, s.tot
                FROM stage s JOIN keys k ON k.key = s.key WHERE true ORDER BY k.ord, s.line
                ON CONFLICT(ord) DO UPDATE SET
                    job_id = excluded.job_id, attempt = excluded.attempt, ok = excluded.ok,
                    retry = excluded.retry, code = excluded.code, off = excluded.off,
                    len = excluded.len, p = excluded.p, c = excluded.c, t = excluded.t,
                    ca = excluded.ca, tot = excluded.tot
                WHERE excluded.job_id != best.job_id AND (excluded.ok > best.ok OR (
                    excluded.ok = best.ok AND (excluded.attempt, excluded.job_id)
                                              > (best.attempt, best.job_id)))
                """,
                {"job": rf.job_id, "attempt": rf.attempt},
            )
            unknown = duplicates = 0
            if db.total_changes - before != lines:  # not every line took a key of its own
                known, distinct = db.execute(
                    "SELECT COUNT(*), COUNT(DISTINCT k.ord) FROM stage s "
                    "JOIN keys k ON k.key = s.key"
                ).fetchone()
                unknown, duplicates = lines - known, known - distinct
            # Pre-ordered part files with an answer from this job are stale now.
            db.execute(
                "UPDATE ordered SET valid = 0 WHERE valid = 1 AND part IN (SELECT r.part "
                "FROM ranges r WHERE EXISTS (SELECT 1 FROM best b "
                "WHERE b.ord BETWEEN r.lo AND r.hi AND b.job_id = ?))",
                (rf.job_id,),
            )
            db.execute("DELETE FROM stage")
            db.execute(
                "INSERT INTO loaded VALUES (?, ?, ?, ?, ?, ?)",
                (rf.job_id, str(rf.path), rf.attempt, size, unknown, duplicates),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.files[rf.job_id] = rf.path
        return True

    # ---- queries ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        (total,) = self.db.execute("SELECT COUNT(*) FROM keys").fetchone()
        answered, ok = self.db.execute("SELECT COUNT(*), TOTAL(ok) FROM best").fetchone()
        ok = int(ok)
        return {
            "total": total,
            "succeeded": ok,
            "failed": total - ok,
            "answered": answered,
            "duplicates_dropped": self.duplicates,
            "unknown_dropped": self.unknown,
        }

    def tokens(self) -> dict[str, int]:
        row = self.db.execute(
            "SELECT SUM(p), SUM(c), SUM(t), SUM(ca), SUM(tot) FROM best WHERE ok = 1"
        ).fetchone()
        return {name: int(v or 0) for name, v in zip(TOKEN_FIELDS, row, strict=True)}

    def error_codes(self) -> list[dict[str, Any]]:
        """Per-request error codes among the best answers, most frequent first, with a sample."""
        out = []
        rows = self.db.execute(
            "SELECT code, COUNT(*), MIN(ord) FROM best WHERE ok = 0 "
            "GROUP BY code ORDER BY COUNT(*) DESC LIMIT 10"
        ).fetchall()
        for code, n, ord_ in rows:
            f, o, ln = self.db.execute(
                "SELECT job_id, off, len FROM best WHERE ord = ?", (ord_,)
            ).fetchone()
            with open(self.files[f], "rb") as fh:
                fh.seek(o)
                sample = orjson.loads(fh.read(ln)).get("error")
            out.append({"code": code, "count": n, "example": sample})
        return out

    def retry_keys(self, part_no: int, *, force: bool) -> int:
        """Select the keys of ``part_no`` to resubmit into the ``retry_sel`` table; returns how
        many. Unanswered and retryable-error keys; with ``force`` every key without a success."""
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS retry_sel (key TEXT PRIMARY KEY)")
        self.db.execute("DELETE FROM retry_sel")
        cond = "b.ok = 0" if force else "b.ok = 0 AND b.retry = 1"
        cur = self.db.execute(
            "INSERT INTO retry_sel SELECT k.key FROM keys k LEFT JOIN best b ON b.ord = k.ord "
            f"WHERE k.part = ? AND (b.ord IS NULL OR ({cond}))",
            (part_no,),
        )
        return cur.rowcount

    def write_retry_part(self, input_path: Path, part: Part, out: IO[bytes]) -> int:
        """Write the canonical lines of the selected keys (see :meth:`retry_keys`) to ``out``."""
        n = 0
        for i, (key, line) in enumerate(self.part_lines(input_path, part)):
            if i % _BATCH == 0:
                self._check()
            if self.db.execute("SELECT 1 FROM retry_sel WHERE key = ?", (key,)).fetchone():
                out.write(line + b"\n")
                n += 1
        return n

    def ranges(self) -> list[tuple[int, int, int]]:
        """``(part, first ord, last ord)`` of every non-empty part, in input order."""
        return self.db.execute("SELECT part, lo, hi FROM ranges ORDER BY lo").fetchall()

    def write_ordered(self, part_no: int, dest: Path) -> bool:
        """Write ``part_no``'s answer lines in input order to ``dest`` ahead of the final merge
        (while other jobs still run), if every key of the part has an answer. The final merge
        copies it as is unless a later job changed one of its answers."""
        row = self.db.execute("SELECT lo, hi FROM ranges WHERE part = ?", (part_no,)).fetchone()
        if row is None:
            return False
        lo, hi = row
        (n,) = self.db.execute(
            "SELECT COUNT(*) FROM best WHERE ord BETWEEN ? AND ?", (lo, hi)
        ).fetchone()
        if n != hi - lo + 1:
            return False
        media = False
        tmp = dest.with_name(dest.name + ".tmp")
        with open(tmp, "wb") as out:
            for chunk in self.answer_chunks(lo, hi):
                lines = [a.line + b"\n" for a in chunk if a.line is not None]
                if len(lines) != len(chunk):  # cannot happen: every key was counted answered
                    raise Rebuild(f"part {part_no} lost an answer")
                if not media:
                    media = any(
                        a.ok and (b"inlineData" in line or b"inline_data" in line)
                        for a, line in zip(chunk, lines, strict=True)
                    )
                out.write(b"".join(lines))
            # Durable before it is trusted: after a power loss a file of the right size could
            # otherwise hold zeros, and the outbox is built from it.
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        self.db.execute(
            "INSERT OR REPLACE INTO ordered VALUES (?, ?, ?, 1, ?)",
            (part_no, str(dest), dest.stat().st_size, int(media)),
        )
        return True

    def ordered_file(self, part_no: int) -> tuple[Path, bool] | None:
        """``(path, has inline media)`` of a still valid pre-ordered part file, or None."""
        row = self.db.execute(
            "SELECT path, size, media FROM ordered WHERE part = ? AND valid = 1", (part_no,)
        ).fetchone()
        if row is None:
            return None
        path = Path(row[0])
        try:
            if path.stat().st_size != row[1]:
                return None
        except FileNotFoundError:
            return None
        return path, bool(row[2])

    def answer_chunks(self, lo: int = 1, hi: int | None = None) -> Iterator[list[Answer]]:
        """The answers of positions ``lo..hi`` in input order, a batch at a time."""
        fds: dict[int, int] = {}
        cur = self.db.execute(
            "SELECT k.ord, k.key, k.part, b.job_id, b.ok, b.off, b.len "
            "FROM keys k LEFT JOIN best b ON b.ord = k.ord WHERE k.ord BETWEEN ? AND ? "
            "ORDER BY k.ord",
            (lo, hi if hi is not None else 1 << 62),
        )
        pread = os.pread
        try:
            while rows := cur.fetchmany(500):
                self._check()
                chunk = []
                for ord_, key, part, job, ok, off, ln in rows:
                    if job is None:
                        chunk.append(Answer(ord_, key, None, part, None))
                        continue
                    fd = fds.get(job)
                    if fd is None:
                        fd = fds[job] = os.open(self.files[job], os.O_RDONLY)
                    chunk.append(Answer(ord_, key, bool(ok), part, pread(fd, ln, off)))
                yield chunk
        finally:
            cur.close()
            for fd in fds.values():
                os.close(fd)


def remove_index(path: Path) -> None:
    """Delete an index file and its SQLite side files."""
    if str(path) == ":memory:":
        return
    for p in [path] + [path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm")]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
