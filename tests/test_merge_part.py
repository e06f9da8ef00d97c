"""The fast path of a big input's merge (daemon.merge_part) on real files."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from daemon import merge_part
from daemon.merge_part import _Keys, fast_path, load_summary, order_part


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


def test_orders_answers_and_summarises(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(3000)] + ['odd"key', "x\\y"]  # escaped keys: slow path
    results = [ok(k) for k in reversed(keys[1:])] + [err(keys[0], 13)]
    source, res = files(tmp_path, keys, results)
    dest = fast_path(tmp_path, 1)
    s = order_part(1, source, res, 7, dest, threading.Event())
    assert s is not None and (s.total, s.succeeded, s.retryable) == (3002, 3001, 1)
    assert s.tokens == [3001, 0, 0, 0, 3 * 3001]
    assert s.codes == [[13, 1, 0, {"code": 13, "message": "x"}]]
    assert [orjson.loads(x)["key"] for x in dest.read_bytes().splitlines()] == keys
    assert load_summary(tmp_path, 1, 7, res) == s
    assert load_summary(tmp_path, 1, 8, res) is None  # another job's summary is not trusted


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


def test_hash_collisions_never_mix_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, _res = files(tmp_path, ["a", "b"], [])
    monkeypatch.setattr(merge_part, "hash", lambda b: 1 if b in (b"a", b"zz") else 2, raising=False)
    keys = _Keys(source, threading.Event())
    assert not keys.ambiguous and keys.find(b"a") == 0 and keys.find(b"b") == 1
    assert keys.find(b"zz") == -1  # same hash as "a", another key
    monkeypatch.setattr(merge_part, "hash", lambda b: 1, raising=False)
    assert _Keys(source, threading.Event()).ambiguous  # the part goes to the merge index
