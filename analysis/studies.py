"""The studies: named sweeps in the simulator, each with its table, figure and findings.

Every study is a :class:`Study`: a grid of :class:`~analysis.sweep.Cell` (variants x paired
seeds), a summary per variant, a seaborn figure and findings computed from the data
(``findings`` is called again by the report, never written in advance).

Every study runs under the protocol of :mod:`analysis.protocol`: each run stops at a total
budget (generated tokens by default, or rollouts), each variant's learning rate is tuned first
on tuning seeds disjoint from the evaluation seeds, each seed draws its own problem set, and
the findings compare values at the budget and areas over the common budget range, with paired
intervals, Holm correction within a finding and equivalence (TOST) tests
(:mod:`analysis.stats`).

Each cell carries its study parameters as columns (``N``, ``recovery``, ``gamma``, ``rule``,
``M``, ``knob``, ``value``, ``heterogeneity``, ``estimator``, ...) and the protocol's (``lr``,
``budget``, ``budget_unit``): the analyses select and group runs by those columns; ``variant`` is
only the display label.

Run one with ``deepgrpo study NAME [--seeds 5] [--quick | --smoke] [--budget-unit tokens|rollouts]
[--out DIR]``; results land in ``DIR/NAME/``: ``tuning/runs.csv`` (the tuning runs),
``tuned_lr.csv`` (criterion per variant and rate, the chosen rate), ``runs.csv`` (tidy: one row per
evaluation run and step), ``summary.csv`` (one row per variant: its parameters and tuned rate,
mean and 95 % CI over seeds of the values at the budget and the AUCs), ``NAME.png`` and
``study.json`` (the protocol, sizes, versions, wall time).

Columns read from the runs (the core's step-record vocabulary plus the simulator's oracle
columns): ``step``, ``seed``, ``method``, ``rollouts``, ``tokens``, ``pivots``, ``pass1``,
``heldout_pass1``, ``pivot_depth_mean``, ``pivot_before_error``, ``pivot_oracle_success`` and the
probes' columns (:mod:`analysis.probes`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.protocol import (
    PROTOCOL_COLUMNS,
    TUNING_CRITERION,
    TUNING_SEED_BASE,
    budget_table,
    choose_rates,
    chosen_rates,
    common_end,
    curve_metrics,
    curves_on_grid,
    extend_grids,
    stopping,
    tuning_cells,
    with_protocol,
)
from analysis.stats import ALPHA, EQUIVALENCE_MARGIN, ci_errorbar, compare_pairs, mean_ci, summarize
from analysis.sweep import Cell, CellTables, run_sweep, span_rows
from deepgrpo.ledger import BUDGET_UNITS
from deepgrpo.records import Interrupted, atomic_write, versions, write_csv_atomic, write_json_atomic

# ------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Size:
    """How big a study run is.

    batch_problems: problems per step; spec: TokenTreeSpec overrides; budget: the total budget
    of every run, per unit (``tokens``, ``rollouts``); max_steps: a cap on steps (a run that
    reaches it before its budget is flagged); lr_factors: the tuning grid, as multiples of the
    simulator's default learning rate; tuning_seeds: how many tuning seeds; max_extensions: how
    many times a variant's grid may be extended by a factor of 2 past either end (where its best
    rate is at that end).
    """

    batch_problems: int
    spec: dict[str, Any]
    budget: dict[str, int]
    max_steps: int
    lr_factors: tuple[float, ...]
    tuning_seeds: int
    max_extensions: int = 0
    runner: dict[str, Any] = field(default_factory=dict)


FULL = Size(batch_problems=16, spec={}, budget={"tokens": 100_000, "rollouts": 15_000}, max_steps=2000,
            lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0), tuning_seeds=2, max_extensions=3)
"""Default size: the simulator's default spec, 16 problems per step, 100,000 generated tokens
(or 15,000 rollouts) per run — what DEEP-GRPO (G = K = 8) spends in about 30 steps — and five
learning rates (1/4x to 4x the simulator's default, extended up to 3 times by 2x past an end
where the best rate lies) tuned on two seeds."""
QUICK = Size(batch_problems=8, spec={"n_problems": 16}, budget={"tokens": 20_000, "rollouts": 3_000},
             max_steps=1000, lr_factors=(0.5, 1.0, 2.0), tuning_seeds=1, max_extensions=2)
"""``--quick``: 16 problems, 8 per step, a fifth of the budget, three rates on one tuning seed."""
SMOKE = Size(batch_problems=4, spec={"n_problems": 8}, budget={"tokens": 4_000, "rollouts": 800},
             max_steps=200, lr_factors=(0.5, 1.0), tuning_seeds=1, max_extensions=1)
"""``--smoke``: 8 problems, 4 per step, a small budget, two rates on one tuning seed, and only
each study's :attr:`Study.smoke` variants (a check that the whole pipeline works)."""
SIZES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
"""Size name -> :class:`Size`."""


def run_sim_cell(cell: Cell) -> list[dict[str, Any]]:
    """Worker of every study: one simulator training run; returns its history rows (each with
    the run's ``problem_set_seed``).

    ``cell.params``: ``method`` (name), ``algo`` (flat overrides of the method's config),
    ``spec`` (TokenTreeSpec overrides), ``runner`` (RunnerConfig overrides), ``probes``
    (names in :data:`analysis.probes.PROBES`).
    """
    from deepgrpo.methods import method_config
    from sims.runner import RunnerConfig, train
    from sims.spec import TokenTreeSpec

    p = cell.params
    algo = method_config(p["method"], **p.get("algo", {}))
    spec = TokenTreeSpec(**p.get("spec", {}))
    runner = RunnerConfig(**p.get("runner", {}))
    probes = _cell_probes(cell, algo.explore.K)
    return train(spec, algo, runner, seed=cell.seed, method=p["method"], probes=probes).history


def _cell_probes(cell: Cell, K: int) -> list:
    from analysis.probes import PROBES, CalibrationProbe
    return [CalibrationProbe(K) if name == "calibration" else PROBES[name]() for name in cell.params.get("probes", [])]


_BATCH_KEYS: dict[str, str] = {}


def sim_batch_key(cell: Cell) -> str:
    """Which cells may train together (:func:`run_sim_cells`): the same method and algorithm
    settings, the same shared loop settings (:data:`sims.runner.SHARED_RUNNER_FIELDS`), the same
    problem-set shape and probes. Seeds, learning rates, budgets and the problem sets' rules
    (difficulty spread, recovery) may differ."""
    p = cell.params
    blob = json.dumps({k: p.get(k) for k in ("method", "algo", "spec", "runner", "probes")}, sort_keys=True,
                      default=repr)
    if blob not in _BATCH_KEYS:
        from sims.runner import SHARED_RUNNER_FIELDS, RunnerConfig
        from sims.spec import TokenTreeSpec
        spec = TokenTreeSpec(**p.get("spec", {}))
        runner = RunnerConfig(**p.get("runner", {}))
        _BATCH_KEYS[blob] = json.dumps({
            "method": p["method"], "algo": p.get("algo", {}), "probes": p.get("probes", []),
            "shape": [spec.n_problems, spec.n_heldout, spec.depth, spec.vocab_size],
            "runner": {f: getattr(runner, f) for f in SHARED_RUNNER_FIELDS}}, sort_keys=True, default=repr)
    return _BATCH_KEYS[blob]


