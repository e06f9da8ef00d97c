"""The per-input answer index, on disk: which result line answers each input key.

Synchronous (run it in a worker thread). Everything large lives in a scratch SQLite file
(``state/work/<input>/merge.sqlite``), so memory stays flat whatever the number of requests:
Python only ever holds one line and one batch of rows. The index is rebuilt from the job results
files each time an input settles, so it never needs to be crash-safe (journal off).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

RETRYABLE_GRPC = {4, 8, 13, 14}  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE
RETRYABLE_HTTP = {429, 500, 503, 504}
RETRYABLE_STATUS = {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE"}
_BATCH = 5000
TOKEN_FIELDS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "totalTokenCount",
)


class Stopped(Exception):
    """The caller asked a long-running pass to stop (shutdown)."""


def is_retryable(error: Any) -> bool:
    """Whether a per-request ``google.rpc.Status`` error is worth resubmitting (SPEC §3)."""
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    if isinstance(code, int) and (code in RETRYABLE_GRPC or code in RETRYABLE_HTTP):
        return True
    return error.get("status") in RETRYABLE_STATUS


def derive_key(obj: Any, line_no: int) -> str:
    """The key of an input line: its ``key`` field, or the physical line number for a bare request."""
    if isinstance(obj, dict) and ("key" in obj or "request" in obj):
        return str(obj.get("key"))
    return str(line_no)


def canonical_line(raw: bytes, line_no: int) -> tuple[str, bytes]:
    """``(key, line)`` where line is a ``{"key", "request"}`` line (keyed lines pass through)."""
    obj = orjson.loads(raw)
    if isinstance(obj, dict) and ("key" in obj or "request" in obj):
        return str(obj.get("key")), raw.rstrip(b"\r\n")
    key = str(line_no)
    return key, b'{"key":' + orjson.dumps(key) + b',"request":' + raw.strip() + b"}"


def iter_lines(
    path: Path, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` for the non-blank lines of ``path[start:end]``."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, line_no = start, first_line
        for raw in f:
            if end is not None and pos >= end:
                break
            pos += len(raw)
            if raw.strip():
                yield line_no, raw
            line_no += 1


def _int(value: Any) -> int:
    if type(value) is int:
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@dataclass
class ResultsFile:
    """One job's normalised results: ``{"key", "response"|"error"}`` lines."""

    path: Path
    job_id: int
    attempt: int


@dataclass
class Part:
    """Where the requests of one part live: an attempt-1 source file of canonical lines, or a
    byte range of the input file (``first_line`` is the line number at ``start``)."""

    part_no: int
    source: Path | None = None
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass
class Answer:
    ord: int
    key: str
    ok: bool | None  # None: no answer at all
    part: int
    line: bytes | None


