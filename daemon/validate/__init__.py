"""Validation: the rules a JSONL input must meet, checked in one streaming pass.

Contract: :func:`.rules.validate_file` reads a file once (UTF-8, JSON, keys, duplicate keys,
sha256, token estimate, media marks) and plans its parts (byte ranges of the input, or part files);
it never touches the store or the API. A big file's second half is checked by a child process
(:mod:`.split`, run as ``python -c``) that imports only this package, the config and the standard
library: keep this ``__init__`` and its modules free of heavy imports (anyio, aiosqlite, google).
``gemini-batchd check`` (:mod:`.check`) runs the same pass offline.
"""
