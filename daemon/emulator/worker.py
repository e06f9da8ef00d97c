"""Result generation for one batch job: streams input JSONL to output JSONL on disk (runs in a thread)."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from daemon.emulator import answers

BUCKET_BYTES = 16 * 1024 * 1024  # shuffle buckets stay around this size, so memory stays bounded


class SeenRequests:
    """Hashes of requests answered before (for `[[transient:N]]` and `[[drop]]`), persisted if a path is given."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._path = path
        self._seen: set[str] = set()
        if path is not None and path.exists():
            self._seen = set(path.read_text().split())

    def first_time(self, h: str) -> bool:
        with self._lock:
            if h in self._seen:
                return False
            self._seen.add(h)
            if self._path is not None:
                with self._path.open("a") as f:
                    f.write(h + "\n")
            return True


@dataclass
class JobResult:
    total: int = 0
    succeeded: int = 0
    failed: int = 0


class Stopped(Exception):
    """The emulator is stopping; the job's results are left unfinished."""


def answer_line(
    line: bytes, *, embed: bool, mid: str, seen: SeenRequests
) -> tuple[dict[str, Any] | None, bool]:
    """Answer one input line; returns (output object or None if dropped, is_error)."""
    try:
        obj = orjson.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except ValueError as e:
        return {"error": answers.rpc_error(3, f"Invalid JSON line: {e}")}, True
    out: dict[str, Any] = {}
    if "key" in obj:
        out["key"] = obj["key"]
    if "metadata" in obj:
        out["metadata"] = obj["metadata"]
    # `{"key", "request"}` lines; a bare request line (UNVERIFIED real behaviour) has no key.
    request = obj["request"] if isinstance(obj.get("request"), dict) else obj
    texts = answers.texts_of(request)
    text = " ".join(texts)
    first = answers.wants_transient(text) and seen.first_time(answers.request_hash(request))
    if first and answers.wants_drop(text):
        return None, False
    err = answers.marker_error(text, first)
    if err is not None:
        out["error"] = err
        return out, True
    if embed:
        out["response"] = answers.embed_response(request, texts)
    else:
        out["response"] = answers.generate_response(mid, request, texts)
    return out, False


def count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return n


def run_job(
    *,
    in_path: Path,
    out_path: Path,
    embed: bool,
    mid: str,
    shuffle: bool,
    seed: str,
    seen: SeenRequests,
    stop: threading.Event,
    on_total: Callable[[int], None],
) -> JobResult:
    """Answer every line of `in_path` into `out_path` (atomically), shuffled if asked."""
    result = JobResult(total=count_lines(in_path))
    on_total(result.total)
    rng = random.Random(seed)
    size = in_path.stat().st_size
    n_buckets = 1 + size // BUCKET_BYTES if shuffle else 1
    tmp_dir = out_path.parent
    bucket_paths = [tmp_dir / f"{out_path.name}.b{i}" for i in range(n_buckets)]
    buckets = [p.open("wb") for p in bucket_paths]
    try:
        with in_path.open("rb") as f:
            for line in f:
                if stop.is_set():
                    raise Stopped
                if not line.strip():
                    continue
                out, is_error = answer_line(line, embed=embed, mid=mid, seen=seen)
                if out is None:
                    continue
                if is_error:
                    result.failed += 1
                else:
                    result.succeeded += 1
                bucket = rng.randrange(n_buckets) if n_buckets > 1 else 0
                buckets[bucket].write(orjson.dumps(out) + b"\n")
        for b in buckets:
            b.close()
        tmp = out_path.with_name(out_path.name + ".tmp")
        with tmp.open("wb") as dst:
            for p in bucket_paths:
                if shuffle:
                    lines = p.read_bytes().splitlines(keepends=True)
                    rng.shuffle(lines)
                    dst.writelines(lines)
                else:
                    with p.open("rb") as src:
                        while block := src.read(1 << 20):
                            dst.write(block)
        os.replace(tmp, out_path)
    finally:
        for b in buckets:
            b.close()
        for p in bucket_paths:
            p.unlink(missing_ok=True)
    return result
