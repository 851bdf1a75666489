"""Batched sweeps (``run_sweep(..., batch_worker=...)``): the same cell files and table as one cell
at a time, resume, batch sizes and groups, lone cells, the pool, and batch workers that break the
contract. The workers log each call as one file in a side directory named in the cells'
parameters (pool workers are other processes)."""

import json
import os
import random
import uuid
from pathlib import Path

import pytest

from analysis.sweep import Cell, cells_done, run_sweep, usable_cpus
from deepgrpo.records import Interrupted


def _rows(cell: Cell) -> list[dict]:
    x = cell.params["x"]
    return [{"step": t, "value": x * t / 7 + cell.seed * 0.1, "tag": f"s{cell.seed}"}
            for t in range(1 + cell.seed % 3)]


def _log(cell: Cell, kind: str, batch: list[Cell]) -> None:
    log = Path(cell.params["log"])
    log.mkdir(parents=True, exist_ok=True)
    entry = {"kind": kind, "pid": os.getpid(), "cells": [[c.variant, c.seed] for c in batch]}
    (log / f"{uuid.uuid4().hex}.json").write_text(json.dumps(entry))


def single_worker(cell: Cell) -> list[dict]:
    _log(cell, "single", [cell])
    return _rows(cell)


def batch_worker(cells: list[Cell], done) -> None:
    _log(cells[0], "batch", cells)
    order = list(cells)
    random.Random(sum(c.seed for c in cells) + len(cells)).shuffle(order)
    for c in order:
        done(c, _rows(c))


def forgetful_batch_worker(cells: list[Cell], done) -> None:
    for c in cells[:-1]:
        done(c, _rows(c))


def stranger_batch_worker(cells: list[Cell], done) -> None:
    done(cells[0], _rows(cells[0]))
    stranger = Cell(cells[0].study, "stranger", 99, dict(cells[0].params), dict(cells[0].columns))
    done(stranger, _rows(stranger))


def twice_batch_worker(cells: list[Cell], done) -> None:
    done(cells[0], _rows(cells[0]))
    done(cells[0], _rows(cells[0]))


def interrupted_batch_worker(cells: list[Cell], done) -> None:
    for c in cells[:2]:
        done(c, _rows(c))
    raise KeyboardInterrupt


def calls(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(p.read_text()) for p in sorted(log.glob("*.json"))]


def batches(log: Path) -> list[list[list]]:
    """The batch compositions logged, in a canonical order (pool calls finish in any order)."""
    return sorted((e["cells"] for e in calls(log) if e["kind"] == "batch"), key=lambda b: b[0][1])


def make_cells(log: Path, seeds=range(6), rules=("dense",)) -> list[Cell]:
    return [Cell("s", f"{rule}", seed, {"x": 1 + i, "log": str(log)}, {"rule": rule, "M": 1 + i})
            for i, rule in enumerate(rules) for seed in seeds]


def by_rule(cell: Cell):
    return cell.columns["rule"]


