"""Cell files of a sweep (:func:`analysis.sweep.write_cell`): formatted directly (no DataFrame) and
written in a few system calls, yet byte for byte what ``write_csv_atomic(path, cell_frame(cell,
rows))`` (the pandas path, kept as the reference and the fallback) writes; the pandas path is
taken wherever the shortcut does not know the answer; atomic, and a failure names the file."""

from __future__ import annotations

import datetime
import decimal
import enum
import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analysis.sweep as sweep
import deepgrpo.records as records
from analysis.sweep import Cell, CellTables, cell_csv, cell_frame, load_cell, run_sweep, write_cell
from deepgrpo.records import describe_os_error, write_csv_atomic

NAN = float("nan")
INF = float("inf")
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def pandas_bytes(path: Path, cell: Cell, rows: list[dict]) -> bytes:
    """What the pandas path writes for ``cell`` (the reference)."""
    write_csv_atomic(path, cell_frame(cell, rows))
    return path.read_bytes()


def fast_bytes(path: Path, cell: Cell, rows: list[dict]) -> bytes:
    write_cell(path, cell, rows)
    return path.read_bytes()


def outcome(write, path: Path, cell: Cell, rows: list[dict]) -> tuple[str, object]:
    """The bytes a writer leaves, or the error it raises (type and message)."""
    try:
        return "bytes", write(path, cell, rows)
    except Exception as e:  # noqa: BLE001 - compared between the two paths
        return "error", (type(e), str(e))


def assert_same_files(d: Path, cell: Cell, rows: list[dict]) -> bytes:
    """The pandas path and write_cell write the same bytes; returns them."""
    ref = pandas_bytes(d / "pandas.csv", cell, rows)
    new = fast_bytes(d / "fast.csv", cell, rows)
    assert new == ref
    return new


# ------------------------------------------------------------------------------------------
# values a sweep writes

TRICKY_TEXT = ["", " ", ",", '"', "a,b", 'say "hi"', "two\nlines", "cr\rhere", "crlf\r\n", "nan", "NaN", "None",
               "True", "false", "1e5", "-0.0", "007", " padded ", "decay | h=2 | deep γ=0.5", "tab\there", "#",
               "'", "x\x00y", "\u2028"]
TRICKY_FLOATS = [0.0, -0.0, NAN, INF, -INF, 1e16, 9999999999999998.0, 1e-4, 9.999999999999999e-05, 1e-5, 5e-324,
                 1.7976931348623157e308, 0.1, 1 / 3, 123456789012345680.0, 2.0 ** 53, 16.0, -2.5e-300, 1e22]
TRICKY_INTS = [0, -1, 1, 2 ** 31, 2 ** 53 + 1, 3685993406, INT64_MAX, INT64_MIN]

texts = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=10))
floats = st.one_of(st.sampled_from(TRICKY_FLOATS), st.floats())
ints = st.one_of(st.sampled_from(TRICKY_INTS), st.integers(INT64_MIN, INT64_MAX), st.integers(-1000, 1000))

ATOMS = {
    "str": texts,
    "int": ints,
    "float": floats,
    "nan": st.just(NAN),
    "bool": st.booleans(),
    "none": st.none(),
    "np.float64": floats.map(np.float64),
    "np.int64": ints.map(np.int64),
    "np.int32": st.integers(-(2 ** 31), 2 ** 31 - 1).map(np.int32),
    "np.int16": st.integers(-(2 ** 15), 2 ** 15 - 1).map(np.int16),
    "np.bool_": st.booleans().map(np.bool_),
}
"""The value types a sweep writes; the fast path must handle every column made of them."""


@st.composite
def column_values(draw, n: int) -> list:
    """``n`` values of one column: of one type (most columns) or a mix of two or three."""
    kinds = draw(st.lists(st.sampled_from(sorted(ATOMS)), min_size=1, max_size=3, unique=True))
    return draw(st.lists(st.one_of(*(ATOMS[k] for k in kinds)), min_size=n, max_size=n))


CELL_VALUES = st.one_of(texts, ints, floats, st.booleans(), st.none(), floats.map(np.float64))
"""What a Cell's columns hold (str, int, float, bool, None)."""


