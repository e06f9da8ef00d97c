"""``gemini-batchd doctor --live``: the daemon's wire assumptions checked against the real API.

A few tiny jobs (two one-word prompts, a file job and an inline job, plus one job cancelled at
once) go through :class:`daemon.gemini.GeminiClient`, the layer the daemon itself uses, and each
assumption the daemon relies on is reported PASS or DIFF with what was seen. Expected values come
from ``real-api-evidence.md`` (the section is named in each check's ``source``), not from the
emulator. Everything made is deleted at the end. The key never enters the report: the whole report
is scrubbed of it before it is printed or written.

Longer than ~400 lines: one short check per wire assumption; the list is the module.
"""

from __future__ import annotations

import itertools
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from daemon.gemini import ApiError, GeminiClient

KEYS = ("doctor-1", "doctor-2")
STATES = {f"BATCH_STATE_{s}" for s in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")}
STATES.add("BATCH_STATE_EXPIRED")
TERMINAL = {s for s in STATES if not s.endswith(("PENDING", "RUNNING"))}
BATCH_NAME = re.compile(r"^batches/[a-z0-9]+$")
_PROMPT = {
    "contents": [{"role": "user", "parts": [{"text": "Reply with the single word OK."}]}],
    "generationConfig": {"maxOutputTokens": 8},
}


@dataclass
class Finding:
    name: str
    status: str  # PASS | DIFF
    expected: str
    seen: str
    source: str = ""
    note: str = ""
    tolerated: bool = False  # a known production quirk the daemon copes with: not a failure


@dataclass
class Made:
    """What the run created, for the cleanup."""

    files: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


def _err(e: ApiError) -> str:
    return f"{e.http_code or '-'} {e.status or ''} {e.message}".replace("  ", " ").strip()


def _sortable_time(t: Any) -> str:
    """An RFC 3339 UTC time that sorts as text (the API sends 0-9 fractional digits)."""
    base, _, frac = str(t or "").removesuffix("Z").partition(".")
    return f"{base}.{frac.ljust(9, '0')}"


def _meta(op: dict[str, Any]) -> dict[str, Any]:
    return op.get("metadata") or {}


class LiveRun:
    """One ``doctor --live`` run: steps in order, each adding findings."""

    def __init__(
        self, gem: GeminiClient, *, model: str, timeout: float, poll_interval: float
    ) -> None:
        self.gem, self.model = gem, model
        self.timeout, self.poll_interval = timeout, poll_interval
        self.deadline = float("inf")  # set when the run starts: one --timeout for all the waits
        self.findings: list[Finding] = []
        self.made = Made()
        self.leftovers: list[str] = []
        self.tag = f"gemini-batchd-doctor-{int(time.time())}"
        self.tmp = Path(tempfile.mkdtemp(prefix="gbd-doctor-"))

    def add(self, name: str, ok: bool, expected: str, seen: str, source: str, **kw: Any) -> None:
        self.findings.append(Finding(name, "PASS" if ok else "DIFF", expected, seen, source, **kw))

    def missed(self, names: list[tuple[str, str, str]], why: str) -> None:
        """Checks a failed earlier step kept from running: DIFF, not reached."""
        for name, expected, source in names:
            self.add(name, False, expected, f"not reached: {why}", source)

    async def expect_error(
        self,
        name: str,
        call: Callable[[], Awaitable[Any]],
        code: int | None,
        text: str,
        source: str,
        note: str = "",
    ) -> None:
        """A call the API should refuse: HTTP ``code`` (None: any) and ``text`` in the message."""
        parts = ([f"HTTP {code}"] if code else ["an error"]) + (
            [f"message containing {text!r}"] if text else []
        )
        expected = ", ".join(parts)
        try:
            await call()
        except ApiError as e:
            ok = (code is None or e.http_code == code) and text.lower() in e.message.lower()
            self.add(name, ok, expected, _err(e), source, note=note)
            return
        self.add(name, False, expected, "200: the call succeeded", source, note=note)

    # ---- steps -------------------------------------------------------------------------------
    async def upload(self, lines: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], int]:
        path = self.tmp / f"{name}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(li) + b"\n" for li in lines))
        f = await self.gem.upload_file(path, display_name=f"{self.tag}-{name}")
        self.made.files.append(f["name"])
        return f, path.stat().st_size

    async def step_upload(self) -> str | None:
        exp = "state ACTIVE, sizeBytes = the bytes sent"
        lines = [{"key": k, "request": _PROMPT} for k in KEYS]
        try:
            f, size = await self.upload(lines, "input")
        except ApiError as e:
            self.add("upload.active", False, exp, _err(e), "1.2")
            return None
        seen = f"state {f.get('state')}, sizeBytes {f.get('sizeBytes')} (sent {size})"
        ok = f.get("state") == "ACTIVE" and str(f.get("sizeBytes")) == str(size)
        self.add("upload.active", ok, exp, seen, "1.2")
        return str(f["name"])

    async def step_creates(self, file_name: str | None) -> tuple[str | None, str | None]:
        exp = "an Operation named batches/<id>, metadata.state PENDING or RUNNING"
        file_job = inline_job = None
        if file_name is None:
            self.missed([("create.file", exp, "1.19")], "no uploaded file")
        else:
            try:
                op = await self.gem.create_file_job(
                    model=self.model,
                    file_name=file_name,
                    display_name=f"{self.tag}-file",
                    embed=False,
                )
                file_job = self._created("create.file", op, exp)
            except ApiError as e:
                self.add("create.file", False, exp, _err(e), "1.19")
        requests = [{"key": k, "request": _PROMPT} for k in KEYS]
        try:
            op = await self.gem.create_inline_job(
                model=self.model, requests=requests, display_name=f"{self.tag}-inline"
            )
            inline_job = self._created("create.inline", op, exp)
        except ApiError as e:
            self.add("create.inline", False, exp, _err(e), "1.19")
        return file_job, inline_job

    def _created(self, check: str, op: dict[str, Any], exp: str) -> str | None:
        name, state = op.get("name"), _meta(op).get("state")
        if name:
            self.made.jobs.append(str(name))
        ok = bool(name and BATCH_NAME.match(name)) and state in STATES - TERMINAL
        self.add(check, ok, exp, f"name {name}, metadata.state {state}", "1.19")
        return str(name) if name else None

    async def step_bad_line(self) -> None:
        exp = "HTTP 400, message containing 'Error on line 1'"
        bad = [{"key": "bad", "request": {"contents": _PROMPT["contents"], "thinking_config": {}}}]
        try:
            f, _ = await self.upload(bad, "bad-line")
            op = await self.gem.create_file_job(
                model=self.model, file_name=f["name"], display_name=f"{self.tag}-bad", embed=False
            )
        except ApiError as e:
            ok = e.http_code == 400 and "error on line 1" in e.message.lower()
            self.add("create.rejects_bad_line", ok, exp, _err(e), "1.9")
            return
        if op.get("name"):
            self.made.jobs.append(str(op["name"]))
        seen = f"created {op.get('name')}: the bad line was accepted"
        self.add("create.rejects_bad_line", False, exp, seen, "1.9")

    async def step_list(self) -> None:
        want = {f"{self.tag}-{s}" for s in ("file", "inline", "cancel")}
        ops: list[dict[str, Any]] = []
        try:
            async for op in self.gem.list_batches():
                ops.append(op)
                names = {_meta(o).get("displayName") for o in ops}
                if want <= names or len(ops) >= 1000:
                    break
        except ApiError as e:
            self.add("list.newest_first", False, "createTime descending", _err(e), "1.14")
            self.add("list.contains_created", False, "the jobs just made", _err(e), "1.14")
            return
        times = [_sortable_time(_meta(o).get("createTime")) for o in ops]
        ordered = all(a >= b for a, b in itertools.pairwise(times))
        seen = f"{len(ops)} jobs, createTime {'descending' if ordered else 'not descending'}"
        self.add("list.newest_first", ordered, "createTime descending", seen, "1.14")
        names = {_meta(o).get("displayName") for o in ops}
        found = sorted(n.removeprefix(self.tag + "-") for n in want & names if n)
        exp = "file, inline and cancel jobs listed by displayName"
        seen = f"found {found or 'none'} in {len(ops)} listed jobs"
        self.add(
            "list.contains_created",
            want <= names,
            exp,
            seen,
            "1.14",
            note="adoption of an ambiguous create relies on it",
        )

    async def step_cancel(self) -> None:
        exp = "done, metadata.state BATCH_STATE_CANCELLED, error.code 13"
        requests = [{"key": "doctor-cancel", "request": _PROMPT}]
        try:
            op = await self.gem.create_inline_job(
                model=self.model, requests=requests, display_name=f"{self.tag}-cancel"
            )
            self.made.jobs.append(str(op["name"]))
            await self.gem.cancel_batch(str(op["name"]))
            op = await self.wait_done(str(op["name"]))
        except ApiError as e:
            self.add("cancel.shape", False, exp, _err(e), "1.6")
            return
        err = op.get("error") or {}
        state = _meta(op).get("state")
        seen = f"done {op.get('done')}, metadata.state {state}, error {orjson.dumps(err).decode()}"
        ok = op.get("done") is True and state == "BATCH_STATE_CANCELLED" and err.get("code") == 13
        self.add("cancel.shape", ok, exp, seen, "1.6", note="the daemon keys on metadata.state")

    async def wait_done(self, name: str, seen: list[dict[str, Any]] | None = None) -> dict:
        """Poll ``batches.get`` until the job is terminal (or the run's ``--timeout`` is up)."""
        with anyio.CancelScope(deadline=self.deadline):
            while True:
                op = await self.gem.get_batch(name)
                if seen is not None:
                    seen.append(op)
                if op.get("done") or _meta(op).get("state") in TERMINAL:
                    return op
                await anyio.sleep(self.poll_interval)
        raise ApiError(
            "transient", f"{name} not terminal after {self.timeout:g}s", endpoint="doctor"
        )

    async def step_poll(self, file_job: str | None, inline_job: str | None) -> dict[str, dict]:
        """Both jobs until terminal; checks the states and where ``batchStats`` lives."""
        ops: list[dict[str, Any]] = []
        final: dict[str, dict] = {}
        for kind, name in (("file", file_job), ("inline", inline_job)):
            if name is None:
                self.missed([(f"terminal.{kind}", "done, BATCH_STATE_SUCCEEDED", "1.19")], "no job")
                continue
            try:
                final[kind] = await self.wait_done(name, ops)
            except ApiError as e:
                self.add(f"terminal.{kind}", False, "done, BATCH_STATE_SUCCEEDED", _err(e), "1.19")
                continue
            op = final[kind]
            seen = f"done {op.get('done')}, metadata.state {_meta(op).get('state')}"
            ok = op.get("done") is True and _meta(op).get("state") == "BATCH_STATE_SUCCEEDED"
            self.add(f"terminal.{kind}", ok, "done, BATCH_STATE_SUCCEEDED", seen, "1.19")
        states = sorted({str(_meta(o).get("state")) for o in ops})
        exp = "only " + ", ".join(sorted(s.removeprefix("BATCH_STATE_") for s in STATES))
        self.add("state.values", bool(ops) and set(states) <= STATES, exp, f"{states}", "1.19")
        top = sorted({k for o in ops for k in ("state", "batchStats") if k in o})
        under = all("batchStats" in _meta(o) for o in ops if o.get("done"))
        seen = f"top level: {top or 'neither'}; metadata.batchStats on terminal jobs: {under}"
        exp = "metadata.state and metadata.batchStats only"
        self.add("batchStats.under_metadata", bool(ops) and not top and under, exp, seen, "1.19")
        return final

    async def step_file_results(self, op: dict[str, Any] | None) -> str | None:
        names = [
            ("result.file_name", "metadata.output.responsesFile = files/batch-…", "1.16"),
            ("result.download", "files/batch-…:download streams the file", "1.16"),
            ("result.lines", "one line per key, each with key and response or error", "1.10"),
        ]
        if op is None or _meta(op).get("state") != "BATCH_STATE_SUCCEEDED":
            self.missed(names, "the file job did not succeed")
            return None
        out = _meta(op).get("output") or {}
        rf = out.get("responsesFile") or (op.get("response") or {}).get("responsesFile")
        ok = bool(rf) and str(rf).startswith("files/batch-") and "responsesFile" in out
        self.add(
            names[0][0], ok, names[0][1], f"metadata.output {orjson.dumps(out).decode()}", "1.16"
        )
        if not rf:
            self.missed(names[1:], "no result file")
            return None
        dest = self.tmp / "results.jsonl"
        try:
            await self.gem.download_file(str(rf), dest)
        except ApiError as e:
            self.add(names[1][0], False, names[1][1], _err(e), "1.16")
            self.missed(names[2:], "download failed")
            return str(rf)
        self.add(names[1][0], True, names[1][1], f"{dest.stat().st_size} bytes", "1.16")
        self._result_lines(dest)
        return str(rf)

    def _result_lines(self, path: Path) -> None:
        exp = "one line per key, each with key and response or error"
        try:
            lines = [orjson.loads(b) for b in path.read_bytes().splitlines() if b.strip()]
        except orjson.JSONDecodeError as e:
            self.add("result.lines", False, exp, f"not JSONL: {e}", "1.10")
            return
        keys = sorted(str(li.get("key")) for li in lines if isinstance(li, dict))
        shaped = all(isinstance(li, dict) and ("response" in li or "error" in li) for li in lines)
        ok = keys == sorted(KEYS) and shaped
        seen = f"{len(lines)} lines, keys {keys}, each with response/error: {shaped}"
        self.add("result.lines", ok, exp, seen, "1.10")

    def step_inline_results(self, op: dict[str, Any] | None) -> None:
        exp_items = "one item per request, each with response or error"
        exp_key = "each item echoes metadata.key"
        if op is None or _meta(op).get("state") != "BATCH_STATE_SUCCEEDED":
            why = "the inline job did not succeed"
            self.missed(
                [("inline.items", exp_items, "1.19"), ("inline.metadata_key", exp_key, "1.19")], why
            )
            return
        out = _meta(op).get("output") or op.get("response") or {}
        items = (out.get("inlinedResponses") or {}).get("inlinedResponses") or []
        shaped = all(isinstance(i, dict) and ("response" in i or "error" in i) for i in items)
        seen = f"{len(items)} items, each with response/error: {shaped}"
        self.add("inline.items", len(items) == len(KEYS) and shaped, exp_items, seen, "1.19")
        keys = sorted(
            str((i.get("metadata") or {}).get("key")) for i in items if isinstance(i, dict)
        )
        note = (
            "production drops it now and then (python-genai #2008); the daemon joins on the key "
            "and retries the unanswered ones"
        )
        ok = keys == sorted(KEYS)
        self.add(
            "inline.metadata_key", ok, exp_key, f"keys {keys}", "1.19", note=note, tolerated=not ok
        )

    async def step_files(self, result_file: str | None, input_file: str | None) -> None:
        if result_file is None:
            self.missed(
                [("files.get_long_id", "HTTP 400 (40-character limit)", "1.16")], "no result file"
            )
        else:
            await self.expect_error(
                "files.get_long_id",
                lambda: self.gem.get_file(result_file),
                400,
                "cannot be more than 40 characters",
                "1.16",
            )
        if input_file is None:
            self.missed([("files.deleted_403", "HTTP 403", "1.18")], "no uploaded file")
            return
        files = self.made.files
        await self.deleted_then_gone(
            "files.deleted_403", input_file, self.gem.delete_file, self.gem.get_file, files, 403
        )

    async def step_batch_names(self, gone: str | None) -> None:
        await self.expect_error(
            "batches.malformed_name",
            lambda: self.gem.get_batch("batches/test-batch"),
            None,
            "Could not parse the batch name",
            "1.8",
            note="the evidence shows the message, not the HTTP status",
        )
        if gone is None:
            self.missed([("batches.deleted_404", "HTTP 404", "1.8")], "no job to delete")
            return
        jobs = self.made.jobs
        await self.deleted_then_gone(
            "batches.deleted_404", gone, self.gem.delete_batch, self.gem.get_batch, jobs, 404
        )

    async def deleted_then_gone(
        self,
        check: str,
        name: str,
        delete: Callable[[str], Awaitable[Any]],
        get: Callable[[str], Awaitable[Any]],
        made: list[str],
        code: int,
    ) -> None:
        """Delete what the run made, then expect ``get`` of it to answer ``code``."""
        evidence = "1.18" if code == 403 else "1.8"
        try:
            await delete(name)
            made.remove(name)
        except ApiError as e:
            self.add(check, False, f"HTTP {code}", f"delete failed: {_err(e)}", evidence)
            return
        await self.expect_error(check, lambda: get(name), code, "", evidence)

    async def cleanup(self) -> None:
        """Delete what the run made (best effort; what remains is reported)."""
        left: list[str] = []
        for job in list(self.made.jobs):
            try:
                await self.gem.delete_batch(job)
            except ApiError as e:
                left.append(f"{job} ({_err(e)})")
        for f in list(self.made.files):
            try:
                if not await self.gem.delete_file(f):
                    left.append(f"{f} (gone, or not deletable through the API: expires on its own)")
            except ApiError as e:
                left.append(f"{f} ({_err(e)})")
        self.leftovers = left

    async def run(self) -> None:
        self.deadline = anyio.current_time() + self.timeout
        input_file = await self.step_upload()
        file_job, inline_job = await self.step_creates(input_file)
        try:
            await self.step_cancel()
            await self.step_bad_line()
            await self.step_list()
            final = await self.step_poll(file_job, inline_job)
            result_file = await self.step_file_results(final.get("file"))
            if result_file:
                self.made.files.append(result_file)
            self.step_inline_results(final.get("inline"))
            await self.step_files(result_file, input_file)
            await self.step_batch_names(inline_job)
        finally:
            with anyio.CancelScope(shield=True):
                await self.cleanup()
