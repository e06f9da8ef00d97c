"""Validation on two cores (daemon.validate.split): the child process checks the second half of the
file, the validator takes over what it found. Every outcome must equal the one-pass validation;
test_validate.py runs its whole suite both ways, these tests look at the seams."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.config import Config, parse_config
from daemon.validate.reader import ScanningWindow
from daemon.validate.rules import Validation, _key_hash, _run, validate_file
from daemon.validate.split import TailCheck

GEN = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}


def cfg(tmp_path: Path, split: int, **submit: Any) -> Config:
    return parse_config(
        {
            "paths": {"root": str(tmp_path)},
            "inbox": {"parallel_validation_bytes": split},
            "submit": {"max_requests_per_job": 300, **submit},
        }
    )


def lines(n: int, **override: bytes) -> list[bytes]:
    out = [orjson.dumps({"key": f"k{i}", "request": GEN}) for i in range(n)]
    for where, raw in override.items():
        out[int(where[1:])] = raw
    return out


def write(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(body)
    return path


def both(tmp_path: Path, body: bytes, **submit: Any) -> tuple[Validation, Validation]:
    """(one pass, two cores) for the same file."""
    path = write(tmp_path, body)
    one = validate_file(path, model="gemini-2.5-flash", cfg=cfg(tmp_path, 0, **submit))
    two = validate_file(path, model="gemini-2.5-flash", cfg=cfg(tmp_path, 1, **submit))
    return one, two


def same_outcome(one: Validation, two: Validation) -> None:
    assert two.ok == one.ok and two.problem_count == one.problem_count
    assert [(p.line, p.reason) for p in two.problems] == [(p.line, p.reason) for p in one.problems]
    assert (two.request_count, two.size_bytes, two.sha256) == (
        one.request_count,
        one.size_bytes,
        one.sha256,
    )
    shape = [
        (p.first_line, p.last_line, p.start_offset, p.end_offset, p.request_count)
        for p in one.parts
    ]
    assert [
        (p.first_line, p.last_line, p.start_offset, p.end_offset, p.request_count)
        for p in two.parts
    ] == shape
    # token estimates are taken per block of lines, and the blocks fall differently
    assert abs(two.est_tokens - one.est_tokens) <= one.request_count // 10 + 1


def test_the_child_checks_the_second_half(tmp_path: Path) -> None:
    body = b"\n".join(lines(2000)) + b"\n"
    one, two = both(tmp_path, body)
    same_outcome(one, two)
    assert one.tail_bytes == 0 and len(two.parts) == 7
    # the child's share (the lines after the first 30% of the file) came from the child
    assert 0.6 * len(body) < two.tail_bytes < 0.75 * len(body)
    assert two.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    "body",
    [
        b"\n".join(lines(2000)),  # no newline after the last line
        b"\n".join(lines(2000)) + b"\n\n   \n",  # blank lines at the end
        b"\n".join(lines(1900)) + b"\r\n" + b"\n".join(lines(2000)[1900:]) + b"\n",  # CRLF
        b"\n".join(lines(2000, l1700=b'{"contents": [{"parts": [{"text": "bare"}]}]}')) + b"\n",
    ],
    ids=["no-final-newline", "blank-lines", "crlf", "bare-line"],
)
def test_the_validator_reads_on_where_the_child_stopped(tmp_path: Path, body: bytes) -> None:
    one, two = both(tmp_path, body)
    same_outcome(one, two)
    assert two.ok and 0 < two.tail_bytes < 0.75 * len(body)


def test_a_bad_line_in_the_childs_half_keeps_its_line_number(tmp_path: Path) -> None:
    body = b"\n".join(lines(2000, l1499=b'{"key": "x", "request": []}')) + b"\n"
    one, two = both(tmp_path, body)
    same_outcome(one, two)
    assert [(p.line, p.reason[:30]) for p in two.problems] == [
        (1500, '"request" is not a JSON object')
    ]


def test_a_duplicate_across_the_halves_is_found(tmp_path: Path) -> None:
    dup = orjson.dumps({"key": "k10", "request": GEN})
    body = b"\n".join(lines(2000, l1900=dup)) + b"\n"
    one, two = both(tmp_path, body)
    same_outcome(one, two)
    assert [(p.line, p.reason) for p in two.problems] == [
        (1901, "duplicate key 'k10' (first on line 11)")
    ]


def test_part_files_take_the_childs_lines_from_the_file(tmp_path: Path) -> None:
    # a bare line in the first half turns the parts into part files, which need the lines
    # themselves: the child's findings are set aside and the validator reads its half too
    body = b"\n".join(lines(2000, l5=orjson.dumps(GEN))) + b"\n"
    path = write(tmp_path, body)
    got = {}
    for split in (0, 1):
        out = tmp_path / f"parts-{split}"
        v = validate_file(path, model="gemini-2.5-flash", cfg=cfg(tmp_path, split), out_dir=out)
        assert v.ok and v.tail_bytes == 0
        got[split] = [p.source_path.read_bytes() for p in v.parts if p.source_path is not None]
    assert len(got[1]) == 7 and got[1] == got[0]


def test_a_failing_child_changes_nothing(tmp_path: Path) -> None:
    body = b"\n".join(lines(2000, l1600=b"{oops")) + b"\n"
    path = write(tmp_path, body)
    c = cfg(tmp_path, 0)
    expected = validate_file(path, model="gemini-2.5-flash", cfg=c)
    for code in ("import sys; sys.exit(3)", "print('not a pickle')"):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        tail = TailCheck(child, begin=len(body) // 2 + body[len(body) // 2 :].index(b"\n") + 1)
        assert tail.result() is None
        with path.open("rb") as f:
            run = _run(
                path, f, model="gemini-2.5-flash", cfg=c, out_dir=None, check_media=False, tail=tail
            )
        assert run.tail_bytes == 0 and run.request_count == 2000
        assert [(p.line, p.reason) for p in run.problems] == [
            (p.line, p.reason) for p in expected.problems
        ]


def test_a_key_hash_is_the_same_in_another_process() -> None:
    # str hash() is salted per process: the child's hashes must be comparable with ours
    code = "from daemon.validate.rules import _key_hash; print(_key_hash('key-\u00e9-1'))"
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=root, check=True)
    assert int(out.stdout) == _key_hash("key-\u00e9-1")


def test_a_deferred_digest_is_left_out_only_for_a_split_file(tmp_path: Path) -> None:
    body = b"\n".join(lines(2000)) + b"\n"
    path = write(tmp_path, body)
    big = validate_file(path, model="gemini-2.5-flash", cfg=cfg(tmp_path, 1), defer_digest=True)
    assert big.ok and big.sha256 is None and big.tail_bytes > 0
    small = validate_file(
        path, model="gemini-2.5-flash", cfg=cfg(tmp_path, 1 << 30), defer_digest=True
    )
    assert small.sha256 == hashlib.sha256(body).hexdigest() and small.tail_bytes == 0


MEDIA_LINE = orjson.dumps(
    {
        "key": "m",
        "request": {"contents": [{"parts": [{"fileData": {"fileUri": "file:nope.png"}}]}]},
    }
)


@pytest.mark.parametrize(
    ("at", "ending"),
    [(100, b"\n"), (1800, b"\n"), (1998, b"")],  # first half, the child's, after it stopped
)
def test_media_marks_are_seen_by_every_window(tmp_path: Path, at: int, ending: bytes) -> None:
    # with the digest deferred there is no separate scan: the windows look for "file: as they
    # read, and a mark anywhere sends the file through the media check
    body = b"\n".join(lines(2000, **{f"l{at}": MEDIA_LINE})) + ending
    path = write(tmp_path, body)
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg(tmp_path, 1), defer_digest=True)
    assert v.sha256 is None and v.media_refs == 1
    assert [(p.line, p.reason) for p in v.problems] == [
        (at + 1, "media file 'nope.png' not found in media_dir")
    ]


@pytest.mark.parametrize("where", [0, 10, (1 << 20) - 3, 1 << 20, (3 << 20) - 6])
def test_a_scanning_window_finds_a_mark_anywhere(tmp_path: Path, where: int) -> None:
    data = bytearray(b"a" * (3 << 20))
    data[where : where + 6] = b'"file:'
    path = tmp_path / "x"
    path.write_bytes(bytes(data))
    for reader in ("read", "readline"):
        window = ScanningWindow(path, 0, len(data))
        with io.BufferedReader(window, 1 << 20) as f:
            got = f.read() if reader == "read" else b"".join(iter(lambda: f.readline(999), b""))
        assert got == bytes(data) and window.found
    clean = ScanningWindow(path, where + 1, len(data))  # starts past the mark's first byte
    with io.BufferedReader(clean, 1 << 20) as f:
        assert len(f.read()) == len(data) - where - 1
    assert not clean.found


def _keys_by_half(n: int) -> tuple[str, str]:
    """A key whose hash falls in the lower half of the validator's 64 buckets, and one in the
    upper half (the child looks for repeats across the halves there)."""
    keys = [f"k{i}" for i in range(n)]
    lower = next(k for k in keys if _key_hash(k) & 63 < 32)
    upper = next(k for k in keys if _key_hash(k) & 63 >= 32)
    return lower, upper


def test_duplicates_across_the_halves_are_found_in_every_bucket(tmp_path: Path) -> None:
    lower, upper = _keys_by_half(100)
    body = (
        b"\n".join(
            lines(
                2000,
                l1900=orjson.dumps({"key": lower, "request": GEN}),
                l1950=orjson.dumps({"key": upper, "request": GEN}),
            )
        )
        + b"\n"
    )
    one, two = both(tmp_path, body)
    same_outcome(one, two)
    assert [p.line for p in two.problems] == [1901, 1951]


def test_the_child_looks_for_repeats_in_the_upper_buckets(tmp_path: Path) -> None:
    # The protocol itself, with a real child: after its findings, it takes our hashes of the
    # upper 32 buckets and answers with those that it holds too (or that repeat among ours).
    body = b"\n".join(lines(2000)) + b"\n"
    path = write(tmp_path, body)
    tail = TailCheck.start(path, len(body), "gemini-2.5-flash", cfg(tmp_path, 1))
    assert tail is not None
    try:
        found = tail.result()
        assert found is not None and found.unique
        theirs = next(h for b in found.buckets[32:] for h in b)
        ours = [array("q") for _ in range(32)]
        ours[(theirs & 63) - 32].append(theirs)  # a key of the child's half, again in ours
        ours[0].extend([64 * 7 + 32, 64 * 7 + 32])  # a repeat among our own
        assert tail.send_upper(ours)
        assert tail.upper_repeats() == {theirs, 64 * 7 + 32}
    finally:
        tail.close()
    assert tail.proc.returncode == 0


def test_a_child_that_fails_at_the_upper_buckets_changes_nothing(tmp_path: Path) -> None:
    # A child that hands over (empty) findings, then reads our hashes and exits without an
    # answer: the validator looks at the upper buckets itself and still finds the repeat.
    _, upper = _keys_by_half(100)
    body = b"\n".join(lines(2000, l1950=orjson.dumps({"key": upper, "request": GEN}))) + b"\n"
    path = write(tmp_path, body)
    code = (
        "import pickle, sys; pickle.dump((True, False, 0, 0, [0] * 64), sys.stdout.buffer); "
        "sys.stdout.flush(); sys.stdin.buffer.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    tail = TailCheck(child, begin=len(body) // 2 + body[len(body) // 2 :].index(b"\n") + 1)
    with path.open("rb") as f:
        run = _run(
            path,
            f,
            model="gemini-2.5-flash",
            cfg=cfg(tmp_path, 0),
            out_dir=None,
            check_media=False,
            tail=tail,
        )
    tail.close()
    assert run.request_count == 2000
    assert [p.line for p in run.problems] == [1951]


def test_child_imports_only_the_validator() -> None:
    """The child process (``python -c``, :mod:`daemon.validate.split`) pays for every import on
    each big file: it must load the validator, the config and the standard library only."""
    import subprocess
    import sys

    code = (
        "import sys; from daemon.validate import rules, split; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    heavy = {
        "anyio",
        "aiosqlite",
        "google",
        "structlog",
        "aiohttp",
        "httpx",
        "watchfiles",
    }
    assert "daemon" in loaded and not loaded & heavy
