"""Atomic outbox writing: never a partial file under a final name, no temp files left behind."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from daemon.layout import OUTBOX_NAME_EXTRA, name_too_long, outbox_paths
from daemon.outbox import atomic_writer, link_or_copy, remove_quietly, write_json


class Boom(Exception):
    pass


def test_error_mid_write_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "out" / "foo.jsonl"
    with pytest.raises(Boom), atomic_writer(final) as f:
        f.write(b'{"key": "1"}\n')
        f.flush()
        assert not final.exists()  # only the temporary name exists while writing
        assert [p.name.startswith(".") for p in final.parent.iterdir()] == [True]
        raise Boom
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_error_mid_rewrite_keeps_the_previous_file_whole(tmp_path: Path) -> None:
    final = tmp_path / "foo.jsonl"
    with atomic_writer(final) as f:
        f.write(b"old\n")
    with pytest.raises(Boom), atomic_writer(final) as f:
        f.write(b"new partial")
        raise Boom
    assert final.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["foo.jsonl"]


def test_write_json_and_outbox_paths(tmp_path: Path) -> None:
    paths = outbox_paths(tmp_path, "gemini-2.5-flash/foo.jsonl")
    assert paths["summary"] == tmp_path / "gemini-2.5-flash" / "foo.summary.json"
    assert paths["media"] == tmp_path / "gemini-2.5-flash" / "foo.media"
    write_json(paths["summary"], {"b": 1, "a": [1]})
    assert orjson.loads(paths["summary"].read_bytes()) == {"a": [1], "b": 1}


def test_link_or_copy_replaces_atomically(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"x\n")
    dest = tmp_path / "keep" / "a.jsonl"
    dest.parent.mkdir()
    dest.write_bytes(b"stale\n")
    link_or_copy(src, dest)
    assert os.path.samefile(src, dest) and dest.read_bytes() == b"x\n"
    assert [p.name for p in dest.parent.iterdir()] == ["a.jsonl"]
    assert remove_quietly(dest) and not remove_quietly(dest)


def test_an_over_long_name_gets_a_short_unique_error_file(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    fits = "a" * (limit - OUTBOX_NAME_EXTRA) + ".jsonl"
    assert name_too_long(tmp_path, fits) is None
    assert outbox_paths(tmp_path, fits)["error"].name == fits[: -len(".jsonl")] + ".error.json"
    long_a = "é" * 120 + "a.jsonl"  # 241 bytes before .jsonl: multi-byte characters
    long_b = "é" * 120 + "b.JSONL"
    assert name_too_long(tmp_path, long_a) == limit
    err_a = outbox_paths(tmp_path, long_a)["error"]
    err_b = outbox_paths(tmp_path, long_b)["error"]
    assert err_a != err_b  # the same first 200 bytes, told apart by the digest
    for err in (err_a, err_b):
        assert len(os.fsencode(f".{err.name}.tmp")) <= limit
        assert err.name.startswith("é" * 100) and err.name.endswith(".error.json")
        err.name.encode("utf-8")  # no character cut in two
    write_json(err_a, {"ok": True})  # really writable, temporary name included
    assert err_a.exists()
