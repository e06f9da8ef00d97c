"""Throughput under the admission cap: a freed slot starts the next job at once."""

from __future__ import annotations

from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import drop, request_lines


async def test_freed_slot_wakes_the_submitter_not_its_idle_timer(make_cfg, emulator):
    # Two slots, six files, and an idle timer that cannot fire during the test: only a nudge
    # when a job leaves flight can start files 3-6.
    cfg = make_cfg(submit={"max_active_jobs": 2, "idle_seconds": 3600.0})
    names = [f"f{i}.jsonl" for i in range(6)]
    async with running_daemon(cfg) as ctx:
        for name in names:
            drop(cfg.inbox_dir, name, request_lines(2, prefix=name))
        rows = [await wait_final(ctx, name, timeout=30) for name in names]
    assert [r["state"] for r in rows] == ["succeeded"] * len(names)
    assert sorted(emulator.stats["creates_by_display_name"].values()) == [1] * len(names)
