"""``doctor --live`` against the emulator: PASS where it follows the evidence, DIFF where it deviates."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from daemon.doctor import live_report
from daemon.emulator import Emulator, EmulatorSettings
from tests.remote_helpers import KEY, make_cfg

MODEL = "gemini-3.1-flash-lite"
FAST = {"pending_seconds": 0.05, "running_seconds": 0.1, "api_key": KEY}
ALL_CHECKS = {
    "upload.active",
    "create.file",
    "create.inline",
    "cancel.shape",
    "create.rejects_bad_line",
    "list.newest_first",
    "list.contains_created",
    "terminal.file",
    "terminal.inline",
    "state.values",
    "batchStats.under_metadata",
    "result.file_name",
    "result.download",
    "result.lines",
    "inline.items",
    "inline.metadata_key",
    "files.get_long_id",
    "files.deleted_403",
    "batches.malformed_name",
    "batches.deleted_404",
}


async def run_live(
    tmp_path: Path, prepare: Callable[[Emulator], None] | None = None, **settings: Any
) -> dict[str, Any]:
    async with Emulator(settings=EmulatorSettings(**(FAST | settings))) as emu:
        if prepare:
            prepare(emu)
        cfg = make_cfg(tmp_path, gemini={"base_url": emu.url})
        with anyio.fail_after(20):
            report = await live_report(cfg, KEY, model=MODEL, timeout=10, poll_interval=0.02)
        assert emu.stats["jobs"] == 0, "every job the run made is deleted"
        assert KEY not in orjson.dumps(report).decode()
    return report


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {c["name"]: c for c in report["checks"]}
    assert set(out) == ALL_CHECKS
    return out


async def test_file_id_limit_off_is_diff_with_what_was_seen(tmp_path: Path) -> None:
    c = checks(r := await run_live(tmp_path, file_id_limit=False))["files.get_long_id"]
    assert c["status"] == "DIFF" and not c["tolerated"]
    assert c["expected"].startswith("HTTP 400") and c["seen"] == "200: the call succeeded"
    assert c["source"] == "1.16"
    assert r["ok"] is False


async def test_file_id_limit_on_passes(tmp_path: Path) -> None:
    report = await run_live(tmp_path, file_id_limit=True)
    c = checks(report)["files.get_long_id"]
    assert c["status"] == "PASS" and "cannot be more than 40 characters" in c["seen"]
    # A generated file cannot be deleted either (1.16): reported as left behind, not hidden.
    (left,) = report["left_behind"]
    assert left.startswith("files/batch-") and "not deletable through the API" in left


async def test_download_fault_is_diff_and_later_checks_not_reached(tmp_path: Path) -> None:
    report = await run_live(tmp_path, lambda emu: emu.fail_next("files.download", "500"))
    c = checks(report)
    assert c["result.download"]["status"] == "DIFF" and c["result.download"]["seen"].startswith(
        "500"
    )
    assert c["result.lines"]["status"] == "DIFF"
    assert c["result.lines"]["seen"] == "not reached: download failed"
    assert c["result.file_name"]["status"] == "PASS"
    assert c["inline.items"]["status"] == "PASS"


async def test_cancel_shape_diff_records_the_error_seen(tmp_path: Path) -> None:
    """On this branch the emulator still answers a cancel with code 1 (the evidence says 13)."""
    c = checks(await run_live(tmp_path))["cancel.shape"]
    if c["status"] == "PASS":  # the cancel branch is merged: 13 is what it must then show
        assert '"code":13' in c["seen"]
    else:
        assert '"code":1,' in c["seen"] and "BATCH_STATE_CANCELLED" in c["seen"]


# passes after the emulator-fidelity branches merge
async def test_every_check_passes_against_the_default_emulator(tmp_path: Path) -> None:
    report = await run_live(tmp_path)
    diffs = {n: c["seen"] for n, c in checks(report).items() if c["status"] != "PASS"}
    assert diffs == {}
    assert report["ok"] is True
    assert all(x.startswith("files/batch-") for x in report["left_behind"])  # 1.16


# passes after the emulator-fidelity branches merge
@pytest.mark.parametrize(
    ("setting", "value", "check"),
    [
        ("cancel_error_code", 1, "cancel.shape"),
        ("missing_file_status", 404, "files.deleted_403"),
        ("file_id_limit", False, "files.get_long_id"),
        ("validate_input_at_create", False, "create.rejects_bad_line"),
    ],
)
async def test_deviating_setting_is_diff(
    tmp_path: Path, setting: str, value: object, check: str
) -> None:
    c = checks(await run_live(tmp_path, **{setting: value}))
    assert c[check]["status"] == "DIFF"
    others = {n for n, x in c.items() if x["status"] != "PASS" and n != check}
    assert others == set(), f"only {check} deviates with {setting}={value!r}"


async def test_cli_live_report_file_and_exit_code(tmp_path: Path) -> None:
    async with Emulator(settings=EmulatorSettings(**FAST, file_id_limit=False)) as emu:
        conf = tmp_path / "c.toml"
        conf.write_text(f'[paths]\nroot = "{tmp_path}/root"\n[gemini]\nbase_url = "{emu.url}"\n')
        report = tmp_path / "report.json"
        env = {**os.environ, "GEMINI_API_KEY": KEY}
        cmd = [sys.executable, "-m", "daemon", "doctor", "-c", str(conf), "--live"]
        cmd += ["--poll-interval", "0.02", "--timeout", "10", "--report", str(report)]
        with anyio.fail_after(30):
            r = await anyio.run_process(cmd, env=env, check=False)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 1, out
    assert KEY not in out and KEY not in report.read_text()
    assert "files.get_long_id" in out and "DIFF" in out
    data = orjson.loads(report.read_bytes())
    assert data["model"] == MODEL and data["ok"] is False
    assert {c["name"]: c["status"] for c in data["checks"]}["files.get_long_id"] == "DIFF"


async def test_rejected_key_gives_diffs_not_a_crash_and_no_key(tmp_path: Path) -> None:
    wrong = "sk-wrong-0d9e8f7a6b5c"
    async with Emulator(settings=EmulatorSettings(**FAST)) as emu:
        cfg = make_cfg(tmp_path, gemini={"base_url": emu.url})
        with anyio.fail_after(20):
            report = await live_report(cfg, wrong, model=MODEL, timeout=5, poll_interval=0.02)
    c = checks(report)
    assert {x["status"] for x in c.values()} == {"DIFF"} and report["ok"] is False
    assert c["upload.active"]["seen"].startswith(("400", "401", "403"))
    assert c["result.lines"]["seen"] == "not reached: the file job did not succeed"
    assert wrong not in orjson.dumps(report).decode()


async def test_timeout_reports_jobs_not_terminal_and_still_cleans_up(tmp_path: Path) -> None:
    async with Emulator(settings=EmulatorSettings(**(FAST | {"pending_seconds": 3600}))) as emu:
        cfg = make_cfg(tmp_path, gemini={"base_url": emu.url})
        with anyio.fail_after(20):
            report = await live_report(cfg, KEY, model=MODEL, timeout=0.5, poll_interval=0.02)
        assert emu.stats["jobs"] == 0  # the unfinished jobs are deleted too
    c = checks(report)
    for kind in ("file", "inline"):
        assert c[f"terminal.{kind}"]["status"] == "DIFF"
        assert "not terminal after 0.5s" in c[f"terminal.{kind}"]["seen"]
    assert c["result.download"]["seen"] == "not reached: the file job did not succeed"
    assert c["list.contains_created"]["status"] == "PASS"  # what did not need the jobs to end


# passes after the emulator-fidelity branches merge
async def test_dropped_inline_metadata_is_a_tolerated_diff(tmp_path: Path) -> None:
    report = await run_live(tmp_path, drop_inline_metadata=True)
    c = checks(report)["inline.metadata_key"]
    assert c["status"] == "DIFF" and c["tolerated"] and "python-genai #2008" in c["note"]
    assert report["ok"] is True  # the daemon copes: not a failure
