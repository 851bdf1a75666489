"""Building the study tables: every cell file read once (:class:`analysis.sweep.CellTables`), every
run read on the budget grid in one vectorised pass (:class:`analysis.protocol.RunCurves`), with
the same tables, to the last bit, as the per-run and per-file definitions kept here."""

import io

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.protocol import (
    PROTOCOL_COLUMNS,
    RunCurves,
    budget_table,
    choose_rates,
    common_end,
    curve_metrics,
    run_keys,
    segment_sums,
    stopping,
    value_and_auc,
)
from analysis.sweep import Cell, CellTables, cell_frame, load_cell
from deepgrpo.ledger import BUDGET_UNITS

# -- the per-run definitions (the tables before vectorising) ------------------------------------


def reference_budget_table(runs, keep=(), ends=None):
    """:func:`budget_table` one run at a time."""
    unit, budget = stopping(runs)
    ends = {u: common_end(runs, u) for u in BUDGET_UNITS} if ends is None else ends
    metrics = curve_metrics(runs)
    rows = []
    cols = list(dict.fromkeys([*keep, *PROTOCOL_COLUMNS]))
    for _, g in runs.groupby(run_keys(runs), sort=False):
        g = g.sort_values("step")
        first, last = g.iloc[0], g.iloc[-1]
        row = {"variant": last["variant"], "seed": last["seed"], **{c: last[c] for c in cols if c in g},
               "steps": int(last["step"]), "rollouts": float(last["rollouts"]), "tokens": float(last["tokens"]),
               "pass1_start": float(first["pass1"]), "reached_budget": bool(last[unit] >= budget)}
        for u in BUDGET_UNITS:
            x = g[u].to_numpy(np.float64)
            for m in metrics:
                row[f"{m}_at_{u}"], row[f"{m}_auc_{u}"] = value_and_auc(x, g[m].to_numpy(np.float64), ends[u])
        rows.append(row)
    return pd.DataFrame(rows)


def reference_choose_rates(tuning_runs, unit, ends):
    """:func:`choose_rates` with its per-variant loop."""
    per = reference_budget_table(tuning_runs, ends=ends)
    crit = f"pass1_auc_{unit}"
    out = (per.groupby(["variant", "lr"], sort=False)[crit]
           .agg(criterion="mean", criterion_sd="std", n="count").reset_index())
    out = out.sort_values(["variant", "lr"], kind="stable")
    order = list(dict.fromkeys(tuning_runs["variant"]))
    out["chosen"] = False
    out["edge"] = False
    for _, g in out.groupby("variant", sort=False):
        best = g["criterion"].to_numpy()
        i = int(np.nanargmax(best)) if np.isfinite(best).any() else 0
        out.loc[g.index[i], "chosen"] = True
        out.loc[g.index[i], "edge"] = len(g) > 1 and i in (0, len(g) - 1)
    out["variant"] = pd.Categorical(out["variant"], categories=order, ordered=True)
    return out.sort_values(["variant", "lr"]).assign(variant=lambda f: f["variant"].astype(str)).reset_index(drop=True)


def same_bits(a, b) -> None:
    """Equal frames, and every float equal to the last bit (NaN to NaN; 0.0 is not -0.0: a CSV
    shows the sign)."""
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for name in a.columns:
        if a[name].dtype == np.float64:
            x, y = a[name].to_numpy(), b[name].to_numpy()
            both_nan = np.isnan(x) & np.isnan(y)
            assert np.array_equal(x[~both_nan].view(np.int64), y[~both_nan].view(np.int64)), name


# -- random runs -----------------------------------------------------------------------------------


