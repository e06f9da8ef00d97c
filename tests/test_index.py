"""The on-disk answer index: input order, reconciliation, retry selection, bounded memory."""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from daemon.results.index import (
    Answer,
    MergeIndex,
    Part,
    ResultsFile,
    Stopped,
    canonical_line,
    derive_key,
    fast_key,
    is_retryable,
)


def _answers(index: MergeIndex) -> Iterator[Answer]:
    """Every input key in input order with its best answer (the chunks the outbox writer reads)."""
    for chunk in index.answer_chunks():
        yield from chunk


def ok_line(key: str) -> bytes:
    return orjson.dumps(
        {
            "key": key,
            "response": {
                "candidates": [{"content": {"parts": [{"text": f"answer:{key}"}]}}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 5},
            },
        }
    )


def err_line(key: str, code: int) -> bytes:
    return orjson.dumps({"key": key, "error": {"code": code, "message": f"e{code}"}})


def write_input(path: Path, keys: list[str]) -> None:
    with open(path, "wb") as f:
        for k in keys:
            f.write(orjson.dumps({"key": k, "request": {"contents": [{"parts": [{"text": k}]}]}}))
            f.write(b"\n")


def write_results(path: Path, lines: list[bytes]) -> ResultsFile:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return ResultsFile(path, int(path.stem.split("-")[1].split(".")[0]), 1)


def build(tmp: Path, input_path: Path, results: list[ResultsFile], parts=None) -> MergeIndex:
    return MergeIndex.build(tmp / "merge.sqlite", input_path, parts or [], results)


@pytest.mark.parametrize("n", [1, 500, 20_000])
def test_answers_come_back_in_input_order_with_their_own_key(tmp_path: Path, n: int) -> None:
    keys = [f"k{i:06d}-{random.random():.6f}" for i in range(n)]
    write_input(tmp_path / "input.jsonl", keys)
    shuffled = keys[:]
    random.Random(n).shuffle(shuffled)
    half = len(shuffled) // 2
    r1 = write_results(tmp_path / "job-1.results.jsonl", [ok_line(k) for k in shuffled[:half]])
    r2 = write_results(tmp_path / "job-2.results.jsonl", [ok_line(k) for k in shuffled[half:]])
    index = build(tmp_path, tmp_path / "input.jsonl", [r1, r2])
    try:
        got = list(_answers(index))
        assert [a.key for a in got] == keys
        for a in got:
            assert a.ok is True
            obj = orjson.loads(a.line)
            assert obj["key"] == a.key
            assert obj["response"]["candidates"][0]["content"]["parts"][0]["text"] == (
                f"answer:{a.key}"
            )
        assert index.counts()["succeeded"] == n
        assert index.tokens()["promptTokenCount"] == 3 * n
        assert index.tokens()["candidatesTokenCount"] == 5 * n
    finally:
        index.close()


def test_bare_lines_are_keyed_by_physical_line_number(tmp_path: Path) -> None:
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(b'{"contents": []}\n\n{"contents": [1]}\n   \n{"contents": [2]}\n')
    res = write_results(tmp_path / "job-1.results.jsonl", [ok_line("5"), ok_line("1")])
    index = build(tmp_path, inp, [res])
    try:
        got = [(a.key, a.ok) for a in _answers(index)]
        assert got == [("1", True), ("3", None), ("5", True)]
    finally:
        index.close()
    assert derive_key({"contents": []}, 7) == "7"
    assert derive_key({"key": "x", "request": {}}, 7) == "x"
    key, line = canonical_line(b'{"contents": [2]}\n', 5)
    assert key == "5" and orjson.loads(line) == {"key": "5", "request": {"contents": [2]}}


