"""The fast path of a big input's merge (daemon.results.fast_order) on real files."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from daemon.results.fast_order import _key_positions, fast_path, load_summary, order_part


def req(key: str) -> bytes:
    return orjson.dumps({"key": key, "request": {"contents": [{"parts": [{"text": key}]}]}})


def ok(key: str) -> bytes:
    usage = {"promptTokenCount": 1, "totalTokenCount": 3}
    return orjson.dumps({"key": key, "response": {"usageMetadata": usage}})


def err(key: str, code: int) -> bytes:
    return orjson.dumps({"key": key, "error": {"code": code, "message": "x"}})


def files(tmp_path: Path, keys: list[str], results: list[bytes]) -> tuple[Path, Path]:
    source, res = tmp_path / "part-1-a1.jsonl", tmp_path / "job-7.results.jsonl"
    source.write_bytes(b"".join(req(k) + b"\n" for k in keys))
    res.write_bytes(b"".join(r + b"\n" for r in results))
    return source, res


@pytest.mark.parametrize("n", [3000, 40_000])
def test_orders_answers_and_summarises(tmp_path: Path, n: int) -> None:
    # 40,000 answers span several 1 MiB blocks: all but the last are taken in bulk, the last
    # (with an error and escaped keys) line by line; the summary is the same either way.
    keys = [f"k{i}" for i in range(n)] + ['odd"key', "x\\y"]  # escaped keys: slow path
    results = [ok(k) for k in reversed(keys[1:])] + [err(keys[0], 13)]
    source, res = files(tmp_path, keys, results)
    dest = fast_path(tmp_path, 1)
    s = order_part(1, source, res, 7, dest, threading.Event())
    assert s is not None and (s.total, s.succeeded, s.retryable) == (n + 2, n + 1, 1)
    assert s.tokens == [n + 1, 0, 0, 0, 3 * (n + 1)]
    assert s.codes == [[13, 1, 0, {"code": 13, "message": "x"}]]
    assert not s.media
    assert [orjson.loads(x)["key"] for x in dest.read_bytes().splitlines()] == keys
    assert load_summary(tmp_path, 1, 7, res) == s
    assert load_summary(tmp_path, 1, 8, res) is None  # another job's summary is not trusted


def test_a_byte_range_part_and_media(tmp_path: Path) -> None:
    # The part is lines 2-3 of the input file (a byte range); an answer with inline media.
    lines = [req(k) + b"\n" for k in ("a", "b", "c", "d")]
    source = tmp_path / "input.jsonl"
    source.write_bytes(b"".join(lines))
    span = (len(lines[0]), len(lines[0]) + len(lines[1]) + len(lines[2]))
    pic = {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}
    image = orjson.dumps({"key": "c", "response": {"candidates": [{"content": {"parts": [pic]}}]}})
    res = tmp_path / "job-7.results.jsonl"
    res.write_bytes(image + b"\n" + ok("b") + b"\n")
    dest = fast_path(tmp_path, 2)
    s = order_part(2, source, res, 7, dest, threading.Event(), span)
    assert s is not None and s.total == 2 and s.media
    assert [orjson.loads(x)["key"] for x in dest.read_bytes().splitlines()] == ["b", "c"]


@pytest.mark.parametrize(
    "results",
    [
        [ok("a"), ok("b")],  # c unanswered
        [ok("a"), ok("b"), ok("c"), ok("a")],  # a duplicate
        [ok("a"), ok("b"), ok("c"), ok("zz")],  # an unknown key
        [ok("a"), ok("b"), b"{not json"],  # a broken line
    ],
)
def test_anything_but_one_answer_per_key_falls_back(tmp_path: Path, results: list[bytes]) -> None:
    source, res = files(tmp_path, ["a", "b", "c"], results)
    dest = fast_path(tmp_path, 1)
    assert order_part(1, source, res, 7, dest, threading.Event()) is None
    assert not dest.exists() and not Path(f"{dest}.json").exists()


def test_a_repeated_key_leaves_the_part_to_the_general_path(tmp_path: Path) -> None:
    source, _res = files(tmp_path, ["a", "b", "a"], [])
    assert _key_positions(source, threading.Event()) is None
    source, _res = files(tmp_path, ["a", "b"], [])
    assert _key_positions(source, threading.Event()) == {"a": 0, "b": 1}
