"""gemini-batchd: a folder-as-a-queue daemon for the Gemini Batch API."""

from typing import Any


def __getattr__(name: str) -> Any:
    # looked up on first use: importlib.metadata costs ~40 ms, which the validator's child
    # process (daemon.validate.split) should not pay
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("gemini-batchd")
    except PackageNotFoundError:  # running from a source tree without an install
        found = "0.1.0"
    globals()["__version__"] = found
    return found
