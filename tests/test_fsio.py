"""Safe file operations in the shared outbox (daemon.fsio) and the writers built on them: the
big input's outbox file in the making, the results copy under state/results, pruning, removal.

Links and files are planted as ``nobody`` (tests.planting), as a producer would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon import fsio
from daemon.outbox import atomic_writer, link_or_copy, remove_quietly, write_json
from daemon.results import outbox_file
from daemon.results.outbox_file import Ready
from tests.planting import as_producer, needs_root, plant_link, shared, untouched, victim

pytestmark = needs_root


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    out = shared(tmp_path / "outbox")
    fsio.share(out)
    return out


def test_a_linked_folder_below_a_shared_root_is_replaced(outbox: Path, tmp_path: Path) -> None:
    v = victim(tmp_path)
    plant_link(outbox, "model", v)
    with atomic_writer(outbox / "model" / "x.media" / "a.png") as f:
        f.write(b"png")
    untouched(v)
    assert not (outbox / "model").is_symlink()
    assert (outbox / "model" / "x.media" / "a.png").read_bytes() == b"png"


def test_outside_shared_roots_a_linked_folder_is_the_admins(tmp_path: Path) -> None:
    real = tmp_path / "disk"
    real.mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "results").symlink_to(real)
    write_json(tmp_path / "state" / "results" / "a.json", {"a": 1})
    assert (real / "a.json").exists() and (tmp_path / "state" / "results").is_symlink()


def test_a_temp_name_taken_by_a_folder_gets_a_random_name(outbox: Path) -> None:
    (outbox / ".x.json.tmp").mkdir()
    write_json(outbox / "x.json", {"ok": True})
    assert (outbox / "x.json").read_bytes() == b'{\n  "ok": true\n}\n'
    assert [p.name for p in outbox.iterdir() if p.name.startswith(".")] == [".x.json.tmp"]


def test_a_file_written_atomically_gets_its_mode(outbox: Path) -> None:
    with atomic_writer(outbox / "r.jsonl", mode=0o640) as f:
        f.write(b"{}\n")
    assert (outbox / "r.jsonl").stat().st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_prune_and_remove_do_not_follow_links(outbox: Path, tmp_path: Path) -> None:
    v = victim(tmp_path)
    plant_link(outbox, "x.media", v)
    fsio.prune(outbox / "x.media", set())
    untouched(v)
    assert not os.path.lexists(outbox / "x.media")  # the link went
    plant_link(outbox, "model", v)
    assert remove_quietly(outbox / "model" / "secret.txt") is False
    untouched(v)


def _parts(work: Path, sizes: list[int]) -> list[Ready]:
    out = []
    for n, size in enumerate(sizes, start=1):
        p = work / f"part-{n}.fast"
        p.write_bytes(b"x" * (size - 1) + b"\n")
        out.append(Ready(n, 10 + n, p, size))
    return out


@pytest.mark.parametrize("planted", ["link", "producer's file", "hard link"])
def test_the_big_inputs_outbox_file_is_never_a_planted_one(
    outbox: Path, tmp_path: Path, planted: str
) -> None:
    v = victim(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    results = outbox / "big.jsonl"
    ps = _parts(work, [10, 20])
    prefix = outbox_file.prefix_path(results, work)
    if planted == "link":
        plant_link(outbox, prefix.name, v / "secret.txt")
    elif planted == "hard link":  # made as root: protected_hardlinks stops nobody doing it
        os.link(v / "secret.txt", prefix)
    else:  # a producer's file with the right size, in place of the daemon's
        outbox_file.extend(results, work, ps[:1])
        os.unlink(prefix)
        as_producer(outbox, lambda fd: _write_as(fd, prefix.name, b"y" * 9 + b"\n"))
    assert outbox_file.extend(results, work, ps) == 2
    untouched(v)
    assert not prefix.is_symlink() and prefix.stat().st_uid == os.geteuid()
    outbox_file.publish(results, work, ps)
    assert results.read_bytes() == b"".join(p.path.read_bytes() for p in ps)


def _write_as(fd: int, name: str, data: bytes) -> None:
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=fd)
    os.write(out, data)
    os.close(out)


def test_the_results_copy_refuses_a_planted_outbox_file(outbox: Path, tmp_path: Path) -> None:
    v = victim(tmp_path)
    keep = tmp_path / "state" / "results" / "i1.jsonl"
    plant_link(outbox, "a.jsonl", v / "secret.txt")
    assert link_or_copy(outbox / "a.jsonl", keep) is False
    assert not keep.exists()
    os.unlink(outbox / "a.jsonl")
    as_producer(outbox, lambda fd: _write_as(fd, "a.jsonl", b'{"key": "forged"}\n'))
    assert link_or_copy(outbox / "a.jsonl", keep) is False
    assert not keep.exists()
    untouched(v)


def test_the_results_copy_is_a_hard_link_of_the_daemons_file(outbox: Path, tmp_path: Path) -> None:
    with atomic_writer(outbox / "a.jsonl") as f:
        f.write(b'{"key": "k"}\n')
    keep = tmp_path / "state" / "results" / "i1.jsonl"
    assert link_or_copy(outbox / "a.jsonl", keep) is True
    assert keep.stat().st_ino == (outbox / "a.jsonl").stat().st_ino


def test_a_file_where_a_folder_belongs_is_moved_aside(outbox: Path) -> None:
    as_producer(outbox, lambda fd: _write_as(fd, "x.media", b"mine"))
    fsio.prune(outbox / "x.media", set())  # not a folder: nothing to prune, nothing removed
    assert (outbox / "x.media").read_bytes() == b"mine"
    with atomic_writer(outbox / "x.media" / "a.png") as f:
        f.write(b"png")
    assert (outbox / "x.media" / "a.png").read_bytes() == b"png"
    (aside,) = outbox.glob(".x.media.planted-*")
    assert aside.read_bytes() == b"mine"