class MergeIndex:
    """Key → best answer for one input. Build with :meth:`build`; close when done."""

    def __init__(self, path: Path, stop: threading.Event | None = None) -> None:
        self.path = path
        self.stop = stop or threading.Event()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in (
            "PRAGMA journal_mode=OFF",
            "PRAGMA synchronous=OFF",
            "PRAGMA cache_size=-8000",  # 8 MB page cache: the bound on this index's memory
            "PRAGMA temp_store=FILE",
        ):
            self.db.execute(pragma)
        self.files: dict[int, Path] = {}
        self.duplicates = 0
        self.unknown = 0

    def close(self) -> None:
        self.db.close()

    def _check(self) -> None:
        if self.stop.is_set():
            raise Stopped

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
        """A fresh index of ``input_path``'s keys and every results file's answers."""
        for p in (path, path.with_name(path.name + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        index = cls(path, stop)
        try:
            index._schema()
            index.db.execute("BEGIN")  # one transaction for the bulk load: far faster
            index._load_keys(input_path, parts)
            for file_no, rf in enumerate(sorted(results, key=lambda r: (r.attempt, r.job_id))):
                index._load_results(file_no, rf)
            index.db.execute("COMMIT")
            index._reconcile()
        except BaseException:
            index.close()
            raise
        return index

    def _schema(self) -> None:
        self.db.executescript(
            """
            CREATE TABLE keys (ord INTEGER PRIMARY KEY, key TEXT NOT NULL, part INTEGER NOT NULL);
            CREATE TABLE files (file_no INTEGER PRIMARY KEY, path TEXT, job_id INT, attempt INT);
            CREATE TABLE raw (seq INTEGER PRIMARY KEY, file_no INT, key TEXT, ok INT, retry INT,
                              code INT, off INT, len INT, p INT, c INT, t INT, ca INT, tot INT);
            """
        )

    def _load_keys(self, input_path: Path, parts: list[Part]) -> None:
        rows: list[tuple[int, str, int]] = []
        ord_ = 0
        if not parts:  # no plan known: the whole input is one part
            parts = [Part(1)]
        for part in parts:
            for key, _line in self.part_lines(input_path, part):
                ord_ += 1
                rows.append((ord_, key, part.part_no))
                if len(rows) >= _BATCH:
                    self._check()
                    self.db.executemany("INSERT INTO keys VALUES (?, ?, ?)", rows)
                    rows.clear()
        self.db.executemany("INSERT INTO keys VALUES (?, ?, ?)", rows)
        self.db.execute("CREATE UNIQUE INDEX keys_key ON keys(key)")

    @staticmethod
    def part_lines(input_path: Path, part: Part) -> Iterator[tuple[str, bytes]]:
        """``(key, canonical line)`` for each request of ``part``, in input order."""
        if part.source is not None and part.source.exists():
            for _n, raw in iter_lines(part.source):
                obj = orjson.loads(raw)
                yield derive_key(obj, 0), raw.rstrip(b"\r\n")
        else:
            for line_no, raw in iter_lines(input_path, part.start, part.end, part.first_line):
                yield canonical_line(raw, line_no)

    def _load_results(self, file_no: int, rf: ResultsFile) -> None:
        self.files[file_no] = rf.path
        self.db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?)", (file_no, str(rf.path), rf.job_id, rf.attempt)
        )
        rows: list[tuple[Any, ...]] = []
        sql = "INSERT INTO raw VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        with open(rf.path, "rb") as f:
            off = 0
            for raw in f:
                line_off, off = off, off + len(raw)
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                key, ok, retry, code, *usage = _parse_result(line)
                rows.append((file_no, key, ok, retry, code, line_off, len(line), *usage))
                if len(rows) >= _BATCH:
                    self._check()
                    self.db.executemany(sql, rows)
                    rows.clear()
        self.db.executemany(sql, rows)

    def _reconcile(self) -> None:
        self._check()
        db = self.db
        db.execute("BEGIN")
        # Lines whose key is not in the input (or that are not a result line at all).
        cur = db.execute("DELETE FROM raw WHERE key IS NULL OR key NOT IN (SELECT key FROM keys)")
        self.unknown = cur.rowcount
        # A key answered twice by one job: keep the first line.
        cur = db.execute(
            "DELETE FROM raw WHERE seq NOT IN (SELECT MIN(seq) FROM raw GROUP BY file_no, key)"
        )
        self.duplicates = cur.rowcount
        # Best answer per key: a success beats an error; among errors the latest attempt wins.
        db.execute(
            """
            CREATE TABLE best AS
            SELECT key, file_no, ok, retry, code, off, len, p, c, t, ca, tot FROM (
                SELECT r.*, ROW_NUMBER() OVER (
                    PARTITION BY r.key ORDER BY r.ok DESC, f.attempt DESC, r.seq DESC) AS rn
                FROM raw r JOIN files f USING (file_no))
            WHERE rn = 1
            """
        )
        db.execute("CREATE UNIQUE INDEX best_key ON best(key)")
        db.execute("DELETE FROM raw")
        db.execute("COMMIT")

    # ---- queries ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        total, ok, answered = self.db.execute(
            "SELECT COUNT(*), COUNT(CASE WHEN b.ok = 1 THEN 1 END), COUNT(b.key) "
            "FROM keys k LEFT JOIN best b ON b.key = k.key"
        ).fetchone()
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
            "SELECT code, COUNT(*), MIN(file_no), MIN(off) FROM best WHERE ok = 0 "
            "GROUP BY code ORDER BY COUNT(*) DESC LIMIT 10"
        ).fetchall()
        for code, n, _f, _o in rows:
            f, o, ln = self.db.execute(
                "SELECT file_no, off, len FROM best WHERE ok = 0 AND code IS ? LIMIT 1", (code,)
            ).fetchone()
            with open(self.files[f], "rb") as fh:
                fh.seek(o)
                sample = orjson.loads(fh.read(ln)).get("error")
            out.append({"code": code, "count": n, "example": sample})
        return out

    def retry_keys(self, part_no: int, *, force: bool) -> int:
        """Select the keys of ``part_no`` to resubmit into the ``retry_sel`` table; returns how
        many. Unanswered and retryable-error keys; with ``force`` every key without a success."""
        self.db.execute("CREATE TABLE IF NOT EXISTS retry_sel (key TEXT PRIMARY KEY)")
        self.db.execute("DELETE FROM retry_sel")
        cond = "b.ok = 0" if force else "b.ok = 0 AND b.retry = 1"
        cur = self.db.execute(
            "INSERT INTO retry_sel SELECT k.key FROM keys k LEFT JOIN best b ON b.key = k.key "
            f"WHERE k.part = ? AND (b.key IS NULL OR ({cond}))",
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

    def answers(self) -> Iterator[Answer]:
        """Every input key in input order with its best answer line (raw bytes), or none."""
        handles: dict[int, IO[bytes]] = {}
        cur = self.db.execute(
            "SELECT k.ord, k.key, k.part, b.file_no, b.ok, b.off, b.len "
            "FROM keys k LEFT JOIN best b ON b.key = k.key ORDER BY k.ord"
        )
        try:
            while rows := cur.fetchmany(1000):
                self._check()
                for ord_, key, part, file_no, ok, off, ln in rows:
                    if file_no is None:
                        yield Answer(ord_, key, None, part, None)
                        continue
                    fh = handles.get(file_no)
                    if fh is None:
                        fh = handles[file_no] = open(self.files[file_no], "rb")
                    fh.seek(off)
                    yield Answer(ord_, key, bool(ok), part, fh.read(ln))
        finally:
            cur.close()
            for fh in handles.values():
                fh.close()


def _parse_result(line: bytes) -> tuple[Any, ...]:
    """``(key, ok, retryable, code, *usage)`` of one results line; key None if it is not one."""
    none = (None, 0, 0, None, 0, 0, 0, 0, 0)
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return none
    if not isinstance(obj, dict):
        return none
    key = obj.get("key")
    key = key if isinstance(key, str) else (str(key) if isinstance(key, int) else None)
    if "response" in obj:
        resp = obj["response"]
        usage = resp.get("usageMetadata") if isinstance(resp, dict) else None
        if not isinstance(usage, dict):
            usage = {}
        return (key, 1, 0, None, *(_int(usage.get(f)) for f in TOKEN_FIELDS))
    error = obj.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    code = code if isinstance(code, int) else None
    return (key, 0, int(is_retryable(error)), code, 0, 0, 0, 0, 0)


def remove_index(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def results_files(rows: Iterable[dict[str, Any]]) -> list[ResultsFile]:
    """The results files of collected job rows (``results_path`` set)."""
    return [
        ResultsFile(Path(r["results_path"]), r["id"], r["attempt"])
        for r in rows
        if r.get("results_path")
    ]