@st.composite
def cells_and_rows(draw) -> tuple[Cell, list[dict]]:
    """A cell (columns of every kind it allows) and its rows: each row the same keys, in the
    first row's order or shuffled (as a simulator's history has them), ``seed`` sometimes a
    row column."""
    cell_names = draw(st.lists(st.one_of(st.sampled_from(["N", "gamma", "lr", "a,b", 'q"t']), st.text(max_size=6)),
                               max_size=4, unique=True).map(lambda ns: [x for x in ns if x not in ("study", "variant",
                                                                                                   "seed")]))
    columns = {name: draw(CELL_VALUES) for name in cell_names}
    cell = Cell(draw(st.sampled_from(["regime-map", "study, with comma"])), draw(texts), draw(st.integers(0, 2 ** 40)),
                {}, columns)
    names = draw(st.lists(st.one_of(st.sampled_from(["step", "pass1", "method", "seed", "x\ny"]), st.text(max_size=6)),
                          max_size=6, unique=True))
    names = [x for x in names if x not in ("study", "variant", *columns)]
    n = draw(st.integers(1, 6))
    values = {name: draw(column_values(n)) for name in names}
    rows = []
    for i in range(n):
        order = names if i == 0 or not draw(st.booleans()) else draw(st.permutations(names))
        rows.append({name: values[name][i] for name in order})
    return cell, rows


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cell-files")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells_and_rows())
def test_the_fast_path_writes_the_bytes_of_the_pandas_path(scratch, case):
    cell, rows = case
    data = cell_csv(cell, rows)
    assert data is not None, "the fast path fell back on values a sweep writes"
    ref = pandas_bytes(scratch / "pandas.csv", cell, rows)
    assert data == ref
    assert fast_bytes(scratch / "fast.csv", cell, rows) == ref


def test_every_kind_of_column_alone_and_mixed(scratch):
    """Each value type, and each pair, in a column of its own: the cases pandas types apart
    (int64, float64 from ints and None, bool, object, str with missing values)."""
    samples = {"str": ["a", "b,c", ""], "int": [1, -2, INT64_MAX], "float": [0.5, NAN, -0.0],
               "nan": [NAN, NAN, NAN], "bool": [True, False, True], "none": [None, None, None],
               "np.float64": [np.float64(0.1), np.float64(NAN), np.float64(1e300)],
               "np.int64": [np.int64(3), np.int64(-4), np.int64(INT64_MIN)],
               "np.int32": [np.int32(7), np.int32(-8), np.int32(9)],
               "np.int16": [np.int16(255), np.int16(0), np.int16(-1)],
               "np.bool_": [np.True_, np.False_, np.True_]}
    assert set(samples) == set(ATOMS)
    kinds = sorted(samples)
    rows = [{} for _ in range(3)]
    for a in kinds:
        for b in kinds:
            for i in range(3):
                rows[i][f"{a}+{b}"] = samples[a][i] if i != 1 else samples[b][i]
    cell = Cell("s", "v", 4, {}, {"g": 2.0, "name": "deep γ=2", "flag": True, "none": None, "n": 3, "x": NAN})
    assert cell_csv(cell, rows) is not None
    assert_same_files(scratch, cell, rows)


# ------------------------------------------------------------------------------------------
# simulator histories, and reading them back


def sim_histories() -> list[list[dict]]:
    from deepgrpo import method_config
    from sims.runner import RunnerConfig, train
    from sims.spec import TokenTreeSpec
    spec = TokenTreeSpec(n_problems=4, n_heldout=2)
    return [train(spec, method_config(m), RunnerConfig(steps=3, batch_problems=2), seed=s).history
            for m, s in (("deep-grpo", 0), ("grpo", 1))]


def sim_cells() -> list[Cell]:
    columns = {"spread": "h=2", "recovery": "decay", "learner": "tabular/adam", "name": "deep γ=2",
               "family": "gamma", "lr": 0.8, "budget": 2000, "budget_unit": "tokens"}
    return [Cell("regime-map", f"h=2 | decay | tabular/adam | deep γ=2 #{i}", i, {}, columns) for i in range(2)]


