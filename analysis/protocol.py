"""How the studies compare methods (DESIGN.md, "How studies compare methods").

* **Equal total budget.** Every run stops at a total budget (``RunnerConfig.budget`` in
  ``RunnerConfig.budget_unit``: generated tokens by default, or rollouts), so cheaper methods take
  more steps; ``steps`` is only a cap (a run that hits it is flagged in the report).
* **A common budget grid.** Each run's curve (exact pass@1, held-out pass@1, ... against its
  cumulative spending) is interpolated linearly between steps. In a unit ``u`` the *common
  range* of a study is [0, e_u] with e_u the smallest final spending of any of its runs (for the
  stopping unit: at most the budget itself). Per run: the value *at the budget* (at e_u) and the
  *AUC* (area under the curve over [0, e_u] divided by e_u: the mean value over the range), in
  both units; every finding names its unit.
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
    linear curve over [0, end] divided by ``end`` (NaN if ``end`` <= 0 or values are missing)."""
    ok = np.isfinite(value)
    x, y = spend[ok].astype(np.float64), value[ok].astype(np.float64)
    if not end > 0 or x.size == 0:
        return float("nan"), float("nan")
    xs = np.append(x[x < end], end)
    ys = np.interp(xs, x, y)
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))
    return float(ys[-1]), area / end


def budget_table(runs: pd.DataFrame, keep: tuple[str, ...] = (), ends: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per run (``variant``, ``seed``) on the common budget grid of ``runs``, or at the
    given ``ends`` (``{unit: budget}``; default: :func:`common_end` of every unit).

    Columns: ``variant``, ``seed``, the ``keep`` columns and :data:`PROTOCOL_COLUMNS` (constant
    within a run), ``steps`` (steps taken), final ``rollouts`` and ``tokens``, ``pass1_start``
    (before training), ``reached_budget`` (the run stopped at its budget, not at the step cap),
    and for each metric m of :func:`curve_metrics` and unit u: ``m_at_u`` (value at the end of
    the common range in u) and ``m_auc_u`` (mean value over it).
    """
    unit, budget = stopping(runs)
    ends = {u: common_end(runs, u) for u in BUDGET_UNITS} if ends is None else ends
    metrics = curve_metrics(runs)
    rows = []
    cols = list(dict.fromkeys([*keep, *PROTOCOL_COLUMNS]))
    for _, g in runs.groupby(run_keys(runs), sort=False):
        g = g.sort_values("step")
        first, last = g.iloc[0], g.iloc[-1]
        row: dict[str, Any] = {"variant": last["variant"], "seed": last["seed"], **{c: last[c] for c in cols if c in g},
                               "steps": int(last["step"]), "rollouts": float(last["rollouts"]),
                               "tokens": float(last["tokens"]), "pass1_start": float(first["pass1"]),
                               "reached_budget": bool(last[unit] >= budget)}
        for u in BUDGET_UNITS:
            x = g[u].to_numpy(np.float64)
            for m in metrics:
                at, auc = value_and_auc(x, g[m].to_numpy(np.float64), ends[u])
                row[f"{m}_at_{u}"], row[f"{m}_auc_{u}"] = at, auc
        rows.append(row)
    return pd.DataFrame(rows)


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
                 ends: dict[str, float] | None = None) -> pd.DataFrame:
    """The tuning table: one row per (variant, lr) with ``criterion`` (:data:`TUNING_CRITERION`:
    mean over tuning seeds of the AUC of training pass@1 over the common range of the stopping
    unit, or of ``unit`` over [0, ``ends[unit]``] when given), ``criterion_sd`` (over seeds),
    ``n`` (seeds), ``chosen`` (the variant's best rate; ties go to the smaller rate) and ``edge``
    (the chosen rate is the smallest or largest of the grid: the best rate may lie outside it)."""
    unit = stopping(tuning_runs)[0] if unit is None else unit
    per = budget_table(tuning_runs, ends=ends)
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


def chosen_rates(table: pd.DataFrame) -> dict[str, float]:
    """``{variant: chosen lr}`` from a :func:`choose_rates` table."""
    return {str(r.variant): float(r.lr) for r in table[table["chosen"]].itertuples()}
