"""A local Gemini API emulator (Files + Batches) that the real google-genai SDK accepts.

Importing this package is cheap; the server (aiohttp) is imported on first use of `Emulator`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.emulator.faults import EmulatorSettings

if TYPE_CHECKING:
    from daemon.emulator.server import Emulator

__all__ = ["Emulator", "EmulatorSettings"]


def __getattr__(name: str) -> Any:
    if name == "Emulator":
        from daemon.emulator.server import Emulator

        return Emulator
    raise AttributeError(name)