def test_simulator_histories_are_written_byte_for_byte_and_read_back_alike(tmp_path):
    histories = sim_histories()
    cells = sim_cells()
    assert len(histories[0]) == 4 and len(histories[0][0]) > 30
    assert any(list(r) != list(histories[0][0]) for r in histories[0])  # the rows' keys come in other orders
    for cell, rows in zip(cells, histories):
        assert cell_csv(cell, rows) is not None
        ref = pandas_bytes(tmp_path / "ref" / "cells" / f"{cell.key}.csv", cell, rows)
        assert fast_bytes(tmp_path / "new" / "cells" / f"{cell.key}.csv", cell, rows) == ref
    for cell in cells:
        pd.testing.assert_frame_equal(load_cell(tmp_path / "new", cell), load_cell(tmp_path / "ref", cell))
    new, ref = CellTables(tmp_path / "new"), CellTables(tmp_path / "ref")
    assert new.finished(cells) == ref.finished(cells) == [True, True]
    pd.testing.assert_frame_equal(new.table(cells), ref.table(cells))
    assert sorted(p.name for p in (tmp_path / "new" / "cells").iterdir()) == sorted(f"{c.key}.csv" for c in cells)


def _history_worker(cell: Cell) -> list[dict]:
    return [{"step": i, "pass1": i / 3, "loss": NAN if i == 0 else -0.0, "tag": "a,b" if i else "x"}
            for i in range(3)]


def _history_batch(cells: list[Cell], done) -> None:
    for c in cells:
        done(c, _history_worker(c))


@pytest.mark.parametrize("batched", [False, True])
def test_sweeps_write_their_cells_without_pandas(tmp_path, monkeypatch, batched):
    """run_sweep writes each cell file through the fast path (cell_frame is not called), with the
    pandas path's bytes."""
    cells = [Cell("s", f"v{i}", i, {}, {"gamma": float(i)}) for i in range(3)]
    refs = {c.key: pandas_bytes(tmp_path / "ref.csv", c, _history_worker(c)) for c in cells}

    def no_pandas(*args, **kwargs):
        raise AssertionError("cell_frame called")

    monkeypatch.setattr(sweep, "cell_frame", no_pandas)
    run_sweep(cells, _history_worker, tmp_path / "out", "s", workers=1, progress=False,
              batch_worker=_history_batch if batched else None)
    for c in cells:
        assert (tmp_path / "out" / "cells" / f"{c.key}.csv").read_bytes() == refs[c.key]


# ------------------------------------------------------------------------------------------
# where the pandas path is taken


class Level(enum.IntEnum):
    LOW = 1


class Text(str):
    pass


FALLBACK_VALUES = {
    "np.float32": [np.float32(0.1), np.float32(2.5)],
    "np.float16": [np.float16(0.1), np.float16(1)],
    "int above int64": [2 ** 63, 1],
    "int below int64": [-(2 ** 63) - 1, 1],
    "int above int64 among floats": [2 ** 64, 0.5],
    "np.uint64": [np.uint64(2 ** 64 - 1), np.uint64(1)],
    "np.uint8 with np.int32": [np.uint8(3), np.int32(-1)],  # pandas: object
    "np.uint8 with int": [np.uint8(3), 1],  # pandas: uint64
    "np.uint32 with NaN": [np.uint32(3), NAN],
    "Decimal": [decimal.Decimal("0.1"), decimal.Decimal("NaN")],
    "datetime": [datetime.datetime(2024, 1, 1), datetime.datetime(2024, 1, 2)],
    "Timestamp": [pd.Timestamp("2024-01-01"), pd.Timestamp("2024-01-02")],
    "pd.NA": [pd.NA, 1],
    "list": [[1, 2], [3]],
    "IntEnum": [Level.LOW, Level.LOW],
    "str subclass": [Text("a"), "b"],
    "np.str_": [np.str_("a"), "b"],
    "surrogate": ["\ud800", "b"],
}


@pytest.mark.parametrize("kind", sorted(FALLBACK_VALUES))
def test_values_it_does_not_know_go_through_pandas(tmp_path, kind):
    cell = Cell("s", "v", 1, {}, {"g": 2.0})
    rows = [{"step": i, "x": v} for i, v in enumerate(FALLBACK_VALUES[kind])]
    assert cell_csv(cell, rows) is None
    assert outcome(fast_bytes, tmp_path / "fast.csv", cell, rows) == outcome(pandas_bytes, tmp_path / "ref.csv",
                                                                             cell, rows)


