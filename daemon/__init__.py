"""gemini-batchd: a folder-as-a-queue daemon for the Gemini Batch API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gemini-batchd")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.1.0"