def run_sim_cells(cells: list[Cell], done: Callable[[Cell, list[dict[str, Any]]], None]) -> None:
    """Batch worker of every study (:func:`analysis.sweep.run_sweep`): the runs of ``cells`` (one
    :func:`sim_batch_key`) trained together in lockstep (:func:`sims.runner.train_replicas`),
    each cell's history handed to ``done`` the moment its run stops. Each run's history is the one
    :func:`run_sim_cell` gives it alone."""
    from deepgrpo.methods import method_config
    from sims.runner import RunnerConfig, train_replicas
    from sims.spec import TokenTreeSpec

    p = cells[0].params
    algo = method_config(p["method"], **p.get("algo", {}))
    train_replicas([TokenTreeSpec(**c.params.get("spec", {})) for c in cells], algo,
                   [RunnerConfig(**c.params.get("runner", {})) for c in cells], [c.seed for c in cells],
                   [c.params["method"] for c in cells],
                   on_finish=lambda r, result: done(cells[r], result.history),
                   probes=[_cell_probes(c, algo.explore.K) for c in cells])


def sim_runs_complete(cells: list[Cell], frame: pd.DataFrame, bounds: list[tuple[int, int]]) -> list[bool]:
    """Whether each table ``frame.iloc[a:b]`` (``bounds``) is the whole history of the simulator
    run of its cell: at least one row, no missing pass@1, steps 0, 1, ..., k in order, ending where
    the run stops (its step cap, or the first step at which it had spent its budget). A table cut
    at a line boundary fails this. Column operations over all the tables at once."""
    if "step" not in frame or "pass1" not in frame:
        return [False] * len(cells)
    a = np.array([lo for lo, _ in bounds], dtype=np.int64)
    b = np.array([hi for _, hi in bounds], dtype=np.int64)
    rows = b - a
    idx = span_rows(a, rows)  # every table's rows, in order
    local = idx - np.repeat(a, rows)  # each row's position in its own table
    table_of = np.repeat(np.arange(len(cells)), rows)

    def count(bad: np.ndarray) -> np.ndarray:  # [tables] how many of each table's rows are flagged
        return np.bincount(table_of[bad], minlength=len(cells))

    steps = pd.to_numeric(frame["step"], errors="coerce").to_numpy()
    ok = (rows > 0) & (count(frame["pass1"].isna().to_numpy()[idx]) == 0) & (count(steps[idx] != local) == 0)
    out = []
    for i, cell in enumerate(cells):
        if not ok[i]:
            out.append(False)
            continue
        budget, unit, max_steps = _stopping_rule(cell.params.get("runner", {}))
        last_step = int(rows[i]) - 1  # the steps are 0, 1, ..., so the last one is the count
        if budget is not None and unit in frame:
            out.append(bool(frame[unit].iat[int(b[i]) - 1] >= budget) or last_step == max_steps)
        else:
            out.append(last_step == max_steps)
    return out


def sim_run_complete(cell: Cell, frame: pd.DataFrame) -> bool:
    """:func:`sim_runs_complete` of one table (a cell file's)."""
    return sim_runs_complete([cell], frame, [(0, len(frame))])[0]


sim_run_complete.many = sim_runs_complete  # type: ignore[attr-defined]  # the sweep reader's batched form

_STOPPING_RULES: dict[str, tuple[Any, str, int]] = {}


def _stopping_rule(runner: dict[str, Any]) -> tuple[Any, str, int]:
    """``(budget, budget_unit, steps)`` of ``RunnerConfig(**runner)``, built once per distinct
    ``runner`` (a sweep checks thousands of cells that share a few)."""
    key = json.dumps(runner, sort_keys=True, default=repr)
    if key not in _STOPPING_RULES:
        from sims.runner import RunnerConfig
        r = RunnerConfig(**runner)
        _STOPPING_RULES[key] = (r.budget, r.budget_unit, r.steps)
    return _STOPPING_RULES[key]


def _cell(study: str, variant: str, seed: int, size: Size, method: str, algo: dict | None = None,
          spec: dict | None = None, probes: tuple[str, ...] = (), **columns: Any) -> Cell:
    """A simulator cell before the protocol (budget, rate: :func:`analysis.protocol.with_protocol`);
    ``columns`` are the study parameters written as columns of its rows."""
    return Cell(study, variant, seed, {
        "method": method, "algo": dict(algo or {}), "spec": {**size.spec, **(spec or {})},
        "runner": {"batch_problems": size.batch_problems, **size.runner},
        "probes": list(probes)}, columns)


def final_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The last step of every run (one row per (variant, seed))."""
    last = runs.groupby(["variant", "seed"])["step"].transform("max")
    return runs[runs["step"] == last].reset_index(drop=True)


def _order(frame: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    cat = pd.Categorical(frame["variant"], categories=variants, ordered=True)
    return frame.assign(variant=cat).sort_values("variant").assign(variant=lambda f: f["variant"].astype(str))


def _fmt(e, digits: int = 3) -> str:
    return f"{e.mean:.{digits}f} ± {e.half_width:.{digits}f}" if np.isfinite(e.half_width) else f"{e.mean:.{digits}f}"


# ------------------------------------------------------------------------------------------
# the study type


@dataclass
class Study:
    """A named study: its grid, summary, figure and findings.

    cells(seeds, size): the full grid (before the protocol: no budget or rate yet); params: the
    study-parameter columns of its runs (shown in the summary); smoke: the display labels of the
    variants of its smoke grid.
    """

    name: str
    question: str
    cells: Callable[[list[int], Size], list[Cell]]
    summary: Callable[[pd.DataFrame], pd.DataFrame]
    plot: Callable[[pd.DataFrame, Path], None]
    findings: Callable[[pd.DataFrame], list[str]]
    params: tuple[str, ...] = ()
    smoke: tuple[str, ...] = ()

    def grid(self, seeds: list[int], size: str) -> list[Cell]:
        """The cells of this study at size ``size`` (a key of :data:`SIZES`): every variant, or
        only the :attr:`smoke` variants for ``"smoke"``."""
        cells = self.cells(seeds, SIZES[size])
        return [c for c in cells if c.variant in self.smoke] if size == "smoke" else cells


def summary_table(per_run: pd.DataFrame, values: tuple[str, ...], order: list[str],
                  params: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per variant: its ``params`` columns (constant within a variant), for each column
    in ``values`` its mean over seeds (NaN-skipping) and the 95 % CI half-width (``<value>_pm``),
    plus ``n`` (runs of the variant), rows in ``order``."""
    out = per_run.groupby("variant", sort=False)[list(params)].first().reset_index()
    for v in values:
        s = summarize(per_run, ["variant"], v).rename(columns={"mean": v, "half_width": f"{v}_pm"})
        out = out.merge(s[["variant", v, f"{v}_pm"]], on="variant")
    out = out.merge(per_run.groupby("variant", sort=False).size().rename("n").reset_index(), on="variant")
    return _order(out, order).reset_index(drop=True)


