"""Parsing a create's "Error on line N" refusal and mapping its lines to the input's."""

from __future__ import annotations

from pathlib import Path

from daemon.results.create_errors import line_errors, map_to_input


def test_line_errors_only_for_a_400_that_names_lines() -> None:
    msg = "Error on line 1: invalid JSON, near column 3: no such field: 'x'\nError on line 4: bad"
    assert line_errors({"code": 400, "message": msg}) == [
        (1, "invalid JSON, near column 3: no such field: 'x'"),
        (4, "bad"),
    ]
    assert line_errors({"code": 400, "message": "Invalid JSON payload received."}) == []
    assert line_errors({"code": 429, "message": "Error on line 1: x"}) == []
    assert line_errors(None) == []


def test_byte_range_lines_are_offset_by_the_lines_before(tmp_path: Path) -> None:
    work = tmp_path / "input.jsonl"
    work.write_bytes(
        b'{"key":"a","request":{}}\n\n{"key":"b","request":{}}\n{"key":"c","request":{}}\n'
    )
    start = work.read_bytes().index(b'{"key":"b"')
    job = {"source_start": start, "source_end": work.stat().st_size, "work_path": str(work)}
    assert map_to_input(job, None, work, [1, 2]) == {1: 3, 2: 4}


def test_part_file_lines_are_found_by_key(tmp_path: Path) -> None:
    work = tmp_path / "input.jsonl"
    work.write_bytes(b'{"contents":"x"}\n\n{"key":"k","request":{}}\n{"contents":"y"}\n')
    part_file = tmp_path / "part-1-a2.jsonl"  # a retry: only some of the part's requests
    part_file.write_bytes(b'{"key":"4","request":{}}\n{"key":"k","request":{}}\n')
    part = {"start_offset": 0, "end_offset": work.stat().st_size}
    job = {"source_start": None, "work_path": str(work)}
    assert map_to_input(job, part, part_file, [1, 2, 3]) == {1: 4, 2: 3, 3: None}
