"""The outbox file assembled while jobs run: appended parts, the record, and what settle trusts."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from daemon.results import outbox_file
from daemon.results.outbox_file import Ready


def parts(tmp_path: Path, sizes: list[int], job0: int = 10) -> list[Ready]:
    out = []
    for n, size in enumerate(sizes, start=1):
        p = tmp_path / f"part-{n}.fast"
        p.write_bytes(bytes([96 + n]) * (size - 1) + b"\n")
        out.append(Ready(n, job0 + n, p, size))
    return out


def whole(ps: list[Ready]) -> bytes:
    return b"".join(p.path.read_bytes() for p in ps)


def layout(tmp_path: Path, sizes: list[int]) -> tuple[Path, Path, list[Ready]]:
    """An input's work folder, its outbox results path, and its parts (files of ``sizes``)."""
    work = tmp_path / "work"
    work.mkdir()
    return work, tmp_path / "outbox" / "x.jsonl", parts(work, sizes)


def put_straight_in(results: Path, work: Path, ps: list[Ready], n: int) -> None:
    """Part ``n`` of ``ps`` written straight into the outbox file after the parts before it."""
    with outbox_file.straight_in(results, work, ps[: n - 1], n, ps[n - 1].job_id) as f:
        assert f is not None
        f.write(ps[n - 1].path.read_bytes())


def test_parts_appended_as_they_come_then_published(tmp_path: Path) -> None:
    work, results, ps = layout(tmp_path, [100, 50, 70])
    assert outbox_file.extend(results, work, ps[:1]) == 1
    prefix = outbox_file.prefix_path(results, work)
    assert prefix.name == f".x.jsonl.{work.name}.tmp" and prefix.read_bytes() == whole(ps[:1])
    assert outbox_file.extend(results, work, ps[:2]) == 2
    assert outbox_file.extend(results, work, ps[:2]) == 2  # nothing new: nothing appended
    assert prefix.read_bytes() == whole(ps[:2])
    seen = []
    outbox_file.publish(results, work, ps, lambda: seen.append(prefix.stat().st_size))
    assert results.read_bytes() == whole(ps) and not prefix.exists()
    assert seen == [220]  # after the one part appended at settle
    assert not (work / "prefix.json").exists()


def test_settle_trusts_the_file_only_as_far_as_the_record_matches(tmp_path: Path) -> None:
    work, results, ps = layout(tmp_path, [100, 50, 70])
    outbox_file.extend(results, work, ps[:2])
    prefix = outbox_file.prefix_path(results, work)
    # a crash in the middle of appending part 3: more bytes than the record says
    with open(prefix, "ab") as f:
        f.write(b"half of part 3")
    outbox_file.publish(results, work, ps)
    assert results.read_bytes() == whole(ps)
    # part 2 was put in order again from another job (say, after a restart): start over
    outbox_file.extend(results, work, ps[:2])
    other = [ps[0], ps[1]._replace(job_id=99), ps[2]]
    with open(prefix, "r+b") as f:
        f.write(b"garbage")  # whatever the file held, it is rewritten
    outbox_file.publish(results, work, other)
    assert results.read_bytes() == whole(ps)
    # the record survives but the file was lost: start over
    outbox_file.extend(results, work, ps[:1])
    prefix.unlink()
    outbox_file.publish(results, work, ps)
    assert results.read_bytes() == whole(ps)


def test_discard_removes_the_file_and_the_record(tmp_path: Path) -> None:
    work, results, ps = layout(tmp_path, [10])
    outbox_file.extend(results, work, ps)
    assert orjson.loads((work / "prefix.json").read_bytes()) == [[1, 11, 10]]
    outbox_file.discard(results, work)
    assert not outbox_file.prefix_path(results, work).exists()
    assert not (work / "prefix.json").exists() and not results.exists()


def test_a_part_goes_straight_in_only_after_the_parts_before_it(tmp_path: Path) -> None:
    work, results, ps = layout(tmp_path, [100, 50, 70])
    prefix = outbox_file.prefix_path(results, work)
    put_straight_in(results, work, ps, 1)
    assert prefix.read_bytes() == whole(ps[:1])
    assert outbox_file.holds(work, 1, ps[0].job_id, 100)
    # part 3 cannot follow part 1: nothing written, nothing recorded
    with outbox_file.straight_in(results, work, ps[:1], 3, ps[2].job_id) as f:
        assert f is None
    # a writer that fails leaves the file and the record as they were
    with pytest.raises(OSError, match="disk full"):
        with outbox_file.straight_in(results, work, ps[:1], 2, ps[1].job_id) as f:
            assert f is not None
            f.write(b"half a part")
            raise OSError("disk full")
    assert prefix.read_bytes() == whole(ps[:1]) and not outbox_file.holds(work, 2, ps[1].job_id, 11)
    put_straight_in(results, work, ps, 2)
    assert outbox_file.holds(work, 2, ps[1].job_id, 50)
    outbox_file.publish(results, work, ps, None)  # part 3 appended from its file at settle
    assert results.read_bytes() == whole(ps)


def test_a_late_look_at_fewer_parts_leaves_what_the_file_holds(tmp_path: Path) -> None:
    # Parts 1 and 2 went straight in (they have no files of their own). A collector worker
    # that looked before part 2's job was marked collected asks to extend with part 1 only:
    # the file must keep part 2 (it used to be cut back to nothing, and settling then failed
    # for ever on the missing part-1.fast).
    work, results, ps = layout(tmp_path, [100, 50, 70])
    prefix = outbox_file.prefix_path(results, work)
    put_straight_in(results, work, ps, 1)
    put_straight_in(results, work, ps, 2)
    expected = whole(ps)
    ps[0].path.unlink()
    ps[1].path.unlink()
    assert outbox_file.extend(results, work, ps[:1]) == 2
    with outbox_file.straight_in(results, work, ps[:1], 2, ps[1].job_id) as f:
        assert f is None  # part 2 is in already
    assert prefix.stat().st_size == 150
    assert outbox_file.holds(work, 1, ps[0].job_id, 100) and outbox_file.holds(
        work, 2, ps[1].job_id, 50
    )
    outbox_file.publish(results, work, ps)
    assert results.read_bytes() == expected


def test_a_prefix_file_that_lost_its_data_is_no_longer_trusted(tmp_path: Path) -> None:
    # The file is shorter than its record (lost outside the daemon): the record goes too, so
    # parts that went straight in are no longer taken as held and are put in order again.
    work, results, ps = layout(tmp_path, [100, 50])
    put_straight_in(results, work, ps, 1)
    outbox_file.prefix_path(results, work).write_bytes(b"")
    assert outbox_file.extend(results, work, ps[:2]) == 2  # both from their files
    assert outbox_file.prefix_path(results, work).read_bytes() == whole(ps)
    outbox_file.prefix_path(results, work).write_bytes(b"")
    ps[0].path.unlink()
    with pytest.raises(FileNotFoundError):  # part 1 has no file of its own
        outbox_file.extend(results, work, ps[:2])
    assert not outbox_file.holds(work, 1, ps[0].job_id, 100)