def random_runs(seed: int, n_runs: int, odd: bool) -> pd.DataFrame:
    """A shuffled tidy table of ``n_runs`` runs: unequal lengths (runs that stop early), repeated
    spendings (steps that spend nothing), missing values, and with ``odd`` runs whose spending
    decreases or is missing (read one by one)."""
    rng = np.random.default_rng(seed)
    combos = [(v, lr, s) for v in ("a", "b | c", "d") for lr in (0.1, 0.2, 0.4) for s in range(3)]
    rows = []
    for i in rng.choice(len(combos), size=n_runs, replace=False):
        variant, lr, s = combos[i]
        n = int(rng.integers(1, 25))
        inc = rng.choice([0.0, 1.0, 2.0, 7.5, 12.0, 0.1], size=(n, 2), p=[0.2, 0.3, 0.2, 0.1, 0.1, 0.1])
        inc[0] = 0.0
        spend = np.cumsum(inc, axis=0)
        if odd and rng.random() < 0.3:
            spend[rng.integers(n), int(rng.integers(2))] = rng.choice([np.nan, -1.0])
        pass1 = rng.random(n)
        pass1[rng.random(n) < 0.15] = np.nan
        held = np.where(rng.random(n) < 0.5, rng.random(n), np.nan)
        for t in range(n):
            rows.append({"variant": variant, "seed": s, "step": t, "tokens": spend[t, 0], "rollouts": spend[t, 1],
                         "pass1": pass1[t], "heldout_pass1": held[t], "lr": lr, "budget": 20, "budget_unit": "tokens",
                         "name": f"m{s}", "K": np.nan if s == 0 else 8.0, "flag": s == 1,
                         "pivot_oracle_success": np.nan if variant == "a" else rng.random()})
    runs = pd.DataFrame(rows)
    return runs.iloc[rng.permutation(len(runs))].reset_index(drop=True)


def random_ends(runs: pd.DataFrame, seed: int, how: str) -> dict[str, float] | None:
    """None (the common range), or per unit: a step's exact spending, past every run's end, between
    steps, or not positive."""
    if how == "common":
        return None
    rng = np.random.default_rng(seed)
    out = {}
    for u in BUDGET_UNITS:
        spend = runs[u].to_numpy(np.float64)
        spend = spend[np.isfinite(spend)]
        out[u] = {"step": float(rng.choice(spend)), "past": float(spend.max()) + 3.0,
                  "between": float(rng.choice(spend)) + 0.05, "zero": 0.0}[how]
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.booleans(),
       st.sampled_from(["common", "step", "past", "between", "zero"]))
def test_budget_table_equals_the_per_run_definition(seed, n_runs, odd, ends_how):
    runs = random_runs(seed, n_runs, odd)
    ends = random_ends(runs, seed, ends_how)
    keep = ("name", "K", "flag")
    same_bits(budget_table(runs, keep, ends), reference_budget_table(runs, keep, ends))


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20))
def test_run_means_and_first_steps_equal_pandas_per_run(seed, n_runs):
    runs = random_runs(seed, n_runs, False)
    curves = RunCurves(runs)
    groups = [g.sort_values("step") for _, g in runs.groupby(run_keys(runs), sort=False)]
    for name in ("pivot_oracle_success", "pass1", "step"):  # float with NaN, and an int column
        ref = np.array([float(g[name].mean()) for g in groups])
        got = curves.mean(name)
        assert np.array_equal(got, ref, equal_nan=True) and np.array_equal(
            np.nan_to_num(got).view(np.int64), np.nan_to_num(ref).view(np.int64)), name
    level = float(np.nanmedian(runs.tokens))
    first = curves.first_where(curves.column("tokens") >= level - 1e-9)
    step = curves.column("step")
    for g, i in zip(groups, first):
        hit = g.step[g.tokens.to_numpy() >= level - 1e-9]
        assert (float(hit.iloc[0]) if len(hit) else -1.0) == (float(step[i]) if i >= 0 else -1.0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 20), st.sampled_from(["tokens", "rollouts"]))
def test_choose_rates_equals_the_per_variant_loop(seed, n_runs, unit):
    runs = random_runs(seed, n_runs, False)
    tie = runs[runs.lr == 0.1].assign(lr=0.3)  # a rate that ties with another: the smaller one is chosen
    runs = pd.concat([runs, tie], ignore_index=True)
    ends = random_ends(runs, seed, "between")
    same_bits(choose_rates(runs, unit, ends), reference_choose_rates(runs, unit, ends))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=12), st.integers(0, 2**32 - 1))
