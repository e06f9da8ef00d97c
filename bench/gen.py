"""Fast generators of benchmark inputs: one big JSONL (cached under bench/out/) and many small ones."""

from __future__ import annotations

import os
import random
import string
import time
from pathlib import Path

from bench.common import MB, OUT, note

LINE_BYTES = 1000  # ~1 KB per request line, so N MB = about N x 1000 requests
_TEMPLATE = b'{"key":"req-%08d","request":{"contents":[{"role":"user","parts":[{"text":"%s"}]}]}}\n'
_OVERHEAD = len(_TEMPLATE % (0, b""))


def text_pool(n_bytes: int = 4 * MB, seed: int = 7) -> bytes:
    """Random lowercase words separated by spaces (plain ASCII: no JSON escaping, no emulator markers)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(5000)
    ]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out).encode()


def big_jsonl(size_mb: int, *, line_bytes: int = LINE_BYTES) -> Path:
    """`bench/out/big-<size>mb.jsonl`: size_mb x 1000 keyed generate requests of ~1 KB each.

    Generated once (≈ 1 s per 100 MB) and cached; written to a temporary name and renamed, so an
    existing file is always complete."""
    path = OUT / f"big-{size_mb}mb.jsonl"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    n = size_mb * MB // line_bytes
    prompt = line_bytes - _OVERHEAD
    pool = text_pool()
    span = len(pool) - prompt - 1
    t0 = time.monotonic()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb", buffering=0) as f:
        batch: list[bytes] = []
        for i in range(n):
            off = (i * 7919) % span
            batch.append(_TEMPLATE % (i, pool[off : off + prompt]))
            if len(batch) == 20000:
                f.write(b"".join(batch))
                batch.clear()
        f.write(b"".join(batch))
    os.replace(tmp, path)
    note(
        f"generated {path.name}: {n:,} requests, {path.stat().st_size / MB:,.0f} MB "
        f"in {time.monotonic() - t0:.1f} s"
    )
    return path


def small_files(folder: Path, n: int, *, requests: int = 10, prompt_bytes: int = 100) -> list[Path]:
    """`n` distinct files of `requests` lines each (distinct, so the daemon's dedupe never reuses)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = text_pool(1 * MB, seed=11)
    span = len(pool) - prompt_bytes - 1
    paths = []
    for i in range(n):
        lines = []
        for j in range(requests):
            off = ((i * requests + j) * 104729) % span
            lines.append(_TEMPLATE % (j, b"file %d: " % i + pool[off : off + prompt_bytes]))
        p = folder / f"f{i:06d}.jsonl"
        p.write_bytes(b"".join(lines))
        paths.append(p)
    return paths
