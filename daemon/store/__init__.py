"""The store: SQLite through aiosqlite, the single source of truth for every stage, and the
only place that speaks SQL (the results stage's scratch index ``merge.sqlite`` aside).

Stages call intention-named methods (``claim_inputs``, ``due_jobs``, ``record_polls``, ...), never
SQL. :class:`Store` is composed of one class per concern: :mod:`.inputs` (inputs, history, the one
transition writer), :mod:`.jobs` (parts and jobs), :mod:`.media` (the media cache) and
:mod:`.stats` (what the socket and the metrics count), over :mod:`.base` (the writer and reader
connections, ``tx()``, migrations).
"""

from daemon.store.base import MediaId, Row, StoreError, dumps, loads, new_input_id
from daemon.store.inputs import Claimed, Move
from daemon.store.jobs import JobRows
from daemon.store.media import MediaRows
from daemon.store.stats import StatsRows

__all__ = [
    "Claimed",
    "MediaId",
    "Move",
    "Row",
    "Store",
    "StoreError",
    "dumps",
    "loads",
    "new_input_id",
]


class Store(JobRows, MediaRows, StatsRows):
    """Use ``async with Store.open(path) as store``."""
