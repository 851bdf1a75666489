"""The studies: named sweeps in the simulator, each with its table, figure and findings.

Every study is a :class:`Study`: a grid of :class:`~analysis.sweep.Cell` (variants x paired
seeds), a summary of the final step per run, a seaborn figure and findings computed from the
data (``findings`` is called again by the report, never written in advance).

Run one with ``deepgrpo study NAME [--seeds 5] [--quick] [--out DIR]``; results land in
``DIR/NAME/``: ``runs.csv`` (tidy: one row per run and step), ``summary.csv`` (one row per
variant: mean and 95 % CI of the final values over seeds), ``NAME.png`` and ``study.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis.stats import mean_ci, paired_by_seed, summarize
from analysis.sweep import Cell, run_sweep
from deepgrpo.records import versions, write_csv_atomic, write_json_atomic

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
          spec: dict | None = None, probes: tuple[str, ...] = (), **extra: Any) -> Cell:
    return Cell(study, variant, seed, {
        "method": method, "algo": dict(algo or {}), "spec": {**size.spec, **(spec or {})},
        "runner": {"steps": size.steps, "batch_problems": size.batch_problems},
        "probes": list(probes), **extra})


def final_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The last step of every run (one row per (variant, seed))."""
    last = runs.groupby(["variant", "seed"])["step"].transform("max")
    return runs[runs["step"] == last].reset_index(drop=True)


def _order(frame: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    cat = pd.Categorical(frame["variant"], categories=variants, ordered=True)
    return frame.assign(variant=cat).sort_values("variant").assign(variant=lambda f: f["variant"].astype(str))


def _ci_errorbar(values) -> tuple[float, float]:
    e = mean_ci(values)
    return (e.low, e.high) if np.isfinite(e.low) else (e.mean, e.mean)


def _fmt(e, digits: int = 3) -> str:
    return f"{e.mean:.{digits}f} ± {e.half_width:.{digits}f}" if np.isfinite(e.half_width) else f"{e.mean:.{digits}f}"


# ------------------------------------------------------------------------------------------
# the study type


@dataclass
class Study:
    """A named study: its grid, summary, figure and findings."""

    name: str
    question: str
    cells: Callable[[list[int], Size], list[Cell]]
    summary: Callable[[pd.DataFrame], pd.DataFrame]
    plot: Callable[[pd.DataFrame, Path], None]
    findings: Callable[[pd.DataFrame], list[str]]


def summary_table(per_run: pd.DataFrame, values: tuple[str, ...], order: list[str]) -> pd.DataFrame:
    """One row per variant: for each column in ``values`` its mean over seeds and the 95 % CI
    half-width (``<value>_pm``), plus ``n`` (runs), rows in ``order``."""
    out = None
    for v in values:
        s = summarize(per_run, ["variant"], v).rename(columns={"mean": v, "half_width": f"{v}_pm"})
        s = s[["variant", v, f"{v}_pm", "n"]]
        out = s if out is None else out.merge(s.drop(columns="n"), on="variant")
    return _order(out, order).reset_index(drop=True)


def _summary_final(runs: pd.DataFrame, values: tuple[str, ...]) -> pd.DataFrame:
    return summary_table(final_rows(runs), values, list(dict.fromkeys(runs["variant"])))


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)


# 1. root saturation ------------------------------------------------------------------------

ROOT_N = (4, 8, 16, 32, 64)


def _root_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("root-saturation", f"grpo N={n}", s, size, "grpo", {"G": n}, N=n) for n in ROOT_N for s in seeds]
    cells += [_cell("root-saturation", "deep-grpo G=8 K=8", s, size, "deep-grpo", N=8) for s in seeds]
    return cells


