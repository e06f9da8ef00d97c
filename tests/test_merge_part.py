"""The fast path of a big input's merge (daemon.merge_part) on real files."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from daemon.merge_part import Streamed, _key_positions, fast_path, load_summary, order_part


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


def _fed(data: bytes, chunk: int) -> Streamed:
    streamed = Streamed()
    for i in range(0, len(data), chunk):
        streamed.feed(data[i : i + chunk])
    return streamed


def _order_both_ways(tmp_path: Path, source: Path, res: Path, streamed: Streamed) -> tuple:
    """order_part with and without the streamed answers: (summaries, ordered bytes)."""
    out = []
    for label, given in (("plain", None), ("streamed", streamed)):
        work = tmp_path / label
        work.mkdir()
        dest = fast_path(work, 1)
        s = order_part(1, source, res, 7, dest, threading.Event(), streamed=given)
        out.append((s, dest.read_bytes() if dest.exists() else None))
    return out[0], out[1]


@pytest.mark.parametrize("chunk", [1, 97, 4096, 1 << 20])
@pytest.mark.parametrize("media", [False, True])
def test_answers_parsed_during_the_download_are_taken(
    tmp_path: Path, chunk: int, media: bool
) -> None:
    # The download shows each chunk (cut anywhere, even inside a line or a media mark) to a
    # Streamed; ordering then takes its answers instead of parsing the file, with the same
    # outcome to the byte.
    keys = [f"k{i}" for i in range(3000 if chunk > 1 else 300)]
    results = [ok(k) for k in reversed(keys)]
    if media:
        pic = {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}
        body = {"candidates": [{"content": {"parts": [pic]}}], "usageMetadata": {}}
        results[7] = orjson.dumps({"key": keys[-8], "response": body})
    source, res = files(tmp_path, keys, results)
    streamed = _fed(res.read_bytes(), chunk)
    plain, fed = _order_both_ways(tmp_path, source, res, streamed)
    assert streamed.taken
    assert plain[0] is not None and fed == plain
    assert plain[0].media is media and plain[0].total == len(keys)


@pytest.mark.parametrize(
    "how", ["an_error_line", "a_crlf", "cut_short", "started_over", "an_unknown_key"]
)
def test_a_streamed_parse_that_does_not_cover_the_file_is_not_taken(
    tmp_path: Path, how: str
) -> None:
    keys = [f"k{i}" for i in range(2000)]
    results = [ok(k) for k in keys]
    if how == "an_error_line":
        results[1500] = err(keys[1500], 13)
    source, res = files(tmp_path, keys, results)
    data = res.read_bytes()
    if how == "a_crlf":
        data = data.replace(b"\n", b"\r\n", 1)
        res.write_bytes(data)
    streamed = _fed(data, 4096)
    if how == "cut_short":  # the file on disk has more than the parse saw
        streamed = _fed(data[: len(data) // 2], 4096)
    if how == "started_over":  # a try that failed half-way, then a whole one: taken
        streamed = _fed(data[: len(data) // 2], 4096)
        streamed.restart()
        for i in range(0, len(data), 4096):
            streamed.feed(data[i : i + 4096])
    if how == "an_unknown_key":  # what was parsed is not this part's answers
        streamed = _fed(b"".join(ok(f"other{i}") + b"\n" for i in range(2000)), 4096)
        streamed.size = len(data)
    plain, fed = _order_both_ways(tmp_path, source, res, streamed)
    assert streamed.taken is (how == "started_over")
    assert fed == plain and plain[0] is not None
