"""The store: migrations by user_version, durable pragmas, serialised transactions, lookups."""

import sqlite3

import anyio
import anyio.lowlevel
import pytest

from daemon.states import InputState, JobState
from daemon.store import Store, StoreError
from daemon.store.schema import MIGRATIONS


async def test_migrates_to_latest_and_sets_durable_pragmas(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:
        assert await store.scalar("PRAGMA user_version") == len(MIGRATIONS)
        assert await store.scalar("PRAGMA journal_mode") == "wal"
        async with store.tx() as conn:  # the writer's own settings
            for pragma, value in (("synchronous", 2), ("foreign_keys", 1)):  # 2: FULL
                async with conn.execute(f"PRAGMA {pragma}") as cur:
                    assert tuple(await cur.fetchone()) == (value,)


async def test_refuses_a_newer_database(tmp_path):
    db = tmp_path / "db.sqlite"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.close()
    with pytest.raises(StoreError, match="newer"):
        async with Store.open(db):
            pass


async def test_a_version_1_database_is_migrated_in_place(tmp_path):
    # A store written by the first release (schema 1) gains the job source range columns and
    # keeps its rows; NULL means "the whole source file", as version 1 meant.
    db = tmp_path / "db.sqlite"
    con = sqlite3.connect(db)
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute(
        "INSERT INTO inputs (id, rel_path, model, state, work_path, created_at, updated_at) "
        "VALUES ('i1', 'a.jsonl', 'm', 'queued', 'w', 0, 0)"
    )
    con.execute(
        "INSERT INTO jobs (input_id, part_no, attempt, display_name, state, mode, source_path, "
        "request_count, est_tokens, created_at, updated_at) "
        "VALUES ('i1', 1, 1, 'gemini-batchd:i1:1', 'planned', 'file', 'p', 1, 1, 0, 0)"
    )
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    async with Store.open(db) as store:
        assert await store.scalar("PRAGMA user_version") == len(MIGRATIONS)
        (job,) = await store.jobs_of("i1")
        assert job["source_path"] == "p" and job["source_start"] is None
        assert job["source_end"] is None
        assert job["key_fp"] is None  # made before key fingerprints: unknown key


async def test_submit_bookkeeping_moves_out_of_jobs_error(tmp_path):
    # Before its own columns, a job's submit bookkeeping lived in jobs.error until the job was
    # done; the migration moves it out and leaves the API's error of done jobs where it was.
    split = next(n for n, m in enumerate(MIGRATIONS) if any("submit_retries" in s for s in m))
    db = tmp_path / "db.sqlite"
    con = sqlite3.connect(db)
    for migration in MIGRATIONS[:split]:
        for statement in migration:
            con.execute(statement)
    con.execute(
        "INSERT INTO inputs (id, rel_path, model, state, work_path, created_at, updated_at) "
        "VALUES ('i1', 'a.jsonl', 'm', 'queued', 'w', 0, 0)"
    )
    rows = [
        (1, "creating", '{"retries":2,"check_remote":true,"last":{"code":503}}'),
        (2, "planned", '{"retries":1,"check_remote":false,"last":null}'),
        (3, "done", '{"code":400,"status":"INVALID_ARGUMENT","message":"bad"}'),
    ]
    for part, state, error in rows:
        con.execute(
            "INSERT INTO jobs (input_id, part_no, attempt, display_name, state, mode, "
            "source_path, request_count, est_tokens, error, created_at, updated_at) "
            "VALUES ('i1', ?, 1, ?, ?, 'file', 'p', 1, 1, ?, 0, 0)",
            (part, f"gemini-batchd:i1:{part}", state, error),
        )
    con.execute(f"PRAGMA user_version = {split}")
    con.commit()
    con.close()
    async with Store.open(db) as store:
        creating, planned, done = await store.jobs_of("i1")
    assert (creating["submit_retries"], creating["check_remote"]) == (2, 1)
    assert creating["submit_error"] == '{"code":503}' and creating["error"] is None
    assert (planned["submit_retries"], planned["check_remote"], planned["error"]) == (1, 0, None)
    assert done["error"].startswith('{"code":400') and done["submit_retries"] == 0
    assert done["check_remote"] is None


async def test_key_salt_is_made_once_per_store(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:
        salt = await store.key_salt()
        assert len(salt) == 32 and await store.key_salt() == salt
    async with Store.open(tmp_path / "db.sqlite") as store:
        assert await store.key_salt() == salt
    async with Store.open(tmp_path / "other.sqlite") as store:
        assert await store.key_salt() != salt


async def test_states_are_checked_by_the_schema(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:
        with pytest.raises(sqlite3.IntegrityError):
            async with store.tx() as conn:
                await store.add_input(
                    conn, rel_path="a.jsonl", model="m", work_path="w", state="bogus"
                )
        assert await store.counts_by_state() == {}


async def test_rollback_on_error_leaves_nothing(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:
        with pytest.raises(RuntimeError):
            async with store.tx() as conn:
                await store.add_input(conn, rel_path="a.jsonl", model="m", work_path="w")
                raise RuntimeError("boom")
        assert await store.list_inputs() == []


async def test_concurrent_transactions_do_not_interleave(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:

        async def writer(n: int) -> None:
            async with store.tx() as conn:
                row = await store.add_input(conn, rel_path=f"{n}.jsonl", model="m", work_path="w")
                await (
                    anyio.lowlevel.checkpoint()
                )  # yield inside the transaction: another task must wait
                await store.set_input_state(conn, row["id"], InputState.QUEUED)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(writer, n)
        assert await store.counts_by_state() == {"queued": 20}


async def test_history_find_by_path_and_jobs(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:
        async with store.tx() as conn:
            first = await store.add_input(
                conn, rel_path="m/a.jsonl", model="m", work_path="w", created_at=1.0
            )
            second = await store.add_input(
                conn, rel_path="m/a.jsonl", model="m", work_path="w", created_at=2.0
            )
            await store.set_input_state(conn, second["id"], InputState.QUEUED, note="validated")
            job = await store.add_job(
                conn,
                input_id=second["id"],
                part_no=1,
                attempt=1,
                display_name="gemini-batchd:x:1",
                mode="inline",
                source_path="p",
                request_count=3,
                est_tokens=9,
            )
            await store.update_job(conn, job, state=JobState.ACTIVE, error={"code": 1})
        assert (await store.find_input("m/a.jsonl"))["id"] == second["id"]
        assert (await store.find_input(first["id"]))["id"] == first["id"]
        assert await store.find_input("nope.jsonl") is None
        assert [h["state"] for h in await store.history(second["id"])] == ["seen", "queued"]
        (j,) = await store.jobs_of(second["id"])
        assert j["state"] == "active" and j["error"] == '{"code":1}'
        with pytest.raises(sqlite3.IntegrityError):  # display names are never shared
            async with store.tx() as conn:
                await store.add_job(
                    conn,
                    input_id=first["id"],
                    part_no=1,
                    attempt=1,
                    display_name="gemini-batchd:x:1",
                    mode="inline",
                    source_path="p",
                    request_count=3,
                    est_tokens=9,
                )


async def test_reads_from_other_tasks_see_only_committed_state(tmp_path):
    # A task inside a write transaction must not leak its uncommitted rows to readers in other
    # tasks (aiosqlite shares one connection's transaction between tasks): a reader that acted
    # on a row later rolled back would act on something that never happened.
    async with Store.open(tmp_path / "db.sqlite") as store:
        inside = anyio.Event()
        release = anyio.Event()
        seen: list[object] = []

        async def writer() -> None:
            with pytest.raises(RuntimeError):
                async with store.tx() as conn:
                    await store.add_input(
                        conn, id="ghost", rel_path="g.jsonl", model="m", work_path="w"
                    )
                    inside.set()
                    await release.wait()
                    raise RuntimeError("rolled back")

        async def reader() -> None:
            await inside.wait()
            seen.append(await store.get_input("ghost"))
            seen.append(await store.scalar("SELECT COUNT(*) FROM inputs"))
            release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            tg.start_soon(reader)
        assert seen == [None, 0]
        assert await store.get_input("ghost") is None


async def test_a_transaction_reads_its_own_writes_through_the_store(tmp_path):
    async with Store.open(tmp_path / "db.sqlite") as store:
        async with store.tx() as conn:
            await store.add_input(conn, id="i1", rel_path="a.jsonl", model="m", work_path="w")
            row = await store.get_input("i1")
            assert row is not None and row["state"] == InputState.SEEN.value


async def test_typed_rows_name_every_column(tmp_path):
    # rows.py states each table's columns for mypy; a migration that adds one must add it there.
    from daemon.store.rows import InputRow, JobRow

    async with Store.open(tmp_path / "db.sqlite") as store:
        for table, row_type in (("inputs", InputRow), ("jobs", JobRow)):
            columns = {r["name"] for r in await store.fetchall(f"PRAGMA table_info({table})")}
            assert columns == set(row_type.__annotations__), table
