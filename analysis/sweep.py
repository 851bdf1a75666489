"""Sweeps: run a grid of cells on all cores, resumable, with tidy atomic tables.

A :class:`Cell` is one run (study, variant label, seed and JSON-able parameters). Its result is a
list of tidy rows (one per step), stored as ``DIR/cells/<key>.csv`` the moment the cell finishes
(atomic write), so a re-run in the same directory skips every finished cell. The table of the
whole sweep, ``DIR/<name>.csv``, is rebuilt from the cell files at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from deepgrpo.records import write_csv_atomic


@dataclass(frozen=True)
class Cell:
    """One run of a sweep.

    study: the study's name; variant: a label for the configuration (e.g. ``gamma=2``);
    seed: the run seed (paired across variants); params: JSON-able run parameters (e.g.
    ``{"method": "deep-grpo", "algo": {...}, "spec": {...}, "runner": {...}}``).
    """

    study: str
    variant: str
    seed: int
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """Stable file name for this cell: a hash of everything that defines the run."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return f"{self.variant}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}".replace("/", "_")


def _cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.key}.csv"


def _run_one(worker: Callable[[Cell], list[dict[str, Any]]], cell: Cell, path: str) -> int:
    import torch
    torch.set_num_threads(1)  # one process per core
    rows = worker(cell)
    frame = pd.DataFrame(rows)
    frame.insert(0, "variant", cell.variant)
    frame.insert(0, "study", cell.study)
    if "seed" not in frame:
        frame["seed"] = cell.seed
    write_csv_atomic(path, frame)
    return len(rows)


def run_sweep(cells: Sequence[Cell], worker: Callable[[Cell], list[dict[str, Any]]], out_dir: str | os.PathLike,
              name: str, workers: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every unfinished cell with ``worker`` (a picklable module-level function) in a
    process pool of ``workers`` processes (default: all cores), then write and return the
    tidy table ``out_dir/<name>.csv`` (cell rows plus ``study``, ``variant``, ``seed``).

    Returns the table of *all* ``cells`` (finished earlier or now).
    """
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate cells in sweep")
    todo = [c for c in cells if not _cell_path(out, c).exists()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=name, unit="run")
    if workers == 1:
        for c in todo:
            _run_one(worker, c, str(_cell_path(out, c)))
            if bar:
                bar.update()
    elif todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_run_one, worker, c, str(_cell_path(out, c))) for c in todo]
            for f in as_completed(futures):
                f.result()
                if bar:
                    bar.update()
    if bar:
        bar.close()
    table = pd.concat([pd.read_csv(_cell_path(out, c)) for c in cells], ignore_index=True) if cells else pd.DataFrame()
    write_csv_atomic(out / f"{name}.csv", table)
    return table


def cells_done(cells: Sequence[Cell], out_dir: str | os.PathLike) -> int:
    """How many of ``cells`` already have a result file in ``out_dir``."""
    return sum(_cell_path(Path(out_dir), c).exists() for c in cells)