def per_run(runs: pd.DataFrame, params: tuple[str, ...], step_means: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run on the common budget grid (:func:`analysis.protocol.budget_table`) with
    the run's ``method`` and ``params``, ``pass1_at_budget`` (= ``pass1_at_<stopping unit>``,
    and ``heldout_pass1_at_budget`` when logged), and ``step_means`` averaged over the run's
    training steps (NaN-skipping)."""
    unit, _ = stopping(runs)
    table = budget_table(runs, keep=("method", *params))
    for m in curve_metrics(runs):
        table[f"{m}_at_budget"] = table[f"{m}_at_{unit}"]
    if step_means:
        means = runs[runs.step > 0].groupby(["variant", "seed"], sort=False)[list(step_means)].mean().reset_index()
        table = table.merge(means, on=["variant", "seed"], how="left")
    return table


COUNT_COLUMNS = ("steps", "rollouts", "tokens")
"""Per-run counts shown in the summaries as means only (no interval)."""


def headline_values(runs: pd.DataFrame) -> tuple[str, ...]:
    """The summary's protocol columns: steps taken, final rollouts and tokens, every curve metric
    at the budget, and the AUC of pass@1 in both units."""
    out = list(COUNT_COLUMNS)
    out += [f"{m}_at_budget" for m in curve_metrics(runs)]
    out += [f"pass1_auc_{u}" for u in BUDGET_UNITS]
    return tuple(out)


def protocol_summary(runs: pd.DataFrame, params: tuple[str, ...], extra: tuple[str, ...] = (),
                     step_means: tuple[str, ...] = ()) -> pd.DataFrame:
    """The summary of a study: per variant its parameters, tuned ``lr``, how many of its runs
    reached the budget (``reached``), and mean ± CI of :func:`headline_values` and ``extra``."""
    table = per_run(runs, params, step_means)
    out = summary_table(table, (*headline_values(runs), *extra), list(dict.fromkeys(runs["variant"])),
                        (*params, "lr"))
    return _finish_summary(out, table)


def _finish_summary(out: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Add ``reached`` (runs of the variant that stopped at the budget, not at the step cap)
    after ``lr`` and drop the intervals of the count columns."""
    reached = table.groupby("variant").reached_budget.sum().astype(int)
    out.insert(list(out.columns).index("lr") + 1, "reached", out.variant.map(reached).to_numpy())
    return out.drop(columns=[f"{c}_pm" for c in COUNT_COLUMNS])


def _save(fig, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


# -- how findings state their unit and statistics ------------------------------------------------


def value_words(runs: pd.DataFrame, column: str) -> str:
    """What a per-run column of :func:`per_run` means, with its budget unit, e.g. ``exact pass@1
    at the budget (100,000 tokens per run)`` or ``mean exact pass@1 over 0-8,320 rollouts (AUC
    over the common range)``."""
    unit, budget = stopping(runs)
    for m, name in (("heldout_pass1", "held-out exact pass@1"), ("pass1", "exact pass@1")):
        if column == f"{m}_at_budget":
            return f"{name} at the budget ({budget:,} {unit} per run)"
        for u in BUDGET_UNITS:
            if column == f"{m}_at_{u}":
                return (f"{name} at the budget ({budget:,} {unit} per run)" if u == unit else
                        f"{name} at {common_end(runs, u):,.0f} {u} (end of the common range in {u})")
            if column == f"{m}_auc_{u}":
                return f"mean {name} over 0-{common_end(runs, u):,.0f} {u} (AUC over the common range in {u})"
    return column


def family_line(title: str, reference: pd.DataFrame, others: list[tuple[str, pd.DataFrame]], column: str,
                runs: pd.DataFrame, words: str | None = None) -> str:
    """One finding: ``reference`` minus each of ``others`` on per-run ``column``, paired over
    seeds, as one Holm family (intervals at Holm's levels, equivalence by TOST within
    :data:`~analysis.stats.EQUIVALENCE_MARGIN`). ``words`` describes the column (default:
    :func:`value_words`, which names the budget unit)."""
    return pairs_line(title, [(n, reference, f) for n, f in others if len(f)], column, runs, words)


def pairs_line(title: str, pairs: list[tuple[str, pd.DataFrame, pd.DataFrame]], column: str, runs: pd.DataFrame,
               words: str | None = None) -> str:
    """One finding over a family of paired comparisons ``(name, a, b)`` (a minus b on per-run
    ``column``), Holm-corrected as in :func:`family_line`."""
    comps = compare_pairs([(n, a, b) for n, a, b in pairs if len(a) and len(b)], column)
    n = min((c.diff.n for c in comps), default=0)
    family = f"Holm over {len(comps)} comparisons" if len(comps) > 1 else "one comparison"
    return (f"{title} — {words or value_words(runs, column)}; differences paired over {n} seeds, "
            f"{family}, 95 %: " + "; ".join(c.fmt() for c in comps) + ".")


# 1. root saturation ------------------------------------------------------------------------

ROOT_N = (4, 8, 16, 32, 64)
ROOT_PARAMS = ("method", "N", "K")


def _root_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("root-saturation", f"grpo N={n}", s, size, "grpo", {"G": n}, N=n, K=None)
             for n in ROOT_N for s in seeds]
    cells += [_cell("root-saturation", "deep-grpo G=8 K=8", s, size, "deep-grpo", {"G": 8, "K": 8}, N=8, K=8)
              for s in seeds]
    cells += [_cell("root-saturation", "root-only G=8 K=8", s, size, "root-only", {"G": 8, "K": 8}, N=8, K=8)
              for s in seeds]
    return cells


