"""Shared test helpers (kept out of conftest.py so every test imports the same module object)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from google import genai
from google.genai import types

KEY = "test-key"
CLIENTS: list[genai.Client] = []


def make_client(
    url: str, api_version: str | None = "v1beta", *, key: str = KEY, **kw: Any
) -> genai.Client:
    """A sync SDK client for `url`; closed after the test by the autouse fixture (no leaked sockets)."""
    opts = (
        types.HttpOptions(base_url=url, api_version=api_version, **kw)
        if api_version
        else types.HttpOptions(base_url=url, **kw)
    )
    client = genai.Client(api_key=key, http_options=opts)
    CLIENTS.append(client)
    return client


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns a truthy value (sync, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
