"""How the studies compare methods (DESIGN.md, "How studies compare methods").

* **Equal total budget.** Every run stops at a total budget (``RunnerConfig.budget`` in
  ``RunnerConfig.budget_unit``: generated tokens by default, or rollouts), so cheaper methods take
  more steps; ``steps`` is only a cap (a run that hits it is flagged in the report).
* **A common budget grid.** Each run's curve (exact pass@1, held-out pass@1, ... against its
  cumulative spending) is interpolated linearly between steps. In a unit ``u`` the *common
  range* of a study is [0, e_u] with e_u the smallest final spending of any of its runs (for the
  stopping unit: at most the budget itself). Per run: the value *at the budget* (at e_u) and the
  *AUC* (area under the curve over [0, e_u] divided by e_u: the mean value over the range), in
  both units; every finding names its unit. :func:`value_and_auc` is the definition for one run;
  :class:`RunCurves` reads every run of a table in one vectorised pass, equal to it to the last bit.
* **Tuned learning rates.** Before the evaluation runs, each variant's learning rate is chosen
  from a small grid (multiples of the simulator's default rate; where the best rate is at an end
  of the grid, the grid is extended by factors of 2 up to a limit, :func:`extend_grids`) on
  tuning seeds
  (:data:`TUNING_SEED_BASE` + i, disjoint from the evaluation seeds 0, 1, ...; each seed draws
  its own problem set), by the mean AUC of training pass@1 over [0, budget] in the stopping unit
  (:data:`TUNING_CRITERION`). The choice is written to ``tuned_lr.csv`` and the evaluation runs
  use it. Tuning runs are cells like any other, so an interrupted study resumes them too.
* **Statistics**: :mod:`analysis.stats` (paired intervals over seeds, Holm, TOST).

Every run carries the protocol as columns: ``lr``, ``budget``, ``budget_unit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from analysis.sweep import Cell
from deepgrpo.ledger import BUDGET_UNITS

TUNING_SEED_BASE = 1000
"""Tuning seeds are ``TUNING_SEED_BASE + i``; evaluation seeds are 0, 1, ... (< this)."""

TUNING_CRITERION = "mean AUC of training exact pass@1 over [0, budget] in the stopping unit"
"""How a variant's learning rate is chosen (stated in the report)."""

CURVE_METRICS = ("pass1", "heldout_pass1")
"""Values read on the budget grid (those present in the runs): exact pass@1 on the training
problems and on the held-out problems."""

PROTOCOL_COLUMNS = ("lr", "budget", "budget_unit")
"""Columns every study run carries besides its study parameters."""


def with_protocol(cell: Cell, lr: float, budget: int, unit: str, max_steps: int, seed: int | None = None) -> Cell:
    """``cell`` run to a total ``budget`` in ``unit`` (at most ``max_steps`` steps) with learning
    rate ``lr`` (and run seed ``seed`` if given); the three become columns of its rows."""
    if unit not in BUDGET_UNITS:
        raise ValueError(f"budget unit {unit!r} is invalid: expected one of {', '.join(BUDGET_UNITS)}")
    runner = {**cell.params.get("runner", {}), "steps": int(max_steps), "budget": int(budget),
              "budget_unit": unit, "lr": float(lr)}
    return replace(cell, seed=cell.seed if seed is None else seed, params={**cell.params, "runner": runner},
                   columns={**cell.columns, "lr": float(lr), "budget": int(budget), "budget_unit": unit})


def run_keys(runs: pd.DataFrame) -> list[str]:
    """The columns that identify one run: ``variant``, ``lr`` (tuning tables hold several rates
    per variant) and ``seed``."""
    return ["variant", "lr", "seed"] if "lr" in runs.columns else ["variant", "seed"]


def curve_metrics(runs: pd.DataFrame) -> tuple[str, ...]:
    """The :data:`CURVE_METRICS` present in ``runs``."""
    return tuple(m for m in CURVE_METRICS if m in runs.columns)


def stopping(runs: pd.DataFrame) -> tuple[str, int]:
    """``(budget_unit, budget)`` of a study's runs (one protocol per table)."""
    units, budgets = runs["budget_unit"].unique(), runs["budget"].unique()
    if len(units) != 1 or len(budgets) != 1:
        raise ValueError(f"runs mix budgets: units {list(units)}, budgets {list(budgets)}")
    return str(units[0]), int(budgets[0])


