"""The README's first command, its session and its curl examples, run as written.

``.venv/bin/gemini-batchd`` is a shim for ``python -m daemon`` from this source tree, so the lines are
run verbatim in a scratch folder next to a daemon started the README's way (``run --emulator``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.helpers import ROOT, read_jsonl, wait_until

README = (ROOT / "README.md").read_text()


def sh_block(heading: str) -> str:
    """The first ```sh block after a heading."""
    section = README[README.index(heading) :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, heading
    return match.group(1)


@pytest.fixture
def workdir(tmp_path: Path):
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    shim = venv_bin / "gemini-batchd"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m daemon "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_"))}
    log = open(tmp_path / "daemon.log", "wb")
    # Command 1 of the README, minus the install: the daemon against the bundled emulator.
    assert "gemini-batchd run --emulator" in sh_block("# gemini-batchd")
    proc = subprocess.Popen(
        [str(shim), "run", "--emulator"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield tmp_path, env
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        log.close()


async def test_readme_session_runs_as_written(workdir):
    cwd, env = workdir
    await wait_until(lambda: (cwd / "gemini-batchd" / "control.sock").exists(), timeout=30)
    script = sh_block("## A short session")
    r = await anyio.run_process(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, check=False
    )
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    results = read_jsonl(cwd / "gemini-batchd" / "outbox" / "questions.jsonl")
    assert [x["key"] for x in results] == ["capital-fr", "haiku"]
    assert (
        results[0]["response"]["candidates"][0]["content"]["parts"][0]["text"]
        == "echo: Capital of France?"
    )
    assert '"state": "succeeded"' in out  # the summary, printed by the last line
    assert "questions.jsonl" in out  # ls shows the input


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_readme_curl_examples_run_as_written(workdir):
    cwd, env = workdir
    await wait_until(lambda: (cwd / "gemini-batchd" / "control.sock").exists(), timeout=30)
    inbox = cwd / "gemini-batchd" / "inbox"
    (inbox / ".questions.jsonl").write_text(
        '{"key": "a", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}\n'
    )
    os.rename(inbox / ".questions.jsonl", inbox / "questions.jsonl")
    await wait_until(
        lambda: (cwd / "gemini-batchd" / "outbox" / "questions.summary.json").exists(), timeout=30
    )
    lines = [
        line for line in sh_block("## The control socket").splitlines() if line.startswith("curl ")
    ]
    assert len(lines) >= 5
    outputs = []
    for line in lines:
        r = await anyio.run_process(["bash", "-c", line], cwd=cwd, env=env, check=False)
        assert r.returncode == 0, (line, r.stderr)
        outputs.append(r.stdout.decode())
    status = json.loads(outputs[0])
    assert status["version"] and status["inputs"]["succeeded"] == 1
    assert json.loads(outputs[2])["state"] == "succeeded"  # GET /v1/inputs/questions.jsonl
    assert json.loads(outputs[3])["error"]["code"] == 409  # cancelling a finished input
    assert "gemini_batchd_inputs" in outputs[-1]  # /metrics
