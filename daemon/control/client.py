"""CLI commands that talk to the running daemon over its control socket (SPEC §7).

``status``, ``ls``, ``show ID``, ``cancel ID``, ``retry ID``: readable rich tables (plain text when
stdout is not a terminal), ``--json`` prints the daemon's JSON answer as is. ``ls --watch`` and
``show ID --follow`` draw live progress bars from the jobs' batchStats until the input(s) are
final (with ``--json`` they wait silently and print the final answer).

Exit codes: 0 ok, 1 failure (unknown id, not allowed in this state, daemon error), 2 usage
(the daemon answered 400), 69 (EX_UNAVAILABLE) when nothing answers on the socket.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from daemon.config import Config

EX_UNAVAILABLE = 69
REFRESH_SECONDS = 1.0
TIMEOUT = 30.0


class Unavailable(Exception):
    """Nothing answers on the socket."""


class Failed(Exception):
    """The daemon answered with an error."""

    def __init__(self, status: int, data: Any) -> None:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        super().__init__(err.get("message") or f"HTTP {status}")
        self.status = status
        self.data = data


class Api:
    """A tiny sync client for the control socket (HTTP/1.1 over AF_UNIX, httpx2)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._http = httpx2.Client(
            transport=httpx2.HTTPTransport(uds=str(socket_path)),
            base_url="http://d",
            timeout=TIMEOUT,
        )

    def probe(self) -> None:
        """Raise :class:`Unavailable` unless something accepts connections on the socket.

        Checked with our own socket first because httpcore2's Unix-socket connect leaks its
        socket when the connect fails (an unclosed-socket ResourceWarning)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        try:
            s.connect(str(self.socket_path))
        except OSError as e:
            raise Unavailable(e.strerror or str(e)) from None
        finally:
            s.close()

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, url: str, *, body: Any = None, params: Any = None) -> Any:
        content = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            resp = self._http.request(method, url, content=content, headers=headers, params=params)
        except httpx2.TransportError as e:
            raise Unavailable(str(e) or type(e).__name__) from None
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            data = {"error": {"code": resp.status_code, "message": resp.text[:200]}}
        if resp.status_code >= 400:
            raise Failed(resp.status_code, data)
        return data

    def input(self, ref: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/inputs/{quote(ref, safe='')}")

    def inputs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self.call("GET", "/v1/inputs", params=params)["inputs"]


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Run one client command; returns the exit code."""
    sock = Path(args.socket) if getattr(args, "socket", None) else cfg.socket_path
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = 200  # piped: keep each row on one line for grep and friends
    api = Api(sock)
    try:
        api.probe()
        return COMMANDS[args.command](api, args, out)
    except Unavailable as e:
        print(
            f"gemini-batchd: no daemon answers on {sock} ({e}).\n"
            "Is it running (systemctl status gemini-batchd)? Point at its socket with "
            "--socket PATH or -c CONFIG.",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    except Failed as e:
        if args.json:
            sys.stdout.write(orjson.dumps(e.data).decode() + "\n")
        else:
            print(f"gemini-batchd: {e}", file=sys.stderr)
        return 2 if e.status == 400 else 1
    except KeyboardInterrupt:
        return 130
    finally:
        api.close()


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# ---- formatting -------------------------------------------------------------------------------
def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    when = datetime.fromisoformat(iso).astimezone()
    if when.date() == datetime.now().astimezone().date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _requests(v: dict[str, Any]) -> str:
    r = v["requests"]
    if r.get("total") is None:
        return "-"
    if r.get("succeeded") is None:
        return str(r["total"])
    text = f"{r['succeeded']}/{r['total']} ok"
    return text + (f", {r['failed']} failed" if r.get("failed") else "")


def _progress_text(v: dict[str, Any]) -> str:
    p = v["progress"]
    if not p["total"]:
        return "-"
    text = f"{p['done'] + p['failed']}/{p['total']}"
    return text + (f" ({p['failed']} failed)" if p["failed"] else "")


def _kv(rows: list[tuple[str, Any]], title: str | None = None) -> Table:
    t = Table(show_header=False, title=title, title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, "-" if v is None else str(v))
    return t


# ---- commands ---------------------------------------------------------------------------------
def cmd_status(api: Api, args: argparse.Namespace, out: Console) -> int:
    data = api.call("GET", "/v1/status")
    if args.json:
        _print_json(data)
        return 0
    err = data.get("last_api_error")
    out.print(
        _kv(
            [
                ("version", data["version"]),
                ("uptime", _duration(data["uptime_seconds"])),
                ("inbox", data["paths"]["inbox"]),
                ("outbox", data["paths"]["outbox"]),
                ("state", data["paths"]["state"]),
                ("socket", data["paths"]["socket"]),
                ("queued requests", data["queued_requests"]),
                ("active jobs", f"{data['active_jobs']} / {data['max_active_jobs']}"),
                ("last API error", orjson.dumps(err).decode() if err else None),
                ("paused", data.get("paused")),
            ],
            title="gemini-batchd",
        )
    )
    counts = {k: n for k, n in data["inputs"].items() if n}
    t = Table("state", "inputs", title="inputs", title_justify="left")
    for state, n in counts.items():
        t.add_row(state, str(n))
    out.print(t if counts else "no inputs")
    if data["stuck_jobs"]:
        st = Table("input", "job", "remote state", "submitted", title="stuck jobs")
        for j in data["stuck_jobs"]:
            st.add_row(j["input_id"], j["remote_name"], j["remote_state"], _when(j["submitted"]))
        out.print(st)
    if data.get("not_visible_jobs"):
        nv = Table("input", "job", title="jobs not visible with the current API key")
        for j in data["not_visible_jobs"]:
            nv.add_row(j["input_id"], j["remote_name"])
        out.print(nv)
    return 0


def _inputs_table(views: list[dict[str, Any]]) -> Table:
    t = Table()
    t.add_column("id", no_wrap=True)
    for name in ("path", "model", "state", "requests", "progress"):
        t.add_column(name, overflow="fold")
    t.add_column("updated", no_wrap=True)
    for v in views:
        state = v["state"] + (f" ({v['reason']})" if v["reason"] and not v["final"] else "")
        t.add_row(
            v["id"],
            v["path"],
            v["model"],
            state,
            _requests(v),
            _progress_text(v),
            _when(v["updated"]),
        )
    return t


def cmd_ls(api: Api, args: argparse.Namespace, out: Console) -> int:
    views = api.inputs(args.state, args.limit)
    if args.watch and views:
        ids = [v["id"] for v in views]

        def fetch() -> list[dict[str, Any]]:
            by_id = {v["id"]: v for v in api.inputs(None, 1000)}
            return [by_id.get(i) or api.input(i) for i in ids]

        views = _watch(fetch, out, quiet=args.json)
    if args.json:
        _print_json({"inputs": views})
    elif not views:
        out.print("no inputs" + (f" in state {args.state}" if args.state else ""))
    else:
        out.print(_inputs_table(views))
    return 0


def cmd_show(api: Api, args: argparse.Namespace, out: Console) -> int:
    v = api.input(args.id)
    if args.follow and not v["final"]:
        v = _watch(lambda: [api.input(v["id"])], out, quiet=args.json)[0]
    if args.json:
        _print_json(v)
        return 0
    out.print(_show(v))
    return 0


def _show(v: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(1, 0))
    grid.add_row(
        _kv(
            [
                ("id", v["id"]),
                ("path", v["path"]),
                ("model", v["model"]),
                ("state", v["state"]),
                ("reason", v["reason"]),
                ("requests", _requests(v)),
                ("progress", _progress_text(v)),
                ("size", f"{v['size_bytes']} bytes" if v["size_bytes"] is not None else None),
                ("created", _when(v["created"])),
                ("finished", _when(v["finished"]) if v["finished"] else None),
                ("reused from", v["reused_from"]),
            ]
        )
    )
    if v["parts"]:
        t = Table("part", "lines", "requests", "bytes", title="parts", title_justify="left")
        for p in v["parts"]:
            t.add_row(
                str(p["part_no"]),
                f"{p['first_line']}-{p['last_line']}",
                str(p["request_count"]),
                str(p["size_bytes"]),
            )
        grid.add_row(t)
    if v["jobs"]:
        t = Table(
            "part", "attempt", "job", "state", "remote state", "done/failed/pending", "submitted"
        )
        t.title, t.title_justify = "jobs", "left"
        for j in v["jobs"]:
            c = j["counts"]
            t.add_row(
                str(j["part"]),
                str(j["attempt"]),
                j["remote_name"] or j["display_name"],
                j["state"],
                (j["remote_state"] or "-").removeprefix("BATCH_STATE_"),
                f"{c['done']}/{c['failed']}/{c['pending']}",
                _when(j["submitted"]),
            )
        grid.add_row(t)
    t = Table("at", "state", "note", title="history", title_justify="left")
    for h in v["history"]:
        t.add_row(_when(h["at"]), h["state"], h["note"] or "")
    grid.add_row(t)
    return grid


def cmd_cancel(api: Api, args: argparse.Namespace, out: Console) -> int:
    v = api.call("POST", f"/v1/inputs/{quote(args.id, safe='')}/cancel")
    if args.json:
        _print_json(v)
    else:
        out.print(f"cancel requested: {v['id']} ({v['path']}), state {v['state']}")
    return 0


def cmd_retry(api: Api, args: argparse.Namespace, out: Console) -> int:
    body = {"fresh": True} if args.fresh else None
    v = api.call("POST", f"/v1/inputs/{quote(args.id, safe='')}/retry", body=body)
    if args.json:
        _print_json(v)
    elif args.fresh:
        out.print(f"fresh rerun: new input {v['id']} ({v['path']}), state {v['state']}")
    else:
        out.print(f"retry: {v['id']} ({v['path']}), state {v['state']}")
    return 0


def _watch(
    fetch: Callable[[], list[dict[str, Any]]], out: Console, *, quiet: bool
) -> list[dict[str, Any]]:
    """Refresh about every second until every fetched input is final; returns the last views."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        console=out,
        disable=quiet,
    )
    tasks: dict[str, TaskID] = {}
    with progress:
        while True:
            views = fetch()
            for v in views:
                p, r = v["progress"], v["requests"]
                total = p["total"] or r.get("total") or None
                completed = p["done"] + p["failed"]
                if v["final"] and r.get("succeeded") is not None:
                    completed = r["succeeded"] + (r.get("failed") or 0)
                    total = r.get("total") or completed
                fields = {"state": v["state"] + (f" ({p['failed']} failed)" if p["failed"] else "")}
                if v["id"] not in tasks:
                    tasks[v["id"]] = progress.add_task(
                        f"{v['path']} {v['id']}", total=total, completed=completed, **fields
                    )
                else:
                    progress.update(tasks[v["id"]], total=total, completed=completed, **fields)
            if all(v["final"] for v in views):
                return views
            time.sleep(REFRESH_SECONDS)


COMMANDS: dict[str, Callable[[Api, argparse.Namespace, Console], int]] = {
    "status": cmd_status,
    "ls": cmd_ls,
    "show": cmd_show,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
}
