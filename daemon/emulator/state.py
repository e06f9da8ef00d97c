"""Files and batch jobs on disk, and the time-driven job state machine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import secrets
import string
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from daemon.emulator import worker
from daemon.emulator.faults import EmulatorSettings

EXPIRY_SECONDS = 48 * 3600
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
ACTIVE = ("PENDING", "RUNNING")
# A prompt marker: cancels of a job with it in any request are acknowledged, not done.
IGNORE_CANCEL = b"[[ignore_cancel]]"
_ALNUM = string.ascii_lowercase + string.digits
_STAT_NAMES = {
    "request": "requestCount",
    "successful": "successfulRequestCount",
    "failed": "failedRequestCount",
    "pending": "pendingRequestCount",
}
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main."


def new_id(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: tmp file + os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(obj))
    os.replace(tmp, path)


def sha256_b64(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return base64.b64encode(h.hexdigest().encode()).decode()


ANSWER_WORKERS = 1  # jobs whose results are being generated at once


class Store:
    """All emulator state under one directory: `files/`, `uploads/`, `batches/`."""

    def __init__(self, root: Path, settings: EmulatorSettings) -> None:
        self.root = root
        self.settings = settings
        for sub in ("files", "uploads", "batches"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.files: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.seen = worker.SeenRequests(root / "seen.txt")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, threading.Event] = {}
        # Jobs are answered one at a time, in creation order: answering is CPU-bound Python, so
        # more threads would only interleave jobs and make them all finish late, together.
        self._answering = asyncio.Semaphore(ANSWER_WORKERS)
        self.forced: list[str] = []  # terminal states for the next jobs created
        for p in (root / "files").glob("*.json"):
            rec = orjson.loads(p.read_bytes())
            self.files[rec["id"]] = rec
        for p in (root / "uploads").glob("*.json"):
            rec = orjson.loads(p.read_bytes())
            self.uploads[rec["upload_id"]] = rec
        for p in (root / "batches").glob("*.json"):
            rec = orjson.loads(p.read_bytes())
            self.jobs[rec["id"]] = rec

    # ---- files -------------------------------------------------------------------------
    def file_path(self, fid: str) -> Path:
        return self.root / "files" / f"{fid}.bin"

    def save_file(self, rec: dict[str, Any]) -> None:
        write_json(self.root / "files" / f"{rec['id']}.json", rec)
        self.files[rec["id"]] = rec

    def save_upload(self, rec: dict[str, Any]) -> None:
        write_json(self.root / "uploads" / f"{rec['upload_id']}.json", rec)
        self.uploads[rec["upload_id"]] = rec

    def delete_file(self, fid: str) -> None:
        self.files.pop(fid, None)
        (self.root / "files" / f"{fid}.json").unlink(missing_ok=True)
        self.file_path(fid).unlink(missing_ok=True)

    def file_json(self, rec: dict[str, Any], base: str) -> dict[str, Any]:
        fid = rec["id"]
        out: dict[str, Any] = {"name": f"files/{fid}"}
        if rec.get("display_name"):
            out["displayName"] = rec["display_name"]
        out["mimeType"] = rec["mime_type"]
        if rec["size"]:  # proto3 JSON omits a zero int64
            out["sizeBytes"] = str(rec["size"])
        out |= {
            "createTime": rfc3339(rec["create"]),
            "updateTime": rfc3339(rec["create"]),
            "expirationTime": rfc3339(rec["create"] + EXPIRY_SECONDS),
            "sha256Hash": rec["sha256"],
            "uri": f"{base}/v1beta/files/{fid}",
            "state": "ACTIVE",
            "source": rec["source"],
        }
        if rec["source"] == "GENERATED":
            out["downloadUri"] = f"{base}/download/v1beta/files/{fid}:download?alt=media"
        return out

    # ---- jobs --------------------------------------------------------------------------
    def _jpath(self, jid: str, suffix: str) -> Path:
        return self.root / "batches" / f"{jid}{suffix}"

    def save_job(self, rec: dict[str, Any]) -> None:
        write_json(self._jpath(rec["id"], ".json"), rec)

    def create_job(
        self,
        *,
        embed: bool,
        model: str,
        display_name: str | None,
        input_file: str | None,
        inline: list[dict[str, Any]] | None,
        tokens: int,
        request_count: int | None = None,
        priority: int = 0,
        owner: str = "",
    ) -> dict[str, Any]:
        """Record a new job and start its result worker."""
        jid = new_id(36)
        rec: dict[str, Any] = {
            "id": jid,
            "embed": embed,
            "model": model,
            "display_name": display_name,
            "input_file": input_file,
            "inline": inline is not None,
            "tokens": tokens,
            "priority": priority,
            "owner": owner,
            "create": time.time(),
            "pending_s": self.settings.pending_seconds,
            "running_s": self.settings.running_seconds,
            "shuffle": self.settings.shuffle_results,
            "seed": f"{self.settings.seed}:{jid}",
            "forced": self.forced.pop(0) if self.forced else None,
            "request_count": request_count,
            "counts": None,
            "state": None,
            "end": None,
            "final_stats": None,
        }
        if inline is not None:
            with self._jpath(jid, ".in.jsonl").open("wb") as f:
                for item in inline:
                    f.write(orjson.dumps(item) + b"\n")
        self.save_job(rec)
        self.jobs[jid] = rec
        self.start_worker(rec)
        return rec

    def start_worker(self, rec: dict[str, Any]) -> None:
        jid = rec["id"]
        if rec["inline"]:
            in_path = self._jpath(jid, ".in.jsonl")
        else:
            in_path = self.file_path(rec["input_file"].removeprefix("files/"))
        stop = self._stops[jid] = threading.Event()

        def on_total(n: int) -> None:
            rec["request_count"] = n

        async def run() -> None:
            try:
                async with self._answering:
                    if stop.is_set():  # cancelled or stopping while it waited for its turn
                        return
                    res = await asyncio.to_thread(
                        worker.run_job,
                        in_path=in_path,
                        out_path=self._jpath(jid, ".out.jsonl"),
                        embed=rec["embed"],
                        mid=rec["model"].removeprefix("models/"),
                        shuffle=rec["shuffle"],
                        seed=rec["seed"],
                        seen=self.seen,
                        stop=stop,
                        on_total=on_total,
                    )
                rec["counts"] = {
                    "total": res.total,
                    "succeeded": res.succeeded,
                    "failed": res.failed,
                }
            except worker.Stopped:
                return
            except OSError as e:
                rec["worker_error"] = f"cannot read the input: {e}"
                rec["counts"] = {"total": rec["request_count"] or 0, "succeeded": 0, "failed": 0}
            if jid in self.jobs:
                self.save_job(rec)

        self._tasks[jid] = asyncio.get_running_loop().create_task(run())

    def resume_workers(self) -> None:
        for rec in self.jobs.values():
            if rec["state"] is None and rec["counts"] is None:
                self.start_worker(rec)

    async def stop(self) -> None:
        for ev in self._stops.values():
            ev.set()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _stop_worker(self, jid: str) -> None:
        if ev := self._stops.get(jid):
            ev.set()

    def state_of(self, rec: dict[str, Any], now: float | None = None) -> str:
        """Current state, advancing the job (and persisting) when it became terminal."""
        if rec["state"] in TERMINAL:
            return rec["state"]
        now = time.time() if now is None else now
        age = now - rec["create"]
        if age > EXPIRY_SECONDS:
            self.finish(rec, "EXPIRED", rec["create"] + EXPIRY_SECONDS)
        elif age < rec["pending_s"]:
            return "PENDING"
        elif age < rec["pending_s"] + rec["running_s"] or rec["counts"] is None:
            return "RUNNING"
        elif rec.get("worker_error"):
            self.finish(rec, "FAILED", now)
        else:
            self.finish(rec, rec["forced"] or "SUCCEEDED", now)
        return rec["state"]

    def _progress(self, rec: dict[str, Any], now: float) -> dict[str, int]:
        total = rec["request_count"]
        if total is None:
            return {}
        frac = (now - rec["create"] - rec["pending_s"]) / max(rec["running_s"], 1e-9)
        frac = min(max(frac, 0.0), 1.0)
        done = int(frac * total)
        counts = rec["counts"]
        failed = done * counts["failed"] // max(counts["total"], 1) if counts else 0
        return {
            "request": total,
            "successful": done - failed,
            "failed": failed,
            "pending": total - done,
        }

    def finish(self, rec: dict[str, Any], state: str, end: float) -> None:
        """Make the job terminal: freeze its stats, publish or discard its results."""
        jid = rec["id"]
        total = rec["request_count"] or 0
        if state == "SUCCEEDED":
            c = rec["counts"]
            stats = {"request": c["total"], "successful": c["succeeded"], "failed": c["failed"]}
        elif state == "CANCELLED":
            stats = self._progress(rec, end)
        elif state == "FAILED":
            stats = {"request": total, "failed": total}
        else:
            stats = {"request": total, "pending": total}
        rec.update(state=state, end=end, final_stats=stats)
        self._stop_worker(jid)
        out = self._jpath(jid, ".out.jsonl")
        if state == "SUCCEEDED" and not rec["inline"]:
            fid = f"batch-{jid}"
            os.replace(out, self.file_path(fid))
            size = self.file_path(fid).stat().st_size
            self.save_file(
                {
                    "id": fid,
                    "display_name": None,
                    "mime_type": "application/jsonl",
                    "size": size,
                    "create": end,
                    "sha256": sha256_b64(self.file_path(fid)),
                    "source": "GENERATED",
                    "owner": rec.get("owner", ""),
                }
            )
        elif state != "SUCCEEDED":
            out.unlink(missing_ok=True)
        self.save_job(rec)

    def delete_job(self, jid: str) -> None:
        self._stop_worker(jid)
        self.jobs.pop(jid, None)
        for suffix in (".json", ".in.jsonl", ".out.jsonl"):
            self._jpath(jid, suffix).unlink(missing_ok=True)

    def inline_results(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        path = self._jpath(rec["id"], ".out.jsonl")
        if not path.exists():
            return []
        with path.open("rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]

    def operation(self, rec: dict[str, Any], *, with_inline: bool = True) -> dict[str, Any]:
        """The long-running Operation JSON the real API returns for a batch."""
        now = time.time()
        state = self.state_of(rec, now)
        jid = rec["id"]
        kind = "EmbedContentBatch" if rec["embed"] else "GenerateContentBatch"
        meta: dict[str, Any] = {"@type": _TYPE + kind, "model": rec["model"]}
        if rec["display_name"]:
            meta["displayName"] = rec["display_name"]
        if rec["input_file"]:
            meta["inputConfig"] = {"fileName": rec["input_file"]}
        if rec.get("priority"):
            meta["priority"] = str(rec["priority"])
        if state == "PENDING":
            update = rec["create"]
            total = rec["request_count"]
            stats = {} if total is None else {"request": total, "pending": total}
        elif state == "RUNNING":
            update, stats = now, self._progress(rec, now)
        else:
            update, stats = rec["end"], rec["final_stats"]
        output: dict[str, Any] | None = None
        if state == "SUCCEEDED":
            if not rec["inline"]:
                if now >= rec["end"] + self.settings.results_file_delay:
                    output = {"responsesFile": f"files/batch-{jid}"}
            elif with_inline:
                items = self.inline_results(rec)
                if self.settings.drop_inline_metadata:
                    items = [{k: v for k, v in i.items() if k != "metadata"} for i in items]
                # Embedding batches use the same field name (EmbedContentBatchOutput.inlinedResponses);
                # the SDK renames it to inlined_embed_content_responses client-side.
                output = {"inlinedResponses": {"inlinedResponses": items}}
        if output is not None:
            meta["output"] = output
        meta |= {"createTime": rfc3339(rec["create"]), "updateTime": rfc3339(update)}
        if state in TERMINAL:
            meta["endTime"] = rfc3339(rec["end"])
        meta["batchStats"] = {_STAT_NAMES[k]: str(v) for k, v in stats.items() if v}
        meta |= {"state": f"BATCH_STATE_{state}", "name": f"batches/{jid}"}
        op: dict[str, Any] = {"name": f"batches/{jid}", "metadata": meta}
        if state in TERMINAL:
            op["done"] = True
        if state == "SUCCEEDED":
            op["response"] = {"@type": _TYPE + kind + "Output", **(output or {})}
        elif state == "CANCELLED":
            code = rec.get("cancel_code", self.settings.cancel_error_code)
            op["error"] = {"code": code, "message": f"Batch {jid} failed without error."}
        elif state == "FAILED":
            msg = rec.get("worker_error") or "The batch failed (forced by the emulator)."
            op["error"] = {"code": 13, "message": msg}
        elif state == "EXPIRED":
            op["error"] = {
                "code": 4,
                "message": "The batch expired: it did not finish within 48 hours.",
            }
        return op

    def cancel(self, rec: dict[str, Any], *, ignored: bool = False) -> bool:
        """Cancel an active job (best effort): False if it is already terminal or ``ignored``
        (see :meth:`ignores_cancel`; the job then runs on to its normal end)."""
        if self.state_of(rec) in TERMINAL:
            return False
        if ignored:
            rec["cancel_ignored"] = True
            self.save_job(rec)
            return False
        rec["cancel_code"] = self.settings.cancel_error_code
        self.finish(rec, "CANCELLED", time.time())
        return True

    def ignores_cancel(self, rec: dict[str, Any]) -> bool:
        """One of the job's requests carries `[[ignore_cancel]]` (reads its input: run in a thread)."""
        if rec["inline"]:
            path = self._jpath(rec["id"], ".in.jsonl")
        else:
            path = self.file_path(rec["input_file"].removeprefix("files/"))
        marker, tail = IGNORE_CANCEL, b""
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    if marker in tail + block:
                        return True
                    tail = block[-len(marker) :]
        except OSError:
            return False
        return False

    def force(self, rec: dict[str, Any], state: str) -> None:
        """End an active job now; SUCCEEDED: as soon as its answers are written."""
        if self.state_of(rec) in TERMINAL:
            raise ValueError(f"job is already {rec['state']}")
        if state == "SUCCEEDED":
            rec.update(pending_s=0.0, running_s=0.0, forced=None)
            self.save_job(rec)
            return
        self.finish(rec, state, time.time())

    def active(self) -> list[dict[str, Any]]:
        now = time.time()
        return [r for r in list(self.jobs.values()) if self.state_of(r, now) in ACTIVE]

    def cleanup_temp(self) -> None:
        for p in self.root.rglob("*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