def common_end(runs: pd.DataFrame, unit: str) -> float:
    """End e_u of the common range in ``unit``: the smallest final spending over the runs, and at
    most the budget when ``unit`` is the stopping unit."""
    end = float(runs.groupby(run_keys(runs))[unit].max().min())
    stop_unit, budget = stopping(runs)
    return min(end, float(budget)) if unit == stop_unit else end


def value_and_auc(spend: np.ndarray, value: np.ndarray, end: float) -> tuple[float, float]:
    """For one run's curve (``spend`` [S] cumulative, non-decreasing, starting at 0; ``value``
    [S]): the value at ``end`` (linear interpolation) and the exact area under the piecewise
    linear curve over [0, end] divided by ``end`` (NaN if ``end`` <= 0 or values are missing).

    This is the definition; :meth:`RunCurves.value_and_auc` computes it for every run at once."""
    ok = np.isfinite(value)
    x, y = spend[ok].astype(np.float64), value[ok].astype(np.float64)
    if not end > 0 or x.size == 0:
        return float("nan"), float("nan")
    xs = np.append(x[x < end], end)
    ys = np.interp(xs, x, y)
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))
    return float(ys[-1]), area / end


def segment_sums(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``np.sum(values[s:s + n])`` for every segment (``starts`` [R], ``lengths`` [R]; 0.0 for an
    empty one), bit for bit: segments of equal length are summed as the rows of one contiguous
    [segments, length] array, which numpy adds in the same (pairwise) order as ``np.sum`` of each
    (``np.add.reduceat`` does not)."""
    out = np.zeros(len(lengths), dtype=np.float64)
    for n in np.unique(lengths[lengths > 0]):
        sel = np.flatnonzero(lengths == n)
        out[sel] = values[starts[sel][:, None] + np.arange(n)].sum(axis=1)
    return out


class RunCurves:
    """Every run of a tidy step table in one set of arrays: its rows grouped by run (runs in order
    of first appearance, like ``groupby(keys, sort=False)``; rows with a missing key belong to no
    run) and sorted by ``step`` within each run (runs have unique steps; ties keep table order).
    It reads every run at once what the per-run definitions read one run at a time
    (:func:`value_and_auc`, ``Series.mean``), equal to them to the last bit.

    runs: the tidy table; keys: the columns that identify a run (default :func:`run_keys`).
    """

    def __init__(self, runs: pd.DataFrame, keys: list[str] | None = None) -> None:
        self.runs = runs
        self.keys = run_keys(runs) if keys is None else list(keys)
        gid = runs.groupby(self.keys, sort=False).ngroup().to_numpy(np.float64)  # NaN: a key is missing
        rows = np.flatnonzero(np.isfinite(gid))
        gid = gid[rows].astype(np.int64)
        self.order = rows[np.lexsort((runs["step"].to_numpy()[rows], gid))]  # [N] table rows, run by run, by step
        self.n_runs = int(gid.max()) + 1 if gid.size else 0
        counts = np.bincount(gid, minlength=self.n_runs)
        self.stops = np.cumsum(counts)  # [R] run r's rows are order[starts[r]:stops[r]]
        self.starts = self.stops - counts
        self.run = np.repeat(np.arange(self.n_runs), counts)  # [N] run of each sorted row

    def column(self, name: str) -> np.ndarray:
        """Column ``name`` in the sorted row order [N]."""
        return self.runs[name].to_numpy()[self.order]

    def first(self, name: str) -> pd.Series:
        """Column ``name`` at each run's first step [R] (the column's own dtype)."""
        return self.runs[name].iloc[self.order[self.starts]].reset_index(drop=True)

    def last(self, name: str) -> pd.Series:
        """Column ``name`` at each run's last step [R] (the column's own dtype)."""
        return self.runs[name].iloc[self.order[self.stops - 1]].reset_index(drop=True)

    def mean(self, name: str) -> np.ndarray:
        """Each run's mean of column ``name`` over its steps, NaN-skipping [R]: ``Series.mean()``
        of the run's rows sorted by step (NaN where the run has no value)."""
        col = self.runs[name]
        if col.dtype != np.float64:  # the vectorised sum below is the float64 path of Series.mean
            return np.array([float(col.iloc[self.order[a:b]].mean()) if b > a else float("nan")
                             for a, b in zip(self.starts, self.stops)], dtype=np.float64)
        v = self.column(name)
        missing = np.isnan(v)
        sums = segment_sums(np.where(missing, 0.0, v), self.starts, self.stops - self.starts)
        count = (self.stops - self.starts - np.bincount(self.run[missing], minlength=self.n_runs)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, sums / count, np.nan)

    def first_where(self, hit: np.ndarray) -> np.ndarray:
        """Per run, the position in the sorted rows of its first row (by step) with ``hit`` [N, in
        sorted row order] true; -1 where none is [R]."""
        pos = np.flatnonzero(hit)
        out = np.full(self.n_runs, -1, dtype=np.int64)
        runs, first = np.unique(self.run[pos], return_index=True)
        out[runs] = pos[first]
        return out

    def value_and_auc(self, spend: str, metric: str, end: float) -> tuple[np.ndarray, np.ndarray]:
        """:func:`value_and_auc` of every run's curve (``metric`` against ``spend``, both columns)
        at ``end``: ``(value at end [R], AUC [R])``.

        One pass over all runs: the value at ``end`` is np.interp's (the last step at or below
        ``end``, then its slope formula), the interior points are the curve's own steps (at a
        repeated spending, the last of them, as np.interp picks), and each run's trapezoids are
        summed in np.sum's order (:func:`segment_sums`). Runs whose spending is not finite and
        non-decreasing are read one by one with :func:`value_and_auc` itself."""
        at = np.full(self.n_runs, np.nan)
        auc = np.full(self.n_runs, np.nan)
        if not end > 0 or self.n_runs == 0:
            return at, auc
        x_all = self.column(spend).astype(np.float64)
        y_all = self.column(metric).astype(np.float64)
        ok = np.isfinite(y_all)
        x, y, run = x_all[ok], y_all[ok], self.run[ok]
        n = np.bincount(run, minlength=self.n_runs)
        stop = np.cumsum(n)
        start = stop - n
        same_run = run[1:] == run[:-1]
        bad_row = ~np.isfinite(x)
        bad_row[1:] |= same_run & (x[1:] < x[:-1])
        bad = np.bincount(run[bad_row], minlength=self.n_runs) > 0
        for r in np.flatnonzero(bad):
            at[r], auc[r] = value_and_auc(x[start[r]:stop[r]], y[start[r]:stop[r]], end)
        good = (n > 0) & ~bad
        # the value at `end`: np.interp(end, x, y) of each run
        top = max(len(x) - 1, 0)  # indices of runs without values are clipped, and never used
        first, last = np.minimum(start, top), np.clip(stop - 1, 0, top)
        n_le = np.bincount(run[x <= end], minlength=self.n_runs)
        j = np.clip(start + n_le - 1, 0, top)  # the last step at or below `end`
        k = np.minimum(j + 1, top)
        y_end = np.full(self.n_runs, np.nan)
        if len(x):
            inside = good & ~(end > x[last]) & ~(end < x[first])
            exact = inside & ((j == last) | (x[j] == end))
            between = inside & ~exact
            with np.errstate(all="ignore"):
                slope = (y[k] - y[j]) / (x[k] - x[j])
                v = slope * (end - x[j]) + y[j]
                retry = np.isnan(v)
                v = np.where(retry, slope * (end - x[k]) + y[k], v)
                v = np.where(retry & np.isnan(v) & (y[j] == y[k]), y[j], v)
            y_end = np.where(good & (end > x[last]), y[last], y_end)
            y_end = np.where(good & ~(end > x[last]) & (end < x[first]), y[first], y_end)
            y_end = np.where(exact, y[j], y_end)
            y_end = np.where(between, v, y_end)
        # the area: trapezoids between the steps below `end`, then up to `end`
        below = np.flatnonzero((x < end) & good[run])  # a prefix of each good run's rows
        count = np.bincount(run[below], minlength=self.n_runs)
        is_last_tie = np.ones(len(x), dtype=bool)
        is_last_tie[:-1] = ~(same_run & (x[1:] == x[:-1]))
        tie_end = np.minimum.accumulate(np.where(is_last_tie, np.arange(len(x)), len(x))[::-1])[::-1]
        p, q = x[below], y[tie_end[below]]
        nxt = np.zeros(len(below), dtype=bool)
        nxt[:-1] = (below[1:] == below[:-1] + 1) & same_run[below[:-1]]  # the next point is a step, not `end`
        p_next = np.where(nxt, np.append(p[1:], 0.0), end)
        q_next = np.where(nxt, np.append(q[1:], 0.0), y_end[run[below]])
        terms = (p_next - p) * (q_next + q) / 2
        offsets = np.cumsum(count) - count
        area = segment_sums(terms, offsets, count)
        at = np.where(good, y_end, at)
        auc = np.where(good, area / end, auc)
        return at, auc


