"""Submission: ``planned`` jobs become ``active`` remote batch jobs.

Contract: jobs are admitted under the caps (``max_active_jobs``, ``max_enqueued_tokens``); local
media are uploaded once per content hash (:mod:`.media`); the intent (``creating``) is committed
before ``batches.create`` is called, and an ambiguous failure is reconciled by display name
(adopt the match, create again only if none exists), never blindly resubmitted. Entry points:
``submitter.run_submitter``, ``submitter.recover_submissions``.
"""
