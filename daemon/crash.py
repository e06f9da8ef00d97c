"""Named crash points for recovery tests (the failpoint technique of fail-rs / FoundationDB).

``GEMINI_BATCHD_CRASH_AT=<name>`` makes the daemon SIGKILL itself when it reaches that point, so a test
can prove that a restart after a crash *exactly there* loses nothing and pays nothing twice. Unset (as in
production), a crash point costs one dictionary lookup.
"""

import os
import signal

ENV = "GEMINI_BATCHD_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
