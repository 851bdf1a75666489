"""Sweeps: run a grid of cells on all cores, resumable, with tidy atomic tables.

A :class:`Cell` is one run (study, variant label, seed, JSON-able run parameters and the study
parameters that define it, as named scalar *columns*). Its result is a list of tidy rows (one
per step), stored with the cell's columns as ``DIR/cells/<key>.csv`` the moment the cell
finishes (atomic write; :func:`write_cell` formats it without pandas, byte for byte the file
``cell_frame(cell, rows).to_csv`` writes), so a re-run in the same directory skips every finished
cell. A cell counts as finished only if its file is whole: it parses, ends with a full line, has
the columns of the cell and at least one row, every row names the cell's study, variant and
seed, and the sweep's own check (``complete``, e.g. "the run reached its budget") accepts it; any
other file (empty, cut short, damaged) is computed again. The table of the whole sweep,
``DIR/<name>.csv``, is rebuilt from the cell files at the end. Each cell file is read once per
process (:class:`CellTables`: checked and kept in one read; files that share a header are parsed
together), and the table is one concatenation of what was read.

Table layout: ``study``, ``variant`` (a display label, never parsed), the cell's columns (e.g.
``N``, ``recovery``, ``gamma``), then the worker's row columns (``seed``, ``step``, ...).
Analyses select and group by the columns.

Processes: at most one worker per CPU this process may run on (:func:`usable_cpus`). Pool
workers ignore Ctrl-C (SIGINT) and SIGTERM — the sweep's process is in charge: a terminal's
Ctrl-C and a scheduler's SIGTERM reach the whole process group, and the parent alone decides to
stop and kills its workers — and die with their parent (``PR_SET_PDEATHSIG`` on Linux, and a
watchdog thread everywhere), so neither Ctrl-C, SIGTERM nor ``kill -9`` of a sweep leaves
workers running. Ctrl-C (or SIGTERM, which :func:`deepgrpo.records.terminate_like_ctrl_c`
turns into the same exception) stops the sweep at once (no queued cell starts; running cells
are abandoned) and raises :class:`deepgrpo.records.Interrupted` saying what was kept.

Batches: with a ``batch_worker`` (:data:`BatchWorker`, e.g. a trainer that advances many runs in
lockstep), the cells that share a ``batch_key`` run together, in one call in one process; a cell
whose key is None runs alone through ``worker``. Each group is cut, in the cells' order, into
equal batches of at most ``max_batch`` cells and at most (cells to run) / (workers), so that no
worker idles while another holds a large batch; the largest batches start first. The batch
worker reports each run the moment it finishes (``done(cell, rows)``), and that cell's file is
written at once, as a single cell's is: resume, Ctrl-C, SIGTERM and ``kill -9`` keep every
reported cell and abandon the others, and the table is the same, byte for byte. A batch that
reports a cell not its own, or one twice, or returns with a cell unreported, is an error.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import operator
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepgrpo.records import Interrupted, signals_held, write_bytes_atomic, write_csv_atomic

RESERVED_COLUMNS = ("study", "variant", "seed")
"""Columns every sweep table has besides the cells' own (``seed`` comes from the cell if the
worker does not write it)."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep.

    study: the study's name; variant: a display label for the configuration (e.g.
    ``decay | gamma=2``); seed: the run seed (paired across variants); params: JSON-able run
    parameters for the worker (e.g. ``{"method": "deep-grpo", "algo": {...}, "spec": {...}}``);
    columns: the study parameters of this cell, ``{name: scalar}`` (e.g. ``{"recovery":
    "decay", "gamma": 2.0}``), written as columns of every row of the cell's table. A name may
    not be ``study``, ``variant`` or ``seed``, nor a column the worker writes; values are
    str, int, float, bool or None (None and NaN read back as NaN).
    """

    study: str
    variant: str
    seed: int
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    columns: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in self.columns.items():
            if not isinstance(name, str) or name in RESERVED_COLUMNS:
                raise ValueError(f"Cell column name {name!r} is invalid: expected a str other than "
                                 f"{', '.join(RESERVED_COLUMNS)}")
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"Cell column {name} = {value!r} is invalid: expected a str, int, float, bool "
                                 f"or None")

    @functools.cached_property
    def key(self) -> str:
        """Stable file name for this cell: a hash of everything that defines the run (computed once
        per cell: a cell is never changed, :func:`dataclasses.replace` makes a new one)."""
        # the fields as dataclasses.asdict gives them (params and columns are plain JSON-able values),
        # without its recursive deep copy: the same text, a fraction of the time over thousands of cells
        fields = {"study": self.study, "variant": self.variant, "seed": self.seed, "params": self.params,
                  "columns": self.columns}
        blob = json.dumps(fields, sort_keys=True, default=str)
        return f"{self.variant}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}".replace("/", "_")


def _cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.key}.csv"


WATCHDOG_INTERVAL_S = 0.2
"""How often a pool worker checks that the sweep process that started it is still alive."""


def _die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` (the sweep's process) ends: the kernel's
    parent-death signal on Linux (immediate), and a daemon thread that exits the process when
    its parent changes or ``parent_pid`` is gone (any platform, and any start method)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    first_parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != first_parent:
                os._exit(1)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            threading.Event().wait(WATCHDOG_INTERVAL_S)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _worker_init(parent_pid: int) -> None:
    """Pool worker set-up: Ctrl-C and SIGTERM are the parent's to handle (it kills the workers
    when it stops), and the worker dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cap_workers(workers: int | None, prog: str = "deepgrpo study") -> int | None:
    """``workers`` capped at :func:`usable_cpus` (None stays None: all of them), with a one-line
    note on stderr when the cap applies (more workers than CPUs only add memory: each runs a
    whole simulator)."""
    cpus = usable_cpus()
    if workers is not None and workers > cpus:
        print(f"{prog}: note: --workers {workers} is more than the {cpus} CPUs this process may use; using {cpus}",
              file=sys.stderr, flush=True)
        return cpus
    return workers


