"""Every file name the daemon writes: under ``state/`` (per input, ``state/work/<id>/``) and in
the outbox. Stages take names from here, so that ``finish`` can clean up what they all wrote.

``state/work/<id>/``:

* ``input.jsonl``: the claimed file; ``.meta.json``: its claim facts (for ``recover``)
* ``part-<n>-a<attempt>.jsonl``: a part's request lines (only when rewritten; else a byte range)
* ``part-<n>-a<attempt>.resolved.jsonl``: the same with local media replaced by uploaded URIs
* ``job-<job id>.results.jsonl``: one job's results, normalised
* ``part-<n>.fast`` (+ ``.fast.json``) / ``part-<n>.ordered``: a part's answers in input order
* ``merge.sqlite``: the results stage's scratch index; ``prefix.json``: the outbox file in the
  making's record

``state/work/.claims-<id>.json``: a claim batch's note (fsynced before its renames).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INPUT_FILE = "input.jsonl"
META_FILE = ".meta.json"  # per input folder, for `gemini-batchd recover` (daemon.recover)
BATCH_NOTE_PREFIX = ".claims-"
CLAIM_FILE = "claim.json"  # per-folder note (older claims; still honoured by recovery)
INDEX_FILE = "merge.sqlite"
PREFIX_RECORD = "prefix.json"
# What finish removes from an input's folder once its outbox files are written.
SCRATCH_GLOBS = ("part-*-a*.jsonl", "part-*.ordered*", "part-*.fast*", ".part-*.fast*")


def part_file_name(part_no: int, attempt: int = 1) -> str:
    return f"part-{part_no}-a{attempt}.jsonl"


def resolved_path(job: Mapping[str, Any]) -> Path:
    """The media-resolved copy of a job's source (next to it)."""
    src = Path(job["source_path"])
    return src.with_name(f"part-{job['part_no']}-a{job['attempt']}.resolved.jsonl")


def job_results_name(job_id: int) -> str:
    return f"job-{job_id}.results.jsonl"


def ordered_part_name(part_no: int) -> str:
    return f"part-{part_no}.ordered"


def fast_part_name(part_no: int) -> str:
    return f"part-{part_no}.fast"


def outbox_paths(outbox_dir: Path, rel_path: str) -> dict[str, Path]:
    """The outbox names for an input at ``rel_path`` (relative to the inbox): ``foo.jsonl`` (or
    ``foo.JSONL``) → ``foo.jsonl``, ``foo.summary.json``, ``foo.error.json``, ``foo.media/``.
    A name too long for its outbox files (:func:`name_too_long`) only gets a shortened error
    file: :func:`short_stem` ``.error.json``."""
    rel = Path(rel_path)
    stem = jsonl_stem(rel.name)
    folder = outbox_dir / rel.parent
    error_stem = short_stem(stem, folder) if name_too_long(folder, rel.name) else stem
    return {
        "results": folder / f"{stem}.jsonl",
        "summary": folder / f"{stem}.summary.json",
        "error": folder / f"{error_stem}.error.json",
        "media": folder / f"{stem}.media",
    }


# The longest name written next to an input's results is a big input's file in the making,
# ``.<stem>.jsonl.<input id>.tmp`` (daemon.results.outbox_file): 29 bytes more than the stem.
OUTBOX_NAME_EXTRA = len(".") + len(".jsonl.") + 17 + len(".tmp")
SHORT_STEM_BYTES = 200  # the start of an over-long stem kept in its error file's name


def jsonl_stem(name: str) -> str:
    """``foo.jsonl`` (any case) → ``foo``."""
    return name[: -len(".jsonl")] if name.lower().endswith(".jsonl") else name


@functools.lru_cache(maxsize=64)
def _name_max_of(existing: str) -> int:
    return os.pathconf(existing, "PC_NAME_MAX")


def name_max(folder: Path) -> int:
    """The file system's limit on one name's bytes, for ``folder`` or its nearest existing parent."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return _name_max_of(str(probe))
    except OSError:
        return 255


def name_too_long(folder: Path, name: str) -> int | None:
    """The limit, when the outbox files of a drop named ``name`` in ``folder`` would exceed it."""
    limit = name_max(folder)
    fits = len(os.fsencode(jsonl_stem(name))) + OUTBOX_NAME_EXTRA <= limit
    return None if fits else limit


def short_stem(stem: str, folder: Path) -> str:
    """``<first 200 bytes of the stem>~<8 hex digits of its sha256>`` (whole characters only):
    the error file of a drop whose name is too long, unique per name."""
    raw = os.fsencode(stem)
    keep = min(SHORT_STEM_BYTES, name_max(folder) - len(".error.json.tmp") - 10)
    head = raw[:keep].decode("utf-8", "ignore")  # a character cut in two is dropped
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return f"{head}~{digest}"