def _as_column(values: pd.Series, how: Callable[[Any], Any] | None = None) -> Any:
    """``values`` (one value per run) typed as a table built record by record types them (the
    per-run definition of :func:`budget_table`): through ``how`` (e.g. ``float``) value by value;
    else kept with their dtype where it is numeric, bool or text, and an object column inferred
    the way ``pd.DataFrame`` infers a column of a list of records."""
    if how is not None:
        return np.array([how(v) for v in values])
    if values.dtype.kind in "biuf":
        return values.to_numpy()
    if isinstance(values.dtype, pd.StringDtype):
        return values.array
    return pd.DataFrame([{"v": v} for v in values])["v"].array

def budget_table(runs: pd.DataFrame, keep: tuple[str, ...] = (), ends: dict[str, float] | None = None,
                 curves: RunCurves | None = None) -> pd.DataFrame:
    """One row per run (``variant``, ``seed``) on the common budget grid of ``runs``, or at the
    given ``ends`` (``{unit: budget}``; default: :func:`common_end` of every unit).

    Columns: ``variant``, ``seed``, the ``keep`` columns and :data:`PROTOCOL_COLUMNS` (constant
    within a run), ``steps`` (steps taken), final ``rollouts`` and ``tokens``, ``pass1_start``
    (before training), ``reached_budget`` (the run stopped at its budget, not at the step cap),
    and for each metric m of :func:`curve_metrics` and unit u: ``m_at_u`` (value at the end of
    the common range in u) and ``m_auc_u`` (mean value over it). Rows in order of each run's
    first row in ``runs``; every run is read in one vectorised pass (:class:`RunCurves`, pass one
    to reuse it).
    """
    unit, budget = stopping(runs)
    ends = {u: common_end(runs, u) for u in BUDGET_UNITS} if ends is None else ends
    metrics = curve_metrics(runs)
    c = RunCurves(runs) if curves is None else curves
    if c.n_runs == 0:
        return pd.DataFrame([])
    cols = list(dict.fromkeys([*keep, *PROTOCOL_COLUMNS]))
    out: dict[str, Any] = {}
    out["variant"] = _as_column(c.last("variant"), None)
    out["seed"] = _as_column(c.last("seed"), None)
    for col in cols:
        if col in runs:
            out[col] = _as_column(c.last(col), None)
    out["steps"] = _as_column(c.last("step"), int)
    out["rollouts"] = _as_column(c.last("rollouts"), float)
    out["tokens"] = _as_column(c.last("tokens"), float)
    out["pass1_start"] = _as_column(c.first("pass1"), float)
    reached = c.last(unit)
    out["reached_budget"] = (reached.to_numpy() >= budget if reached.dtype.kind in "biuf"
                             else _as_column(reached, lambda v: bool(v >= budget)))
    for u in BUDGET_UNITS:
        for m in metrics:
            out[f"{m}_at_{u}"], out[f"{m}_auc_{u}"] = c.value_and_auc(u, m, ends[u])
    return pd.DataFrame(out)


