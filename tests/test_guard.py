"""The start-up check of the store against state/work/ (daemon.store.guard), on real files."""

from __future__ import annotations

import sqlite3

import orjson
import pytest

from daemon.store import Store
from daemon.store.guard import CorruptStore, LostStore, check_store, mark_open


def _claimed(work, input_id: str) -> None:
    (work / input_id).mkdir(parents=True)
    (work / input_id / "input.jsonl").write_bytes(b"{}\n")


async def _store_with(db, *ids: str) -> None:
    async with Store.open(db) as store:
        async with store.tx() as conn:
            for i in ids:
                await store.add_input(conn, id=i, rel_path=f"{i}.jsonl", model="m", work_path="w")


async def test_a_fresh_state_folder_and_a_matching_store_start(tmp_path):
    db, work = tmp_path / "db.sqlite", tmp_path / "work"
    check_store(db, work)  # nothing at all: a first start
    _claimed(work, "aaa1")
    await _store_with(db, "aaa1")
    check_store(db, work)
    (work / "bbb2").mkdir()  # a folder whose move never happened (no input.jsonl) is no input
    check_store(db, work)


@pytest.mark.parametrize("how", ["missing", "empty", "no schema"])
def test_a_store_without_the_claimed_inputs_is_refused(tmp_path, how):
    db, work = tmp_path / "db.sqlite", tmp_path / "work"
    _claimed(work, "aaa1")
    if how == "empty":
        db.write_bytes(b"")
    elif how == "no schema":
        sqlite3.connect(db).execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(LostStore, match=r"holds 1 claimed inputs.*gemini-batchd recover"):
        check_store(db, work)


async def test_rows_lost_are_refused_unless_a_claim_note_accounts_for_them(tmp_path):
    db, work = tmp_path / "db.sqlite", tmp_path / "work"
    await _store_with(db, "aaa1")
    for i in ("aaa1", "bbb2", "ccc3"):
        _claimed(work, i)
    with pytest.raises(LostStore, match="no row for 2 of them"):
        check_store(db, work)
    (work / ".claims-x.json").write_bytes(orjson.dumps([{"id": "bbb2"}, {"id": "ccc3"}]))
    check_store(db, work)  # a claim cut short by a crash: claim recovery adopts them


async def test_a_missing_wal_after_an_unclean_stop_is_refused(tmp_path):
    db, work = tmp_path / "state" / "db.sqlite", tmp_path / "state" / "work"
    await _store_with(db)
    mark_open(db.parent)  # as a daemon killed -9 leaves it: the marker, and a -wal
    db.with_name(db.name + "-wal").write_bytes(b"")
    check_store(db, work)  # its read checkpoints and removes the -wal, and so the marker
    assert not (db.parent / "store-open").exists()
    check_store(db, work)
    mark_open(db.parent)  # killed -9 again, and then the -wal was removed
    with pytest.raises(LostStore, match="write-ahead log"):
        check_store(db, work)


def test_a_corrupt_store_is_one_line(tmp_path):
    db, work = tmp_path / "db.sqlite", tmp_path / "work"
    db.write_bytes(b"not a database " * 100)
    with pytest.raises(CorruptStore) as e:
        check_store(db, work)
    assert "\n" not in str(e.value) and "is corrupt" in str(e.value)
