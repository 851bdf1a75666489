"""The studies: named sweeps in the simulator, each with its table, figure and findings.

Every study is a :class:`Study`: a grid of :class:`~analysis.sweep.Cell` (variants x paired
seeds), a summary of the final step per run, a seaborn figure and findings computed from the
data (``findings`` is called again by the report, never written in advance).

Each cell carries its study parameters as columns (``N``, ``recovery``, ``gamma``, ``rule``,
``M``, ``knob``, ``value``, ``heterogeneity``, ``estimator``, ...): the analyses select and
group runs by those columns; ``variant`` is only the display label.

Run one with ``deepgrpo study NAME [--seeds 5] [--quick | --smoke] [--out DIR]``; results land in
``DIR/NAME/``: ``runs.csv`` (tidy: one row per run and step), ``summary.csv`` (one row per
variant: its parameters, mean and 95 % CI of the final values over seeds), ``NAME.png`` and
``study.json``.

Columns read from the runs (the core's step-record vocabulary plus the simulator's oracle
columns): ``step``, ``seed``, ``method``, ``rollouts``, ``tokens``, ``pivots``, ``pass1``,
``pass8``, ``pivot_depth_mean``, ``pivot_before_error``, ``pivot_oracle_success`` and the
probes' columns (:mod:`analysis.probes`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.stats import ci_errorbar, mean_ci, paired_difference, paired_rows, summarize
from analysis.sweep import Cell, run_sweep
from deepgrpo.records import atomic_write, versions, write_csv_atomic, write_json_atomic

# ------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Size:
    """How big a study run is: training steps, problems per step, extra spec overrides."""

    steps: int
    batch_problems: int
    spec: dict[str, Any]


FULL = Size(steps=30, batch_problems=16, spec={})
"""Default size: the simulator's default spec (32 problems), 30 steps of 16 problems."""
QUICK = Size(steps=12, batch_problems=8, spec={"n_problems": 16})
"""``--quick``: 16 problems, 12 steps of 8 (every study in well under a minute on 2 cores)."""
SMOKE = Size(steps=4, batch_problems=4, spec={"n_problems": 8})
"""``--smoke``: 8 problems, 4 steps of 4, and only each study's :attr:`Study.smoke` variants
(a check that the whole pipeline works; a second or two per study)."""
SIZES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
"""Size name -> :class:`Size`."""


def run_sim_cell(cell: Cell) -> list[dict[str, Any]]:
    """Worker of every study: one simulator training run; returns its history rows.

    ``cell.params``: ``method`` (name), ``algo`` (flat overrides of the method's config),
    ``spec`` (TokenTreeSpec overrides), ``runner`` (RunnerConfig overrides), ``probes``
    (names in :data:`analysis.probes.PROBES`).
    """
    from analysis.probes import PROBES, CalibrationProbe
    from deepgrpo.methods import method_config
    from sims.runner import RunnerConfig, train
    from sims.spec import TokenTreeSpec

    p = cell.params
    algo = method_config(p["method"], **p.get("algo", {}))
    spec = TokenTreeSpec(**p.get("spec", {}))
    runner = RunnerConfig(**p.get("runner", {}))
    probes = []
    for name in p.get("probes", []):
        probes.append(CalibrationProbe(algo.explore.K) if name == "calibration" else PROBES[name]())
    result = train(spec, algo, runner, seed=cell.seed, method=p["method"], probes=probes)
    return result.history


