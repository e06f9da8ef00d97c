"""Results: ``done`` jobs are collected, and a settled input's answers reach ``outbox/``.

Contract: a job's results (downloaded file or inline answers) become
``state/work/<id>/job-<job>.results.jsonl`` and the job ``collected`` (:mod:`.collect`); a big
input's parts are put in key order as they come (:mod:`.order`, :mod:`.fast_order`,
:mod:`.index`) and appended to the outbox file in the making (:mod:`.outbox_file`). When every job
of an input is collected it settles: retries are planned, or the outbox files are written
atomically (results, media, summary last; :mod:`.finish`) and the input gets its final state. The
on-disk answer index (``merge.sqlite``) is this stage's own scratch store. Entry point:
``collect.run_collector``.
"""
