"""Control: the HTTP API on the Unix socket, its actions and metrics, and the CLI client.

Contract: answers read the store (committed state only); actions (cancel, retry, fresh rerun)
write through the store and wake the stage that acts next; nothing here calls the API except the
best-effort cancel of a remote job. Entry point: ``http.run_control``; ``client`` is the CLI side.
"""