def _cell(study: str, variant: str, seed: int, size: Size, method: str, algo: dict | None = None,
          spec: dict | None = None, probes: tuple[str, ...] = (), **columns: Any) -> Cell:
    """A simulator cell; ``columns`` are the study parameters written as columns of its rows."""
    return Cell(study, variant, seed, {
        "method": method, "algo": dict(algo or {}), "spec": {**size.spec, **(spec or {})},
        "runner": {"steps": size.steps, "batch_problems": size.batch_problems},
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

    cells(seeds, size): the full grid; params: the study-parameter columns of its runs (shown
    in the summary); smoke: the display labels of the variants of its smoke grid.
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
    in ``values`` its mean over seeds and the 95 % CI half-width (``<value>_pm``), plus ``n``
    (runs), rows in ``order``."""
    out = per_run.groupby("variant", sort=False)[list(params)].first().reset_index()
    n = None
    for v in values:
        s = summarize(per_run, ["variant"], v).rename(columns={"mean": v, "half_width": f"{v}_pm"})
        n = s[["variant", "n"]] if n is None else n
        out = out.merge(s[["variant", v, f"{v}_pm"]], on="variant")
    out = out.merge(n, on="variant")
    return _order(out, order).reset_index(drop=True)


def _summary_final(runs: pd.DataFrame, values: tuple[str, ...], params: tuple[str, ...]) -> pd.DataFrame:
    return summary_table(final_rows(runs), values, list(dict.fromkeys(runs["variant"])), params)


def _save(fig, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


# 1. root saturation ------------------------------------------------------------------------

ROOT_N = (4, 8, 16, 32, 64)
ROOT_PARAMS = ("method", "N", "K")


def _root_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("root-saturation", f"grpo N={n}", s, size, "grpo", {"G": n}, N=n) for n in ROOT_N for s in seeds]
    cells += [_cell("root-saturation", "deep-grpo G=8 K=8", s, size, "deep-grpo", {"G": 8, "K": 8}, N=8, K=8)
              for s in seeds]
    return cells


def _root_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fin = final_rows(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    grpo, deep = fin[fin.method == "grpo"], fin[fin.method == "deep-grpo"]
    sns.lineplot(grpo, x="N", y="pass1", marker="o", errorbar=ci_errorbar, ax=axes[0], label="GRPO (N roots)")
    if len(deep):
        e = mean_ci(deep.pass1)
        axes[0].axhspan(e.low if np.isfinite(e.low) else e.mean, e.high if np.isfinite(e.high) else e.mean,
                        color="C3", alpha=0.2)
        axes[0].axhline(e.mean, color="C3", label=f"DEEP-GRPO G={deep.N.iloc[0]:.0f}, K={deep.K.iloc[0]:.0f} "
                                                  "(95% CI band)")
    axes[0].set(xscale="log", xlabel="GRPO group size N (log scale)", ylabel="final exact pass@1",
                title="Does root sampling saturate?")
    ns = sorted(grpo.N.unique())
    axes[0].set_xticks(ns, [f"{n:.0f}" for n in ns])
    axes[0].minorticks_off()  # only the swept values on the log axis
    axes[0].legend(fontsize=8)
    sns.scatterplot(fin, x="rollouts", y="pass1", hue="variant", style="method", ax=axes[1], s=40)
    axes[1].set(xscale="log", xlabel="rollouts used (whole run, log scale)", ylabel="final exact pass@1",
                title="Final pass@1 against budget (one point per seed)")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def _root_findings(runs: pd.DataFrame) -> list[str]:
    fin = final_rows(runs)
    grpo, deep = fin[fin.method == "grpo"], fin[fin.method == "deep-grpo"]
    by_n = {int(n): g for n, g in grpo.groupby("N")}
    out = [f"Initial exact pass@1 is {_fmt(mean_ci(runs[runs.step == 0].pass1))}."]
    if by_n:
        out.append("GRPO final pass@1 by N: " + ", ".join(f"N={n}: {_fmt(mean_ci(g.pass1))}"
                                                            for n, g in sorted(by_n.items())) + ".")
    if 32 in by_n and 64 in by_n:
        d = paired_rows(by_n[64], by_n[32], "pass1")
        out.append(f"Doubling N from 32 to 64 changes final pass@1 by {_fmt(d)} (paired over {d.n} seeds) "
                   f"for {by_n[64].rollouts.mean() / by_n[32].rollouts.mean():.2f}x the rollouts.")
    if len(deep) and by_n:
        name = f"DEEP-GRPO (G={deep.N.iloc[0]:.0f}, K={deep.K.iloc[0]:.0f})"
        ro = deep.rollouts.mean()
        if 64 in by_n:
            d = paired_rows(deep, by_n[64], "pass1")
            verdict = "beats" if d.low > 0 else ("trails" if d.high < 0 else "is not distinguishable from")
            out.append(f"{name} {verdict} GRPO N=64: difference {_fmt(d)} in final pass@1, using {ro:,.0f} rollouts "
                       f"against {by_n[64].rollouts.mean():,.0f} ({ro / by_n[64].rollouts.mean():.2f}x).")
        near = min(by_n, key=lambda n: abs(np.log(by_n[n].rollouts.mean()) - np.log(ro)))
        d = paired_rows(deep, by_n[near], "pass1")
        if near != 64:
            out.append(f"At the closest budget, {name} ({ro:,.0f} rollouts) minus GRPO N={near} "
                       f"({by_n[near].rollouts.mean():,.0f} rollouts) is {_fmt(d)} in final pass@1.")
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


def _with_step_means(runs: pd.DataFrame, cols: tuple[str, ...]) -> pd.DataFrame:
    """Final rows with ``cols`` replaced by their mean over the run's training steps (NaN-skipping)."""
    means = runs[runs.step > 0].groupby(["variant", "seed"])[list(cols)].mean().reset_index()
    return final_rows(runs).drop(columns=list(cols)).merge(means, on=["variant", "seed"])


DEPTH_MEANS = ("pivot_before_error", "pivot_depth_mean", "pivot_oracle_success")


def _depth_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summary_table(_with_step_means(runs, DEPTH_MEANS), ("pass1", *DEPTH_MEANS, "rollouts"),
                         list(dict.fromkeys(runs.variant)), DEPTH_PARAMS)


def _depth_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fin = _with_step_means(runs, DEPTH_MEANS)
    order = [p for p in PIVOT_ORDER if p in set(fin.pivot_rule)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.pointplot(fin, x="pivot_rule", y="pass1", hue="recovery", order=order, errorbar=ci_errorbar,
                  dodge=0.3, ax=axes[0])
    axes[0].set(xlabel="pivot rule (γ = depth exponent of Q ∝ P̂·r^γ)", ylabel="final exact pass@1",
                title="Depth bias: final pass@1 (mean, 95% CI)")
    axes[0].tick_params(axis="x", rotation=35)
    sns.pointplot(fin, x="pivot_rule", y="pivot_before_error", hue="recovery", order=order,
                  errorbar=ci_errorbar, dodge=0.3, ax=axes[1])
    axes[1].set(xlabel="pivot rule", ylabel="fraction of pivots at/before the first error",
                title="Where the pivots land (mean over training steps)")
    axes[1].tick_params(axis="x", rotation=35)
    _save(fig, path)


def _depth_findings(runs: pd.DataFrame) -> list[str]:
    fin = _with_step_means(runs, DEPTH_MEANS)
    out = []
    for rec, g in fin.groupby("recovery", sort=False):
        util = g[g.gamma.notna()]
        parts = []
        if len(util):
            means = util.groupby("gamma").pass1.mean()
            parts.append(f"the best γ is {means.idxmax():g} (final pass@1 {means.max():.3f})")
        ref = util[util.gamma == 2.0]
        if len(ref):
            others = [("γ = 0", util[util.gamma == 0.0]), ("random pivots", g[g.pivot_rule == "random"]),
                      ("root-only", g[g.pivot_rule == "root-only"])]
            diffs = [f"minus {name} {_fmt(paired_rows(ref, other, 'pass1'))}" for name, other in others if len(other)]
            if diffs:
                parts.append("final pass@1 of γ = 2 " + ", ".join(diffs) + " (paired over seeds)")
        land = g.groupby("pivot_rule", sort=False).pivot_oracle_success.mean().dropna()
        land = land[[p for p in PIVOT_ORDER if p in land.index]]
        before = g.groupby("pivot_rule", sort=False).pivot_before_error.mean()
        if len(land):
            parts.append("exact success probability of a continuation from the chosen pivot: "
                         + ", ".join(f"{land[p]:.3f} for {p}" for p in land.index)
                         + "; fraction of pivots at or before the chain's first error: "
                         + ", ".join(f"{before[p]:.2f} for {p}" for p in land.index))
        out.append(f"{rec} recovery: " + "; ".join(parts) + ".")
    return out


# 3. dilution --------------------------------------------------------------------------------

RULES = {"max-surprisal": "tree-surprisal", "low-prob": "tree-lowprob", "uniform": "tree-uniform"}
MS = (2, 4, 8)
DILUTION_PARAMS = ("rule", "M")


def _dilution_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("dilution", "dense M=1", s, size, "deep-grpo", probes=("dilution",), rule="dense", M=1)
             for s in seeds]
    for rule, method in RULES.items():
        for m in MS:
            cells += [_cell("dilution", f"{rule} M={m}", s, size, method, {"n_cut_points": m},
                            probes=("dilution",), rule=rule, M=m) for s in seeds]
    return cells


def _dilution_per_run(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs[runs.step > 0]
    agg = r.groupby(["variant", "rule", "M", "seed"], sort=False).agg(
        found_rate=("found_rate", "mean"), baseline_var=("baseline_var", "mean"),
        zero_signal_points=("zero_signal_points", "mean")).reset_index()
    fin = final_rows(runs)[["variant", "seed", "pass1", "rollouts"]]
    return agg.merge(fin, on=["variant", "seed"])


def _dilution_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summary_table(_dilution_per_run(runs), ("found_rate", "baseline_var", "zero_signal_points", "pass1",
                                                    "rollouts"), list(dict.fromkeys(runs.variant)), DILUTION_PARAMS)


def _dilution_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    per = _dilution_per_run(runs)
    dense = per[per.rule == "dense"]
    disp = per[per.rule != "dense"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"found_rate": "P(>= 1 correct suffix | failed chain)",
              "baseline_var": "variance of the local baseline (oracle)", "pass1": "final exact pass@1"}
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
    axes[0].set_title("Dilution at equal budget (n_pivots·K per failed chain)")
    _save(fig, path)


def _dilution_findings(runs: pd.DataFrame) -> list[str]:
    per = _dilution_per_run(runs)
    dense = per[per.rule == "dense"]
    disp = per[per.rule != "dense"]
    if not len(dense):
        return ["No dense-branching runs in this directory."]
    out = []
    for col, what in (("found_rate", "finds a correct suffix for a failed chain"),
                      ("pass1", "reaches final pass@1")):
        parts = [f"{rule} M={m}: {_fmt(paired_rows(dense, g, col))}"
                 for (rule, m), g in disp.groupby(["rule", "M"], sort=False)]
        out.append(f"Dense branching {what} at {_fmt(mean_ci(dense[col]))}"
                   + ("; dense minus dispersed, paired: " + "; ".join(parts) if parts else "") + ".")
    if len(disp):
        widest = disp[disp.M == disp.M.max()]
        rule = "uniform" if "uniform" in set(widest.rule) else widest.rule.iloc[0]
        widest = widest[widest.rule == rule]
        m = int(widest.M.iloc[0])
        out.append(f"The local baseline's variance is {mean_ci(dense.baseline_var).mean:.4f} with K continuations "
                   f"at one point and {mean_ci(widest.baseline_var).mean:.4f} with K/{m} at each of {m} {rule} "
                   f"points.")
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
    fin = final_rows(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sns.lineplot(fin[fin.K == 8], x="lam", y="pass1", marker="o", errorbar=ci_errorbar, ax=axes[0])
    axes[0].set(xlabel="λ (weight of the aux stream)", ylabel="final exact pass@1", title="Aux-stream weight λ (K = 8)")
    k = fin[fin.lam == 1.0]
    sns.lineplot(k, x="K", y="pass1", marker="o", errorbar=ci_errorbar, ax=axes[1])
    axes[1].set(xscale="log", xlabel="K continuations per pivot (log scale)", ylabel="final exact pass@1",
                title="Branch width K (λ = 1)")
    ks = sorted(k.K.unique())
    axes[1].set_xticks(ks, [f"{x:.0f}" for x in ks])
    axes[1].minorticks_off()  # only the swept values on the log axis
    _save(fig, path)


def _lk_findings(runs: pd.DataFrame) -> list[str]:
    fin = final_rows(runs)
    lam_runs = fin[fin.K == 8]
    out = []
    if len(lam_runs):
        by_lam = {float(x): g for x, g in lam_runs.groupby("lam")}
        means = lam_runs.groupby("lam").pass1.mean()
        line = f"Best λ: {means.idxmax():g} (final pass@1 {means.max():.3f})"
        if 1.0 in by_lam:
            diffs = [f"λ=1 minus λ={x:g}: {_fmt(paired_rows(by_lam[1.0], g, 'pass1'))}"
                     for x, g in by_lam.items() if x != 1.0]
            if diffs:
                line += "; " + "; ".join(diffs)
        out.append(line + ".")
    ks = fin[fin.lam == 1.0]
    if len(ks):
        means, rollouts = ks.groupby("K").pass1.mean(), ks.groupby("K").rollouts.mean()
        out.append("K (λ = 1): " + "; ".join(f"K={k:.0f}: pass@1 {means[k]:.3f} with {rollouts[k]:,.0f} rollouts"
                                             for k in means.index) + ".")
    return out


# 5. budget frontier -------------------------------------------------------------------------

FRONTIER = {"grpo N=8": ("grpo", {"G": 8}), "grpo N=16": ("grpo", {"G": 16}), "grpo N=32": ("grpo", {"G": 32}),
            "drgrpo N=16": ("drgrpo", {"G": 16}), "deep-grpo": ("deep-grpo", {}),
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
    """Per run: AUC of pass@1 over a common rollout range and over a common token range, and
    the rollouts/tokens needed to reach a target pass@1 (computed from the data)."""
    fin = final_rows(runs)
    common_r = fin.groupby("variant").rollouts.mean().min()
    common_t = fin.groupby("variant").tokens.mean().min()
    init = runs[runs.step == 0].pass1.mean()
    target = init + 0.5 * (fin.groupby("variant").pass1.mean().max() - init)
    rows = []
    for (v, s), g in runs.groupby(["variant", "seed"], sort=False):
        g = g.sort_values("step")
        row = {"variant": v, "seed": s, "target": target}
        for x, common, name in (("rollouts", common_r, "auc_rollouts"), ("tokens", common_t, "auc_tokens")):
            grid = np.linspace(0, common, 200)
            row[name] = float(np.mean(np.interp(grid, g[x].to_numpy(float), g.pass1.to_numpy(float))))
            hit = g[g.pass1 >= target]
            row[f"{x}_to_target"] = float(hit[x].iloc[0]) if len(hit) else float("nan")
        rows.append(row)
    keep = ["variant", "seed", *FRONTIER_PARAMS, "pass1", "rollouts", "tokens"]
    return pd.DataFrame(rows).merge(fin[keep], on=["variant", "seed"])


def _frontier_summary(runs: pd.DataFrame) -> pd.DataFrame:
    m = _frontier_metrics(runs)
    out = summary_table(m, ("pass1", "rollouts", "tokens", "auc_rollouts", "auc_tokens", "rollouts_to_target",
                            "tokens_to_target"), list(FRONTIER), FRONTIER_PARAMS)
    reached = m.groupby("variant").rollouts_to_target.apply(lambda x: int(x.notna().sum()))
    out["reached_target"] = out.variant.map(reached).values
    return out


def _frontier_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    order = [v for v in FRONTIER if v in set(runs.variant)]
    for ax, x, label in ((axes[0], "rollouts", "cumulative rollouts"),
                         (axes[1], "tokens", "cumulative generated tokens")):
        # put every run on a common grid so seeds can be averaged with a CI band
        grid = np.linspace(0, runs.groupby("variant")[x].max().min(), 40)
        rows = [{"variant": v, "seed": s, x: b, "pass1": float(np.interp(b, g[x], g.pass1))}
                for (v, s), g in runs.groupby(["variant", "seed"]) for b in grid]
        sns.lineplot(pd.DataFrame(rows), x=x, y="pass1", hue="variant", hue_order=order,
                     errorbar=ci_errorbar, ax=ax)
        ax.set(xlabel=f"{label} (common range)", ylabel="exact pass@1", title=f"pass@1 against {label}")
        ax.legend(fontsize=7)
    _save(fig, path)


def _frontier_findings(runs: pd.DataFrame) -> list[str]:
    m = _frontier_metrics(runs)
    s = _frontier_summary(runs)
    best = s.sort_values("auc_rollouts", ascending=False).iloc[0]
    out = [f"Target pass@1 = {m.target.iloc[0]:.3f} (half-way from the start to the best final mean).",
           f"Largest area under pass@1-vs-rollouts (common budget): {best.variant} "
           f"({_fmt(mean_ci(m[m.variant == best.variant].auc_rollouts))})."]
    deep = m[m.method == "deep-grpo"]
    refs = [(f"GRPO N={n:.0f}", g) for n, g in m[m.method == "grpo"].groupby("N")]
    refs += [("tree-surprisal", m[m.method == "tree-surprisal"])]
    for name, ref in refs:
        if len(deep) and len(ref):
            d = paired_rows(deep, ref, "auc_rollouts")
            dt = paired_rows(deep, ref, "auc_tokens")
            out.append(f"DEEP-GRPO minus {name}: AUC over rollouts {_fmt(d)}, over tokens {_fmt(dt)}.")
    reach = "; ".join(f"{r.variant}: {r.rollouts_to_target:,.0f} rollouts ({r.reached_target}/{r.n} seeds)"
                      for r in s.itertuples() if np.isfinite(r.rollouts_to_target))
    out.append("Rollouts to reach the target (mean over seeds that reached it): " + (reach or "none reached it") + ".")
    return out


# 6. recoverability --------------------------------------------------------------------------

HETEROGENEITY = (0.0, 0.5, 1.0)
ESTIMATORS = {"position": "deep-grpo", "state": "deep-state"}
"""Estimator driving the pivots (``estimator`` column) -> method."""
RECOV_PARAMS = ("heterogeneity", "estimator")


def _recov_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = []
    for h in HETEROGENEITY:
        for est, method in ESTIMATORS.items():
            cells += [_cell("recoverability", f"h={h:g} | {est}", s, size, method, spec={"heterogeneity": h},
                            probes=("calibration",), heterogeneity=h, estimator=est) for s in seeds]
    return cells


def _recov_per_run(runs: pd.DataFrame) -> pd.DataFrame:
    late = runs[runs.step > runs.step.max() / 2]
    agg = late.groupby(["variant", *RECOV_PARAMS, "seed"], sort=False).agg(
        mse_pos=("mse_pos", "mean"), mse_state=("mse_state", "mean"), ece_pos=("ece_pos", "mean"),
        ece_state=("ece_state", "mean"), brier_pos=("brier_pos", "mean"), brier_state=("brier_state", "mean"),
        pivot_oracle_success=("pivot_oracle_success", "mean")).reset_index()
    fin = final_rows(runs)[["variant", "seed", "pass1"]]
    return agg.merge(fin, on=["variant", "seed"])


def _recov_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summary_table(_recov_per_run(runs), ("ece_pos", "ece_state", "mse_pos", "mse_state", "brier_pos",
                                                 "brier_state", "pivot_oracle_success", "pass1"),
                         list(dict.fromkeys(runs.variant)), RECOV_PARAMS)


def _recov_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    per = _recov_per_run(runs)
    long = pd.concat([per.assign(shadow="position (paper)", ece=per.ece_pos),
                      per.assign(shadow="state-aware", ece=per.ece_state)])
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
    sns.lineplot(per, x="heterogeneity", y="pass1", hue="estimator", marker="o", errorbar=ci_errorbar, ax=axes[3])
    axes[3].set(xlabel="heterogeneity h", ylabel="final exact pass@1", title="Final pass@1 by pivot estimator")
    _save(fig, path)


def _recov_findings(runs: pd.DataFrame) -> list[str]:
    per = _recov_per_run(runs)
    out = []
    for h, g in per.groupby("heterogeneity"):
        pos, state = g[g.estimator == "position"], g[g.estimator == "state"]
        shadow = pos if len(pos) else state
        line = (f"h = {h:g}: position-only ECE {mean_ci(shadow.ece_pos).mean:.3f} vs state-aware "
                f"{mean_ci(shadow.ece_state).mean:.3f} (position minus state "
                f"{_fmt(paired_difference(shadow.ece_pos, shadow.ece_state))}, same runs)")
        if len(pos) and len(state):
            line += (f"; driving pivots with the state-aware estimator changes the oracle recoverability of chosen "
                     f"pivots by {_fmt(paired_rows(state, pos, 'pivot_oracle_success'))} and final pass@1 by "
                     f"{_fmt(paired_rows(state, pos, 'pass1'))}")
        out.append(line + ".")
    return out


STUDIES: dict[str, Study] = {
    "root-saturation": Study("root-saturation", "Does GRPO flatten as N grows, and does DEEP-GRPO beat N = 64 at "
                             "equal or lower budget?", _root_cells,
                             lambda r: _summary_final(r, ("pass1", "pass8", "rollouts", "tokens"), ROOT_PARAMS),
                             _root_plot, _root_findings, ROOT_PARAMS, ("grpo N=4", "deep-grpo G=8 K=8")),
    "depth-bias": Study("depth-bias", "Which depth exponent γ works best, and how does the sweet spot move with "
                        "the recovery model?", _depth_cells,
                        _depth_summary, _depth_plot, _depth_findings, DEPTH_PARAMS,
                        ("fatal | gamma=2", "decay | root-only")),
    "dilution": Study("dilution", "Dense (1 pivot x K) or dispersed (M points x K/M) at equal budget?",
                      _dilution_cells, _dilution_summary, _dilution_plot, _dilution_findings, DILUTION_PARAMS,
                      ("dense M=1", "uniform M=4")),
    "lambda-k": Study("lambda-k", "How do the aux weight λ and the branch width K matter?", _lk_cells,
                      lambda r: _summary_final(r, ("pass1", "rollouts", "tokens"), LK_PARAMS), _lk_plot,
                      _lk_findings, LK_PARAMS, ("lambda=1", "K=4")),
    "budget-frontier": Study("budget-frontier", "pass@1 per rollout and per token for every method",
                             _frontier_cells, _frontier_summary, _frontier_plot, _frontier_findings,
                             FRONTIER_PARAMS, ("grpo N=8", "deep-grpo")),
    "recoverability": Study("recoverability", "Is P(success | prefix) a function of relative depth alone? When "
                            "is it not, and does a state-aware estimator help?", _recov_cells, _recov_summary,
                            _recov_plot, _recov_findings, RECOV_PARAMS, ("h=1 | position", "h=1 | state")),
}


def run_study(name: str, out: str | Path, seeds: int = 5, size: str = "full", workers: int | None = None,
              progress: bool = True, quick: bool = False) -> Path:
    """Run study ``name`` (resumable) and write its tables, figure and record to ``out/name``.

    size: ``full``, ``quick`` or ``smoke`` (:data:`SIZES`; ``quick=True`` is ``size="quick"``).
    """
    from deepgrpo.config import ConfigError
    if name not in STUDIES:
        raise ConfigError(f"study = {name!r} is invalid: expected one of {', '.join(STUDIES)}")
    if seeds < 1:
        raise ConfigError(f"--seeds = {seeds} is invalid: expected an integer in [1, inf)")
    size = "quick" if quick else size
    if size not in SIZES:
        raise ConfigError(f"size = {size!r} is invalid: expected one of {', '.join(SIZES)}")
    study = STUDIES[name]
    d = Path(out) / name
    t0 = time.perf_counter()
    cells = study.grid(list(range(seeds)), size)
    runs = run_sweep(cells, run_sim_cell, d, "runs", workers=workers, progress=progress)
    write_csv_atomic(d / "summary.csv", study.summary(runs))
    study.plot(runs, d / f"{name}.png")
    write_json_atomic(d / "study.json", {"study": name, "question": study.question, "seeds": seeds, "size": size,
                                          "size_config": vars(SIZES[size]), "params": list(study.params),
                                          "cells": len(cells), "wall_time_s": time.perf_counter() - t0,
                                          "versions": versions()})
    return d
