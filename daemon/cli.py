"""The command line: parse, call, print. Every subcommand lives in the module of its concern."""

from __future__ import annotations

import argparse
import sys

from daemon import __version__

EX_CONFIG = 78
EX_UNAVAILABLE = 69


def _common(p: argparse.ArgumentParser) -> None:
    # -c/--config is accepted before or after the subcommand (SPEC §1).
    p.add_argument(
        "-c", "--config", dest="config", default=argparse.SUPPRESS, help="config file (TOML)"
    )


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="a warning is a problem too (exit 1)")
    p.add_argument(
        "--live",
        action="store_true",
        help="check the API's wire shapes with a few tiny jobs (costs a fraction of a cent)",
    )
    p.add_argument("--model", default="gemini-3.1-flash-lite", help="model for --live")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="--live: seconds to wait for the jobs"
    )
    p.add_argument(
        "--poll-interval", type=float, default=10.0, help="--live: seconds between job polls"
    )
    p.add_argument("--report", help="--live: write the JSON report to this file")


# Long but flat: one add_parser/add_argument block per command, read top to bottom.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemini-batchd", description="Gemini Batch API inbox/outbox daemon"
    )
    parser.add_argument("--version", action="version", version=f"gemini-batchd {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the daemon in the foreground (what systemd runs)")
    _common(p)
    p.add_argument(
        "--emulator",
        action="store_true",
        help="start the bundled emulator and use it (no key, no network)",
    )

    p = sub.add_parser("check-config", help="validate the config and exit (0 ok, 78 bad)")
    _common(p)

    p = sub.add_parser("check", help="validate a JSONL file offline, as the daemon would")
    _common(p)
    p.add_argument("file")
    p.add_argument(
        "--model", help="model the file is for (default: the folder name or [gemini] default_model)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("doctor", help="check the setup offline (--live: against the API)")
    _common(p)
    _doctor_args(p)
    p = sub.add_parser(
        "recover",
        help="rebuild a lost or corrupt state database from state/work/ and the remote jobs",
    )
    _common(p)

    p = sub.add_parser("emulator", help="run the local Gemini API emulator")
    _common(p)
    from daemon.emulator.cli import add_arguments

    add_arguments(p)

    for name, help_ in [
        ("status", "daemon status"),
        ("ls", "list inputs"),
        ("show", "show one input"),
        ("cancel", "cancel an input's unfinished jobs"),
        ("retry", "resubmit an input's unanswered requests"),
    ]:
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--socket", help="control socket path (default from config)")
        p.add_argument("--json", action="store_true", help="JSON output for scripts")
        if name in {"show", "cancel", "retry"}:
            p.add_argument("id", help="input id, or its path relative to the inbox")
        if name == "ls":
            p.add_argument("--state", help="only inputs in this state")
            p.add_argument("--limit", type=int, default=50)
            p.add_argument(
                "--watch",
                action="store_true",
                help="live progress until all shown inputs are final",
            )
        if name == "show":
            p.add_argument(
                "--follow", action="store_true", help="live progress until the input is final"
            )
        if name == "retry":
            p.add_argument(
                "--fresh", action="store_true", help="run again as new paid work, even if succeeded"
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.command
    if cmd == "emulator":
        from daemon.emulator.cli import main as emulator_main

        return emulator_main(args)

    if cmd == "doctor":  # before loading the config: a bad one is one of its findings
        from daemon.doctor import doctor_main

        return doctor_main(args)

    from daemon.config import ConfigError, load_config

    try:
        cfg = load_config(getattr(args, "config", None))
    except ConfigError as e:
        print(f"gemini-batchd: bad config: {e}", file=sys.stderr)
        return EX_CONFIG

    if cmd == "check-config":
        print(f"config ok: {cfg.source or 'built-in defaults'}")
        return 0
    if cmd == "run":
        from daemon.service import main_run

        return main_run(cfg, emulator=args.emulator)
    if cmd == "recover":
        from daemon.recover import main_recover

        return main_recover(cfg)
    if cmd == "check":
        from daemon.validate.check import check_main

        return check_main(cfg, args.file, model=args.model, as_json=args.json)
    from daemon.control.client import main as client_main

    return client_main(cfg, args)