RAGGED = {
    "a key missing": [{"step": 0, "x": 1}, {"step": 1}],
    "a key more": [{"step": 0}, {"step": 1, "x": 1.5}],
    "other keys": [{"step": 0, "x": 1}, {"step": 1, "y": 2}],
    "no rows": [],
    "no columns, one row": [{}],
    "a row not a dict": [{"step": 0}, pd.Series({"step": 1})],
    "a key not a str": [{"step": 0, 7: "x"}],
    "study as a row column": [{"step": 0, "study": "other"}],
    "variant as a row column": [{"step": 0, "variant": "other"}],
    "a cell column as a row column": [{"step": 0, "g": 3.0}],
}


@pytest.mark.parametrize("kind", sorted(RAGGED))
def test_rows_it_does_not_take_go_through_pandas(tmp_path, kind):
    cell = Cell("s", "v", 1, {}, {"g": 2.0})
    rows = RAGGED[kind]
    if kind != "no columns, one row":
        assert cell_csv(cell, rows) is None
    assert outcome(fast_bytes, tmp_path / "fast.csv", cell, rows) == outcome(pandas_bytes, tmp_path / "ref.csv",
                                                                             cell, rows)


def test_a_cell_column_clash_is_the_same_error(tmp_path):
    cell = Cell("s", "v", 1, {}, {"g": 2.0})
    with pytest.raises(ValueError, match=r"columns \['g'\] are both study parameters and worker columns"):
        write_cell(tmp_path / "x.csv", cell, [{"g": 1.0}])
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("seed", [np.int64(3), 2 ** 64, True])
def test_a_seed_it_does_not_know_goes_through_pandas(tmp_path, seed):
    cell = Cell("s", "v", seed, {}, {})
    rows = [{"step": 0}]
    assert cell_csv(cell, rows) is None
    assert_same_files(tmp_path, cell, rows)
    assert cell_csv(cell, [{"step": 0, "seed": 5}]) is not None  # the rows' own seed: the cell's is not written


# ------------------------------------------------------------------------------------------
# writing: atomic, mode 0644, a failure names the file

ROWS = [{"step": 0, "x": 0.5}, {"step": 1, "x": NAN}]
CELL = Cell("s", "v", 1, {}, {"g": 2.0})


def test_the_file_is_0644_whatever_the_umask_and_no_temporary_file_is_left(tmp_path):
    old = os.umask(0o077)
    try:
        assert_same_files(tmp_path, CELL, ROWS)
    finally:
        os.umask(old)
    assert (tmp_path / "fast.csv").stat().st_mode & 0o777 == (tmp_path / "pandas.csv").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.csv", "pandas.csv"]


def test_a_missing_directory_is_made(tmp_path):
    path = tmp_path / "new" / "cells" / "x.csv"
    write_cell(path, CELL, ROWS)
    assert path.read_bytes() == pandas_bytes(tmp_path / "ref.csv", CELL, ROWS)


def test_a_directory_that_is_a_file_fails_as_the_pandas_path_does(tmp_path):
    (tmp_path / "cells").write_text("not a directory")
    fast = outcome(fast_bytes, tmp_path / "cells" / "x.csv", CELL, ROWS)
    ref = outcome(pandas_bytes, tmp_path / "cells" / "y.csv", CELL, ROWS)
    assert fast[0] == ref[0] == "error"
    assert fast[1][0] is ref[1][0] and fast[1][1].replace("x.csv", "y.csv") == ref[1][1]


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "x.csv"
    path.write_bytes(b"previous")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as e:
        write_cell(path, CELL, ROWS)
    assert e.value.filename == str(path)
    assert describe_os_error(e.value) == (f"no space left on device: {path}; free some space and rerun the same "
                                          "command to resume")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


def test_an_interrupt_before_the_rename_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "x.csv"
    path.write_bytes(b"previous")
    hits = []

    def interrupt(name):
        hits.append(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(records, "failpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_cell(path, CELL, ROWS)
    assert hits == ["atomic-write"]  # the fault tests' failpoint, once per cell file as before
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]