def _root_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fin = final_rows(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    g = fin[fin.variant.str.startswith("grpo")].assign(N=lambda f: f.variant.str.extract(r"N=(\d+)")[0].astype(int))
    d = fin[fin.variant.str.startswith("deep")]
    sns.lineplot(g, x="N", y="pass1", marker="o", errorbar=_ci_errorbar, ax=axes[0], label="GRPO (N roots)")
    e = mean_ci(d.pass1)
    axes[0].axhspan(e.low if np.isfinite(e.low) else e.mean, e.high if np.isfinite(e.high) else e.mean,
                    color="C3", alpha=0.2)
    axes[0].axhline(e.mean, color="C3", label="DEEP-GRPO G=8, K=8 (95% CI band)")
    axes[0].set(xscale="log", xlabel="GRPO group size N (log scale)", ylabel="final exact pass@1",
                title="Does root sampling saturate?")
    axes[0].set_xticks(list(ROOT_N), [str(n) for n in ROOT_N])
    axes[0].legend(fontsize=8)
    both = fin.assign(kind=np.where(fin.variant.str.startswith("deep"), "DEEP-GRPO", "GRPO"))
    sns.scatterplot(both, x="rollouts", y="pass1", hue="variant", style="kind", ax=axes[1], s=40)
    axes[1].set(xscale="log", xlabel="rollouts used (whole run, log scale)", ylabel="final exact pass@1",
                title="Final pass@1 against budget (one point per seed)")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def _root_findings(runs: pd.DataFrame) -> list[str]:
    fin = final_rows(runs)
    pm = {v: mean_ci(g.pass1) for v, g in fin.groupby("variant")}
    ro = fin.groupby("variant").rollouts.mean()
    init = mean_ci(runs[runs.step == 0].pass1)
    out = [f"Initial exact pass@1 is {_fmt(init)}."]
    out.append("GRPO final pass@1 by N: " + ", ".join(f"N={n}: {_fmt(pm[f'grpo N={n}'])}" for n in ROOT_N
                                                        if f"grpo N={n}" in pm) + ".")
    if "grpo N=32" in pm and "grpo N=64" in pm:
        d = paired_by_seed(fin, "variant", "pass1", "grpo N=64", "grpo N=32")
        out.append(f"Doubling N from 32 to 64 changes final pass@1 by {_fmt(d)} (paired over {d.n} seeds) "
                   f"for {ro['grpo N=64'] / ro['grpo N=32']:.2f}x the rollouts.")
    deep = "deep-grpo G=8 K=8"
    if deep in pm and "grpo N=64" in pm:
        d = paired_by_seed(fin, "variant", "pass1", deep, "grpo N=64")
        verdict = "beats" if d.low > 0 else ("trails" if d.high < 0 else "is not distinguishable from")
        out.append(f"DEEP-GRPO (G=8, K=8) {verdict} GRPO N=64: difference {_fmt(d)} in final pass@1, using "
                   f"{ro[deep]:,.0f} rollouts against {ro['grpo N=64']:,.0f} ({ro[deep] / ro['grpo N=64']:.2f}x).")
        grpo = ro[[v for v in ro.index if v.startswith("grpo")]]
        near = (np.log(grpo) - np.log(ro[deep])).abs().idxmin()
        d = paired_by_seed(fin, "variant", "pass1", deep, near)
        out.append(f"At the closest budget, DEEP-GRPO ({ro[deep]:,.0f} rollouts) minus {near} ({grpo[near]:,.0f} "
                   f"rollouts) is {_fmt(d)} in final pass@1.")
    return out


# 2. depth bias ------------------------------------------------------------------------------

GAMMAS = (0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0)
RECOVERY = {"fatal": {"recovery": "fatal"}, "constant": {"recovery": "constant", "recovery_prob": 0.05},
            "decay": {"recovery": "decay", "recovery_prob": 0.2, "recovery_decay": 3.0}}


def _depth_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = []
    for rec, spec in RECOVERY.items():
        for s in seeds:
            for g in GAMMAS:
                cells.append(_cell("depth-bias", f"{rec} | gamma={g:g}", s, size, "deep-grpo", {"gamma": g}, spec,
                                   recovery=rec, pivot=f"gamma={g:g}"))
            cells.append(_cell("depth-bias", f"{rec} | random", s, size, "deep-random", None, spec,
                               recovery=rec, pivot="random"))
            cells.append(_cell("depth-bias", f"{rec} | root-only", s, size, "deep-root", None, spec,
                               recovery=rec, pivot="root-only"))
    return cells


def _with_step_means(runs: pd.DataFrame, cols: tuple[str, ...]) -> pd.DataFrame:
    """Final rows with ``cols`` replaced by their mean over the run's training steps (NaN-skipping)."""
    means = runs[runs.step > 0].groupby(["variant", "seed"])[list(cols)].mean().reset_index()
    return final_rows(runs).drop(columns=list(cols)).merge(means, on=["variant", "seed"])


DEPTH_MEANS = ("pivot_before_error", "pivot_depth_mean", "pivot_oracle_success")


def _depth_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summary_table(_with_step_means(runs, DEPTH_MEANS), ("pass1", *DEPTH_MEANS, "rollouts"),
                         list(dict.fromkeys(runs.variant)))


def _split_variant(frame: pd.DataFrame) -> pd.DataFrame:
    parts = frame.variant.str.split(" | ", regex=False, expand=True)
    return frame.assign(recovery=parts[0], pivot=parts[1])


def _depth_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fin = _split_variant(_with_step_means(runs, DEPTH_MEANS))
    order = ["root-only", "random"] + [f"gamma={g:g}" for g in GAMMAS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.pointplot(fin, x="pivot", y="pass1", hue="recovery", order=order, errorbar=_ci_errorbar,
                  dodge=0.3, ax=axes[0])
    axes[0].set(xlabel="pivot rule (γ = depth exponent of Q ∝ P̂·r^γ)", ylabel="final exact pass@1",
                title="Depth bias: final pass@1 (mean, 95% CI)")
    axes[0].tick_params(axis="x", rotation=35)
    sns.pointplot(fin, x="pivot", y="pivot_before_error", hue="recovery", order=order,
                  errorbar=_ci_errorbar, dodge=0.3, ax=axes[1])
    axes[1].set(xlabel="pivot rule", ylabel="fraction of pivots at/before the first error",
                title="Where the pivots land (mean over training steps)")
    axes[1].tick_params(axis="x", rotation=35)
    _save(fig, path)


def _depth_findings(runs: pd.DataFrame) -> list[str]:
    fin = _split_variant(_with_step_means(runs, DEPTH_MEANS))
    out = []
    for rec, g in fin.groupby("recovery", sort=False):
        means = g.groupby("pivot").pass1.mean()
        gam = means[[f"gamma={x:g}" for x in GAMMAS if f"gamma={x:g}" in means]]
        best = gam.idxmax()
        d2 = paired_by_seed(g, "pivot", "pass1", "gamma=2", "gamma=0")
        dr = paired_by_seed(g, "pivot", "pass1", "gamma=2", "random")
        dro = paired_by_seed(g, "pivot", "pass1", "gamma=2", "root-only")
        land = g.groupby("pivot").pivot_oracle_success.mean()
        out.append(f"{rec} recovery: the best γ is {best.split('=')[1]} (final pass@1 {gam.max():.3f}); "
                   f"γ = 2 beats γ = 0 by {_fmt(d2)}, random pivots by {_fmt(dr)} and root-only by {_fmt(dro)} "
                   f"(paired over seeds). Exact success probability of a continuation from the chosen pivot: "
                   f"{land.get('gamma=0', float('nan')):.3f} at γ = 0, {land.get('gamma=2', float('nan')):.3f} at γ = 2, "
                   f"{land.get('gamma=5', float('nan')):.3f} at γ = 5.")
    return out


# 3. dilution --------------------------------------------------------------------------------

RULES = {"max-surprisal": "tree-surprisal", "low-prob": "tree-lowprob", "uniform": "tree-uniform"}
MS = (2, 4, 8)


def _dilution_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("dilution", "dense M=1", s, size, "deep-grpo", probes=("dilution",), rule="dense", M=1)
             for s in seeds]
    for rule, method in RULES.items():
        for m in MS:
            cells += [_cell("dilution", f"{rule} M={m}", s, size, method, {"n_cut_points": m},
                            probes=("dilution",), rule=rule, M=m) for s in seeds]
    return cells


def _dilution_frame(runs: pd.DataFrame) -> pd.DataFrame:
    parts = runs.variant.str.extract(r"^(?P<rule>[\w-]+) M=(?P<M>\d+)$")
    return runs.assign(rule=parts["rule"], M=parts["M"].astype(int))


def _dilution_per_run(runs: pd.DataFrame) -> pd.DataFrame:
    r = _dilution_frame(runs[runs.step > 0])
    agg = r.groupby(["variant", "rule", "M", "seed"], sort=False).agg(
        found_rate=("found_rate", "mean"), baseline_var=("baseline_var", "mean"),
        zero_signal_points=("zero_signal_points", "mean")).reset_index()
    fin = final_rows(runs)[["variant", "seed", "pass1", "rollouts"]]
    return agg.merge(fin, on=["variant", "seed"])


def _dilution_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summary_table(_dilution_per_run(runs), ("found_rate", "baseline_var", "zero_signal_points", "pass1",
                                                    "rollouts"), list(dict.fromkeys(runs.variant)))


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
        sns.lineplot(disp, x="M", y=col, hue="rule", marker="o", errorbar=_ci_errorbar, ax=ax)
        e = mean_ci(dense[col])
        ax.errorbar([1], [e.mean], yerr=[[e.mean - e.low], [e.high - e.mean]] if np.isfinite(e.low) else None,
                    fmt="*", color="k", markersize=12, label="dense (1 pivot x K)")
        ax.set(xscale="log", xlabel="cut points per failed chain M (K/M continuations each)", ylabel=labels[col])
        ax.set_xticks([1, *MS], ["1", *map(str, MS)])
        ax.legend(fontsize=7)
    axes[0].set_title("Dilution at equal budget (n_pivots·K per failed chain)")
    _save(fig, path)


def _dilution_findings(runs: pd.DataFrame) -> list[str]:
    per = _dilution_per_run(runs)
    out = []
    dense = per[per.rule == "dense"]
    for col, what in (("found_rate", "finds a correct suffix for a failed chain"),
                      ("pass1", "reaches final pass@1")):
        e = mean_ci(dense[col])
        parts = []
        for rule in RULES:
            for m in MS:
                v = f"{rule} M={m}"
                if v in set(per.variant):
                    both = per[per.variant.isin(["dense M=1", v])]
                    d = paired_by_seed(both, "variant", col, "dense M=1", v)
                    parts.append(f"{v}: {_fmt(d)}")
        out.append(f"Dense branching {what} at {_fmt(e)}; dense minus dispersed, paired: " + "; ".join(parts) + ".")
    var_dense = mean_ci(dense.baseline_var)
    var_m8 = mean_ci(per[(per.rule == "uniform") & (per.M == max(MS))].baseline_var)
    out.append(f"The local baseline's variance is {var_dense.mean:.4f} with K continuations at one point and "
               f"{var_m8.mean:.4f} with K/{max(MS)} at each of {max(MS)} uniform points.")
    return out


# 4. lambda and K ----------------------------------------------------------------------------

LAMBDAS = (0.0, 0.1, 0.5, 1.0, 2.0)
KS = (2, 4, 8, 16)


def _lk_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = [_cell("lambda-k", f"lambda={lam:g}", s, size, "deep-grpo", {"lam": lam}, knob="lambda", value=lam)
             for lam in LAMBDAS for s in seeds]
    cells += [_cell("lambda-k", f"K={k}", s, size, "deep-grpo", {"K": k}, knob="K", value=k)
              for k in KS if k != 8 for s in seeds]
    return cells


def _lk_frame(fin: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in fin.iterrows():
        knob, val = r.variant.split("=")
        rows.append({**r.to_dict(), "knob": knob, "value": float(val)})
        if r.variant == "lambda=1":  # the reference run is also the K = 8 point
            rows.append({**r.to_dict(), "knob": "K", "value": 8.0})
    return pd.DataFrame(rows)


def _lk_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    f = _lk_frame(final_rows(runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sns.lineplot(f[f.knob == "lambda"], x="value", y="pass1", marker="o", errorbar=_ci_errorbar, ax=axes[0])
    axes[0].set(xlabel="λ (weight of the aux stream)", ylabel="final exact pass@1", title="Aux-stream weight λ (K = 8)")
    k = f[f.knob == "K"]
    sns.lineplot(k, x="value", y="pass1", marker="o", errorbar=_ci_errorbar, ax=axes[1])
    axes[1].set(xscale="log", xlabel="K continuations per pivot (log scale)", ylabel="final exact pass@1",
                title="Branch width K (λ = 1)")
    axes[1].set_xticks(list(KS), list(map(str, KS)))
    _save(fig, path)


def _lk_findings(runs: pd.DataFrame) -> list[str]:
    fin = final_rows(runs)
    f = _lk_frame(fin)
    lam = f[f.knob == "lambda"].groupby("value").pass1.mean()
    out = [f"Best λ: {lam.idxmax():g} (final pass@1 {lam.max():.3f}); "
           + "; ".join(f"λ=1 minus λ={x:g}: {_fmt(paired_by_seed(fin, 'variant', 'pass1', 'lambda=1', f'lambda={x:g}'))}"
                       for x in LAMBDAS if x != 1.0) + "."]
    ks = f[f.knob == "K"]
    means = ks.groupby("value").pass1.mean()
    rollouts = ks.groupby("value").rollouts.mean()
    out.append("K: " + "; ".join(f"K={int(k)}: pass@1 {means[k]:.3f} with {rollouts[k]:,.0f} rollouts"
                                 for k in means.index) + ".")
    return out


# 5. budget frontier -------------------------------------------------------------------------

FRONTIER = {"grpo N=8": ("grpo", {"G": 8}), "grpo N=16": ("grpo", {"G": 16}), "grpo N=32": ("grpo", {"G": 32}),
            "drgrpo N=16": ("drgrpo", {"G": 16}), "deep-grpo": ("deep-grpo", {}),
            "deep-random": ("deep-random", {}), "tree-surprisal": ("tree-surprisal", {}),
            "tree-lowprob": ("tree-lowprob", {}), "tree-uniform": ("tree-uniform", {})}


def _frontier_cells(seeds: list[int], size: Size) -> list[Cell]:
    return [_cell("budget-frontier", v, s, size, m, a) for v, (m, a) in FRONTIER.items() for s in seeds]


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
    return pd.DataFrame(rows).merge(fin[["variant", "seed", "pass1", "rollouts", "tokens"]], on=["variant", "seed"])


def _frontier_summary(runs: pd.DataFrame) -> pd.DataFrame:
    m = _frontier_metrics(runs)
    out = summary_table(m, ("pass1", "rollouts", "tokens", "auc_rollouts", "auc_tokens", "rollouts_to_target",
                            "tokens_to_target"), list(FRONTIER))
    reached = m.groupby("variant").rollouts_to_target.apply(lambda x: int(x.notna().sum()))
    out["reached_target"] = out.variant.map(reached).values
    return out


def _frontier_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    r = runs.copy()
    for ax, x, label in ((axes[0], "rollouts", "cumulative rollouts"), (axes[1], "tokens", "cumulative generated tokens")):
        # put every run on a common grid so seeds can be averaged with a CI band
        grid = np.linspace(0, r.groupby("variant")[x].max().min(), 40)
        rows = [{"variant": v, "seed": s, x: b, "pass1": float(np.interp(b, g[x], g.pass1))}
                for (v, s), g in r.groupby(["variant", "seed"]) for b in grid]
        sns.lineplot(pd.DataFrame(rows), x=x, y="pass1", hue="variant", hue_order=list(FRONTIER),
                     errorbar=_ci_errorbar, ax=ax)
        ax.set(xlabel=f"{label} (common range)", ylabel="exact pass@1", title=f"pass@1 against {label}")
        ax.legend(fontsize=7)
    _save(fig, path)


def _frontier_findings(runs: pd.DataFrame) -> list[str]:
    m = _frontier_metrics(runs)
    s = _frontier_summary(runs)
    best = s.sort_values("auc_rollouts", ascending=False).iloc[0]
    out = [f"Target pass@1 = {m.target.iloc[0]:.3f} (half-way from the start to the best final mean).",
           f"Largest area under pass@1-vs-rollouts (common budget): {best.variant} "
           f"({best.auc_rollouts:.3f} ± {best.auc_rollouts_pm:.3f})."]
    for ref in ("grpo N=8", "grpo N=16", "tree-surprisal"):
        if ref in set(m.variant) and "deep-grpo" in set(m.variant):
            d = paired_by_seed(m, "variant", "auc_rollouts", "deep-grpo", ref)
            dt = paired_by_seed(m, "variant", "auc_tokens", "deep-grpo", ref)
            out.append(f"DEEP-GRPO minus {ref}: AUC over rollouts {_fmt(d)}, over tokens {_fmt(dt)}.")
    reach = "; ".join(f"{r.variant}: {r.rollouts_to_target:,.0f} rollouts ({r.reached_target}/{r.n} seeds)"
                      for r in s.itertuples() if np.isfinite(r.rollouts_to_target))
    out.append("Rollouts to reach the target (mean over seeds that reached it): " + (reach or "none reached it") + ".")
    return out


# 6. recoverability --------------------------------------------------------------------------

HETEROGENEITY = (0.0, 0.5, 1.0)


def _recov_cells(seeds: list[int], size: Size) -> list[Cell]:
    cells = []
    for h in HETEROGENEITY:
        for method, est in (("deep-grpo", "position"), ("deep-state", "state")):
            cells += [_cell("recoverability", f"h={h:g} | {est}", s, size, method, spec={"heterogeneity": h},
                            probes=("calibration",), heterogeneity=h, estimator=est) for s in seeds]
    return cells


def _recov_per_run(runs: pd.DataFrame) -> pd.DataFrame:
    parts = runs.variant.str.extract(r"^h=(?P<h>[\d.]+) \| (?P<est>\w+)$")
    r = runs.assign(heterogeneity=parts.h.astype(float), driver=parts.est)
    late = r[r.step > r.step.max() / 2]
    agg = late.groupby(["variant", "heterogeneity", "driver", "seed"], sort=False).agg(
        mse_pos=("mse_pos", "mean"), mse_state=("mse_state", "mean"), ece_pos=("ece_pos", "mean"),
        ece_state=("ece_state", "mean"), brier_pos=("brier_pos", "mean"), brier_state=("brier_state", "mean"),
        pivot_oracle_success=("pivot_oracle_success", "mean")).reset_index()
    fin = final_rows(runs)[["variant", "seed", "pass1"]]
    return agg.merge(fin, on=["variant", "seed"])


def _recov_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summary_table(_recov_per_run(runs), ("ece_pos", "ece_state", "mse_pos", "mse_state", "brier_pos",
                                                 "brier_state", "pivot_oracle_success", "pass1"),
                         list(dict.fromkeys(runs.variant)))


def _recov_plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns
    per = _recov_per_run(runs)
    long = pd.concat([per.assign(estimator="position (paper)", ece=per.ece_pos),
                      per.assign(estimator="state-aware", ece=per.ece_state)])
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    sns.lineplot(long[long.driver == "position"], x="heterogeneity", y="ece", hue="estimator", marker="o",
                 errorbar=_ci_errorbar, ax=axes[0])
    axes[0].set(xlabel="between-problem heterogeneity h", ylabel="expected calibration error vs oracle",
                title="Calibration (same data, second half of training)")
    fin = runs[(runs.step == runs.step.max()) & runs.variant.str.endswith("| position")]
    hmax = max(HETEROGENEITY)
    fh = fin[fin.variant.str.startswith(f"h={hmax:g} ")]
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
    sns.lineplot(per, x="heterogeneity", y="pivot_oracle_success", hue="driver", marker="o",
                 errorbar=_ci_errorbar, ax=axes[2])
    axes[2].set(xlabel="heterogeneity h", ylabel="oracle P(success | chosen pivot)",
                title="Recoverability of chosen pivots")
    sns.lineplot(per, x="heterogeneity", y="pass1", hue="driver", marker="o", errorbar=_ci_errorbar, ax=axes[3])
    axes[3].set(xlabel="heterogeneity h", ylabel="final exact pass@1", title="Final pass@1 by pivot estimator")
    _save(fig, path)


def _recov_findings(runs: pd.DataFrame) -> list[str]:
    per = _recov_per_run(runs)
    out = []
    for h, g in per.groupby("heterogeneity"):
        pos = g[g.driver == "position"]
        d_ece = paired_by_seed(pd.concat([pos.assign(e="pos", v=pos.ece_pos), pos.assign(e="state", v=pos.ece_state)]),
                               "e", "v", "pos", "state")
        both = g.assign(k=g.driver)
        d_piv = paired_by_seed(both, "k", "pivot_oracle_success", "state", "position")
        d_p1 = paired_by_seed(both, "k", "pass1", "state", "position")
        out.append(f"h = {h:g}: position-only ECE {mean_ci(pos.ece_pos).mean:.3f} vs state-aware "
                   f"{mean_ci(pos.ece_state).mean:.3f} (position minus state {_fmt(d_ece)}); driving pivots with the "
                   f"state-aware estimator changes the oracle recoverability of chosen pivots by {_fmt(d_piv)} and "
                   f"final pass@1 by {_fmt(d_p1)}.")
    return out


STUDIES: dict[str, Study] = {
    "root-saturation": Study("root-saturation", "Does GRPO flatten as N grows, and does DEEP-GRPO beat N = 64 at "
                             "equal or lower budget?", _root_cells,
                             lambda r: _summary_final(r, ("pass1", "pass8", "rollouts", "tokens")),
                             _root_plot, _root_findings),
    "depth-bias": Study("depth-bias", "Which depth exponent γ works best, and how does the sweet spot move with "
                        "the recovery model?", _depth_cells,
                        _depth_summary, _depth_plot, _depth_findings),
    "dilution": Study("dilution", "Dense (1 pivot x K) or dispersed (M points x K/M) at equal budget?",
                      _dilution_cells, _dilution_summary, _dilution_plot, _dilution_findings),
    "lambda-k": Study("lambda-k", "How do the aux weight λ and the branch width K matter?", _lk_cells,
                      lambda r: _summary_final(r, ("pass1", "rollouts", "tokens")), _lk_plot, _lk_findings),
    "budget-frontier": Study("budget-frontier", "pass@1 per rollout and per token for every method",
                             _frontier_cells, _frontier_summary, _frontier_plot, _frontier_findings),
    "recoverability": Study("recoverability", "Is P(success | prefix) a function of relative depth alone? When "
                            "is it not, and does a state-aware estimator help?", _recov_cells, _recov_summary,
                            _recov_plot, _recov_findings),
}


def run_study(name: str, out: str | Path, seeds: int = 5, quick: bool = False, workers: int | None = None,
              progress: bool = True) -> Path:
    """Run study ``name`` (resumable) and write its tables, figure and record to ``out/name``."""
    from deepgrpo.config import ConfigError
    if name not in STUDIES:
        raise ConfigError(f"study = {name!r} is invalid: expected one of {', '.join(STUDIES)}")
    if seeds < 1:
        raise ConfigError(f"--seeds = {seeds} is invalid: expected an integer in [1, inf)")
    study = STUDIES[name]
    size = QUICK if quick else FULL
    d = Path(out) / name
    t0 = time.perf_counter()
    cells = study.cells(list(range(seeds)), size)
    runs = run_sweep(cells, run_sim_cell, d, "runs", workers=workers, progress=progress)
    write_csv_atomic(d / "summary.csv", study.summary(runs))
    study.plot(runs, d / f"{name}.png")
    write_json_atomic(d / "study.json", {"study": name, "question": study.question, "seeds": seeds, "quick": quick,
                                          "size": vars(size), "cells": len(cells), "wall_time_s": time.perf_counter() - t0,
                                          "versions": versions()})
    return d
