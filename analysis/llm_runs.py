"""``deepgrpo report --llm-runs DIR [DIR ...] --out OUTDIR``: the curves of LLM training runs.

An LLM run directory (written by ``deepgrpo llm train``) holds ``config.json`` (``{"train":
TrainConfig, "algo": AlgoConfig, ...}``) and ``metrics.jsonl``: one JSON object per step with
``step``, the core's step record (:mod:`deepgrpo.step`: ``rollouts``, ``tokens`` cumulative,
``reward_main``, ...) and, at evaluation steps, the held-out columns ``eval/greedy_mean@1``,
``eval/sampled_mean@1`` and ``eval/pass@k``. Step 0 is the evaluation before any update (zero
budget).

Runs are grouped into *variants* by method and its overrides (``grpo G=16``); when runs of the
same method and overrides differ in another config field (say ``lr``), that field is added to
the label and written as a column. Seeds are ``train.seed``. The outputs, in ``OUTDIR``:

- ``runs.csv``: one row per (run, step): ``run`` (the directory), ``variant``, ``method``,
  ``seed``, the distinguishing config fields (``train.lr``, ...), then every column of
  ``metrics.jsonl``;
- ``curves.csv``: tidy, one row per (run, step, quantity) with ``rollouts``, ``tokens``,
  ``quantity`` (``reward_main`` or a held-out accuracy) and ``value``. Every point is placed at
  the budget spent through its step: the reward of step s (the mean reward of the main chains
  step s sampled) and the held-out evaluation after step s at the cumulative budget of step s
  (the evaluation before training at 0). A value read "at a budget" is therefore what a run
  had measured once it had spent that budget;
- ``summary.csv``: one row per variant (seeds, budget, first/last reward, held-out accuracy
  before and after, paired change);
- ``at_budget.csv``: every quantity of every variant at a budget all runs reached, in
  rollouts and in tokens (:func:`at_common_budget`);
- ``reward.png`` and ``heldout.png``: each quantity against cumulative rollouts and against
  cumulative generated tokens (mean over seeds with a 95 % CI band, on a common grid per
  variant; dots are the measured points), on a y range fitted to the data (so that a change of
  0.01 is visible);
- ``REPORT.md``: the tables and the figures.

Everything is read and validated before anything is written: bad input (a missing directory,
no ``metrics.jsonl``, a malformed line, a step without the core's budget columns) raises
:class:`~deepgrpo.config.ConfigError` naming the file, and ``OUTDIR`` is left untouched.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.stats import mean_ci, paired_difference
from analysis.tables import markdown_table
from deepgrpo.config import ConfigError
from deepgrpo.records import atomic_write, write_csv_atomic, write_text_atomic

BUDGETS = ("rollouts", "tokens")
"""The cumulative budget columns the curves are drawn against (the core's names)."""
REWARD = "reward_main"
"""Mean reward of the step's main chains (the core's name)."""
STEP_BUDGETS = {"rollouts": ("step_rollouts_main", "step_rollouts_aux"),
                "tokens": ("step_tokens_main", "step_tokens_aux")}
"""This step's spending per budget (the core's names)."""
REQUIRED = (*BUDGETS, *(c for cols in STEP_BUDGETS.values() for c in cols), REWARD)
"""Columns every training step (step >= 1) must have."""
EVAL_PREFIX = "eval/"
NOT_ACCURACY = ("eval/n_problems",)
"""``eval/`` columns that are not held-out accuracies."""
IGNORED_FIELDS = ("seed", "steps", "threads", "tensorboard", "checkpoint_every", "device", "logprob_chunk_size",
                  "micro_batch_size", "eval_every", "method")
"""Train-config fields that never distinguish variants: the seed (runs are paired over it), the
run length (curves are compared on budget, over the common range), bookkeeping that leaves the
numbers unchanged, and the method (always in the label)."""
GRID_POINTS = 50


@dataclass
class LLMRun:
    """One LLM run directory, read and validated.

    path: the directory; train: its ``TrainConfig`` dict; rows: ``metrics.jsonl`` as a frame,
    sorted by step, with zero budget filled in at step 0.
    """

    path: Path
    train: dict[str, Any]
    rows: pd.DataFrame

    @property
    def method(self) -> str:
        return str(self.train["method"])

    @property
    def seed(self) -> int:
        return int(self.train["seed"])


def _fail(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}", owner="--llm-runs", value=str(path))


def load_llm_run(path: str | Path) -> LLMRun:
    """Read and validate one LLM run directory (see the module docstring).

    Raises :class:`ConfigError` naming the file (and line) for a missing directory or file,
    invalid JSON, a config without ``train.method``/``train.seed``, a row without ``step``, a
    repeated step, or a training step without the core's budget and reward columns.
    """
    d = Path(path)
    if not d.is_dir():
        raise _fail(d, "no such run directory (expected one written by `deepgrpo llm train`)")
    cfg_path, metrics_path = d / "config.json", d / "metrics.jsonl"
    if not cfg_path.is_file():
        raise _fail(cfg_path, "missing (not an LLM run directory?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise _fail(cfg_path, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    train = cfg.get("train") if isinstance(cfg, dict) else None
    if not (isinstance(train, dict) and isinstance(train.get("method"), str) and isinstance(train.get("seed"), int)):
        raise _fail(cfg_path, 'expected {"train": {"method": "<name>", "seed": <int>, ...}, ...}')
    if not metrics_path.is_file():
        raise _fail(metrics_path, "missing (the run wrote no steps?)")
    rows = []
    for lineno, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(metrics_path, f"line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise _fail(metrics_path, f"line {lineno} is not a JSON object with an integer 'step'")
        if row["step"] > 0:
            missing = [c for c in REQUIRED if c not in row]
            if missing:
                raise _fail(metrics_path, f"line {lineno} (step {row['step']}) has no {', '.join(missing)} "
                                          "(expected the core's step record, deepgrpo.step)")
        rows.append(row)
    if not rows:
        raise _fail(metrics_path, "has no rows")
    frame = pd.DataFrame(rows).sort_values("step", kind="stable").reset_index(drop=True)
    if frame.step.duplicated().any():
        raise _fail(metrics_path, f"step {int(frame.step[frame.step.duplicated()].iloc[0])} appears twice")
    for col in REQUIRED:  # present even in a run with step 0 only
        frame[col] = frame[col].astype(float) if col in frame else np.nan
    for col in (*BUDGETS, *(c for cols in STEP_BUDGETS.values() for c in cols)):
        frame.loc[frame.step == 0, col] = frame.loc[frame.step == 0, col].fillna(0.0)  # nothing spent before step 1
    return LLMRun(d, train, frame)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sampling": {"temperature": 1}}`` -> ``{"sampling.temperature": 1}`` (lists as tuples)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _variants(runs: Sequence[LLMRun]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per run: its variant label and its distinguishing config fields (see the module docstring)."""
    base = []
    for r in runs:
        over = r.train.get("overrides") or {}
        base.append(" ".join([r.method, *(f"{k}={_show(over[k])}" for k in sorted(over))]))
    labels, fields = list(base), [dict() for _ in runs]
    for b in dict.fromkeys(base):
        members = [i for i, x in enumerate(base) if x == b]
        flats = [_flat(runs[i].train) for i in members]
        keys = sorted({k for f in flats for k in f
                       if k not in IGNORED_FIELDS and not k.startswith("overrides.")})
        differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
        for i, f in zip(members, flats):
            fields[i] = {k: f.get(k) for k in differ}
            if differ:
                labels[i] = f"{b} (" + ", ".join(f"{k}={_show(f.get(k))}" for k in differ) + ")"
    seen: dict[tuple[str, int], Path] = {}
    for r, label in zip(runs, labels):
        if (label, r.seed) in seen:
            raise _fail(r.path, f"same method, overrides, config and seed as {seen[label, r.seed]} (a copy?)")
        seen[label, r.seed] = r.path
    return labels, fields


def runs_table(runs: Sequence[LLMRun]) -> pd.DataFrame:
    """One row per (run, step): ``run``, ``variant``, ``method``, ``seed``, the distinguishing
    config fields (``train.<field>``, e.g. ``train.lr``), then the run's metrics columns."""
    labels, fields = _variants(runs)
    frames = []
    for r, label, extra in zip(runs, labels, fields):
        head = {"run": str(r.path), "variant": label, "method": r.method, "seed": r.seed,
                **{f"train.{k}": _show(v) if isinstance(v, tuple) else v for k, v in extra.items()}}
        f = r.rows.drop(columns=[c for c in head if c in r.rows.columns])
        for i, (k, v) in enumerate(head.items()):
            f.insert(i, k, [v] * len(f))
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def accuracy_columns(table: pd.DataFrame) -> list[str]:
    """The held-out accuracy columns present (``eval/...`` but not ``eval/n_problems``), in a
    stable order: greedy, sampled, then pass@k by k."""
    cols = [c for c in table.columns if c.startswith(EVAL_PREFIX) and c not in NOT_ACCURACY]
    first = [c for c in ("eval/greedy_mean@1", "eval/sampled_mean@1") if c in cols]
    return first + sorted(set(cols) - set(first))


def curves_table(table: pd.DataFrame) -> pd.DataFrame:
    """Tidy curves: one row per (run, step, quantity) where the quantity was measured, with
    ``run``, ``variant``, ``method``, ``seed``, ``step``, ``rollouts``, ``tokens``,
    ``quantity`` and ``value``. Quantities: ``reward_main`` (training steps) and the held-out
    accuracies (evaluation steps), each at the cumulative budget of its step (see the module
    docstring)."""
    ids = ["run", "variant", "method", "seed", "step", *BUDGETS]
    acc = accuracy_columns(table)
    quantities = [REWARD, *acc]
    reward = table[ids + [REWARD]].rename(columns={REWARD: "value"}).assign(quantity=REWARD)
    evals = table[ids + acc].melt(id_vars=ids, value_vars=acc, var_name="quantity", value_name="value")
    long = pd.concat([reward[ids + ["quantity", "value"]], evals], ignore_index=True).dropna(subset=["value"])
    runs = list(dict.fromkeys(long.run))
    order = long.assign(_run=long.run.map(runs.index), _q=long.quantity.map(quantities.index))
    return long.loc[order.sort_values(["_run", "_q", "step"], kind="stable").index].reset_index(drop=True)


def on_grid(curves: pd.DataFrame, budget: str, points: int = GRID_POINTS) -> pd.DataFrame:
    """Each run's curve of each quantity, linearly interpolated on a grid of ``points`` values
    of ``budget`` over the variant's common range (from the largest first measured budget to the
    smallest last one among its seeds: the training reward starts at the first step's budget,
    never extrapolated back to 0), so that seeds can be averaged. Runs with fewer than two
    measured points of a quantity are left out. Columns: ``variant``, ``seed``, ``quantity``,
    ``budget`` and ``value``."""
    rows = []
    for (variant, quantity), g in curves.groupby(["variant", "quantity"], sort=False):
        per_run = [r.sort_values(budget) for _, r in g.groupby("run", sort=False) if len(r) >= 2]
        if not per_run:
            continue
        low = max(float(r[budget].min()) for r in per_run)
        top = min(float(r[budget].max()) for r in per_run)
        if top < low:  # the seeds' measured ranges do not overlap
            continue
        grid = np.linspace(low, top, points)
        for r in per_run:
            v = np.interp(grid, r[budget].to_numpy(float), r["value"].to_numpy(float))
            rows += [{"variant": variant, "seed": int(r.seed.iloc[0]), "quantity": quantity, budget: x, "value": y}
                     for x, y in zip(grid, v)]
    return pd.DataFrame(rows, columns=["variant", "seed", "quantity", budget, "value"])


def value_at(run_curve: pd.DataFrame, budget: str, at: float) -> float:
    """The value of one run's quantity at ``budget == at`` (linear interpolation between measured
    points; NaN outside the measured range)."""
    r = run_curve.sort_values(budget)
    x, y = r[budget].to_numpy(float), r["value"].to_numpy(float)
    if len(x) == 0 or at < x[0] or at > x[-1]:
        return float("nan")
    return float(np.interp(at, x, y))


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (in order of first appearance).

    Columns: ``variant``, ``method``, ``n`` (seeds), ``steps``, ``rollouts``, ``tokens`` (mean
    final budget), ``reward_first``/``reward_last`` (mean reward of the first/last training
    step), and per held-out accuracy ``Q``: ``Q@start``, ``Q@end`` (means over seeds of the
    first and last evaluation) and ``Q_change`` / ``Q_change_pm`` (mean change and 95 % CI
    half-width, paired per seed).
    """
    last = table.loc[table.groupby("run").step.idxmax()]
    rows = []
    for variant, g in table.groupby("variant", sort=False):
        fin = last[last.variant == variant]
        train = g[g.step > 0]
        first = train.loc[train.groupby("run").step.idxmin()]
        row: dict[str, Any] = {"variant": variant, "method": g.method.iloc[0], "n": int(g.seed.nunique()),
                               "steps": int(fin.step.mean()), "rollouts": float(fin.rollouts.mean()),
                               "tokens": float(fin.tokens.mean()),
                               "reward_first": float(first[REWARD].mean()) if len(first) else math.nan,
                               "reward_last": float(fin[REWARD].mean()) if REWARD in fin else math.nan}
        for q in accuracy_columns(table):
            ev = g.dropna(subset=[q])
            start = ev.loc[ev.groupby("run").step.idxmin()].set_index("run")[q]
            end = ev.loc[ev.groupby("run").step.idxmax()].set_index("run")[q]
            change = paired_difference(end.to_numpy(), start.loc[end.index].to_numpy())
            row.update({f"{q}@start": float(start.mean()), f"{q}@end": float(end.mean()),
                        f"{q}_change": change.mean, f"{q}_change_pm": change.half_width})
        rows.append(row)
    return pd.DataFrame(rows)


def at_common_budget(curves: pd.DataFrame) -> pd.DataFrame:
    """Every quantity of every variant at a budget all runs reached, for both budgets.

    For each (budget, quantity) the common budget ``at`` is the smallest, over all runs, of the
    largest budget at which the run measured the quantity; each run's value there is
    interpolated linearly between its measured points (:func:`value_at`). Columns:
    ``budget``, ``quantity``, ``at``, ``variant``, ``mean``, ``half_width`` (95 % CI over
    seeds), ``n``.
    """
    rows = []
    for b in BUDGETS:
        for q, qc in curves.groupby("quantity", sort=False):
            at = float(qc.groupby("run")[b].max().min())
            for variant, vc in qc.groupby("variant", sort=False):
                e = mean_ci([value_at(rc, b, at) for _, rc in vc.groupby("run", sort=False)])
                rows.append({"budget": b, "quantity": q, "at": at, "variant": variant, "mean": e.mean,
                             "half_width": e.half_width, "n": e.n})
    return pd.DataFrame(rows)


def mean_band(grid: pd.DataFrame, budget: str, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over seeds of :func:`on_grid` curves with its Student-t interval, per (variant,
    quantity, budget value): columns ``variant``, ``quantity``, ``budget``, ``mean``, ``low``,
    ``high``, ``n`` (the interval of :func:`analysis.stats.mean_ci`, vectorised; a single seed
    gives low = high = mean)."""
    from scipy import stats
    agg = grid.groupby(["variant", "quantity", budget], sort=False)["value"].agg(["mean", "std", "count"])
    agg = agg.reset_index().rename(columns={"count": "n"})
    n = agg.n.to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * agg["std"].to_numpy(float) / np.sqrt(n)
    half = np.where(n >= 2, half, 0.0)
    return agg.assign(low=agg["mean"] - half, high=agg["mean"] + half).drop(columns="std")


def y_limits(points: pd.Series, *bands: pd.Series, margin: float = 0.08, min_span: float = 0.02
             ) -> tuple[float, float] | None:
    """The y range of a panel fitted to its data: from the lowest to the highest measured point
    or CI band edge, widened by ``margin`` of that span on each side (the span is at least
    ``min_span``, so that a flat curve is drawn in the middle of a readable scale). For rates
    (every point in [0, 1]) the range is kept within [-0.02, 1.02]. None if there is no data."""
    values = pd.concat([points, *bands]).to_numpy(float)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    pad = margin * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if len(points) and points.between(0, 1).all():  # rates: no room beyond what a rate can be
        lo, hi = max(lo, -0.02), min(hi, 1.02)
    return lo, hi


def _plural(n: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _figure(grid_by_budget: dict[str, pd.DataFrame], curves: pd.DataFrame, quantities: list[str],
            order: list[str], title: str) -> bytes:
    """PNG bytes of one figure: a row per quantity, a column per budget; per variant the mean
    over seeds (line) with its 95 % CI (band) and the measured points (dots)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    labels = {"rollouts": "cumulative rollouts", "tokens": "cumulative generated tokens"}
    colors = dict(zip(order, sns.color_palette(n_colors=len(order))))
    bands = {b: mean_band(g, b) for b, g in grid_by_budget.items()}
    fig, axes = plt.subplots(len(quantities), len(BUDGETS), figsize=(12, 3.8 * len(quantities)), squeeze=False)
    for i, q in enumerate(quantities):
        limits = y_limits(curves[curves.quantity == q].value,
                          *(bands[b].loc[bands[b].quantity == q, c] for b in BUDGETS for c in ("low", "high")))
        for j, b in enumerate(BUDGETS):
            ax = axes[i, j]
            band = bands[b][bands[b].quantity == q]
            for variant in order:
                v = band[band.variant == variant]
                if len(v):
                    ax.plot(v[b], v["mean"], color=colors[variant], label=variant)
                    ax.fill_between(v[b], v["low"], v["high"], color=colors[variant], alpha=0.2, lw=0)
            pts = curves[curves.quantity == q]
            if len(pts):
                sns.scatterplot(pts, x=b, y="value", hue="variant", hue_order=order, palette=colors, ax=ax, s=18,
                                legend=False)
            ax.set(xlabel=labels[b], ylabel=q, title=f"{q} against {labels[b]}")
            if limits is not None:
                ax.set_ylim(*limits)
            if len(band):
                ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _markdown(table: pd.DataFrame, summary: pd.DataFrame, at_budget: pd.DataFrame) -> str:
    order = list(dict.fromkeys(table.variant))
    runs = table.groupby("run", sort=False).agg(variant=("variant", "first"), seed=("seed", "first"),
                                                steps=("step", "max"), rollouts=("rollouts", "max"),
                                                tokens=("tokens", "max")).reset_index()
    acc = accuracy_columns(table)
    lines = ["# LLM runs", "",
             f"{_plural(len(runs), 'run')} of {_plural(summary.variant.nunique(), 'variant')}; values are means "
             "over seeds, ± a 95 % "
             "t-interval of the paired change (end minus start, per seed). Budgets are cumulative rollouts and "
             "generated tokens (a branch counts only its suffix). Every number is computed from the runs' "
             "`metrics.jsonl` when this file is written.", "",
             "## Runs", "", markdown_table(runs.astype({"rollouts": int, "tokens": int})), "",
             "## Curves", "", "![reward](reward.png)", ""]
    if acc:
        lines += ["![held-out accuracy](heldout.png)", ""]
    lines += ["## Summary", ""]
    cols = ["variant", "n", "steps", "rollouts", "tokens", "reward_first", "reward_last"]
    lines += [markdown_table(summary[cols].astype({"rollouts": int, "tokens": int})), ""]
    for q in acc:
        parts = []
        for _, r in summary.iterrows():
            pm = f" ± {r[f'{q}_change_pm']:.3f}" if np.isfinite(r[f"{q}_change_pm"]) else ""
            seeds = f"{r['n']} seed" + ("s" if r["n"] != 1 else "")
            parts.append(f"{r['variant']}: {r[f'{q}@start']:.3f} -> {r[f'{q}@end']:.3f} "
                         f"(change {r[f'{q}_change']:+.3f}{pm}, {seeds})")
        lines.append(f"- {q}: " + "; ".join(parts) + ".")
    lines.append("")
    for b in BUDGETS:
        rows = at_budget[at_budget.budget == b]
        wide = rows.pivot(index="quantity", columns="variant", values="mean")
        wide = wide.loc[list(dict.fromkeys(rows.quantity)), [v for v in order if v in set(rows.variant)]]
        wide.insert(0, f"at {b}", rows.groupby("quantity", sort=False)["at"].first())
        lines += [f"Means over seeds at a common budget of {b} (per quantity: the largest budget every run "
                  "measured it at; values interpolated linearly between measurements):", "",
                  markdown_table(wide.reset_index().astype({f"at {b}": int})), ""]
    return "\n".join(lines) + "\n"


def write_llm_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Read every run in ``run_dirs`` and write the tables, figures and ``REPORT.md`` to ``out``
    (see the module docstring). Returns the path of ``REPORT.md``."""
    if not run_dirs:
        raise ConfigError("--llm-runs needs at least one run directory", owner="--llm-runs")
    runs = [load_llm_run(d) for d in run_dirs]
    table = runs_table(runs)
    curves = curves_table(table)
    summary = summary_table(table)
    at_budget = at_common_budget(curves)
    order = list(dict.fromkeys(table.variant))
    grids = {b: on_grid(curves, b) for b in BUDGETS}
    acc = accuracy_columns(table)
    figures = {"reward.png": _figure(grids, curves, [REWARD], order, "Training reward (main chains)")}
    if acc:
        figures["heldout.png"] = _figure(grids, curves, acc, order, "Held-out accuracy")
    text = _markdown(table, summary, at_budget)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory", owner="--out", value=str(out))
    from deepgrpo.records import claim_output
    claim_output(out)  # one writer at a time, taken once every input was read
    write_csv_atomic(out / "runs.csv", table)
    write_csv_atomic(out / "curves.csv", curves)
    write_csv_atomic(out / "summary.csv", summary)
    write_csv_atomic(out / "at_budget.csv", at_budget)
    for name, png in figures.items():
        atomic_write(out / name, lambda p, png=png: p.write_bytes(png))
    return write_text_atomic(out / "REPORT.md", text)
