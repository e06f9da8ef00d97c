"""Validation on two cores: a child process checks the second half of a big file while the
validator parses the first.

``orjson`` holds the GIL, so a second thread would not parse any faster; a second process does.
The child is a plain ``python -c`` that imports only the validator (no ``multiprocessing``: that
would re-import the daemon's ``__main__``), reads the file on its own from the first line start
after the middle, and takes blocks of canonical ``{"key","request"}`` lines in the validator's
bulk way. It stops at the first block that needs a closer look (a bad, blank or over-long line, a
missing final newline...) and writes what it found to stdout as one pickle: each block's line
count, size and token estimate, every line's length, the key hashes in the validator's 64
buckets and whether any of them repeats (a small pickled header, then the arrays as they are). The validator, once it reaches the child's first line, takes that over (counts, hashes,
and part planning from the lengths) and reads on itself from where the child stopped, with its
exact per-line messages. At the end the child, idle by then, also looks for keys repeated across
the halves in the upper half of the buckets (the validator sends its own hashes of those) while
the validator looks at the lower half. If the child fails, or the parts have become part files (which need the
lines themselves), the validator simply reads the second half too: the outcome never depends on
the child, only the time does.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from daemon.validate.reader import ScanningWindow

if TYPE_CHECKING:
    from daemon.config import Config

# The child takes the lines after this fraction of the file; measured on two cores, these shares
# have both finish together. Parsing costs about 2 s/GB on either side; the child also starts a
# Python (~0.1 s) and checks its key hashes for repeats; with the sha256 (not deferred) the
# validator's thread also reads the whole file for it once it has parsed its share (~1 s/GB).
SHARE = 0.55
SHARE_WITH_DIGEST = 0.3
_SEEK_CHUNK = 64 * 1024
_PKG_ROOT = str(Path(__file__).resolve().parents[2])
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from daemon.validate.split import main; main(sys.argv[2:])"
)


class BlockRecorder:
    """Stands in for the part planner in the child: notes the shape of each block taken."""

    def __init__(self) -> None:
        self.lengths = array("I")  # every line's length, newline included
        self.blocks = array("q")  # (line count, bytes, est. tokens) per block, flattened

    def add_block(
        self, line_no: int, start: int, lines: list[bytes], size: int, tokens: int
    ) -> None:
        self.lengths.extend(map(len, lines))
        self.blocks.extend((len(lines), size, tokens))

    def abandon(self) -> None:
        pass


@dataclass
class TailFindings:
    """What the child took, from ``TailCheck.begin`` on (as far as its blocks go)."""

    lengths: array[int]
    blocks: array[int]
    buckets: list[array[int]]
    unique: bool  # no hash repeats within ``buckets``
    marks: bool  # "file: seen in what the child read


class TailCheck:
    """The child process checking the lines from ``begin`` on."""

    def __init__(self, proc: subprocess.Popen[bytes], begin: int) -> None:
        self.proc, self.begin = proc, begin
        self._taken = False  # the findings were taken (the child then waits for send_upper)
        self._found: TailFindings | None = None

    @classmethod
    def start(
        cls, path: Path, size: int, model: str, cfg: Config, *, share: float = SHARE
    ) -> TailCheck | None:
        """Start a child for a file of at least ``[inbox] parallel_validation_bytes`` (None for
        a smaller one, or when no line starts in its second half)."""
        threshold = cfg.inbox.parallel_validation_bytes
        if not threshold or size < threshold:
            return None
        begin = _line_start_after(path, int(size * share))
        if begin is None:
            return None
        args = [path, str(begin), model, str(cfg.inbox.max_line_bytes)]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, _PKG_ROOT, *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            return None
        return cls(proc, begin)

    def result(self) -> TailFindings | None:
        """Wait for the child's findings; None if it failed."""
        if not self._taken:
            self._taken = True
            out = self.proc.stdout
            assert out is not None
            try:
                unique, marks, n_lengths, n_blocks, sizes = pickle.load(out)
                lengths, blocks = _read(out, "I", n_lengths), _read(out, "q", n_blocks)
                buckets = [_read(out, "q", n) for n in sizes]
                self._found = TailFindings(lengths, blocks, buckets, unique, marks)
            except Exception:  # a truncated or foreign answer: the validator reads it all
                self._found = None
            if self._found is None:
                self.close()
        return self._found

    def send_upper(self, buckets: list[array[int]]) -> bool:
        """Hand the validator's own hashes of the upper buckets to the child (after
        :meth:`result`), which looks for repeats in them and its own; False if it cannot."""
        inp = self.proc.stdin
        if self._found is None or inp is None or inp.closed:
            return False
        try:
            pickle.dump([len(b) for b in buckets], inp)
            for b in buckets:
                b.tofile(inp)
            inp.close()
        except OSError:
            return False
        return True

    def upper_repeats(self) -> set[int] | None:
        """The child's answer to :meth:`send_upper`: hashes seen more than once there."""
        assert self.proc.stdout is not None
        try:
            found = pickle.load(self.proc.stdout)
        except Exception:
            return None
        return found if isinstance(found, set) else None

    def close(self) -> None:
        """Stop the child if it still runs (the validator is done or gave up)."""
        if self.proc.returncode is not None:
            return
        if self._found is None:  # it may be stuck writing what nobody reads
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()  # the child, waiting for send_upper, sees the end and exits
                except OSError:
                    pass
        self.proc.wait()


def _line_start_after(path: Path, pos: int) -> int | None:
    """The offset of the first line that starts after byte ``pos``, if any."""
    with open(path, "rb", buffering=0) as f:
        f.seek(pos)
        while chunk := f.read(_SEEK_CHUNK):
            nl = chunk.find(b"\n")
            if nl >= 0:
                begin = pos + nl + 1
                return begin if begin < os.fstat(f.fileno()).st_size else None
            pos += len(chunk)
    return None


def main(argv: list[str]) -> None:
    """The child: ``PATH BEGIN MODEL MAX_LINE_BYTES``; its findings on stdout."""
    from daemon.validate.rules import (  # validate imports this module
        duplicate_hashes,
        new_tail_pass,
    )

    path, begin = Path(argv[0]), int(argv[1])
    recorder = BlockRecorder()
    window = ScanningWindow(path, begin, os.stat(path).st_size)  # looks for media marks too
    with io.BufferedReader(window, 1 << 20) as f:
        run = new_tail_pass(path, f, model=argv[2], limit=int(argv[3]), recorder=recorder)
        run.read_all()
    # a small header, then the arrays as they are (no copy of them is made to send them)
    out = sys.stdout.buffer
    sizes = [len(b) for b in run.buckets]
    # the check for repeats among its own hashes is done here, on the second core
    unique = all(len(set(b)) == len(b) for b in run.buckets)
    header = (unique, window.found, len(recorder.lengths), len(recorder.blocks), sizes)
    pickle.dump(header, out)
    for arr in (recorder.lengths, recorder.blocks, *run.buckets):
        arr.tofile(out)
    out.flush()
    # Then, if the validator sends its own hashes of the upper buckets (it checks the lower
    # ones meanwhile), the repeats among them and ours; nothing if its end closes instead.
    inp = sys.stdin.buffer
    try:
        sizes = pickle.load(inp)
    except EOFError:
        return
    theirs = [_read(inp, "q", n) for n in sizes]
    pickle.dump(duplicate_hashes(theirs, run.buckets[len(run.buckets) - len(sizes) :]), out)
    out.flush()


def _read(f: IO[bytes], code: str, n: int) -> array[int]:
    arr = array(code)
    arr.fromfile(f, n)
    return arr