def test_batched_sweep_writes_the_same_table_as_one_cell_at_a_time(tmp_path):
    cells = make_cells(tmp_path / "log", seeds=range(5), rules=("dense", "uniform"))
    plain = run_sweep(cells, single_worker, tmp_path / "plain", "runs", workers=1, progress=False)
    batched = run_sweep(cells, single_worker, tmp_path / "batched", "runs", workers=1, progress=False,
                        batch_worker=batch_worker, batch_key=by_rule)
    assert (tmp_path / "batched" / "runs.csv").read_bytes() == (tmp_path / "plain" / "runs.csv").read_bytes()
    assert batched.equals(plain) and len(plain) == sum(1 + s % 3 for s in range(5)) * 2
    for c in cells:
        name = f"cells/{c.key}.csv"
        assert (tmp_path / "batched" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    kinds = [e["kind"] for e in calls(tmp_path / "log")]
    assert kinds.count("single") == 10 and kinds.count("batch") == 2  # one batch per rule
    assert not list(tmp_path.rglob("*.tmp"))


def test_batched_sweep_resumes_and_runs_only_unfinished_cells(tmp_path):
    log = tmp_path / "log"
    cells = make_cells(log, seeds=range(4))
    first = run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
                      batch_worker=batch_worker, batch_key=by_rule)
    assert batches(log) == [[["dense", s] for s in range(4)]]
    table = (tmp_path / "out" / "runs.csv").read_bytes()
    for p in log.glob("*.json"):
        p.unlink()
    again = run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
                      batch_worker=batch_worker, batch_key=by_rule)
    assert calls(log) == [] and again.equals(first) and (tmp_path / "out" / "runs.csv").read_bytes() == table
    # one cell's file damaged, two cells added: those three run, in one batch, in the cells' order
    (tmp_path / "out" / "cells" / f"{cells[1].key}.csv").write_text("study,variant\ns,den")
    more = cells + make_cells(log, seeds=(4, 5))
    run_sweep(more, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
              batch_worker=batch_worker, batch_key=by_rule)
    assert batches(log) == [[["dense", 1], ["dense", 4], ["dense", 5]]]
    assert cells_done(more, tmp_path / "out") == 6


def test_max_batch_and_groups_are_honoured_and_cells_keyed_none_run_alone(tmp_path):
    log = tmp_path / "log"
    cells = [c for pair in zip(make_cells(log, range(7), ("dense",)), make_cells(log, range(7), ("uniform",)))
             for c in pair]  # the two groups interleaved
    cells += [Cell("s", "alone", seed, {"x": 0, "log": str(log)}, {"rule": "alone", "M": 0}) for seed in (0, 1)]

    def key(cell):  # not picklable: batch keys are computed in the sweep's process
        return None if cell.columns["rule"] == "alone" else cell.columns["rule"]

    plain = run_sweep(cells, single_worker, tmp_path / "plain", "runs", workers=1, progress=False)
    for p in log.glob("*.json"):
        p.unlink()
    run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
              batch_worker=batch_worker, batch_key=key, max_batch=3)
    # 7 cells per group, at most 3 per batch: 3 equal batches (3, 2, 2), in the cells' order
    dense = [[["dense", s] for s in seeds] for seeds in ((0, 1, 2), (3, 4), (5, 6))]
    uniform = [[["uniform", s] for s in seeds] for seeds in ((0, 1, 2), (3, 4), (5, 6))]
    logged = calls(log)
    got = sorted((e["cells"] for e in logged if e["kind"] == "batch"), key=lambda b: (b[0][0], b[0][1]))
    assert got == dense + uniform
    assert sorted(e["cells"] for e in logged if e["kind"] == "single") == [[["alone", 0]], [["alone", 1]]]
    assert (tmp_path / "out" / "runs.csv").read_bytes() == (tmp_path / "plain" / "runs.csv").read_bytes()
    assert len(plain) > 0


@pytest.mark.skipif(usable_cpus() < 2, reason="a pool of two workers needs two usable CPUs")
def test_batched_sweep_in_a_pool_of_two_splits_a_group_and_gives_the_same_table(tmp_path):
    log = tmp_path / "log"
    cells = make_cells(log, seeds=range(6)) + [
        Cell("s", "alone", 0, {"x": 0, "log": str(log)}, {"rule": "alone", "M": 0})]
    plain = run_sweep(cells, single_worker, tmp_path / "plain", "runs", workers=1, progress=False)
    for p in log.glob("*.json"):
        p.unlink()

    pooled = run_sweep(cells, single_worker, tmp_path / "pool", "runs", workers=2, progress=True,
                       batch_worker=batch_worker, batch_key=_none_for_alone)
    assert (tmp_path / "pool" / "runs.csv").read_bytes() == (tmp_path / "plain" / "runs.csv").read_bytes()
    assert pooled.equals(plain)
    logged = calls(log)
    # 7 cells on 2 workers: batches of at most ceil(7 / 2) = 4: the 6 cells of the group in 2 of 3
    assert batches(log) == [[["dense", s] for s in (0, 1, 2)], [["dense", s] for s in (3, 4, 5)]]
    assert [e["cells"] for e in logged if e["kind"] == "single"] == [[["alone", 0]]]
    assert all(e["pid"] != os.getpid() for e in logged)  # every run in a pool process