def curves_on_grid(runs: pd.DataFrame, unit: str, metric: str = "pass1", points: int = 40) -> pd.DataFrame:
    """Every run's ``metric`` on a common grid of ``points`` budgets over [0, largest final
    spending in ``unit``], each variant up to the smallest final spending of its runs (so that
    every point of a variant's curve averages all its seeds; NaN beyond): columns ``variant``,
    ``seed``, ``unit``, ``metric`` (for seaborn curves with intervals over seeds)."""
    grid = np.linspace(0.0, float(runs[unit].max()), points)
    reach = runs.groupby(run_keys(runs))[unit].max().groupby(level="variant").min()
    rows = []
    for _, g in runs.groupby(run_keys(runs), sort=False):
        g = g.sort_values("step")
        v, s = g["variant"].iloc[0], g["seed"].iloc[0]
        x, y = g[unit].to_numpy(np.float64), g[metric].to_numpy(np.float64)
        vals = np.where(grid <= reach[v], np.interp(grid, x, y), np.nan)
        rows += [{"variant": v, "seed": s, unit: b, metric: val} for b, val in zip(grid, vals)]
    return pd.DataFrame(rows)


# -- tuning ---------------------------------------------------------------------------------


def tuning_cells(base: list[Cell], grids: dict[str, list[float]], n_seeds: int, budget: int, unit: str,
                 max_steps: int) -> list[Cell]:
    """The tuning grid: one cell per (variant of ``base``, rate in ``grids[variant]``, tuning
    seed); ``base`` holds one cell per variant (its seed is replaced by the tuning seeds)."""
    return [with_protocol(c, lr, budget, unit, max_steps, seed=TUNING_SEED_BASE + i)
            for c in base for lr in sorted(grids[c.variant]) for i in range(n_seeds)]