def test_segment_sums_are_np_sum_to_the_bit(lengths, seed):
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths)
    values = rng.standard_normal(int(lengths.sum())) * 10.0 ** rng.integers(-6, 6, size=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths
    got = segment_sums(values, starts, lengths)
    ref = np.array([np.sum(values[a:a + n]) for a, n in zip(starts, lengths)])
    assert np.array_equal(got.view(np.int64), ref.view(np.int64))


def test_budget_edges_by_hand():
    """Past the last step: the last value, and the area up to the end; exactly at a step: that
    step's value; at a repeated spending (a step that spent nothing): the later step's value, as
    np.interp reads it."""
    runs = pd.DataFrame({"variant": "v", "seed": 0, "lr": 0.1, "budget": 10, "budget_unit": "tokens",
                         "step": [0, 1, 2, 3], "tokens": [0.0, 4.0, 4.0, 8.0], "rollouts": [0.0, 1.0, 2.0, 3.0],
                         "pass1": [0.0, 0.2, 0.6, 1.0]})
    t = budget_table(runs, ends={"tokens": 10.0, "rollouts": 2.0}).iloc[0]
    assert t.pass1_at_tokens == 1.0 and t.pass1_auc_tokens == pytest.approx((4 * 0.6 / 2 + 4 * 1.6 / 2 + 2.0) / 10)
    assert t.pass1_at_rollouts == 0.6 and t.pass1_auc_rollouts == pytest.approx((0.1 + 0.4) / 2)
    assert budget_table(runs, ends={"tokens": 4.0, "rollouts": 0.0}).iloc[0].pass1_at_tokens == 0.6


# -- reading the cell files --------------------------------------------------------------------------


def _cells_on_disk(d):
    """Cell files that exercise every way a joint parse could differ from reading each file: an
    int column that is float in another file, a text column empty in one file or holding only
    numbers in another, bools, a quoted label, blank lines, other headers, and damaged files."""
    (d / "cells").mkdir(parents=True)
    cells = []

    def add(variant, seed, rows=None, raw=None, as_seed=None):
        cell = Cell("s", variant, seed, {}, {"M": 2})
        cells.append(cell)
        if raw is None:
            raw = cell_frame(Cell("s", variant, seed if as_seed is None else as_seed, {}, {"M": 2}), rows).to_csv(
                index=False).encode()
        if raw is not False:
            (d / "cells" / f"{cell.key}.csv").write_bytes(raw)
        return cell

    for seed in range(3):  # one header; x int, then float, then missing; tag text: parsed together
        add("plain", seed, [{"step": t, "x": [t, t + 0.5, np.nan][seed], "tag": f"t{t}", "ok": True}
                            for t in range(3)])
    add("plain", 3, [{"step": 0, "x": 1, "tag": "u", "ok": True}], as_seed=7)  # another seed's rows: not finished
    add("text", 0, [{"step": 0, "x": 1, "tag": np.nan, "ok": False, "z": 0}])  # tag empty: a float column alone
    add("text", 1, [{"step": 0, "x": 1, "tag": "12", "ok": True, "z": 0}])  # tag reads as a number alone
    add("more", 0, [{"step": t, "x": 2, "tag": "u", "ok": True, "extra": 1.5} for t in range(2)])
    add("more", 1, [{"step": 0, "x": 2, "tag": "v", "ok": True, "extra": 2.5}])
    add("a, quoted label", 0, [{"step": 0, "x": 3, "tag": "w", "ok": True}])
    blank = add("blank", 0, [{"step": t, "x": 4, "tag": "b", "ok": True} for t in range(2)])
    path = d / "cells" / f"{blank.key}.csv"
    path.write_text(path.read_text().replace("\n", "\n\n", 2))
    cut = add("cut", 0, [{"step": t, "x": 5, "tag": "c", "ok": True} for t in range(3)])
    path = d / "cells" / f"{cut.key}.csv"
    path.write_text(path.read_text()[:-4])
    head = b"study,variant,M,step,x,tag,ok,seed,w\n"
    add("bad row", 0, raw=head + b"s,bad row,2,0,1,t,True,0,1,9\n")  # one field too many: no joint parse
    add("bad row", 1, raw=head + b"s,bad row,2,0,1,t,True,1,1\n")
    add("garbage", 0, raw=b"\x00\xff garbage \x89PNG\n")
    add("header", 0, raw=b"study,variant,M,step,x,tag,ok,seed\n")
    add("empty", 0, raw=b"")
    add("missing", 0, raw=False)
    add("utf8", 0, raw=b"study,variant,M,step,seed\ns,utf8,2,0,\xff\xfe\n")
    return cells


def _count_reads(monkeypatch):
    from pathlib import Path
    reads = {}
    read_bytes = Path.read_bytes

    def counting(self):
        reads[self.name] = reads.get(self.name, 0) + 1
        return read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", counting)
    return reads


def _alone(d, cells):
    return pd.concat([load_cell(d, c) for c in cells], ignore_index=True)


def test_cell_tables_equal_reading_each_file_alone_and_read_each_once(tmp_path, monkeypatch):
    cells = _cells_on_disk(tmp_path)
    alone = [load_cell(tmp_path, c) for c in cells]
    reads = _count_reads(monkeypatch)
    tables = CellTables(tmp_path)
    done = tables.finished(cells)
    assert done == [f is not None for f in alone]
    assert sum(done) == 10 and tables.count_finished(cells) == 10
    finished = [c for c, ok in zip(cells, done) if ok]
    assert len(tables._rows[finished[0].key][0].keys) == 3  # the plain files, parsed together
    plain = [c for c in finished if c.variant in ("plain", "more", "blank", "a, quoted label")]
    table = tables.table(plain)
    assert set(reads.values()) == {1} and len(reads) == len(cells)  # each file once (one is missing: tried once)
    same_bits(table, _alone(tmp_path, plain))
    # a text column that one file alone reads as numbers: the files parsed together are read again alone
    same_bits(tables.table(finished), _alone(tmp_path, finished))
    # a file rewritten (a new run of a cell) replaces what was read, and types the table as it alone does
    cell = finished[0]
    (tmp_path / "cells" / f"{cell.key}.csv").write_text(
        cell_frame(cell, [{"step": 0, "x": "text", "tag": "t", "ok": True}]).to_csv(index=False))
    tables.read_new([cell])
    same_bits(tables.table(finished[::-1]), _alone(tmp_path, finished[::-1]))


def test_a_just_computed_cell_is_checked_from_what_was_read(tmp_path):
    cells = [Cell("s", "v", s, {}) for s in range(3)]
    (tmp_path / "cells").mkdir()
    for c in cells:
        (tmp_path / "cells" / f"{c.key}.csv").write_text(cell_frame(c, [{"step": 0, "v": c.seed}]).to_csv(index=False))
    tables = CellTables(tmp_path, lambda cell, frame: int(frame.v.iloc[0]) != 1)
    tables.read_new(cells)
    assert tables.finished(cells) == [True, False, True]


# -- a finished directory, rebuilt ----------------------------------------------------------------------


def test_rerun_of_a_finished_smoke_study_reads_each_cell_once_and_rewrites_identical_tables(tmp_path, monkeypatch):
    from analysis.studies import STUDIES, run_study
    monkeypatch.setattr(STUDIES["root-saturation"], "plot", lambda runs, path: None)  # figures are not tables
    d = run_study("root-saturation", tmp_path, seeds=2, size="smoke", workers=1, progress=False)
    tables = sorted(p for p in d.rglob("*.csv") if p.parent.name != "cells")
    first = {p: p.read_bytes() for p in tables}
    # the table of a sweep is the cell files read one by one and concatenated
    for sub in (d, d / "tuning"):
        files = sorted((sub / "cells").iterdir())
        rebuilt = pd.concat([pd.read_csv(f, dtype={"study": str, "variant": str}) for f in files], ignore_index=True)
        runs = pd.read_csv(sub / "runs.csv")
        order = ["variant", "lr", "seed", "step"]
        same_bits(runs.sort_values(order).reset_index(drop=True),
                  pd.read_csv(io.StringIO(rebuilt.to_csv(index=False))).sort_values(order).reset_index(drop=True))
    reads = _count_reads(monkeypatch)
    run_study("root-saturation", tmp_path, seeds=2, size="smoke", workers=1, progress=False)
    read = dict(reads)
    cell_files = {p.name for sub in (d / "cells", d / "tuning" / "cells") for p in sub.iterdir()}
    assert read == dict.fromkeys(cell_files, 1)  # every cell file (tuning and evaluation) once, nothing else
    assert {p: p.read_bytes() for p in tables} == first
