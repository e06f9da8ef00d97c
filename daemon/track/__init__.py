"""Tracking: ``active`` jobs are polled until the API reports a terminal state, then ``done``.

Contract: each due job is asked with ``batches.get``; its remote state, counters and times are
recorded in one group commit; the interval grows from ``min_interval`` to ``max_interval`` and
resets on a change. A 404 is "lost" only when the job's own key should see it, else the job is
held (:mod:`.missing`). Decisions follow ``metadata.state``, never an error code. Entry point:
``poll.run_pollers``.
"""
