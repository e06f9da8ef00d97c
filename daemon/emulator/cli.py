"""`gemini-batchd emulator`: run the emulator until SIGINT/SIGTERM (cheap to import)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="port (default 8765; 0 = pick a free one)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="keep files and jobs here (survives restarts)"
    )
    parser.add_argument(
        "--pending-seconds", type=float, default=0.2, help="time a job stays PENDING"
    )
    parser.add_argument(
        "--running-seconds", type=float, default=0.5, help="time a job stays RUNNING"
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep results in input order")
    parser.add_argument("--api-key", help="require this API key (default: any non-empty key)")
    parser.add_argument(
        "--max-active-jobs", type=int, default=100, help="PENDING+RUNNING jobs before 429"
    )
    parser.add_argument(
        "--max-enqueued-tokens",
        action="append",
        default=[],
        metavar="MODEL:N",
        help="enqueued-token limit per model id (repeatable)",
    )
    parser.add_argument(
        "--fault-rate",
        action="append",
        default=[],
        metavar="ENDPOINT:KIND:P",
        help="inject fault KIND (429, 500, 503, drop, create_then_503, create_then_drop) on ENDPOINT "
        "(e.g. batches.get, or *) with probability P (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for shuffling and fault draws")
    parser.add_argument(
        "--no-file-id-limit",
        action="store_true",
        help="allow files.get/delete of ids over 40 chars (the real API refuses them: "
        "python-genai#1759)",
    )
    parser.add_argument(
        "--missing-file-status",
        type=int,
        choices=(403, 404),
        default=403,
        help="status of a missing file (default 403, as the real API)",
    )
    parser.add_argument(
        "--no-validate-at-create",
        action="store_true",
        help="accept bad input lines at create (answer them with error lines instead)",
    )
    parser.add_argument(
        "--scope-by-key",
        action="store_true",
        help="jobs and files visible only to the API key that created them",
    )


def settings_from_args(args: argparse.Namespace) -> object:
    from daemon.emulator.faults import EmulatorSettings, check_fault

    rates: dict[str, dict[str, float]] = {}
    for spec in args.fault_rate:
        endpoint, kind, p = spec.rsplit(":", 2)
        check_fault(endpoint, kind)
        rates.setdefault(endpoint, {})[kind] = float(p)
    tokens = {}
    for spec in args.max_enqueued_tokens:
        model, n = spec.rsplit(":", 1)
        tokens[model.removeprefix("models/")] = int(n)
    return EmulatorSettings(
        pending_seconds=args.pending_seconds,
        running_seconds=args.running_seconds,
        shuffle_results=not args.no_shuffle,
        api_key=args.api_key,
        max_active_jobs=args.max_active_jobs,
        max_enqueued_tokens=tokens,
        fault_rates=rates,
        seed=args.seed,
        file_id_limit=not args.no_file_id_limit,
        missing_file_status=args.missing_file_status,
        validate_input_at_create=not args.no_validate_at_create,
        scope_by_key=args.scope_by_key,
    )


async def _serve(args: argparse.Namespace) -> None:
    import asyncio
    import signal

    from daemon.emulator.server import Emulator

    settings = settings_from_args(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    emulator = Emulator(host=args.host, port=args.port, data_dir=args.data_dir, settings=settings)  # type: ignore[arg-type]
    url = await emulator.start()
    try:
        print(f"gemini-batchd emulator listening on {url}", flush=True)
        await stop.wait()
    finally:
        await emulator.stop()


def main(args: argparse.Namespace) -> int:
    import asyncio

    # Answering a job is a CPU-bound thread; hand the GIL back to the HTTP server every 1 ms
    # (default 5 ms), so that downloads and polls are served promptly meanwhile.
    sys.setswitchinterval(0.001)
    try:
        asyncio.run(_serve(args))
    except ValueError as e:
        print(f"gemini-batchd emulator: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gemini-batchd emulator: cannot listen: {e}", file=sys.stderr)
        return 1
    return 0