def _run_one(worker: Callable[[Cell], list[dict[str, Any]]], cell: Cell, path: str) -> int:
    import torch
    torch.set_num_threads(1)  # one process per core
    rows = worker(cell)
    write_cell(path, cell, rows)
    return len(rows)


BatchWorker = Callable[[list[Cell], Callable[[Cell, list[dict[str, Any]]], None]], None]
"""``batch_worker(cells, done)`` runs every cell of ``cells`` together and calls ``done(cell,
rows)`` once per cell, as soon as that cell's run is finished (``rows``: what ``worker(cell)``
would return); a picklable module-level function."""


def _describe(cell: Any) -> str:
    """A cell, named in an error message."""
    if isinstance(cell, Cell):
        return f"{cell.study}/{cell.variant} seed {cell.seed} ({cell.key})"
    return repr(cell)[:200]


def _run_batch(batch_worker: BatchWorker, cells: list[Cell], paths: list[str],
               on_done: Callable[[Cell], None] | None = None) -> int:
    """Run ``cells`` with ``batch_worker``, writing each cell's file (``paths``) the moment the
    worker reports it; ``on_done(cell)`` after each write (in-process progress)."""
    import torch
    torch.set_num_threads(1)  # one process per core
    mine = {c.key: (c, p) for c, p in zip(cells, paths)}
    reported: set[str] = set()
    name = getattr(batch_worker, "__qualname__", repr(batch_worker))

    def done(cell: Cell, rows: list[dict[str, Any]]) -> None:
        key = cell.key if isinstance(cell, Cell) else None
        if key not in mine:
            raise RuntimeError(f"batch worker {name} reported cell {_describe(cell)}, which is not in its batch of "
                               f"{len(cells)} cell(s)")
        if key in reported:
            raise RuntimeError(f"batch worker {name} reported cell {_describe(cell)} twice")
        own, path = mine[key]
        write_cell(path, own, rows)
        reported.add(key)
        if on_done is not None:
            on_done(own)

    batch_worker(list(cells), done)
    missing = [c for c in cells if c.key not in reported]
    if missing:
        shown = "; ".join(_describe(c) for c in missing[:5]) + ("; ..." if len(missing) > 5 else "")
        raise RuntimeError(f"batch worker {name} returned without reporting {len(missing)} of its {len(cells)} "
                           f"cell(s): {shown}")
    return len(cells)


_Unit = tuple[list[Cell], bool]
"""What one pool task runs: a batch (True: through the batch worker) or one cell (False)."""