def extend_grids(table: pd.DataFrame, grids: dict[str, list[float]], lowest: float, highest: float,
                 factor: float = 2.0) -> bool:
    """Where a variant's chosen rate (in a :func:`choose_rates` table) is the largest (smallest)
    it tried, add the rate ``factor`` times larger (smaller) to ``grids[variant]``, within
    [``lowest``, ``highest``]; returns whether any grid grew. Tuning repeats until none does, so
    that every chosen rate is inside its grid or at a stated limit."""
    grown = False
    tol = 1e-9
    for r in table[table["chosen"].astype(bool)].itertuples():
        tried = grids[str(r.variant)]
        if r.lr >= max(tried) * (1 - tol) and r.lr * factor <= highest * (1 + tol):
            tried.append(float(r.lr * factor))
            grown = True
        elif r.lr <= min(tried) * (1 + tol) and r.lr / factor >= lowest * (1 - tol) and len(tried) > 1:
            tried.append(float(r.lr / factor))
            grown = True
    return grown


def choose_rates(tuning_runs: pd.DataFrame, unit: str | None = None,
                 ends: dict[str, float] | None = None, per: pd.DataFrame | None = None) -> pd.DataFrame:
    """The tuning table: one row per (variant, lr) with ``criterion`` (:data:`TUNING_CRITERION`:
    mean over tuning seeds of the AUC of training pass@1 over the common range of the stopping
    unit, or of ``unit`` over [0, ``ends[unit]``] when given), ``criterion_sd`` (over seeds),
    ``n`` (seeds), ``chosen`` (the variant's best rate; ties go to the smaller rate) and ``edge``
    (the chosen rate is the smallest or largest of the grid: the best rate may lie outside it).
    ``per``: ``budget_table(tuning_runs, ends=ends)`` if already computed (e.g. for another unit)."""
    unit = stopping(tuning_runs)[0] if unit is None else unit
    per = budget_table(tuning_runs, ends=ends) if per is None else per
    crit = f"pass1_auc_{unit}"
    out = (per.groupby(["variant", "lr"], sort=False)[crit]
           .agg(criterion="mean", criterion_sd="std", n="count").reset_index())
    out = out.sort_values(["variant", "lr"], kind="stable")
    order = list(dict.fromkeys(tuning_runs["variant"]))
    # per variant (consecutive rows, rates ascending): the first rate with the largest criterion
    # (np.nanargmax), the first rate if no criterion is finite
    variant = out["variant"].to_numpy()
    new = np.ones(len(out), dtype=bool)
    new[1:] = variant[1:] != variant[:-1]
    starts = np.flatnonzero(new)
    lengths = np.diff(np.append(starts, len(out)))
    group = np.cumsum(new) - 1
    value = out["criterion"].to_numpy(np.float64)
    filled = np.where(np.isnan(value), -np.inf, value)
    best = np.maximum.reduceat(filled, starts) if len(out) else filled
    top = np.flatnonzero(filled == best[group])
    first_top = top[np.unique(group[top], return_index=True)[1]]
    finite = np.bincount(group[np.isfinite(value)], minlength=len(starts)) > 0
    i = np.where(finite, first_top - starts, 0)
    chosen, edge = np.zeros(len(out), dtype=bool), np.zeros(len(out), dtype=bool)
    chosen[starts + i] = True
    edge[starts + i] = (lengths > 1) & ((i == 0) | (i == lengths - 1))
    out["chosen"] = chosen
    out["edge"] = edge
    out["variant"] = pd.Categorical(out["variant"], categories=order, ordered=True)
    return out.sort_values(["variant", "lr"]).assign(variant=lambda f: f["variant"].astype(str)).reset_index(drop=True)


def chosen_rates(table: pd.DataFrame) -> dict[str, float]:
    """``{variant: chosen lr}`` from a :func:`choose_rates` table."""
    return {str(r.variant): float(r.lr) for r in table[table["chosen"]].itertuples()}