def test_duplicate_and_unknown_keys_are_dropped_and_counted(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", ["a", "b", "c"])
    res = write_results(
        tmp_path / "job-1.results.jsonl",
        [
            ok_line("a"),
            ok_line("a"),
            ok_line("zz"),
            b"not json",
            b"[1]",
            ok_line("b"),
            ok_line("b"),
        ],
    )
    index = build(tmp_path, tmp_path / "input.jsonl", [res])
    try:
        c = index.counts()
        assert c["duplicates_dropped"] == 2
        assert c["unknown_dropped"] == 3  # zz, the non-JSON line, the non-object line
        assert (c["total"], c["succeeded"], c["failed"]) == (3, 2, 1)
        assert [a.ok for a in _answers(index)] == [True, True, None]
    finally:
        index.close()


def test_success_beats_error_and_latest_error_wins(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", ["a", "b", "c"])
    r1 = write_results(
        tmp_path / "job-1.results.jsonl", [err_line("a", 13), err_line("b", 13), ok_line("c")]
    )
    r2 = write_results(tmp_path / "job-2.results.jsonl", [ok_line("a"), err_line("b", 3)])
    r2.attempt = 2
    r3 = write_results(tmp_path / "job-3.results.jsonl", [err_line("c", 13)])
    r3.attempt = 3
    index = build(tmp_path, tmp_path / "input.jsonl", [r3, r2, r1])
    try:
        got = {a.key: orjson.loads(a.line) for a in _answers(index)}
        assert "response" in got["a"]
        assert got["b"]["error"]["code"] == 3  # attempt 2's error replaces attempt 1's
        assert "response" in got["c"]  # an earlier success beats a later error
    finally:
        index.close()


def test_retry_selection_and_part_file(tmp_path: Path) -> None:
    inp = tmp_path / "input.jsonl"
    # part 1: lines 1-3 keyed; part 2: lines 4-6 bare
    lines = [
        b'{"key": "a", "request": {"x": 1}}\n',
        b'{"key": "b", "request": {"x": 2}}\n',
        b'{"key": "c", "request": {"x": 3}}\n',
        b'{"y": 4}\n',
        b'{"y": 5}\n',
        b'{"y": 6}\n',
    ]
    inp.write_bytes(b"".join(lines))
    split = sum(len(x) for x in lines[:3])
    parts = [Part(1, None, 0, split, 1), Part(2, None, split, None, 4)]
    res = write_results(
        tmp_path / "job-1.results.jsonl",
        [err_line("a", 13), err_line("b", 3), ok_line("c"), err_line("4", 429), ok_line("6")],
    )
    index = build(tmp_path, inp, [res], parts)
    try:
        assert index.retry_keys(1, force=False) == 1  # a (13); b is permanent (3)
        out = io.BytesIO()
        assert index.write_retry_part(inp, parts[0], out) == 1
        assert out.getvalue() == lines[0]
        assert index.retry_keys(1, force=True) == 2  # force: every key without a success
        out = io.BytesIO()
        index.write_retry_part(inp, parts[0], out)
        assert out.getvalue() == lines[0] + lines[1]
        assert index.retry_keys(2, force=False) == 2  # "4" (HTTP 429) and "5" (unanswered)
        out = io.BytesIO()
        index.write_retry_part(inp, parts[1], out)
        assert [orjson.loads(x) for x in out.getvalue().splitlines()] == [
            {"key": "4", "request": {"y": 4}},
            {"key": "5", "request": {"y": 5}},
        ]
    finally:
        index.close()


def test_part_source_files_are_read_when_present(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", ["a", "b"])
    src = tmp_path / "part-1-a1.jsonl"
    src.write_bytes((tmp_path / "input.jsonl").read_bytes())
    index = build(tmp_path, tmp_path / "nothing-here.jsonl", [], [Part(1, src)])
    try:
        assert [a.key for a in _answers(index)] == ["a", "b"]
    finally:
        index.close()


def test_is_retryable() -> None:
    for code in (4, 8, 13, 14, 429, 500, 503, 504):
        assert is_retryable({"code": code})
    for code in (3, 5, 7, 400, 404):
        assert not is_retryable({"code": code})
    assert is_retryable({"status": "UNAVAILABLE"})
    assert not is_retryable(None)


def test_merging_200k_requests_keeps_memory_flat(tmp_path: Path) -> None:
    n = 200_000
    keys = [f"request-{i:07d}" for i in range(n)]
    write_input(tmp_path / "input.jsonl", keys)
    order = list(range(n))
    random.Random(1).shuffle(order)
    with open(tmp_path / "job-1.results.jsonl", "wb") as f:
        for i in order:
            f.write(ok_line(keys[i]) + b"\n")
    del order
    res = ResultsFile(tmp_path / "job-1.results.jsonl", 1, 1)
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = before
    index = build(tmp_path, tmp_path / "input.jsonl", [res])
    try:
        peak = max(peak, proc.memory_info().rss)
        count = 0
        for _a in _answers(index):
            count += 1
            if count % 20_000 == 0:
                peak = max(peak, proc.memory_info().rss)
        assert count == n
    finally:
        index.close()
    growth = (peak - before) / 1e6
    print(f"RSS growth merging {n} requests: {growth:.1f} MB")
    assert growth < 50, growth


def test_jobs_folded_in_one_by_one_equal_a_fresh_build(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", ["a", "b", "c"])
    r1 = write_results(
        tmp_path / "job-1.results.jsonl",
        [err_line("a", 13), err_line("a", 14), ok_line("c"), ok_line("zz")],
    )
    r2 = write_results(tmp_path / "job-2.results.jsonl", [err_line("a", 8), ok_line("b")])
    r2.attempt = 2
    r3 = write_results(tmp_path / "job-3.results.jsonl", [ok_line("b"), err_line("c", 13)])
    r3.attempt = 3

    def snapshot(index: MergeIndex) -> tuple[object, ...]:
        return (index.counts(), [(a.key, a.line) for a in _answers(index)])

    (tmp_path / "fresh").mkdir()
    fresh = build(tmp_path / "fresh", tmp_path / "input.jsonl", [r1, r2, r3])
    expected = snapshot(fresh)
    fresh.close()
    path = tmp_path / "merge.sqlite"
    index = MergeIndex(path)
    index.ensure_keys(tmp_path / "input.jsonl", [])
    assert index.add_results(r3) and index.add_results(r1)  # any order
    assert not index.add_results(r3)  # idempotent: already there
    index.db.execute("INSERT INTO meta VALUES ('probe', 'kept')")
    index.close()
    index = MergeIndex.build(path, tmp_path / "input.jsonl", [], [r1, r2, r3])
    try:
        assert index._meta("probe") == "kept"  # the index was extended, not rebuilt
        assert snapshot(index) == expected
        got = {a.key: orjson.loads(a.line or b"null") for a in _answers(index)}
        assert got["a"]["error"]["code"] == 8  # latest attempt's error
        counts = index.counts()
        assert counts["duplicates_dropped"] == 1 and counts["unknown_dropped"] == 1
    finally:
        index.close()


def test_an_index_that_does_not_fit_is_rebuilt(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", ["a", "b"])
    r1 = write_results(tmp_path / "job-1.results.jsonl", [ok_line("a")])
    r2 = write_results(tmp_path / "job-2.results.jsonl", [ok_line("b")])
    path = tmp_path / "merge.sqlite"
    build(tmp_path, tmp_path / "input.jsonl", [r1, r2]).close()
    # job 2 is no longer listed: its answer must not linger
    index = build(tmp_path, tmp_path / "input.jsonl", [r1])
    assert [a.ok for a in _answers(index)] == [True, None]
    index.close()
    r1.path.write_bytes(ok_line("a") + b"\n" + ok_line("b") + b"\n")  # changed file
    index = build(tmp_path, tmp_path / "input.jsonl", [r1])
    assert [a.ok for a in _answers(index)] == [True, True]
    index.close()
    path.write_bytes(b"this is not a database" * 100)  # damaged cache
    index = build(tmp_path, tmp_path / "input.jsonl", [r1])
    assert [a.ok for a in _answers(index)] == [True, True]
    index.close()


def test_ordered_part_files_and_their_invalidation(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", ["a", "b", "c"])
    src = tmp_path / "part-1-a1.jsonl"
    src.write_bytes((tmp_path / "input.jsonl").read_bytes())
    parts = [Part(1, src)]
    r1 = write_results(
        tmp_path / "job-1.results.jsonl", [ok_line("c"), err_line("a", 13), ok_line("b")]
    )
    index = MergeIndex(tmp_path / "merge.sqlite")
    try:
        index.ensure_keys(tmp_path / "nothing.jsonl", parts)
        index.add_results(r1)
        dest = tmp_path / "part-1.ordered"
        assert index.write_ordered(1, dest)
        assert dest.read_bytes() == b"".join(
            a.line + b"\n" for a in _answers(index) if a.line is not None
        )
        assert [orjson.loads(x)["key"] for x in dest.read_bytes().splitlines()] == ["a", "b", "c"]
        assert index.ordered_file(1) == (dest, False)
        r2 = write_results(tmp_path / "job-2.results.jsonl", [ok_line("a")])
        r2.attempt = 2
        index.add_results(r2)
        assert index.ordered_file(1) is None  # a's answer changed: the file is stale
        r3 = write_results(tmp_path / "job-3.results.jsonl", [])
        index.add_results(r3)
        assert index.write_ordered(1, dest) and index.ordered_file(1) == (dest, False)
        dest.write_bytes(b"truncated")
        assert index.ordered_file(1) is None
    finally:
        index.close()
    write_input(tmp_path / "input.jsonl", ["a", "b"])
    r4 = write_results(tmp_path / "job-4.results.jsonl", [ok_line("a")])
    (tmp_path / "x").mkdir()
    index = build(tmp_path / "x", tmp_path / "input.jsonl", [r4])
    try:
        assert not index.write_ordered(1, tmp_path / "p.ordered")  # b unanswered
    finally:
        index.close()


def test_fast_key_only_answers_when_certain() -> None:
    assert fast_key(b'{"key":"abc","request":{}}\n') == "abc"
    assert fast_key(b'{"key":"h\\u00e9","request":{}}') is None  # escapes: parse it
    assert fast_key(b'{"key": "abc", "request": {}}') is None  # not the canonical form
    assert fast_key(b'{"key":"a","request":{},"key":"b"}') is None  # last one would win
    assert fast_key('{"key":"é","request":{"t":"x\\"key\\""}}'.encode()) == "é"


def test_a_stop_request_ends_a_long_build(tmp_path: Path) -> None:
    write_input(tmp_path / "input.jsonl", [f"k{i}" for i in range(20_000)])
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        MergeIndex.build(tmp_path / "merge.sqlite", tmp_path / "input.jsonl", [], [], stop)
    # the index is usable again afterwards (its lock was released)
    build(tmp_path, tmp_path / "input.jsonl", []).close()