def _root_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    unit, budget = stopping(runs)
    per = per_run(runs, ROOT_PARAMS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    grpo = per[per.method == "grpo"]
    sns.lineplot(grpo, x="N", y="pass1_at_budget", marker="o", errorbar=ci_errorbar, ax=axes[0],
                 label="GRPO (N roots)")
    for i, method in enumerate(("deep-grpo", "root-only")):
        other = per[per.method == method]
        if len(other):
            e = mean_ci(other.pass1_at_budget)
            axes[0].axhspan(e.low if np.isfinite(e.low) else e.mean, e.high if np.isfinite(e.high) else e.mean,
                            color=f"C{3 + i}", alpha=0.2)
            axes[0].axhline(e.mean, color=f"C{3 + i}", label=f"{other.variant.iloc[0]} (95% CI band)")
    axes[0].set(xscale="log", xlabel="GRPO group size N (log scale)", ylabel="exact pass@1 at the budget",
                title=f"Equal budget: {budget:,} {unit} per run")
    ns = sorted(grpo.N.unique())
    axes[0].set_xticks(ns, [f"{n:.0f}" for n in ns])
    axes[0].minorticks_off()  # only the swept values on the log axis
    axes[0].legend(fontsize=8)
    curves = curves_on_grid(runs, unit)
    sns.lineplot(curves, x=unit, y="pass1", hue="variant", errorbar=ci_errorbar, ax=axes[1])
    axes[1].set(xlabel=f"cumulative {unit}", ylabel="exact pass@1", title=f"pass@1 against {unit} (95% CI)")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def _root_findings(runs: pd.DataFrame) -> list[str]:
    unit, _ = stopping(runs)
    per = per_run(runs, ROOT_PARAMS)
    grpo = per[per.method == "grpo"]
    by_n = {int(n): g for n, g in grpo.groupby("N")}
    out = []
    if by_n:
        line = (f"GRPO {value_words(runs, 'pass1_at_budget')} by N: "
                + ", ".join(f"N={n}: {_fmt(mean_ci(g.pass1_at_budget))} in {g.steps.mean():.0f} steps"
                            for n, g in sorted(by_n.items())))
        if "heldout_pass1_at_budget" in per:
            line += ("; held-out: " + ", ".join(f"N={n}: {_fmt(mean_ci(g.heldout_pass1_at_budget))}"
                                                for n, g in sorted(by_n.items())))
        out.append(line + ".")
    if 32 in by_n and 64 in by_n:
        out.append(family_line("Doubling N from 32 to 64 at equal budget (N=64 minus N=32)", by_n[64],
                               [("N=64 minus N=32", by_n[32])], "pass1_at_budget", runs))
    for method in ("deep-grpo", "root-only"):
        ref = per[per.method == method]
        if not len(ref) or not by_n:
            continue
        name = ref.variant.iloc[0]
        others = [(f"minus GRPO N={n}", g) for n, g in sorted(by_n.items())]
        if method == "deep-grpo":
            others.append(("minus root-only", per[per.method == "root-only"]))
        out.append(family_line(f"{name} at equal budget", ref, others, "pass1_at_budget", runs))
        if "heldout_pass1_at_budget" in per:
            out.append(family_line(f"{name}, held-out problems", ref, others, "heldout_pass1_at_budget", runs))
        for u in BUDGET_UNITS:
            out.append(family_line(f"{name}, area under the curve", ref, others, f"pass1_auc_{u}", runs))
    return out


# 2. depth bias ------------------------------------------------------------------------------

GAMMAS = (0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0)
RECOVERY = {"fatal": {"recovery": "fatal"}, "constant": {"recovery": "constant", "recovery_prob": 0.05},
            "decay": {"recovery": "decay", "recovery_prob": 0.2, "recovery_decay": 3.0}}
ROOT_PIVOT_METHOD = "root-only"
"""The method that branches from the root of failed chains only (the "root-only" pivot rule)."""
DEPTH_PARAMS = ("recovery", "pivot_rule", "gamma")


def _gamma_pivot(g: float) -> str:
    """Display name of the utility pivot rule Q ∝ P̂·r^γ at depth exponent ``g``."""
    return f"gamma={g:g}"


PIVOT_ORDER = ["root-only", "random"] + [_gamma_pivot(g) for g in GAMMAS]
"""Pivot rules of the depth-bias study, in display order (``pivot_rule`` column)."""


def _depth_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = []
    for rec, spec in RECOVERY.items():
        for s in seeds:
            for g in GAMMAS:
                cells.append(_cell("depth-bias", f"{rec} | {_gamma_pivot(g)}", s, size, "deep-grpo", {"gamma": g},
                                   spec, recovery=rec, pivot_rule=_gamma_pivot(g), gamma=g))
            cells.append(_cell("depth-bias", f"{rec} | random", s, size, "deep-random", None, spec,
                               recovery=rec, pivot_rule="random", gamma=None))
            cells.append(_cell("depth-bias", f"{rec} | root-only", s, size, ROOT_PIVOT_METHOD, None, spec,
                               recovery=rec, pivot_rule="root-only", gamma=None))
    return cells


DEPTH_MEANS = ("pivot_before_error", "pivot_depth_mean", "pivot_oracle_success")


def _depth_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return protocol_summary(runs, DEPTH_PARAMS, DEPTH_MEANS, DEPTH_MEANS)


def _depth_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    unit, budget = stopping(runs)
    per = per_run(runs, DEPTH_PARAMS, DEPTH_MEANS)
    order = [p for p in PIVOT_ORDER if p in set(per.pivot_rule)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.pointplot(per, x="pivot_rule", y="pass1_at_budget", hue="recovery", order=order, errorbar=ci_errorbar,
                  dodge=0.3, ax=axes[0])
    axes[0].set(xlabel="pivot rule (γ = depth exponent of Q ∝ P̂·r^γ)", ylabel="exact pass@1 at the budget",
                title=f"Depth bias at {budget:,} {unit} per run (mean, 95% CI)")
    axes[0].tick_params(axis="x", rotation=35)
    sns.pointplot(per, x="pivot_rule", y="pivot_before_error", hue="recovery", order=order,
                  errorbar=ci_errorbar, dodge=0.3, ax=axes[1])
    axes[1].set(xlabel="pivot rule", ylabel="fraction of pivots at/before the first error",
                title="Where the pivots land (mean over training steps)")
    axes[1].tick_params(axis="x", rotation=35)
    _save(fig, path)


def _depth_findings(runs: pd.DataFrame) -> list[str]:
    per = per_run(runs, DEPTH_PARAMS, DEPTH_MEANS)
    out = []
    for rec, g in per.groupby("recovery", sort=False):
        util = g[g.gamma.notna()]
        if util.gamma.nunique() > 1:
            means = util.groupby("gamma").pass1_at_budget.mean()
            out.append(f"{rec} recovery: the γ with the highest mean {value_words(runs, 'pass1_at_budget')} is "
                       f"{means.idxmax():g} ({means.max():.3f}; the lowest is γ = {means.idxmin():g}, "
                       f"{means.min():.3f}).")
        ref = util[util.gamma == 2.0]
        if len(ref):
            others = [("minus γ = 0", util[util.gamma == 0.0]), ("minus random pivots", g[g.pivot_rule == "random"]),
                      ("minus root-only", g[g.pivot_rule == "root-only"])]
            if any(len(o) for _, o in others):
                out.append(family_line(f"{rec} recovery, γ = 2", ref, others, "pass1_at_budget", runs))
        land = g.groupby("pivot_rule", sort=False).pivot_oracle_success.mean().dropna()
        land = land[[p for p in PIVOT_ORDER if p in land.index]]
        before = g.groupby("pivot_rule", sort=False).pivot_before_error.mean()
        if len(land):
            out.append(f"{rec} recovery, where pivots land (means over training steps, budget-independent): exact "
                       "success probability of a continuation from the chosen pivot "
                       + ", ".join(f"{land[p]:.3f} for {p}" for p in land.index)
                       + "; fraction of pivots at or before the chain's first error "
                       + ", ".join(f"{before[p]:.2f} for {p}" for p in land.index) + ".")
    return out


# 3. dilution --------------------------------------------------------------------------------

RULES = {"max-surprisal": "tree-surprisal", "low-prob": "tree-lowprob", "uniform": "tree-uniform"}
DILUTION_K = 8
"""Continuations per failed chain of every variant (dense: one pivot x K; dispersed: M x K/M)."""
MS = (2, 4)
"""Cut points of the dispersed variants: K/M >= 2 continuations per point (a group of one has
zero advantage, so the simulator rejects such plans)."""
DILUTION_PARAMS = ("rule", "M", "advantage")
"""``advantage``: ``group`` (group-relative, per branch point) or ``tree`` (TreeRL's tree advantage)."""


TREE_ADVANTAGE_RULE = "max-surprisal"
"""The dispersed rule also run with TreeRL's tree advantages (TreeRL = max-surprisal cut points +
global and local node-value advantages; ``AdvantageConfig.tree``)."""


def _dilution_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("dilution", "dense M=1", s, size, "deep-grpo", {"K": DILUTION_K}, probes=("dilution",),
                   rule="dense", M=1, advantage="group") for s in seeds]
    for rule, method in RULES.items():
        for m in MS:
            cells += [_cell("dilution", f"{rule} M={m}", s, size, method, {"n_cut_points": m, "K": DILUTION_K},
                            probes=("dilution",), rule=rule, M=m, advantage="group") for s in seeds]
    for m in MS:
        cells += [_cell("dilution", f"{TREE_ADVANTAGE_RULE} M={m} tree-adv", s, size, RULES[TREE_ADVANTAGE_RULE],
                        {"n_cut_points": m, "K": DILUTION_K, "tree": True}, probes=("dilution",),
                        rule=TREE_ADVANTAGE_RULE, M=m, advantage="tree") for s in seeds]
    return cells


DILUTION_MEANS = ("found_rate", "baseline_var", "zero_signal_points")


def _dilution_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return protocol_summary(runs, DILUTION_PARAMS, DILUTION_MEANS, DILUTION_MEANS)


def _dilution_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    unit, budget = stopping(runs)
    per = per_run(runs, DILUTION_PARAMS, DILUTION_MEANS)
    dense = per[per.rule == "dense"]
    disp = per[per.rule != "dense"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"found_rate": "P(>= 1 correct suffix | failed chain)",
              "baseline_var": "variance of the local baseline (oracle)",
              "pass1_at_budget": f"exact pass@1 at {budget:,} {unit}"}
    disp = disp.assign(rule=np.where(disp.advantage == "tree", disp.rule + " + tree adv.", disp.rule))
    for ax, col in zip(axes, labels):
        sns.lineplot(disp, x="M", y=col, hue="rule", marker="o", errorbar=ci_errorbar, ax=ax)
        if len(dense):
            e = mean_ci(dense[col])
            ax.errorbar([1], [e.mean], yerr=[[e.mean - e.low], [e.high - e.mean]] if np.isfinite(e.low) else None,
                        fmt="*", color="k", markersize=12, label="dense (1 pivot x K)")
        ax.set(xscale="log", xlabel="cut points per failed chain M (K/M continuations each)", ylabel=labels[col])
        ms = sorted(disp.M.unique())
        ax.set_xticks([1, *ms], ["1", *map(str, ms)])
        ax.minorticks_off()  # only the swept values on the log axis
        ax.legend(fontsize=7)
    axes[0].set_title(f"Dilution: K = {DILUTION_K} continuations per failed chain")
    _save(fig, path)


def _dilution_findings(runs: pd.DataFrame) -> list[str]:
    per = per_run(runs, DILUTION_PARAMS, DILUTION_MEANS)
    dense = per[per.rule == "dense"]
    disp = per[per.rule != "dense"]
    if not len(dense):
        return ["No dense-branching runs in this directory."]
    others = [(f"minus {rule} M={m}" + (" (tree advantage)" if adv == "tree" else ""), g)
              for (rule, m, adv), g in disp.groupby(["rule", "M", "advantage"], sort=False)]
    out = [f"Dense branching finds a correct suffix for {_fmt(mean_ci(dense.found_rate))} of the failed chains it "
           f"branches from (mean over training steps)."]
    if others:
        out.append(family_line("Dense minus dispersed", dense, others, "found_rate", runs,
                               "fraction of failed chains with >= 1 correct continuation (mean over training steps, "
                               "same K per failed chain)"))
        out.append(family_line("Dense minus dispersed", dense, others, "pass1_at_budget", runs))
        for u in BUDGET_UNITS:
            out.append(family_line("Dense minus dispersed", dense, others, f"pass1_auc_{u}", runs))
        widest = disp[(disp.M == disp.M.max()) & (disp.advantage == "group")]
        rule = "uniform" if "uniform" in set(widest.rule) else widest.rule.iloc[0]
        widest = widest[widest.rule == rule]
        m = int(widest.M.iloc[0])
        out.append(f"The local baseline's variance (oracle, mean over training steps) is "
                   f"{mean_ci(dense.baseline_var).mean:.4f} with K = {DILUTION_K} continuations at one point and "
                   f"{mean_ci(widest.baseline_var).mean:.4f} with K/{m} at each of {m} {rule} points.")
    return out


# 4. lambda and K ----------------------------------------------------------------------------

LAMBDAS = (0.0, 0.1, 0.5, 1.0, 2.0)
KS = (2, 4, 8, 16)
LK_PARAMS = ("knob", "value", "lam", "K")
"""``knob`` is the swept parameter (``lambda`` or ``K``) and ``value`` its value; ``lam`` and
``K`` are the run's λ and K. The reference run (λ = 1, K = 8) belongs to both curves."""


def _lk_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("lambda-k", f"lambda={lam:g}", s, size, "deep-grpo", {"lam": lam, "K": 8},
                   knob="lambda", value=lam, lam=lam, K=8) for lam in LAMBDAS for s in seeds]
    cells += [_cell("lambda-k", f"K={k}", s, size, "deep-grpo", {"lam": 1.0, "K": k},
                    knob="K", value=k, lam=1.0, K=k) for k in KS if k != 8 for s in seeds]
    return cells