def _none_for_alone(cell: Cell):
    return None if cell.columns["rule"] == "alone" else cell.columns["rule"]


def test_a_batch_worker_that_forgets_a_cell_raises_naming_it_and_keeps_the_others(tmp_path):
    cells = make_cells(tmp_path / "log", seeds=range(3))
    with pytest.raises(RuntimeError, match=r"returned without reporting 1 of its 3 cell\(s\): s/dense seed 2 \(") as e:
        run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
                  batch_worker=forgetful_batch_worker)
    assert cells[2].key in str(e.value)
    assert cells_done(cells, tmp_path / "out") == 2 and not (tmp_path / "out" / "runs.csv").exists()
    run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False, batch_worker=batch_worker)
    assert batches(tmp_path / "log") == [[["dense", 2]]]


@pytest.mark.skipif(usable_cpus() < 2, reason="a pool of two workers needs two usable CPUs")
def test_a_batch_worker_that_forgets_a_cell_in_a_pool_raises(tmp_path):
    cells = make_cells(tmp_path / "log", seeds=range(4))
    with pytest.raises(RuntimeError, match=r"returned without reporting 1 of its 2 cell\(s\): s/dense seed [13] "):
        run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=2, progress=False,
                  batch_worker=forgetful_batch_worker)
    assert not (tmp_path / "out" / "runs.csv").exists()


@pytest.mark.parametrize("bad, message", [(stranger_batch_worker, r"reported cell s/stranger seed 99 \(.*\), which "
                                           r"is not in its batch of 3 cell\(s\)"),
                                          (twice_batch_worker, r"reported cell s/dense seed 0 \(.*\) twice")])
def test_a_batch_worker_that_reports_a_cell_not_its_own_or_twice_raises(tmp_path, bad, message):
    cells = make_cells(tmp_path / "log", seeds=range(3))
    with pytest.raises(RuntimeError, match=message):
        run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False, batch_worker=bad)
    assert cells_done(cells, tmp_path / "out") == 1


def test_ctrl_c_in_a_batch_keeps_the_reported_cells_and_says_so(tmp_path):
    cells = make_cells(tmp_path / "log", seeds=range(5))
    with pytest.raises(Interrupted, match=r"^2 of 5 runs are finished and kept in .*cells; rerun the same command"):
        run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
                  batch_worker=interrupted_batch_worker)
    assert cells_done(cells, tmp_path / "out") == 2 and not (tmp_path / "out" / "runs.csv").exists()


def test_batch_arguments_are_checked(tmp_path):
    cells = make_cells(tmp_path / "log", seeds=range(2))
    with pytest.raises(ValueError, match="batch_key is given without a batch_worker"):
        run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False, batch_key=by_rule)
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        run_sweep(cells, single_worker, tmp_path / "out", "runs", workers=1, progress=False,
                  batch_worker=batch_worker, max_batch=0)
    assert calls(tmp_path / "log") == []


def _square_with_pid(x: int) -> tuple[int, int]:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x, os.getpid()


def test_run_parallel_returns_every_call_in_order_from_the_pool_and_raises_a_calls_error():
    from analysis.sweep import run_parallel
    calls = [(_square_with_pid, (x,)) for x in range(7)]
    here = run_parallel(calls, workers=1)
    assert [r for r, _ in here] == [x * x for x in range(7)] and {p for _, p in here} == {os.getpid()}
    if usable_cpus() > 1:
        pooled = run_parallel(calls, workers=2)
        assert [r for r, _ in pooled] == [x * x for x in range(7)] and os.getpid() not in {p for _, p in pooled}
    with pytest.raises(ValueError, match="negative: -3"):
        run_parallel([*calls, (_square_with_pid, (-3,))], workers=2)
