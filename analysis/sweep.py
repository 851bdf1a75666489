"""Sweeps: run a grid of cells on all cores, resumable, with tidy atomic tables.

A :class:`Cell` is one run (study, variant label, seed, JSON-able run parameters and the study
parameters that define it, as named scalar *columns*). Its result is a list of tidy rows (one
per step), stored with the cell's columns as ``DIR/cells/<key>.csv`` the moment the cell
finishes (atomic write), so a re-run in the same directory skips every finished cell. A cell
counts as finished only if its file is whole: it parses, ends with a full line, has the
columns of the cell and at least one row, every row names the cell's study, variant and seed,
and the sweep's own check (``complete``, e.g. "the run reached its budget") accepts it; any
other file (empty, cut short, damaged) is computed again. The table of the whole sweep,
``DIR/<name>.csv``, is rebuilt from the cell files at the end.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from deepgrpo.records import Interrupted, write_csv_atomic

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

    @property
    def key(self) -> str:
        """Stable file name for this cell: a hash of everything that defines the run."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
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


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals :func:`_signals_held` holds back."""


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the pool forks its workers, then deliver one that
    arrived to the handler it was meant for. An exception raised while Python runs its fork
    hooks is printed and dropped ("Exception ignored"), so a Ctrl-C landing in a fork would be
    lost and the sweep would go on; held back, it stops the sweep right after the fork."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in HELD_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            s, handler = caught[0], previous[caught[0]]
            if callable(handler):
                handler(s, None)  # Ctrl-C: KeyboardInterrupt; SIGTERM under `deepgrpo`: Terminated
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


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
    write_csv_atomic(path, cell_frame(cell, rows))
    return len(rows)


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


CellCheck = Callable[[Cell, pd.DataFrame], bool]
"""A sweep's own test that a cell's table is its whole result (e.g. the run reached its budget)."""


def load_cell(out_dir: str | os.PathLike, cell: Cell, complete: CellCheck | None = None) -> pd.DataFrame | None:
    """The table of ``cell`` from its file in ``out_dir`` if the file holds the cell's whole
    result (see the module docstring), else None (missing, empty, cut short or damaged: the
    cell is to be computed again)."""
    path = _cell_path(Path(out_dir), cell)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return None
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # cut in the middle of a line
                return None
        frame = pd.read_csv(path, dtype={"study": str, "variant": str})
    except (OSError, ValueError, UnicodeDecodeError):  # missing, unreadable or not a table (pandas: ValueError)
        return None
    needed = {"study", "variant", "seed", *cell.columns}
    if len(frame) == 0 or not needed <= set(frame.columns):
        return None
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    if not ((frame["study"] == cell.study).all() and (frame["variant"] == cell.variant).all()
            and (seeds == cell.seed).all()):
        return None
    if complete is not None and not complete(cell, frame):
        return None
    return frame


def run_sweep(cells: Sequence[Cell], worker: Callable[[Cell], list[dict[str, Any]]], out_dir: str | os.PathLike,
              name: str, workers: int | None = None, progress: bool = True,
              complete: CellCheck | None = None) -> pd.DataFrame:
    """Run every unfinished cell with ``worker`` (a picklable module-level function) in a
    process pool of ``workers`` processes (default and at most: the usable CPUs), then write and
    return the tidy table ``out_dir/<name>.csv`` (cell rows plus ``study``, ``variant``, the
    cells' columns and ``seed``; see :func:`cell_frame`). A cell is finished when
    :func:`load_cell` accepts its file (with the sweep's own check ``complete``); any other
    cell file is computed again.

    Returns the table of *all* ``cells`` (finished earlier or now).
    """
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate cells in sweep")
    done = {c.key: frame for c in cells if (frame := load_cell(out, c, complete)) is not None}
    todo = [c for c in cells if c.key not in done]
    damaged = sum(_cell_path(out, c).exists() for c in todo)
    if damaged:
        print(f"{name}: {damaged} cell file(s) in {out / 'cells'} are empty, cut short or damaged; computing them "
              "again", file=sys.stderr, flush=True)
    workers = max(1, min(workers or usable_cpus(), usable_cpus(), len(todo) or 1))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=name, unit="run")
    if workers == 1:
        import torch
        threads = torch.get_num_threads()
        try:
            try:
                for c in todo:
                    _run_one(worker, c, str(_cell_path(out, c)))
                    if bar:
                        bar.update()
            finally:
                torch.set_num_threads(threads)  # _run_one pins one thread; give the caller its own back
        except KeyboardInterrupt:
            _close(bar)
            raise Interrupted(_kept(cells, out, complete)) from None
    elif todo:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
        try:
            with _signals_held():  # the first submit forks every worker
                futures = [pool.submit(_run_one, worker, c, str(_cell_path(out, c))) for c in todo]
            for f in as_completed(futures):
                f.result()
                if bar:
                    bar.update()
        except KeyboardInterrupt:
            _stop_pool(pool)
            _close(bar)
            raise Interrupted(_kept(cells, out, complete)) from None
        except BaseException:
            _stop_pool(pool)
            raise
        pool.shutdown(wait=True)
    _close(bar)
    frames = [done[c.key] if c.key in done else pd.read_csv(_cell_path(out, c), dtype={"study": str, "variant": str})
              for c in cells]
    table = pd.concat(frames, ignore_index=True) if cells else pd.DataFrame()
    write_csv_atomic(out / f"{name}.csv", table)
    return table


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


def _kept(cells: Sequence[Cell], out: Path, complete: CellCheck | None = None) -> str:
    """What an interrupted sweep kept, in one line."""
    return (f"{cells_done(cells, out, complete)} of {len(cells)} runs are finished and kept in {out / 'cells'}; "
            f"rerun the same command to resume")


def cells_done(cells: Sequence[Cell], out_dir: str | os.PathLike, complete: CellCheck | None = None) -> int:
    """How many of ``cells`` are finished in ``out_dir`` (their file holds their whole result:
    :func:`load_cell`)."""
    return sum(load_cell(out_dir, c, complete) is not None for c in cells)
