"""Validation rules (SPEC §2), part planning (SPEC §3) and `gemini-batchd check`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.config import Config, parse_config
from daemon.states import model_kind
from daemon.validate import reader
from daemon.validate.check import check_main
from daemon.validate.rules import validate_file

GEN = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


# Every test here runs twice: validated in one pass, and with a child process checking the second
# half of the file (daemon.validate.split; the threshold of 1 byte sends every file through it).
# The outcome must not depend on which.
_SPLIT = {"bytes": 0}


@pytest.fixture(autouse=True, params=[0, 1], ids=["one-pass", "two-cores"])
def _validation_split(request: pytest.FixtureRequest) -> Any:
    _SPLIT["bytes"] = request.param
    yield request.param
    _SPLIT["bytes"] = 0


def cfg_for(tmp_path: Path, **sections: Any) -> Config:
    inbox = {"parallel_validation_bytes": _SPLIT["bytes"], **sections.pop("inbox", {})}
    return parse_config({"paths": {"root": str(tmp_path)}, "inbox": inbox, **sections})


def write(tmp_path: Path, lines: list[Any] | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_bytes(
            b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)
        )
    return path


def line(key: str, request: Any = None) -> dict[str, Any]:
    return {"key": key, "request": GEN if request is None else request}


def problems(tmp_path: Path, data: list[Any] | bytes, model: str = "gemini-2.5-flash", **cfg: Any):
    v = validate_file(write(tmp_path, data), model=model, cfg=cfg_for(tmp_path, **cfg))
    assert v.ok is (v.problem_count == 0)
    return [(p.line, p.reason) for p in v.problems]


def test_valid_file_facts(tmp_path: Path) -> None:
    path = write(tmp_path, [line("a"), b"", GEN, b"   ", line("b")])
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg_for(tmp_path))
    assert v.ok and v.problems == [] and v.problem_count == 0
    assert v.request_count == 3
    assert v.size_bytes == path.stat().st_size
    assert v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert v.kind == "generate" and v.est_tokens > 0
    assert len(v.parts) == 1 and v.parts[0].first_line == 1 and v.parts[0].last_line == 5


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([line("a"), b"{not json"], [(2, "invalid JSON")]),
        (
            [line("a"), b"[1, 2]", b'"text"', b"7"],
            [(2, "not a JSON object"), (3, "not"), (4, "not")],
        ),
        ([{"key": "a"}], [(1, 'missing "request"')]),
        ([{"key": "a", "request": {}}], [(1, '"request" is empty')]),
        ([{"key": "a", "request": []}], [(1, '"request" is not a JSON object')]),
        ([{"key": "a", "request": "x"}], [(1, '"request" is not a JSON object')]),
        ([{"request": GEN}], [(1, 'missing "key"')]),
        ([{"key": "", "request": GEN}], [(1, '"key" must be a non-empty string')]),
        ([{"key": 5, "request": GEN}], [(1, '"key" must be a non-empty string')]),
        ([{"key": "a", "request": GEN, "extra": 1}], [(1, "unknown member(s) extra")]),
        ([{}], [(1, '"request" is empty')]),
        ([line("a"), line("b"), line("a")], [(3, "duplicate key 'a' (first on line 1)")]),
        # an explicit key colliding with a bare line's number key
        ([GEN, line("1")], [(2, "duplicate key '1' (first on line 1)")]),
        ([line("3"), b"", GEN], [(3, "duplicate key '3' (first on line 1)")]),
        (b'{"key":"a","request":{"contents":[]}}\n{"key":"\xff\xfe"}\n', [(2, "not valid UTF-8")]),
        (b"", [(0, "no request lines")]),
        (b"\n  \n\t\n", [(0, "no request lines")]),
        ([line("a", {"content": {"parts": [{"text": "x"}]}})], [(1, 'request has no "contents"')]),
    ],
)
def test_rejection_rules(tmp_path: Path, data: Any, expected: list[tuple[int, str]]) -> None:
    got = problems(tmp_path, data)
    assert [n for n, _ in got] == [n for n, _ in expected], got
    for (_, reason), (_, want) in zip(got, expected, strict=True):
        assert want in reason


def test_line_over_max_line_bytes(tmp_path: Path) -> None:
    long_text = "x" * 5000
    data = [line("a"), line("b", {"contents": [{"parts": [{"text": long_text}]}]}), line("c")]
    got = problems(tmp_path, data, inbox={"max_line_bytes": 2000})
    assert got == [(2, "line is longer than max_line_bytes (2000 bytes)")]
    # a line just at the limit passes
    exact = orjson.dumps(line("a"))
    assert problems(tmp_path, [exact], inbox={"max_line_bytes": len(exact)}) == []
    assert problems(tmp_path, [exact], inbox={"max_line_bytes": len(exact) - 1})[0][0] == 1


def test_over_long_line_keeps_line_numbers_and_hash(tmp_path: Path) -> None:
    big = b'{"key":"big","request":{"contents":"' + b"y" * 3_000_000 + b'"}}'
    path = write(tmp_path, [line("a"), big, b"oops", line("a")])
    cfg = cfg_for(tmp_path, inbox={"max_line_bytes": 1000})
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg)
    assert [p.line for p in v.problems] == [2, 3, 4]
    assert v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert v.size_bytes == path.stat().st_size


def test_embedding_model_needs_content(tmp_path: Path) -> None:
    assert model_kind("gemini-embedding-001") == "embed"
    assert model_kind("gemini-2.5-flash") == "generate"
    emb = {"content": {"parts": [{"text": "hello"}]}, "taskType": "RETRIEVAL_DOCUMENT"}
    assert problems(tmp_path, [line("a", emb), emb], model="gemini-embedding-001") == []
    got = problems(tmp_path, [line("a", emb), GEN], model="gemini-embedding-001")
    assert got[0][0] == 2 and 'no "content"' in got[0][1]


def media_part(uri: str, snake: bool = False) -> dict[str, Any]:
    if snake:
        return {"file_data": {"file_uri": uri, "mime_type": "image/png"}}
    return {"fileData": {"fileUri": uri, "mimeType": "image/png"}}


def test_media_references(tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "cat.png").write_bytes(b"png")
    (media / "sub" / "dog.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"png")
    os.symlink(tmp_path / "secret.png", media / "escape.png")
    os.symlink(media / "cat.png", media / "inside.png")

    def req(*uris: str, snake: bool = False) -> dict[str, Any]:
        return {"contents": [{"parts": [{"text": "x"}, *[media_part(u, snake) for u in uris]]}]}

    ok = [
        line("a", req("file:cat.png", "file:sub/dog.png")),
        line("b", req("file:cat.png", "file:inside.png", snake=True)),
        line("c", req("https://example.com/x.png", "files/abc")),
    ]
    path = write(tmp_path, ok)
    out = tmp_path / "work"
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg_for(tmp_path), out_dir=out)
    assert v.ok and v.media_refs == 4
    assert b"".join(part_bytes(v, path)) == path.read_bytes()
    assert all(p.source_path is not None for p in v.parts)  # media lines get part files
    assert v.media_names == {"cat.png", "sub/dog.png", "inside.png"}
    bad = [
        line("a", req("file:cat.png")),
        line("b", req("file:missing.png")),
        line("c", req("file:../secret.png")),
        line("d", req("file:/etc/passwd", snake=True)),
        line("e", req("file:escape.png")),
        line("f", req("file:sub")),
    ]
    got = problems(tmp_path, bad)
    assert [n for n, _ in got] == [2, 3, 4, 5, 6]
    assert "not found" in got[0][1] and "outside media_dir" in got[1][1]
    assert "outside media_dir" in got[2][1] and "outside media_dir" in got[3][1]
    assert "not a regular file" in got[4][1]
    # embed requests: content.parts[]
    emb = {"content": {"parts": [media_part("file:nope.png")]}}
    got = problems(tmp_path, [emb], model="gemini-embedding-001")
    assert got[0][0] == 1 and "not found" in got[0][1]


def test_problem_cap_keeps_total_count(tmp_path: Path) -> None:
    data: list[Any] = [b"nope"] * 150 + [line("a"), line("a")]
    v = validate_file(write(tmp_path, data), model="gemini-2.5-flash", cfg=cfg_for(tmp_path))
    assert not v.ok and v.problem_count == 151 and len(v.problems) == 100
    assert [p.line for p in v.problems] == list(range(1, 101))
    # duplicates found at the end are merged in line order
    data = [line("a"), line("a"), *[b"nope"] * 120]
    v = validate_file(write(tmp_path, data), model="gemini-2.5-flash", cfg=cfg_for(tmp_path))
    assert (
        v.problem_count == 121 and v.problems[0].line == 2 and "duplicate" in v.problems[0].reason
    )
    assert [p.line for p in v.problems] == list(range(2, 102))


def part_bytes(v: Any, path: Path) -> list[bytes]:
    """What each planned part submits: its part file, or its byte range of the input."""
    raw = path.read_bytes()
    return [
        p.source_path.read_bytes() if p.source_path else raw[p.start_offset : p.end_offset]
        for p in v.parts
    ]


def read_keys(chunks: list[bytes]) -> list[str]:
    keys: list[str] = []
    for chunk in chunks:
        for raw in chunk.splitlines():
            doc = orjson.loads(raw)
            assert set(doc) == {"key", "request"}
            keys.append(doc["key"])
    return keys


def test_split_by_count_writes_canonical_parts(tmp_path: Path) -> None:
    data: list[Any] = []
    for i in range(1, 24):
        data.append(GEN if i % 3 == 0 else line(f"k{i}"))
        if i % 5 == 0:
            data.append(b"")
    path = write(tmp_path, data)
    (tmp_path / "in.jsonl").write_bytes(path.read_bytes().replace(b"\n", b"\r\n", 3))
    out = tmp_path / "work"
    cfg = cfg_for(tmp_path, submit={"max_requests_per_job": 10})
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg, out_dir=out)
    assert v.ok and [p.request_count for p in v.parts] == [10, 10, 3]
    files = [p.source_path for p in v.parts]
    assert files == [out / f"part-{n}-a1.jsonl" for n in (1, 2, 3)]
    assert all(f is not None and f.exists() for f in files)
    expected: list[str] = []
    lines = path.read_bytes().split(b"\n")
    for n, raw in enumerate(lines[:-1], 1):
        if raw.strip():
            doc = orjson.loads(raw)
            expected.append(doc["key"] if "key" in doc else str(n))
    assert read_keys([f.read_bytes() for f in files if f]) == expected
    assert b"\r" not in b"".join(f.read_bytes() for f in files if f)
    # every part file is exactly its canonical lines, one newline each
    canonical = b"".join(
        (raw.strip() if b'"key"' in raw else b'{"key":"%d","request":%b}' % (n, raw.strip()))
        + b"\n"
        for n, raw in enumerate(lines[:-1], 1)
        if raw.strip()
    )
    assert b"".join(f.read_bytes() for f in files if f) == canonical
    # raw bytes of an already-canonical line are kept unchanged
    assert files[0] is not None
    assert files[0].read_bytes().split(b"\n")[0] == orjson.dumps(line("k1"))
    # offsets and sizes describe the input and the part files
    raw_in = path.read_bytes()
    for p in v.parts:
        assert p.source_path is not None and p.size_bytes == p.source_path.stat().st_size
        chunk = raw_in[p.start_offset : p.end_offset]
        assert chunk.count(b"\n") == p.last_line - p.first_line + 1
    assert v.parts[0].start_offset == 0 and v.parts[-1].end_offset == len(raw_in)


def test_split_by_bytes(tmp_path: Path) -> None:
    data = [line(f"key-{i:03}", {"contents": "x" * 200}) for i in range(30)]
    out = tmp_path / "work"
    one = len(orjson.dumps(data[0])) + 1
    cfg = cfg_for(tmp_path, submit={"max_job_bytes": one * 7 + 3})
    path = write(tmp_path, data)
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg, out_dir=out)
    assert [p.request_count for p in v.parts] == [7, 7, 7, 7, 2]
    assert all(p.size_bytes <= one * 7 + 3 for p in v.parts)
    # canonical lines: the parts are byte ranges of the input, no part files
    assert all(p.source_path is None for p in v.parts) and list(out.iterdir()) == []
    assert read_keys(part_bytes(v, path)) == [f"key-{i:03}" for i in range(30)]


def test_invalid_file_leaves_no_part_files(tmp_path: Path) -> None:
    out = tmp_path / "work"
    cfg = cfg_for(tmp_path, submit={"max_requests_per_job": 2})
    data = [line(f"k{i}") for i in range(10)] + [line("k0")]
    v = validate_file(write(tmp_path, data), model="gemini-2.5-flash", cfg=cfg, out_dir=out)
    assert not v.ok and v.parts == []
    assert list(out.iterdir()) == []


def test_check_main_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = cfg_for(tmp_path)
    good = write(tmp_path, [line("a"), GEN], "good.jsonl")
    assert check_main(cfg, str(good), model=None, as_json=False) == 0
    out = capsys.readouterr().out
    assert "ok: 2 requests, 1 part(s)" in out and "gemini-2.5-flash" in out
    bad = write(tmp_path, [line("a"), b"{", line("a")], "bad.jsonl")
    assert check_main(cfg, str(bad), model=None, as_json=False) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{bad}:2: invalid JSON: " + out[0].split("invalid JSON: ")[1]
    assert out[1] == f"{bad}:3: duplicate key 'a' (first on line 1)"
    assert "2 problem(s)" in out[2]
    assert check_main(cfg, str(bad), model=None, as_json=True) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["problem_count"] == 2
    assert [p["line"] for p in doc["problems"]] == [2, 3]
    assert check_main(cfg, str(tmp_path / "none.jsonl"), model=None, as_json=False) == 1
    assert "no such file" in capsys.readouterr().err


def test_check_main_model_from_inbox_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = cfg_for(tmp_path)
    folder = cfg.inbox_dir / "gemini-embedding-001"
    folder.mkdir(parents=True)
    path = write(folder, [{"content": {"parts": [{"text": "x"}]}}])
    assert check_main(cfg, str(path), model=None, as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "gemini-embedding-001" and doc["kind"] == "embed"
    assert check_main(cfg, str(path), model="gemini-2.5-flash", as_json=False) == 1


def test_lines_across_read_blocks_and_over_long_lines(tmp_path: Path) -> None:
    # The validator reads 1 MiB blocks: lines that straddle blocks, and an over-long line that
    # spans several blocks, keep their line numbers, offsets, hash and size.
    filler = line("pad", {"contents": "y" * 5000})
    data: list[Any] = [line(f"k{i}", {"contents": "x" * (700 + i % 13)}) for i in range(3000)]
    data.insert(1500, {"key": "big", "request": {"contents": "z" * (3 << 20)}})
    data.append(filler)
    path = write(tmp_path, data)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])  # and no newline at the end
    cfg = cfg_for(tmp_path, inbox={"max_line_bytes": 100_000})
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg)
    assert [(p.line, p.reason) for p in v.problems] == [
        (1501, "line is longer than max_line_bytes (100000 bytes)")
    ]
    assert v.request_count == 3002 and v.size_bytes == len(raw) - 1
    assert v.sha256 == hashlib.sha256(raw[:-1]).hexdigest()
    del data[1500]
    path = write(tmp_path, data)
    out = tmp_path / "work"
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg, out_dir=out)
    assert (
        v.ok
        and v.request_count == 3001
        and v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert b"".join(part_bytes(v, path)) == path.read_bytes()
    assert v.parts[-1].end_offset == path.stat().st_size


def test_ranged_parts_turn_into_part_files_at_the_first_rewritten_line(tmp_path: Path) -> None:
    # 25 canonical lines (two full parts and half of a third), then a bare line that must be
    # rewritten: every part gets a part file of canonical lines, copied or written.
    data: list[Any] = [line(f"k{i}") for i in range(25)] + [GEN, line("z")]
    path = write(tmp_path, data)
    out = tmp_path / "work"
    cfg = cfg_for(tmp_path, submit={"max_requests_per_job": 10})
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg, out_dir=out)
    assert v.ok and [p.request_count for p in v.parts] == [10, 10, 7]
    assert [p.source_path for p in v.parts] == [out / f"part-{n}-a1.jsonl" for n in (1, 2, 3)]
    assert read_keys(part_bytes(v, path)) == [f"k{i}" for i in range(25)] + ["26", "z"]
    assert v.parts[2].source_path is not None
    assert v.parts[2].source_path.read_bytes().splitlines()[5] == (
        b'{"key":"26","request":%b}' % orjson.dumps(GEN)
    )
    # the same lines without the bare one stay byte ranges
    path = write(tmp_path, data[:25] + data[26:])
    out2 = tmp_path / "work2"
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg, out_dir=out2)
    assert v.ok and all(p.source_path is None for p in v.parts)
    assert b"".join(part_bytes(v, path)) == path.read_bytes() and list(out2.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [
        b'{"key":"x","request":{"contents":[]},"extra":1}',
        b'{"key":7,"request":{"contents":[]}}',
        b'{"key":"","request":{"contents":[]}}',
        b'{"key":"x","request":[]}',
        b'{"key":"x","request":{"content":[]}}',
        b'["key","request"]',
        b'{"key":"k3","request":{"contents":[]}}',  # a duplicate of an earlier key
        b"{not json",
        b'{"key":"x","request":{"contents":"\xff"}}',
    ],
)
def test_a_bad_line_inside_a_block_of_good_lines_is_found(tmp_path: Path, bad: bytes) -> None:
    # Good lines are taken a block at a time; one bad line in the middle of a block must still
    # be reported at its own line number.
    data: list[Any] = [line(f"k{i}") for i in range(200)]
    data.insert(100, bad)
    got = problems(tmp_path, data)
    assert [n for n, _ in got] == [101], got


def test_duplicate_keys_among_many(tmp_path: Path) -> None:
    # More keys than one set check takes: the hashes are partitioned into buckets first.
    n = 150_000
    body = b"".join(b'{"key":"k%d","request":{"contents":"x"}}\n' % i for i in range(n))
    body += b'{"key":"k5","request":{"contents":"x"}}\n'
    got = problems(tmp_path, body)
    assert got == [(n + 1, "duplicate key 'k5' (first on line 6)")]
    v = validate_file(
        write(tmp_path, body[: -len(b'{"key":"k5","request":{"contents":"x"}}\n')]),
        model="gemini-2.5-flash",
        cfg=cfg_for(tmp_path),
    )
    assert v.ok and v.request_count == n


@pytest.mark.parametrize("straddle", [False, True])
def test_media_reference_in_a_big_file_is_found_by_the_scan(tmp_path: Path, straddle: bool) -> None:
    # Big files are taken a block at a time without looking for media references; a second
    # thread scans the whole file for '"file:' and, when it is there, the file is validated
    # again with every line checked. The mark may straddle two of the scan's reads.
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(b"png")
    filler = [line(f"k{i}", {"contents": "x" * 1000}) for i in range(9_500)]  # > 8 MiB
    ref = line("m", {"contents": [{"parts": [media_part("file:cat.png")]}]})
    missing = line("n", {"contents": [{"parts": [media_part("file:nope.png")]}]})
    body = b"".join(orjson.dumps(x) + b"\n" for x in filler)
    if straddle:
        head = orjson.dumps(ref)
        edge = reader._SCAN_BLOCK  # the scan's first read ends here
        cut = edge - head.index(b'"file:') - 3  # the mark starts 3 bytes before it
        first = body[:cut]
        first = first[: first.rindex(b"\n") + 1]
        pad = cut - len(first) - len(b'{"key":"pad","request":{"contents":""}}\n')
        assert pad >= 0
        body = (
            first
            + b'{"key":"pad","request":{"contents":"%b"}}\n' % (b"p" * pad)
            + head
            + b"\n"
            + body[len(first) :]
        )
        assert body.index(b'"file:') == edge - 3
        data = body
    else:
        data = body + orjson.dumps(ref) + b"\n"
    path = write(tmp_path, data)
    out = tmp_path / "work"
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg_for(tmp_path), out_dir=out)
    assert v.ok and v.media_refs == 1 and v.media_names == {"cat.png"}
    assert all(p.source_path is not None for p in v.parts)  # media lines need part files
    assert b"".join(part_bytes(v, path)) == path.read_bytes()
    got = problems(tmp_path, data + orjson.dumps(missing) + b"\n")
    assert got == [(data.count(b"\n") + 1, "media file 'nope.png' not found in media_dir")]


def test_file_mark_without_media_keeps_byte_ranges(tmp_path: Path) -> None:
    # '"file:' inside a prompt is not a media reference: after the closer look, the parts stay
    # byte ranges of the input.
    data = [line(f"k{i}", {"contents": "x" * 1000}) for i in range(9_500)]
    data.append(line("t", {"contents": "file:not-a-reference"}))
    path = write(tmp_path, data)
    out = tmp_path / "work"
    v = validate_file(path, model="gemini-2.5-flash", cfg=cfg_for(tmp_path), out_dir=out)
    assert v.ok and v.media_refs == 0 and all(p.source_path is None for p in v.parts)
    assert list(out.iterdir()) == []