def _plan_batches(cells: Sequence[Cell], batch_key: Callable[[Cell], Hashable | None] | None, max_batch: int,
                  workers: int) -> list[_Unit]:
    """The tasks that run ``cells`` on ``workers`` processes: the cells grouped by ``batch_key``
    (default: one group; a None key: the cell runs alone), each group cut in the cells' order
    into as few equal batches as hold at most ``min(max_batch, ceil(len(cells) / workers))``
    cells each; the largest batches first (then by first cell), the lone cells last."""
    if not cells:
        return []
    groups: dict[Hashable, list[Cell]] = {}
    alone: list[Cell] = []
    for c in cells:
        key = batch_key(c) if batch_key is not None else ()
        if key is None:
            alone.append(c)
        else:
            groups.setdefault(key, []).append(c)
    size = max(1, min(max_batch, -(-len(cells) // max(1, workers))))
    batches: list[list[Cell]] = []
    for members in groups.values():
        count = -(-len(members) // size)
        q, r = divmod(len(members), count)
        start = 0
        for i in range(count):
            n = q + (i < r)
            batches.append(members[start:start + n])
            start += n
    position = {c.key: i for i, c in enumerate(cells)}
    batches.sort(key=lambda b: (-len(b), position[b[0].key]))
    return [(b, True) for b in batches] + [([c], False) for c in alone]


PROGRESS_POLL_S = 0.5
"""How often a batched sweep looks for cell files written by batches still running (progress bar)."""


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` (inode, size, modification time; None: none)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def cell_frame(cell: Cell, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The tidy table of one finished cell: ``study``, ``variant``, the cell's columns, then the
    worker's ``rows`` (plus ``seed`` if the rows lack it). A cell column that the worker also
    writes is an error (the table would hold two meanings under one name)."""
    frame = pd.DataFrame(rows)
    clash = sorted(set(cell.columns) & set(frame.columns))
    if clash:
        raise ValueError(f"cell {cell.variant!r}: columns {clash} are both study parameters and worker columns")
    head = {"study": cell.study, "variant": cell.variant, **cell.columns}
    for i, (name, value) in enumerate(head.items()):
        frame.insert(i, name, [value] * len(frame))
    if "seed" not in frame:
        frame["seed"] = cell.seed
    return frame


_INT_TYPES = frozenset({int, np.int64, np.int32, np.int16, np.int8})  # unsigned ones: pandas types mixes apart
_FLOAT_TYPES = frozenset({float, np.float64})
_BOOL_TYPES = frozenset({bool, np.bool_})
_NONE = type(None)
_NUMBER_TYPES = _INT_TYPES | _FLOAT_TYPES | {_NONE}
_OBJECT_TYPES = _INT_TYPES | _FLOAT_TYPES | _BOOL_TYPES | {str, _NONE}
_INT64 = (-(1 << 63), (1 << 63) - 1)
_PLAIN_TYPES = frozenset({str, int, float, bool, _NONE})
_float_repr = float.__repr__


def _csv_fields(values: list[Any]) -> list[Any] | None:
    """What ``DataFrame.to_csv`` hands the csv writer for a column of ``values`` once pandas has
    typed it (as ``pd.DataFrame(rows)`` or ``frame.insert`` type it), or None where that is not
    known here (types other than str, bool, int within int64, float, None and their numpy
    scalars; unsigned numpy integers, float32 and the like)."""
    types = set(map(type, values))
    if types <= {str} or types <= _BOOL_TYPES:  # str / bool dtype: as they are
        return values
    if not types <= _OBJECT_TYPES:
        return None
    ints = types & _INT_TYPES
    if ints:
        whole = [v for v in values if type(v) in ints] if types - ints else values
        if min(whole) < _INT64[0] or max(whole) > _INT64[1]:
            return None  # uint64 or object: left to pandas
    if types <= _INT_TYPES:  # int64: the decimal digits (the csv writer's str)
        return values
    if types == {_NONE}:  # object column of None: empty fields
        return [""] * len(values)
    if types <= _NUMBER_TYPES:  # float64 (numpy's float-to-text, i.e. repr); None and NaN empty
        if types <= _FLOAT_TYPES:
            return ["" if s == "nan" else s for s in map(_float_repr, values)]
        return ["" if v is None or v != v else _float_repr(float(v)) for v in values]
    # object (or str with missing values): the objects as they are; None and NaN empty
    return ["" if v is None or (type(v) in _FLOAT_TYPES and v != v) else v for v in values]


def cell_csv(cell: Cell, rows: list[dict[str, Any]]) -> bytes | None:
    """The bytes ``cell_frame(cell, rows).to_csv(path, index=False)`` writes, formatted directly
    (no DataFrame: a fraction of the cost), or None where this shortcut does not apply (then the
    pandas path is the one to take): rows that are not all dicts with the same keys, no rows, a
    value of a type :func:`_csv_fields` does not know, or anything :func:`cell_frame` rejects.

    pandas types each column (str, int64, float64, bool or object) and hands the csv writer of
    the standard library its values (float64 as numpy's text, which is ``repr``; missing values
    empty); this types each column as pandas does (:func:`_csv_fields`) and uses the same writer.
    When every row has the same Python types (a worker's history: one type per column), the
    values go to the writer as they are (it writes them as pandas does), NaN made empty."""
    if type(rows) is not list or not rows or type(rows[0]) is not dict:
        return None
    keys = rows[0].keys()
    for r in rows:
        if type(r) is not dict or r.keys() != keys:
            return None  # ragged rows: pandas fills the gaps and orders the columns
    names = list(keys)
    if (any(type(k) is not str for k in names) or "study" in keys or "variant" in keys
            or not keys.isdisjoint(cell.columns)):
        return None  # cell_frame raises (or pandas names the columns its way)
    with_seed = "seed" not in keys
    if with_seed and (type(cell.seed) is not int or not _INT64[0] <= cell.seed <= _INT64[1]):
        return None
    head = {"study": cell.study, "variant": cell.variant, **cell.columns}
    lead: list[Any] = []
    for value in head.values():  # one value per column: typed as the copies that cell_frame inserts
        fields = _csv_fields([value])
        if fields is None:
            return None
        lead.append(fields[0])
    tail = [cell.seed] if with_seed else []
    if len(names) > 1:
        table = list(map(operator.itemgetter(*names), rows))  # each row's values in the columns' order
    else:
        table = [tuple(r.values()) for r in rows]
    kinds = {tuple(map(type, t)) for t in table}
    if len(kinds) == 1 and _PLAIN_TYPES.issuperset(next(iter(kinds))):
        # one type per column, each as pandas types it (str, int64, float64, bool; None: object)
        kind = next(iter(kinds))
        ints = [i for i, t in enumerate(kind) if t is int]
        if ints:
            whole = [t[i] for t in table for i in ints]
            if min(whole) < _INT64[0] or max(whole) > _INT64[1]:
                return None  # uint64 or object: left to pandas
        if float in kind:
            body = [["" if v != v else v for v in t] for t in table]  # NaN: empty; floats: repr
        else:
            body = table
    else:
        columns = []
        for values in zip(*table):
            fields = _csv_fields(list(values))
            if fields is None:
                return None
            columns.append(fields)
        body = list(zip(*columns)) if columns else [()] * len(table)
    out = io.StringIO()
    try:
        writer = csv.writer(out, lineterminator="\n")  # as pandas makes it (excel dialect, QUOTE_MINIMAL)
        writer.writerow([*head, *names, *(["seed"] if with_seed else [])])
        writer.writerows([(*lead, *t, *tail) for t in body])
        return out.getvalue().encode("utf-8")
    except (csv.Error, ValueError):  # e.g. text that UTF-8 cannot encode
        return None  # pandas raises its own error (or manages)


def write_cell(path: str | os.PathLike, cell: Cell, rows: list[dict[str, Any]]) -> Path:
    """Write the file of ``cell`` (its table: :func:`cell_frame`, as ``to_csv(index=False)``
    writes it) atomically: the bytes :func:`cell_csv` formats, or through pandas where it does
    not apply (the same bytes, at many times the cost)."""
    data = cell_csv(cell, rows)
    if data is None:
        return write_csv_atomic(path, cell_frame(cell, rows))
    return write_bytes_atomic(path, data)


CellCheck = Callable[[Cell, pd.DataFrame], bool]
"""A sweep's own test that a cell's table is its whole result (e.g. the run reached its budget).
It may also have a ``many(cells, frame, bounds) -> list[bool]`` attribute: the same answers for
the tables ``frame.iloc[a:b]`` of many cells at once (``bounds``: their ``(a, b)``, each with at
least one row), which :class:`CellTables` then uses for the files it reads together."""


def span_rows(starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``[sum(rows)]`` the positions ``starts[i], ..., starts[i] + rows[i] - 1`` of every span, span
    after span (the rows of several cells' tables in one frame)."""
    return np.repeat(starts - np.cumsum(rows) + rows, rows) + np.arange(int(rows.sum()))


CSV_DTYPES = {"study": str, "variant": str}
"""How a cell file's columns are typed when read (the rest: as pandas infers them)."""


def _parse_cell(raw: bytes) -> pd.DataFrame:
    """The table in a cell file's bytes, as ``pd.read_csv`` reads the file (raises as it does)."""
    return pd.read_csv(io.BytesIO(raw), dtype=CSV_DTYPES)


def _whole_file(raw: bytes) -> bool:
    """The cheap part of "the file is whole": not empty, and it ends with a full line."""
    return len(raw) > 0 and raw[-1:] == b"\n"


def _accepts(cell: Cell, frame: pd.DataFrame, complete: CellCheck | None) -> bool:
    """Whether ``frame`` (the table of ``cell``'s file) holds the cell's whole result: the cell's
    columns, at least one row, every row naming the cell's study, variant and seed, and the
    sweep's own check."""
    needed = {"study", "variant", "seed", *cell.columns}
    if len(frame) == 0 or not needed <= set(frame.columns):
        return False
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    if not ((frame["study"] == cell.study).all() and (frame["variant"] == cell.variant).all()
            and (seeds == cell.seed).all()):
        return False
    return complete is None or bool(complete(cell, frame))


def load_cell(out_dir: str | os.PathLike, cell: Cell, complete: CellCheck | None = None) -> pd.DataFrame | None:
    """The table of ``cell`` from its file in ``out_dir`` if the file holds the cell's whole
    result (see the module docstring), else None (missing, empty, cut short or damaged: the
    cell is to be computed again). One file; :class:`CellTables` reads many at once."""
    try:
        raw = _cell_path(Path(out_dir), cell).read_bytes()
        if not _whole_file(raw):  # empty, or cut in the middle of a line
            return None
        frame = _parse_cell(raw)
    except (OSError, ValueError, UnicodeDecodeError):  # missing, unreadable or not a table (pandas: ValueError)
        return None
    return frame if _accepts(cell, frame, complete) else None


_BLANK_LINE = re.compile(rb"\n[ \t]*\n")
"""A line pandas skips (empty or blank): a file with one is parsed alone (its rows != its lines)."""
_BOOL_WORDS = frozenset({"true", "false"})


def _numeric_word(s: str) -> bool:
    """Whether pandas might read ``s`` as a number or a bool (erring towards yes)."""
    if s.strip().lower() in _BOOL_WORDS:
        return True
    try:
        float(s)
    except ValueError:
        return False
    return True


def _safe_joint_column(col: pd.Series, files: np.ndarray, n_files: int) -> bool:
    """Whether column ``col`` of a joint parse of ``n_files`` cell files (``files``: the file of
    each row) has the values and dtype that parsing each file alone and concatenating gives:
    int64 and bool (every file had them), float64 (each file float64 or int64; integers within
    2**53 and no -0.0, so that int-to-float and text-to-float agree), or text where every file has
    a value that is no number (so no file alone reads as numbers, bools or an all-missing float
    column)."""
    kind = col.dtype.kind
    if kind in "ib":
        return True
    if kind == "f":
        v = col.to_numpy()
        fin = v[np.isfinite(v)]
        return not (np.any(np.abs(fin) >= 2.0 ** 53) or np.any((fin == 0) & np.signbit(fin)))
    if not isinstance(col.dtype, pd.StringDtype):
        return False
    codes, uniques = pd.factorize(col)
    text = np.array([not _numeric_word(u) for u in uniques], dtype=bool)
    has_text = np.zeros(len(col), dtype=bool)
    has_text[codes >= 0] = text[codes[codes >= 0]]
    return bool((np.bincount(files[has_text], minlength=n_files) > 0).all())


@dataclass(eq=False)
class _Part:
    """One parse: the table of one cell file, or of several files with one header parsed as one
    CSV text (``frame``); ``keys``: the cells whose rows it holds."""

    frame: pd.DataFrame
    keys: list[str]


class CellTables:
    """The tables of the cell files of one sweep directory ``out_dir``, each file read once per
    process: :meth:`finished` reads and checks (with the sweep's ``complete``) the files of cells
    it has not seen, keeping each accepted table; :meth:`read_new` reads the files of cells just
    computed; :meth:`table` concatenates the tables of a sweep's cells.

    Parsing thousands of small files one ``pd.read_csv`` at a time costs milliseconds each, so
    the files that share a header line are parsed together, as one CSV text, and each cell's
    table is its rows of that parse. The result is the same as reading each file alone and
    concatenating (values, dtypes, column and row order): a file or group whose joint parse could
    differ (quotes, blank lines, a column whose type depends on the rows, a parse error) is
    parsed file by file, and a cell whose rows share a parse with cells outside the table asked
    for is read again alone.
    """

    def __init__(self, out_dir: str | os.PathLike, complete: CellCheck | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.complete = complete
        self._rows: dict[str, tuple[_Part, int, int]] = {}  # cell key -> (parse, first row, end row)
        self._checked: set[str] = set()  # keys whose table passed the checks
        self._rejected: dict[str, tuple[int, int, int] | None] = {}  # key -> the file (stat) that failed them

    # -- reading

    def finished(self, cells: Sequence[Cell]) -> list[bool]:
        """Whether each of ``cells`` is finished (its file holds its whole result, see the module
        docstring); a file not read before is read now, once."""
        known = [c for c in cells if c.key in self._rows and c.key not in self._checked]
        if known:  # read by :meth:`read_new`, not checked yet: check what was read
            by_part: dict[int, list[Cell]] = {}
            for c in known:
                by_part.setdefault(id(self._rows[c.key][0]), []).append(c)
            for group in by_part.values():
                ok = self._check(self._rows[group[0].key][0], group)
                for c, good in zip(group, ok):
                    if good:
                        self._checked.add(c.key)
                    else:
                        del self._rows[c.key]
                        self._rejected[c.key] = self._stat(c)
        unread = [c for c in cells if c.key not in self._rows
                  and not (c.key in self._rejected and self._stat(c) == self._rejected[c.key])]
        stats = {c.key: self._stat(c) for c in unread}  # before reading: a file replaced meanwhile is read again
        self._read(unread, check=True)
        for c in unread:
            if c.key not in self._rows:
                self._rejected[c.key] = stats[c.key]
        return [c.key in self._rows for c in cells]

    def _stat(self, cell: Cell) -> tuple[int, int, int] | None:
        """Which file ``cell`` has (inode, size, modification time; None: none): a rejected file is
        not read again until it is replaced (cell files are replaced by renames, new inodes)."""
        try:
            st = _cell_path(self.out_dir, cell).stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def count_finished(self, cells: Sequence[Cell]) -> int:
        """How many of ``cells`` are finished (:meth:`finished`)."""
        return sum(self.finished(cells))

    def read_new(self, cells: Sequence[Cell]) -> None:
        """Read the files of ``cells``, just computed (written whole, atomically: not checked
        unless :meth:`finished` asks), in place of anything read for them before."""
        for c in cells:
            self._rows.pop(c.key, None)
            self._checked.discard(c.key)
            self._rejected.pop(c.key, None)
        self._read(list(cells), check=False)

    def _read(self, cells: list[Cell], check: bool) -> None:
        """Read the files of ``cells``; with ``check``, keep only the tables that pass the checks
        (:func:`load_cell`'s), else keep every one (a file that is not a table raises)."""
        alone: list[tuple[Cell, bytes]] = []
        groups: dict[bytes, list[tuple[Cell, bytes]]] = {}
        for c in cells:
            try:
                raw = _cell_path(self.out_dir, c).read_bytes()
            except OSError:
                if check:
                    continue
                raise
            if check and not _whole_file(raw):
                continue
            head, sep, body = raw.partition(b"\n")
            rows = body.count(b"\n")
            if (not sep or rows == 0 or body[-1:] != b"\n" or b'"' in raw or b"\r" in raw or b"\x00" in raw
                    or _BLANK_LINE.search(b"\n" + body) or rows >= _chunk_rows(head)):
                alone.append((c, raw))
            else:
                groups.setdefault(head, []).append((c, raw))
        for members in groups.values():
            self._read_group(members, check, alone)
        for c, raw in alone:
            if check:
                try:
                    frame = _parse_cell(raw)
                except (ValueError, UnicodeDecodeError):
                    continue
            else:
                frame = _parse_cell(raw)
            part = _Part(frame, [c.key])
            if check and not self._check(part, [c], [(0, len(frame))])[0]:
                continue
            self._keep(part, [c], check)

    def _read_group(self, members: list[tuple[Cell, bytes]], check: bool,
                    alone: list[tuple[Cell, bytes]]) -> None:
        """Parse the files ``members`` (one header) as one text; on any doubt, add them to
        ``alone``. Cells whose table fails the checks are dropped and the rest parsed again
        without their rows (so that no dropped row types a column)."""
        while members:
            if len(members) == 1:
                alone.extend(members)
                return
            rows = np.array([raw.count(b"\n") - 1 for _, raw in members])
            head = members[0][1].partition(b"\n")[0]
            text = b"".join([head, b"\n", *(raw.partition(b"\n")[2] for _, raw in members)])
            try:
                frame = pd.read_csv(io.BytesIO(text), dtype=CSV_DTYPES, low_memory=False)
            except (ValueError, UnicodeDecodeError):
                alone.extend(members)
                return
            files = np.repeat(np.arange(len(members)), rows)
            if (len(frame) != rows.sum() or not isinstance(frame.index, pd.RangeIndex)
                    or not all(_safe_joint_column(frame[name], files, len(members))
                               for name in frame.columns if name not in CSV_DTYPES)):
                alone.extend(members)
                return
            cells = [c for c, _ in members]
            part = _Part(frame, [c.key for c in cells])
            ends = np.cumsum(rows)
            bounds = list(zip((ends - rows).tolist(), ends.tolist()))
            ok = self._check(part, cells, bounds) if check else [True] * len(cells)
            if all(ok):
                self._keep(part, cells, check, bounds)
                return
            members = [m for m, good in zip(members, ok) if good]

    def _check(self, part: _Part, cells: list[Cell], bounds: list[tuple[int, int]] | None = None) -> list[bool]:
        """Whether the table of each of ``cells`` in ``part`` (rows ``bounds``, default: as kept)
        passes :func:`load_cell`'s checks; the row-wise ones for all cells at once."""
        if bounds is None:
            bounds = [self._rows[c.key][1:] for c in cells]
        frame = part.frame
        columns = set(frame.columns)
        starts = np.array([a for a, _ in bounds], dtype=np.int64)
        rows = np.array([b - a for a, b in bounds], dtype=np.int64)
        idx = span_rows(starts, rows)  # every cell's rows
        ok = rows > 0
        ok &= [{"study", "variant", "seed", *c.columns} <= columns for c in cells]
        if ok.any() and {"study", "variant", "seed"} <= columns:
            file = np.repeat(np.arange(len(cells)), rows)
            study = frame["study"].to_numpy()[idx] == np.repeat(np.array([c.study for c in cells], dtype=object), rows)
            variant = (frame["variant"].to_numpy()[idx]
                       == np.repeat(np.array([c.variant for c in cells], dtype=object), rows))
            seed = (pd.to_numeric(frame["seed"], errors="coerce").to_numpy()[idx]
                    == np.repeat(np.array([c.seed for c in cells]), rows))
            ok &= np.bincount(file[~(study & variant & seed)], minlength=len(cells)) == 0
        out = ok.tolist()
        if self.complete is not None:
            todo = [i for i, good in enumerate(out) if good]
            many = getattr(self.complete, "many", None)
            if many is not None and todo:
                for i, good in zip(todo, many([cells[i] for i in todo], frame, [bounds[i] for i in todo])):
                    out[i] = bool(good)
            else:
                for i in todo:
                    a, b = bounds[i]
                    out[i] = bool(self.complete(cells[i], frame.iloc[a:b]))
        return out

    def _keep(self, part: _Part, cells: list[Cell], checked: bool,
              bounds: list[tuple[int, int]] | None = None) -> None:
        for i, c in enumerate(cells):
            self._rows[c.key] = (part, *(bounds[i] if bounds is not None else (0, len(part.frame))))
            if checked:
                self._checked.add(c.key)

    # -- the table

    def table(self, cells: Sequence[Cell]) -> pd.DataFrame:
        """The tidy table of ``cells`` (all read: finished or just computed): their tables
        concatenated in order, as ``pd.concat`` of the files read one by one gives it."""
        if not cells:
            return pd.DataFrame()
        missing = [c.variant for c in cells if c.key not in self._rows]
        if missing:
            raise ValueError(f"cells not read: {missing[:3]}")
        wanted = {c.key for c in cells}
        clean = {}  # per parse: whether all its rows are of wanted cells
        for key in wanted:
            part = self._rows[key][0]
            if id(part) not in clean:
                clean[id(part)] = self._only(part, wanted)
        stray = [c for c in cells if not clean[id(self._rows[c.key][0])]]
        if stray:  # their parse holds rows of other cells (or older tables), which may have typed a column
            self._reread(stray)
        parts = list({id(self._rows[c.key][0]): self._rows[c.key][0] for c in cells}.values())
        if not _concat_types_agree(parts):
            self._reread([c for c in cells if len(self._rows[c.key][0].keys) > 1])
            parts = list({id(self._rows[c.key][0]): self._rows[c.key][0] for c in cells}.values())
        offset, at = 0, {}
        for part in parts:
            at[id(part)] = offset
            offset += len(part.frame)
        spans = [self._rows[c.key] for c in cells]
        starts = np.array([at[id(part)] + a for part, a, _ in spans], dtype=np.int64)
        rows = np.array([b - a for _, a, b in spans], dtype=np.int64)
        idx = span_rows(starts, rows)
        whole = pd.concat([p.frame for p in parts], ignore_index=True) if len(parts) > 1 else parts[0].frame
        columns = list(dict.fromkeys(name for part in parts for name in part.frame.columns))  # as pd.concat
        return whole.take(idx).reset_index(drop=True)[columns]

    def _only(self, part: _Part, wanted: set[str]) -> bool:
        """Whether every row of ``part`` belongs to a cell in ``wanted`` whose table it still is."""
        return all(k in wanted and (k in self._rows and self._rows[k][0] is part) for k in part.keys)

    def _reread(self, cells: list[Cell]) -> None:
        """Read the files of ``cells`` again, each alone (keeping whether they passed the checks)."""
        for c in cells:
            frame = _parse_cell(_cell_path(self.out_dir, c).read_bytes())
            self._rows[c.key] = (_Part(frame, [c.key]), 0, len(frame))


def _chunk_rows(head: bytes) -> int:
    """Rows above which ``pd.read_csv`` (low_memory) types a file of this header chunk by chunk,
    halved: a longer file is parsed alone, as it would be."""
    heuristic = (1 << 20) // max(1, head.count(b",") + 1)
    lines = 1
    while lines * 2 < heuristic:
        lines *= 2
    return max(1, lines // 2)


def _concat_types_agree(parts: list[_Part]) -> bool:
    """Whether concatenating ``parts`` types every column as concatenating their files one by one
    would: per column, the parts agree on its dtype, or they are all int64 or float64."""
    seen: dict[str, set[str]] = {}
    for p in parts:
        for name, dtype in p.frame.dtypes.items():
            seen.setdefault(name, set()).add(str(dtype))
    return all(len(d) == 1 or d <= {"int64", "float64"} for d in seen.values())


def run_sweep(cells: Sequence[Cell], worker: Callable[[Cell], list[dict[str, Any]]], out_dir: str | os.PathLike,
              name: str, workers: int | None = None, progress: bool = True,
              complete: CellCheck | None = None, tables: CellTables | None = None,
              batch_worker: BatchWorker | None = None, batch_key: Callable[[Cell], Hashable | None] | None = None,
              max_batch: int = 256, write_table: bool = True) -> pd.DataFrame:
    """Run every unfinished cell with ``worker`` (a picklable module-level function) in a
    process pool of ``workers`` processes (default and at most: the usable CPUs), then write and
    return the tidy table ``out_dir/<name>.csv`` (cell rows plus ``study``, ``variant``, the
    cells' columns and ``seed``; see :func:`cell_frame`). A cell is finished when
    :func:`load_cell`'s checks accept its file (with the sweep's own check ``complete``); any
    other cell file is computed again. ``tables``: the :class:`CellTables` of ``out_dir`` (with
    ``complete``) that earlier calls read, so that no file is read twice (default: a new one).

    ``batch_worker``: run the unfinished cells in batches through it (see the module docstring):
    cells with the same ``batch_key(cell)`` (default: all) share batches of at most ``max_batch``
    cells; a cell whose key is None runs alone through ``worker``.

    ``write_table``: False leaves ``out_dir/<name>.csv`` unwritten (a caller that grows one sweep
    over several calls writes the last table itself, instead of every intermediate one).

    Returns the table of *all* ``cells`` (finished earlier or now).
    """
    if batch_worker is None and batch_key is not None:
        raise ValueError("batch_key is given without a batch_worker")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    out = Path(out_dir)
    if tables is None:
        tables = CellTables(out, complete)
    elif tables.out_dir.resolve() != out.resolve() or tables.complete is not complete:
        raise ValueError(f"tables read {tables.out_dir} with another check; this sweep is in {out}")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate cells in sweep")
    todo = [c for c, done in zip(cells, tables.finished(cells)) if not done]
    damaged = sum(_cell_path(out, c).exists() for c in todo)
    if damaged:
        print(f"{name}: {damaged} cell file(s) in {out / 'cells'} are empty, cut short or damaged; computing them "
              "again", file=sys.stderr, flush=True)
    units = (_plan_batches(todo, batch_key, max_batch, min(workers or usable_cpus(), usable_cpus()))
             if batch_worker is not None else [([c], False) for c in todo])
    workers = max(1, min(workers or usable_cpus(), usable_cpus(), len(units) or 1))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=name, unit="run")
    _run_units(units, worker, batch_worker, out, workers, bar, cells, complete, tables)
    _close(bar)
    tables.read_new(todo)
    table = tables.table(cells)
    if write_table:
        write_csv_atomic(out / f"{name}.csv", table)
    return table


def _run_units(units: list[_Unit], worker: Callable[[Cell], list[dict[str, Any]]], batch_worker: BatchWorker | None,
               out: Path, workers: int, bar, cells: Sequence[Cell], complete: CellCheck | None,
               tables: CellTables) -> None:
    """Run the batches and lone cells ``units`` of a sweep: in this process when
    ``workers`` is 1, else in a pool of ``workers`` processes, counting runs on ``bar`` as their
    files are written (in a pool: seen when each batch ends, and every :data:`PROGRESS_POLL_S`
    for the batches running)."""
    def paths(batch: list[Cell]) -> list[str]:
        return [str(_cell_path(out, c)) for c in batch]

    if workers == 1:
        import torch
        threads = torch.get_num_threads()
        count = (lambda _cell: bar.update()) if bar else None
        try:
            try:
                for batch, batched in units:
                    if batched:
                        _run_batch(batch_worker, batch, paths(batch), count)
                    else:
                        _run_one(worker, batch[0], paths(batch)[0])
                        if bar:
                            bar.update()
            finally:
                torch.set_num_threads(threads)  # the runs pin one thread; give the caller its own back
        except KeyboardInterrupt:
            _close(bar)
            raise Interrupted(_kept(cells, out, complete, tables)) from None
        return
    if not units:
        return
    before = {c.key: _file_id(_cell_path(out, c)) for batch, _ in units for c in batch} if bar else {}
    counted: set[str] = set()

    def count(batch: list[Cell], finished: bool) -> None:
        new = [c for c in batch if c.key not in counted
               and (finished or _file_id(_cell_path(out, c)) != before[c.key])]
        counted.update(c.key for c in new)
        if new:
            bar.update(len(new))

    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        # the first submit forks every worker: a Ctrl-C or SIGTERM raised in Python's fork hooks
        # would be printed and dropped, so they are held back and delivered right after
        with signals_held():
            futures: dict[Future, _Unit] = {
                (pool.submit(_run_batch, batch_worker, batch, paths(batch)) if batched
                 else pool.submit(_run_one, worker, batch[0], paths(batch)[0])): (batch, batched)
                for batch, batched in units}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=PROGRESS_POLL_S if bar else None, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
                if bar:
                    count(futures[f][0], True)
            if bar:
                for f in pending:
                    if futures[f][1] and f.running():
                        count(futures[f][0], False)
    except KeyboardInterrupt:
        _stop_pool(pool)
        _close(bar)
        raise Interrupted(_kept(cells, out, complete, tables)) from None
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def run_parallel(calls: Sequence[tuple[Callable[..., Any], tuple]], workers: int | None = None) -> list[Any]:
    """``[f(*args) for f, args in calls]``, the calls shared among a pool of ``workers`` processes
    (default and at most: the usable CPUs; one, or a single call, runs them here). Each ``f`` is
    a module-level function; arguments and results travel between this process and its forked
    workers by pickling (never through a file). A call's exception is raised here, after the
    pool is stopped; Ctrl-C and SIGTERM are this process's to handle, as in a sweep. The workers
    are forked: calls that run torch operations belong before this process has used torch's
    intra-op threads (a forked child can hang in an OpenMP pool its parent started), so the map
    hands its pools tables and figures, never training."""
    workers = max(1, min(workers or usable_cpus(), usable_cpus(), len(calls)))
    if workers == 1:
        return [f(*args) for f, args in calls]
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        with signals_held():  # the first submit forks every worker (see _run_units)
            futures = [pool.submit(f, *args) for f, args in calls]
        results = [f.result() for f in futures]
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return results


def _close(bar) -> None:
    """Close the progress bar (if any), so that a message after it starts on its own line."""
    if bar is not None:
        bar.close()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` now: cancel queued cells and kill running workers (an abandoned cell
    leaves no file: cells are written atomically)."""
    procs = list(getattr(pool, "_processes", {}).values())  # no public API to kill workers before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.kill()
    for p in procs:
        p.join(5)
    # the pool's manager thread closes its wake-up pipe as it ends: wait for it, or the
    # interpreter's exit hook for pools (concurrent.futures.process._python_exit) can write to that
    # pipe while it is being closed and print an "Exception ignored ... Bad file descriptor"
    # traceback after the one-line message
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(2)


def _kept(cells: Sequence[Cell], out: Path, complete: CellCheck | None = None,
          tables: CellTables | None = None) -> str:
    """What an interrupted sweep kept, in one line (``tables``: what the sweep has read already)."""
    done = (tables or CellTables(out, complete)).count_finished(cells)
    return f"{done} of {len(cells)} runs are finished and kept in {out / 'cells'}; rerun the same command to resume"


def cells_done(cells: Sequence[Cell], out_dir: str | os.PathLike, complete: CellCheck | None = None,
               tables: CellTables | None = None) -> int:
    """How many of ``cells`` are finished in ``out_dir`` (their file holds their whole result:
    :func:`load_cell`'s checks); ``tables``: the :class:`CellTables` of ``out_dir`` to read
    through (a file it has read is not read again)."""
    return (tables or CellTables(out_dir, complete)).count_finished(cells)
