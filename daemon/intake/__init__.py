"""Intake: files dropped into ``inbox/`` become ``queued`` inputs or ``rejected`` ones.

Contract: a file is claimed only once it has settled (no change for ``settle_seconds``); a claim
writes and fsyncs a batch note, then inserts the ``seen`` rows and renames the files into
``state/work/<id>/input.jsonl`` in one transaction (:mod:`.claim`). The validation stage
(:mod:`.validate_stage`) moves ``seen → validating → queued | rejected``: the error file is
written before ``rejected`` is committed; ``queued`` commits the input's parts and one
``planned`` job per part in the same transaction. Entry points: ``watch.run_inbox``,
``validate_stage.run_validator``, ``claim.recover_claims``.
"""