def _lk_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    unit, budget = stopping(runs)
    per = per_run(runs, LK_PARAMS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sns.lineplot(per[per.K == 8], x="lam", y="pass1_at_budget", marker="o", errorbar=ci_errorbar, ax=axes[0])
    axes[0].set(xlabel="λ (weight of the aux stream)", ylabel=f"exact pass@1 at {budget:,} {unit}",
                title="Aux-stream weight λ (K = 8)")
    k = per[per.lam == 1.0]
    sns.lineplot(k, x="K", y="pass1_at_budget", marker="o", errorbar=ci_errorbar, ax=axes[1])
    axes[1].set(xscale="log", xlabel="K continuations per pivot (log scale)",
                ylabel=f"exact pass@1 at {budget:,} {unit}", title="Branch width K (λ = 1)")
    ks = sorted(k.K.unique())
    axes[1].set_xticks(ks, [f"{x:.0f}" for x in ks])
    axes[1].minorticks_off()  # only the swept values on the log axis
    _save(fig, path)


def _lk_findings(runs: pd.DataFrame) -> list[str]:
    per = per_run(runs, LK_PARAMS)
    out = []
    lam_runs = per[per.K == 8]
    if len(lam_runs):
        by_lam = {float(x): g for x, g in lam_runs.groupby("lam")}
        means = lam_runs.groupby("lam").pass1_at_budget.mean()
        out.append(f"λ with the highest mean {value_words(runs, 'pass1_at_budget')}: {means.idxmax():g} "
                   f"({means.max():.3f}).")
        if 1.0 in by_lam and len(by_lam) > 1:
            out.append(family_line("λ = 1 (K = 8)", by_lam[1.0], [(f"minus λ = {x:g}", g) for x, g in by_lam.items()
                                                                  if x != 1.0], "pass1_at_budget", runs))
    ks = per[per.lam == 1.0]
    if len(ks):
        g = ks.groupby("K")
        out.append(f"K (λ = 1), mean {value_words(runs, 'pass1_at_budget')}: " + "; ".join(
            f"K={k:.0f}: {m:.3f} after {s:.0f} steps"
            for k, m, s in zip(g.pass1_at_budget.mean().index, g.pass1_at_budget.mean(), g.steps.mean())) + ".")
        by_k = {int(k): f for k, f in g}
        if 8 in by_k and len(by_k) > 1:
            out.append(family_line("K = 8 (λ = 1)", by_k[8], [(f"minus K = {k}", f) for k, f in by_k.items()
                                                              if k != 8], "pass1_at_budget", runs))
    return out


# 5. budget frontier -------------------------------------------------------------------------

FRONTIER = {"grpo N=8": ("grpo", {"G": 8}), "grpo N=16": ("grpo", {"G": 16}), "grpo N=32": ("grpo", {"G": 32}),
            "drgrpo N=16": ("drgrpo", {"G": 16}), "root-only": ("root-only", {}), "deep-grpo": ("deep-grpo", {}),
            "deep-random": ("deep-random", {}), "tree-surprisal": ("tree-surprisal", {}),
            "tree-lowprob": ("tree-lowprob", {}), "tree-uniform": ("tree-uniform", {})}
FRONTIER_PARAMS = ("method", "N", "K")
"""``N``: main chains per prompt (G); ``K``: continuations per pivot (empty for root-only methods)."""


def _frontier_cells(seeds: list[int], size: Size) -> list[Cell]:
    from deepgrpo.methods import method_config
    cells = []
    for v, (m, a) in FRONTIER.items():
        ex = method_config(m, **a).explore
        k = None if ex.strategy == "root" else ex.K
        cells += [_cell("budget-frontier", v, s, size, m, a, N=ex.G, K=k) for s in seeds]
    return cells


def _frontier_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: the protocol's values (:func:`per_run`) and the budget needed to reach a target
    pass@1 (half-way from the mean start to the best variant's mean pass@1 at the budget, from
    the data) in each unit (``<unit>_to_target``, NaN if never reached)."""
    per = per_run(runs, FRONTIER_PARAMS)
    init = per.pass1_start.mean()
    target = init + 0.5 * (per.groupby("variant").pass1_at_budget.mean().max() - init)
    per["target"] = target
    reach = {}
    for (v, s), g in runs.groupby(["variant", "seed"], sort=False):
        hit = g[g.pass1 >= target].sort_values("step")
        reach[(v, s)] = {f"{u}_to_target": float(hit[u].iloc[0]) if len(hit) else float("nan") for u in BUDGET_UNITS}
    for u in BUDGET_UNITS:
        per[f"{u}_to_target"] = [reach[(v, s)][f"{u}_to_target"] for v, s in zip(per.variant, per.seed)]
    return per


def _frontier_summary(runs: pd.DataFrame) -> pd.DataFrame:
    m = _frontier_metrics(runs)
    values = (*headline_values(runs), *(f"{u}_to_target" for u in BUDGET_UNITS))
    out = summary_table(m, values, [v for v in FRONTIER if v in set(m.variant)] or list(dict.fromkeys(m.variant)),
                        (*FRONTIER_PARAMS, "lr"))
    reached = m.groupby("variant").rollouts_to_target.apply(lambda x: int(x.notna().sum()))
    out["reached_target"] = out.variant.map(reached).values
    return _finish_summary(out, m)


def _frontier_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    order = [v for v in FRONTIER if v in set(runs.variant)]
    for ax, x in zip(axes, BUDGET_UNITS):
        curves = curves_on_grid(runs, x)
        sns.lineplot(curves, x=x, y="pass1", hue="variant", hue_order=order, errorbar=ci_errorbar, ax=ax)
        end = common_end(runs, x)
        ax.axvline(end, color="k", lw=0.8, ls="--", label="end of the common range")
        ax.set(xlabel=f"cumulative {x}", ylabel="exact pass@1", title=f"pass@1 against {x} (95% CI over seeds)")
        ax.legend(fontsize=7)
    _save(fig, path)


def _frontier_findings(runs: pd.DataFrame) -> list[str]:
    m = _frontier_metrics(runs)
    out = [f"Target pass@1 = {m.target.iloc[0]:.3f} (half-way from the mean start to the best variant's mean "
           f"{value_words(runs, 'pass1_at_budget')})."]
    for u in BUDGET_UNITS:
        col = f"pass1_auc_{u}"
        means = m.groupby("variant")[col].mean()
        best = means.idxmax()
        out.append(f"Largest {value_words(runs, col)}: {best} ({_fmt(mean_ci(m[m.variant == best][col]))}).")
    deep = m[m.method == "deep-grpo"]
    if len(deep):
        others = [(f"minus {v}", g) for v, g in m[m.method != "deep-grpo"].groupby("variant", sort=False)]
        held = ("heldout_pass1_at_budget",) if "heldout_pass1_at_budget" in m else ()
        for col in ("pass1_at_budget", *held, *(f"pass1_auc_{u}" for u in BUDGET_UNITS)):
            out.append(family_line("DEEP-GRPO", deep, others, col, runs))
    s = _frontier_summary(runs)
    for u in BUDGET_UNITS:
        reach = "; ".join(f"{r.variant}: {getattr(r, f'{u}_to_target'):,.0f} ({r.reached_target}/{r.n} seeds)"
                          for r in s.itertuples() if np.isfinite(getattr(r, f"{u}_to_target")))
        out.append(f"{u.capitalize()} to reach the target (mean over seeds that reached it): "
                   + (reach or "none reached it") + ".")
    return out


# 6. recoverability --------------------------------------------------------------------------

HETEROGENEITY = (0.0, 0.5, 1.0)
ESTIMATORS = {"position": "deep-grpo", "state": "deep-state"}
"""Estimator driving the pivots (``estimator`` column) -> method."""
RECOV_PARAMS = ("heterogeneity", "estimator")
CALIBRATION = ("mse_pos", "mse_state", "ece_pos", "ece_state", "brier_pos", "brier_state")


def _recov_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = []
    for h in HETEROGENEITY:
        for est, method in ESTIMATORS.items():
            cells += [_cell("recoverability", f"h={h:g} | {est}", s, size, method, spec={"heterogeneity": h},
                            probes=("calibration",), heterogeneity=h, estimator=est) for s in seeds]
    return cells


def _recov_per_run(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: the protocol's values, calibration means over the second half of the run's
    steps, and the mean oracle recoverability of its chosen pivots."""
    per = per_run(runs, RECOV_PARAMS)
    half = runs.groupby(["variant", "seed"]).step.transform("max") / 2
    late = runs[runs.step > half]
    agg = late.groupby(["variant", "seed"], sort=False)[[*CALIBRATION, "pivot_oracle_success"]].mean().reset_index()
    return per.merge(agg, on=["variant", "seed"], how="left")


def _recov_summary(runs: pd.DataFrame) -> pd.DataFrame:
    per = _recov_per_run(runs)
    out = summary_table(per, ("ece_pos", "ece_state", "mse_pos", "mse_state", "brier_pos", "brier_state",
                              "pivot_oracle_success", *headline_values(runs)),
                        list(dict.fromkeys(runs.variant)), (*RECOV_PARAMS, "lr"))
    return _finish_summary(out, per)


def _recov_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    unit, budget = stopping(runs)
    per = _recov_per_run(runs)
    long = pd.concat([per.assign(shadow="position (paper)", ece=per.ece_pos),
                      per.assign(shadow="state-aware", ece=per.ece_state)], ignore_index=True)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    drive = "position" if "position" in set(per.estimator) else per.estimator.iloc[0]
    sns.lineplot(long[long.estimator == drive], x="heterogeneity", y="ece", hue="shadow", marker="o",
                 errorbar=ci_errorbar, ax=axes[0])
    axes[0].set(xlabel="between-problem heterogeneity h", ylabel="expected calibration error vs oracle",
                title=f"Calibration (same data: runs driven by {drive}, second half)")
    fin = final_rows(runs)
    fin = fin[fin.estimator == drive]
    hmax = fin.heterogeneity.max()
    fh = fin[fin.heterogeneity == hmax]
    for name, label in (("pos", "position (paper)"), ("state", "state-aware")):
        p = np.nansum(np.stack([fh[f"rel_{name}_p{j}"] * fh[f"rel_{name}_n{j}"] for j in range(10)]), axis=1)
        q = np.nansum(np.stack([fh[f"rel_{name}_q{j}"] * fh[f"rel_{name}_n{j}"] for j in range(10)]), axis=1)
        n = np.nansum(np.stack([fh[f"rel_{name}_n{j}"] for j in range(10)]), axis=1)
        ok = n > 0
        axes[1].plot(p[ok] / n[ok], q[ok] / n[ok], marker="o", label=label)
    axes[1].plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    axes[1].set(xlabel="predicted P(>= 1 of K succeeds)", ylabel="oracle P(>= 1 of K succeeds)",
                title=f"Reliability diagram (h = {hmax:g}, all seeds)", xlim=(0, 1), ylim=(0, 1))
    axes[1].legend(fontsize=8)
    sns.lineplot(per, x="heterogeneity", y="pivot_oracle_success", hue="estimator", marker="o",
                 errorbar=ci_errorbar, ax=axes[2])
    axes[2].set(xlabel="heterogeneity h", ylabel="oracle P(success | chosen pivot)",
                title="Recoverability of chosen pivots")
    sns.lineplot(per, x="heterogeneity", y="pass1_at_budget", hue="estimator", marker="o", errorbar=ci_errorbar,
                 ax=axes[3])
    axes[3].set(xlabel="heterogeneity h", ylabel=f"exact pass@1 at {budget:,} {unit}",
                title="pass@1 at the budget by pivot estimator")
    _save(fig, path)


def _recov_findings(runs: pd.DataFrame) -> list[str]:
    per = _recov_per_run(runs)
    out = []
    hs = sorted(per.heterogeneity.unique())
    # the two shadow estimators see the same branch points within a run: pair them within runs
    shadows = []
    for h in hs:
        g = per[per.heterogeneity == h]
        pos = g[g.estimator == "position"]
        shadows.append((h, pos if len(pos) else g[g.estimator == "state"]))
    if shadows:
        comps = compare_pairs([(f"h = {h:g}", s.assign(ece=s.ece_pos), s.assign(ece=s.ece_state))
                               for h, s in shadows], "ece")
        levels = ", ".join(f"h = {h:g}: position {mean_ci(s.ece_pos).mean:.3f}, state {mean_ci(s.ece_state).mean:.3f}"
                           for h, s in shadows)
        out.append(f"Expected calibration error against the oracle over the second half of each run (shadow "
                   f"estimators fed the same branch points; budget-independent): {levels}. Position minus state, "
                   f"paired within runs, Holm over {len(comps)} heterogeneities, 95 %: "
                   + "; ".join(c.fmt() for c in comps) + ".")
    pairs = []
    for h in hs:
        g = per[per.heterogeneity == h]
        st, po = g[g.estimator == "state"], g[g.estimator == "position"]
        if len(st) and len(po):
            pairs.append((f"h = {h:g}", st, po))
    for col, words in (("pivot_oracle_success", "exact recoverability of the chosen pivots (second half of each "
                                                "run)"), ("pass1_at_budget", None)):
        if pairs:
            comps = compare_pairs(pairs, col)
            out.append(f"Driving pivots with the state-aware estimator instead of the position-only one — "
                       f"{words or value_words(runs, col)}; state minus position, paired over seeds, Holm over "
                       f"{len(comps)} heterogeneities, 95 %: " + "; ".join(c.fmt() for c in comps) + ".")
    return out


# 7. the decomposition ladder ---------------------------------------------------------------------

LADDER = {"grpo N=8": ("grpo", {"G": 8}, "root sampling only"),
          "root-only": ("root-only", {}, "extra samples on failed prompts (K root samples per failed chain)"),
          "deep-random": ("deep-random", {}, "branching from a random pivot (suffix-only cost, masked prefix, "
                                             "sibling baseline)"),
          "deep-depth-only": ("deep-depth-only", {}, "pivots by depth alone (r^γ)"),
          "deep-grpo": ("deep-grpo", {}, "the position-only P̂ (DEEP-GRPO)"),
          "deep-state": ("deep-state", {}, "a state-aware P̂"),
          "oracle-pivot": ("oracle-pivot", {}, "the exact P(success | prefix) (simulator truth)"),
          "oracle-informative": ("oracle-informative", {}, "the pivot most likely to give a mixed K-group per "
                                                          "generated token (simulator truth)")}
"""The ladder of DEEP-GRPO's ingredients (DESIGN.md), in order: variant -> (method, overrides,
what this rung adds to the previous one). Every rung has G = 8 main chains."""
LADDER_PARAMS = ("rung", "method")
LADDER_MEANS = ("pivot_oracle_success", "pivot_before_error")


def _ladder_cells(seeds: list[int], size: Size) -> list[Cell]:
    return [_cell("ladder", v, s, size, m, a, rung=i) for i, (v, (m, a, _)) in enumerate(LADDER.items())
            for s in seeds]


def _ladder_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    unit, budget = stopping(runs)
    per = per_run(runs, LADDER_PARAMS, LADDER_MEANS)
    order = [v for v in LADDER if v in set(per.variant)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    long = pd.concat([per.assign(problems="training", value=per.pass1_at_budget)]
                     + ([per.assign(problems="held-out", value=per.heldout_pass1_at_budget)]
                        if "heldout_pass1_at_budget" in per else []), ignore_index=True)
    sns.pointplot(long, x="variant", y="value", hue="problems", order=order, errorbar=ci_errorbar, dodge=0.2,
                  ax=axes[0])
    axes[0].set(xlabel="rung (each adds one ingredient)", ylabel=f"exact pass@1 at {budget:,} {unit}",
                title="Decomposition ladder (mean, 95% CI)")
    axes[0].tick_params(axis="x", rotation=30)
    sns.pointplot(per, x="variant", y="pivot_oracle_success", order=order, errorbar=ci_errorbar, ax=axes[1])
    axes[1].set(xlabel="rung", ylabel="oracle P(success | branch prefix)",
                title="Recoverability of the branch points (mean over steps)")
    axes[1].tick_params(axis="x", rotation=30)
    _save(fig, path)


def _ladder_findings(runs: pd.DataFrame) -> list[str]:
    per = per_run(runs, LADDER_PARAMS, LADDER_MEANS)
    rungs = [(v, per[per.variant == v]) for v in LADDER if v in set(per.variant)]
    out = [f"Mean {value_words(runs, 'pass1_at_budget')} by rung: "
           + "; ".join(f"{v}: {_fmt(mean_ci(g.pass1_at_budget))}" for v, g in rungs) + "."]
    land = [(v, g.pivot_oracle_success.mean()) for v, g in rungs if g.pivot_oracle_success.notna().any()]
    if land:
        out.append("Exact success probability of a continuation from the branch points (mean over training steps, "
                   "budget-independent): " + "; ".join(f"{v}: {x:.3f}" for v, x in land) + ".")
    steps = [(f"{b} minus {a} ({LADDER[b][2]})", gb, ga) for (a, ga), (b, gb) in zip(rungs, rungs[1:])]
    if steps:
        cols = ["pass1_at_budget", *(["heldout_pass1_at_budget"] if "heldout_pass1_at_budget" in per else []),
                *(f"pass1_auc_{u}" for u in BUDGET_UNITS)]
        for col in cols:
            out.append(pairs_line("Each rung minus the one below it", steps, col, runs))
    return out


STUDIES: dict[str, Study] = {
    "root-saturation": Study("root-saturation", "Does GRPO flatten as N grows, and does DEEP-GRPO beat large N (and "
                             "the root-only ablation) at equal total budget?", _root_cells,
                             lambda r: protocol_summary(r, ROOT_PARAMS), _root_plot, _root_findings, ROOT_PARAMS,
                             ("grpo N=4", "deep-grpo G=8 K=8")),
    "depth-bias": Study("depth-bias", "Which depth exponent γ works best, and how does the sweet spot move with "
                        "the recovery model?", _depth_cells,
                        _depth_summary, _depth_plot, _depth_findings, DEPTH_PARAMS,
                        ("fatal | gamma=2", "decay | root-only")),
    "dilution": Study("dilution", "Dense (1 pivot x K) or dispersed (M points x K/M) for the same K per failed chain?",
                      _dilution_cells, _dilution_summary, _dilution_plot, _dilution_findings, DILUTION_PARAMS,
                      ("dense M=1", "uniform M=4")),
    "lambda-k": Study("lambda-k", "How do the aux weight λ and the branch width K matter at equal budget?", _lk_cells,
                      lambda r: protocol_summary(r, LK_PARAMS), _lk_plot, _lk_findings, LK_PARAMS,
                      ("lambda=1", "K=4")),
    "budget-frontier": Study("budget-frontier", "pass@1 per rollout and per token for every method",
                             _frontier_cells, _frontier_summary, _frontier_plot, _frontier_findings,
                             FRONTIER_PARAMS, ("grpo N=8", "deep-grpo")),
    "recoverability": Study("recoverability", "Is P(success | prefix) a function of relative depth alone? When "
                            "is it not, and does a state-aware estimator help?", _recov_cells, _recov_summary,
                            _recov_plot, _recov_findings, RECOV_PARAMS, ("h=1 | position", "h=1 | state")),
    "ladder": Study("ladder", "Which of DEEP-GRPO's ingredients pays at equal budget? GRPO → root-only → random "
                    "pivot → depth-only → position-only P̂ → state-aware P̂ → oracle pivot, each rung adding one",
                    _ladder_cells, lambda r: protocol_summary(r, LADDER_PARAMS, LADDER_MEANS, LADDER_MEANS),
                    _ladder_plot, _ladder_findings, LADDER_PARAMS, ("grpo N=8", "oracle-pivot")),
}


def base_lr(size: Size) -> float:
    """The simulator's default learning rate for this size's runner settings (the tuning grid is
    ``size.lr_factors`` times it)."""
    from sims.runner import RunnerConfig
    return float(RunnerConfig(**size.runner).lr)


def lr_grid(size: Size) -> list[float]:
    """The learning rates tried for every variant."""
    lr = base_lr(size)
    return [float(f * lr) for f in size.lr_factors]


def _kept(d: Path, tune: list[Cell], evaluation: list[Cell], tune_tables: CellTables,
          eval_tables: CellTables) -> str:
    """What an interrupted study kept, in one line (``evaluation``: the evaluation cells, empty
    while the rates are being tuned: then the evaluation files an earlier run left are counted;
    the tables: what the study has read of ``d / "tuning"`` and ``d``, not read again)."""
    if evaluation:
        evaluated = eval_tables.count_finished(evaluation)
    else:
        evaluated = len(list((d / "cells").glob("*.csv"))) if (d / "cells").is_dir() else 0
    return (f"{tune_tables.count_finished(tune)} of {len(tune)} tuning runs and {evaluated} "
            f"evaluation runs are finished and kept in {d}; rerun the same command to resume")


def run_study(name: str, out: str | Path, seeds: int = 5, size: str = "full", workers: int | None = None,
              progress: bool = True, quick: bool = False, budget_unit: str = "tokens",
              budget: int | None = None, runner: dict[str, Any] | None = None,
              rates: list[float] | None = None) -> Path:
    """Run study ``name`` under the protocol (resumable) and write its tables, figure and record
    to ``out/name``: first the tuning runs (``tuning/``, then ``tuned_lr.csv``), then the
    evaluation runs with the chosen rates (``runs.csv``, ``summary.csv``, figure, ``study.json``).

    size: ``full``, ``quick`` or ``smoke`` (:data:`SIZES`; ``quick=True`` is ``size="quick"``);
    budget_unit: what stops a run (``tokens`` or ``rollouts``); budget: total budget per run in
    that unit (default: the size's); runner: RunnerConfig overrides for every run (e.g.
    ``{"policy": "features", "optimizer": "sgd"}``; default: the simulator's defaults); rates:
    the learning-rate grid (default: the size's factors times the default rate). Ctrl-C raises
    :class:`~deepgrpo.records.Interrupted` saying what was kept.
    """
    from deepgrpo.config import ConfigError
    if name not in STUDIES:
        raise ConfigError(f"study = {name!r} is invalid: expected one of {', '.join(STUDIES)}")
    if not 1 <= seeds <= TUNING_SEED_BASE:
        raise ConfigError(f"--seeds = {seeds} is invalid: expected an integer in [1, {TUNING_SEED_BASE}] "
                          f"(evaluation seeds stay below the tuning seeds {TUNING_SEED_BASE}, ...)")
    size = "quick" if quick else size
    if size not in SIZES:
        raise ConfigError(f"size = {size!r} is invalid: expected one of {', '.join(SIZES)}")
    if budget_unit not in BUDGET_UNITS:
        raise ConfigError(f"--budget-unit = {budget_unit!r} is invalid: expected one of {', '.join(BUDGET_UNITS)}")
    if budget is not None and budget < 1:
        raise ConfigError(f"--budget = {budget} is invalid: expected an integer in [1, inf)")
    study, sz = STUDIES[name], SIZES[size]
    if runner:
        from dataclasses import replace as _replace

        from deepgrpo.config import dataclass_from_dict
        from sims.runner import RunnerConfig
        dataclass_from_dict(RunnerConfig, {**runner})  # invalid settings fail here, before any work
        sz = _replace(sz, runner={**sz.runner, **runner})
    if rates is not None and (not rates or not all(np.isfinite(r) and r > 0 for r in rates)):
        raise ConfigError(f"--lr-grid = {rates} is invalid: expected learning rates > 0")
    total = int(budget if budget is not None else sz.budget[budget_unit])
    d = Path(out) / name
    t0 = time.perf_counter()
    cells = study.grid(list(range(seeds)), size)
    if runner:
        cells = [_replace(c, params={**c.params, "runner": {**c.params["runner"], **runner}}) for c in cells]
    base = list({c.variant: c for c in reversed(cells)}.values())[::-1]  # one cell per variant, grid order
    rates = sorted(float(r) for r in rates) if rates is not None else lr_grid(sz)
    grids = {c.variant: list(rates) for c in base}
    limits = (rates[0] / 2 ** sz.max_extensions, rates[-1] * 2 ** sz.max_extensions)
    tune = tuning_cells(base, grids, sz.tuning_seeds, total, budget_unit, sz.max_steps)
    stage = "learning-rate tuning"
    evaluation: list[Cell] = []
    tune_tables = CellTables(d / "tuning", sim_run_complete)  # every cell file is read once
    eval_tables = CellTables(d, sim_run_complete)
    try:
        while True:  # extend a variant's grid past an end where its best rate lies, up to the limits
            tuning_runs = run_sweep(tune, run_sim_cell, d / "tuning", "runs", workers=workers, progress=progress,
                                    batch_worker=run_sim_cells, batch_key=sim_batch_key,
                                    complete=sim_run_complete, tables=tune_tables, write_table=False)
            table = choose_rates(tuning_runs)
            if not extend_grids(table, grids, *limits):
                break
            tune = tuning_cells(base, grids, sz.tuning_seeds, total, budget_unit, sz.max_steps)
        write_csv_atomic(d / "tuning" / "runs.csv", tuning_runs)  # once, when the grids stop growing
        stage = "choosing the learning rates"
        write_csv_atomic(d / "tuned_lr.csv", table)
        chosen = chosen_rates(table)
        evaluation = [with_protocol(c, chosen[c.variant], total, budget_unit, sz.max_steps) for c in cells]
        stage = "evaluation"
        runs = run_sweep(evaluation, run_sim_cell, d, "runs", workers=workers, progress=progress,
                         batch_worker=run_sim_cells, batch_key=sim_batch_key,
                         complete=sim_run_complete, tables=eval_tables)
        stage = "writing the summary and figure"
        write_csv_atomic(d / "summary.csv", study.summary(runs))
        study.plot(runs, d / f"{name}.png")
    except KeyboardInterrupt:  # also the sweeps' Interrupted: say what this study kept
        raise Interrupted(f"study {name}, during {stage}: "
                          f"{_kept(d, tune, evaluation, tune_tables, eval_tables)}") from None
    from sims.runner import RunnerConfig
    write_json_atomic(d / "study.json", {
        "study": name, "question": study.question, "seeds": seeds, "evaluation_seeds": list(range(seeds)),
        "size": size, "size_config": {k: v for k, v in vars(sz).items()}, "params": list(study.params),
        "protocol": {"budget_unit": budget_unit, "budget": total, "max_steps": sz.max_steps,
                     "tuning_seeds": [TUNING_SEED_BASE + i for i in range(sz.tuning_seeds)],
                     "lr_grid": rates, "lr_limits": list(limits), "max_extensions": sz.max_extensions,
                     "tuning_criterion": TUNING_CRITERION, "alpha": ALPHA,
                     "equivalence_margin": EQUIVALENCE_MARGIN, "columns": list(PROTOCOL_COLUMNS),
                     "runner": {k: v for k, v in vars(RunnerConfig(**evaluation[0].params["runner"])).items()
                                if k not in ("steps", "budget", "budget_unit", "lr")} if evaluation else {}},
        "cells": len(cells), "tuning_cells": len(tune), "wall_time_s": time.perf_counter() - t0,
        "versions": versions()})
    return d
