"""``deepgrpo sim compare``: GRPO with N ∈ {8, 16, 32, 64}, the root-only ablation, a TreeRL-like
tree baseline and DEEP-GRPO at **equal total budget** on one fresh problem set (the DESIGN's
protocol): every method runs until it has spent the same number of generated tokens (main
chains + branch suffixes; ``--budget``, ``--budget-unit rollouts`` for rollouts), so cheaper
methods take more steps; the problem set is drawn from the run seed (``--spec-seed`` pins one);
exact pass@1 is reported on the training problems and on held-out problems never trained on.
Values "at the budget" are interpolated linearly between the two steps around it (a run stops
at the first step boundary at or past the budget, so it overshoots by less than one step; the
spent budget is in the table too). A run that the ``--steps`` cap stops before the budget has no
value at the budget: ``summary.csv`` says so (``reached_budget`` false, the ``*_at_budget``
cells empty) and the printed table shows its values after its last step, marked, with a line
saying what it spent.

Outputs (all written atomically, only after every run finished):
    summary.csv              one row per method (:data:`SUMMARY_COLUMNS`)
    history.csv              every run's per-step history (tidy; a ``label`` column names the method)
    run.json                 resolved configs, seed, problem-set seed, versions, wall times, budgets
    pass1_vs_budget.svg      exact pass@1 (training and held-out) against the budget spent
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepgrpo.config import AlgoConfig
from deepgrpo.methods import method_config
from deepgrpo.records import versions, write_json_atomic, write_text_atomic
from sims.figure import pass1_vs_budget_svg
from sims.runner import RunnerConfig, TrainResult, train_replicas
from sims.spec import TokenTreeSpec, explain

COMPARE_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("GRPO N=8", "grpo", {"G": 8}),
    ("GRPO N=16", "grpo", {"G": 16}),
    ("GRPO N=32", "grpo", {"G": 32}),
    ("GRPO N=64", "grpo", {"G": 64}),
    ("root-only (G=8, K=8)", "root-only", {}),
    ("TreeRL-like (surprisal, tree adv.)", "tree-surprisal", {"tree": True}),
    ("DEEP-GRPO (G=8, K=8)", "deep-grpo", {}),
)
"""(label, method name, overrides) of the default comparison. The root-only ablation spends
DEEP-GRPO's extra samples at the root (the first rung of the decomposition ladder); the tree
baseline is TreeRL-like: max-surprisal cut points (M = 4, 2 continuations each) and TreeRL's
tree advantage."""

COMPARE_BUDGET = 50_000
"""Default total budget of ``sim compare`` in generated tokens: about what DEEP-GRPO (G = K = 8)
spends in 12 steps of 16 problems on the default spec."""

COMPARE_RUNNER = RunnerConfig(steps=1000, budget=COMPARE_BUDGET, budget_unit="tokens")
"""``sim compare``'s loop: the budget decides when a run stops (``steps`` is only a cap)."""

SUMMARY_COLUMNS = ("label", "method", "budget_unit", "budget", "seeds", "steps", "rollouts", "tokens",
                   "pass1_at_budget", "pass1_at_budget_ci95", "heldout_pass1_at_budget",
                   "heldout_pass1_at_budget_ci95", "final_pass1", "final_heldout_pass1",
                   "initial_pass1", "initial_heldout_pass1", "final_pass8", "gain_per_1k_rollouts",
                   "gain_per_1m_tokens", "all_fail_groups_per_step", "pivot_before_error", "branch_success",
                   "reached_budget")
"""Columns of ``summary.csv``: ``*_at_budget`` are interpolated at exactly the budget (empty
without a budget, or for a run the step cap stopped first: ``reached_budget`` false), ``final_*``
are the values after the last step (spent: ``rollouts``, ``tokens``). With several seeds every
number is the mean over the seeds (``reached_budget``: every seed reached it) and
``*_ci95`` is the half-width of its 95 % t-interval (empty with one seed)."""


@dataclass
class CompareResult:
    """The runs of one comparison: ``runs[i][j]`` is ``methods[i]`` trained with ``seeds[j]``."""

    spec: TokenTreeSpec
    runner: RunnerConfig
    seeds: list[int]
    methods: list[tuple[str, str, dict[str, Any]]]
    algos: list[AlgoConfig]
    runs: list[list[TrainResult]]
    wall_time_s: float

    @property
    def seed(self) -> int:
        """The first seed."""
        return self.seeds[0]

    @property
    def problem_set_seeds(self) -> list[int]:
        """The problem-set seed of each run seed (the same for every method)."""
        return [self.spec.problem_set_seed(s) for s in self.seeds]

    @property
    def problem_set_seed(self) -> int:
        """The first seed's problem-set seed."""
        return self.problem_set_seeds[0]


def run_compare(spec: TokenTreeSpec, runner: RunnerConfig = COMPARE_RUNNER, seed: int = 0,
                methods: tuple[tuple[str, str, dict[str, Any]], ...] = COMPARE_METHODS,
                seeds: int = 1) -> CompareResult:
    """Train every method of ``methods`` on ``spec`` with the run seeds ``seed``, ..., ``seed + seeds - 1``
    (a seed gives every method the same problem set and starting policy) and the same loop (the
    same total budget). A method's seeds are trained together in lockstep
    (:func:`sims.runner.train_replicas`): each run is the one it would be alone."""
    if seeds < 1:
        raise ValueError(f"seeds = {seeds} is invalid: at least 1 run per method")
    t0 = time.perf_counter()
    algos = [method_config(name, **overrides) for _, name, overrides in methods]  # validate all first
    seed_list = [seed + i for i in range(seeds)]
    runs = [train_replicas([spec] * seeds, algo, [runner] * seeds, seed_list, [label] * seeds)
            for (label, _, _), algo in zip(methods, algos)]
    return CompareResult(spec=spec, runner=runner, seeds=seed_list, methods=list(methods), algos=algos, runs=runs,
                         wall_time_s=time.perf_counter() - t0)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r[key] == r[key]]  # drop NaN
    return sum(vals) / len(vals) if vals else float("nan")


def value_at_budget(history: list[dict[str, Any]], key: str, budget: int | None, unit: str) -> float:
    """``key`` at exactly ``budget`` spent (in ``unit``), interpolated linearly between the last
    step below the budget and the first at or past it; NaN without a budget or if the run
    stopped before reaching it (a ``steps`` cap)."""
    if budget is None:
        return float("nan")
    for prev, row in zip(history, history[1:]):
        if row[unit] >= budget:
            x0, x1 = prev[unit], row[unit]
            w = (budget - x0) / (x1 - x0) if x1 > x0 else 1.0
            return prev[key] + w * (row[key] - prev[key])
    return float("nan")


def run_row(label: str, name: str, run: TrainResult, runner: RunnerConfig) -> dict[str, Any]:
    """The :data:`SUMMARY_COLUMNS` of one run."""
    k, budget, unit = runner.pass_k, runner.budget, runner.budget_unit
    h = run.history
    first, last = h[0], h[-1]
    gain = last["pass1"] - first["pass1"]
    return {
        "label": label, "method": name, "budget_unit": unit, "budget": budget, "seeds": 1, "steps": last["step"],
        "rollouts": last["rollouts"], "tokens": last["tokens"],
        "pass1_at_budget": value_at_budget(h, "pass1", budget, unit), "pass1_at_budget_ci95": float("nan"),
        "heldout_pass1_at_budget": value_at_budget(h, "heldout_pass1", budget, unit),
        "heldout_pass1_at_budget_ci95": float("nan"),
        "final_pass1": last["pass1"], "final_heldout_pass1": last["heldout_pass1"],
        "initial_pass1": first["pass1"], "initial_heldout_pass1": first["heldout_pass1"],
        "final_pass8": last[f"pass{k}"] if k == 8 else float("nan"),
        "gain_per_1k_rollouts": 1000.0 * gain / last["rollouts"] if last["rollouts"] else float("nan"),
        "gain_per_1m_tokens": 1e6 * gain / last["tokens"] if last["tokens"] else float("nan"),
        "all_fail_groups_per_step": _mean(h[1:], "all_fail_groups"),
        "pivot_before_error": _mean(h[1:], "pivot_before_error"),
        "branch_success": _mean(h[1:], "branch_success"),
        "reached_budget": budget is None or last[unit] >= budget,
    }


def _ci95(values: list[float]) -> float:
    """Half-width of the 95 % t-interval of the mean of ``values`` (NaN with fewer than 2 or any NaN)."""
    n = len(values)
    if n < 2 or any(v != v for v in values):
        return float("nan")
    # scipy.special's t quantile: scipy.stats would cost a third of `import torch` to import (and
    # only several seeds need it: one seed's compare never imports scipy)
    from scipy.special import stdtrit
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5
    return float(stdtrit(n - 1, 0.975)) * sd / n ** 0.5


def summary_rows(result: CompareResult) -> list[dict[str, Any]]:
    """One row per method (see :data:`SUMMARY_COLUMNS`): its run's values, or with several seeds
    their means and the 95 % intervals of pass@1 at the budget."""
    out = []
    for (label, name, _), runs in zip(result.methods, result.runs):
        rows = [run_row(label, name, run, result.runner) for run in runs]
        if len(rows) == 1:
            out.append(rows[0])
            continue
        row = dict(rows[0], seeds=len(rows), reached_budget=all(r["reached_budget"] for r in rows))
        for key in SUMMARY_COLUMNS:
            if key not in ("label", "method", "budget_unit", "budget", "seeds", "reached_budget") \
                    and not key.endswith("_ci95"):
                vals = [r[key] for r in rows]
                row[key] = sum(vals) / len(vals)  # NaN if any seed has none (e.g. one stopped before the budget)
        for key in ("pass1_at_budget", "heldout_pass1_at_budget"):
            row[f"{key}_ci95"] = _ci95([r[key] for r in rows])
        out.append(row)
    return out


def _unit_words(unit: str) -> str:
    return "generated tokens (main chains + branch suffixes)" if unit == "tokens" else "rollouts (main + branches)"


def _seed_words(result: CompareResult) -> str:
    """``seed 0, problem set N (drawn from the seed)`` or, with several seeds, their range."""
    spec = result.spec
    if len(result.seeds) == 1:
        pinned = "pinned by --spec-seed" if spec.pinned else "drawn from the seed"
        return f"seed {result.seed}, problem set {result.problem_set_seed} ({pinned})"
    sets = (f"one problem set, {result.problem_set_seed} (pinned by --spec-seed)" if spec.pinned
            else "each its own problem set, drawn from the seed")
    return f"seeds {result.seeds[0]}-{result.seeds[-1]} ({len(result.seeds)} runs per method; {sets})"


def format_header(result: CompareResult) -> str:
    """The lines above the table: spec, seeds, problem sets, and the budget with its unit."""
    r, spec = result.runner, result.spec
    lines = [f"sim compare: {explain(spec)}", f"{r.batch_problems} problems per step, {_seed_words(result)}, "
             f"{r.policy} policy, {r.optimizer} lr {r.lr:g}"]
    if r.budget is None:
        lines.append(f"equal steps ({r.steps} per method; no budget): values after the last step")
    else:
        lines.append(f"equal budget: {r.budget:,} {_unit_words(r.budget_unit)} per method; each method runs until it "
                     f"has spent it; pass@1 at exactly {r.budget:,} {r.budget_unit} (interpolated)")
    if len(result.seeds) > 1:
        lines.append(f"means over the {len(result.seeds)} seeds; ± is the half-width of the 95 % t-interval "
                     "of the mean")
    return "\n".join(lines)


SHORT_MARK = "*"
"""Marks, in the printed table, a run the step cap stopped before the budget."""


def _fmt_mean(x: float, ci: float) -> str:
    """``0.512`` or ``0.512±0.034``."""
    return _fmt_value(x) if ci != ci else f"{x:.3f}±{ci:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed table: method, steps, budget spent, exact pass@1 on the training and held-out
    problems at the budget (or after the last step without one), and their starting values
    (with several seeds: means, and the 95 % interval of pass@1 at the budget).
    A run the step cap stopped before the budget shows its values after its last step, marked
    :data:`SHORT_MARK` and explained below the table."""
    at_budget = bool(rows) and rows[0]["budget"] is not None
    where = "at budget" if at_budget else "final"
    several = bool(rows) and rows[0]["seeds"] > 1
    w = 13 if several else 8
    head = (f"{'method':<36} {'steps':>5} {'rollouts':>9} {'tokens':>8} {'pass@1':>{w}} {'held-out':>{w}}   "
            f"({where}; start {rows[0]['initial_pass1']:.3f} / {_fmt_value(rows[0]['initial_heldout_pass1'])})" if rows
            else "")
    lines = [head, "-" * len(head)]
    short = [r for r in rows if not r["reached_budget"]]
    for r in rows:
        at = at_budget and r["reached_budget"]
        if at:
            p1 = _fmt_mean(r["pass1_at_budget"], r["pass1_at_budget_ci95"])
            ho = _fmt_mean(r["heldout_pass1_at_budget"], r["heldout_pass1_at_budget_ci95"])
        else:
            p1, ho = _fmt_value(r["final_pass1"]), _fmt_value(r["final_heldout_pass1"])
        mark = " " if at or not at_budget else SHORT_MARK
        lines.append(f"{r['label']:<36} {r['steps']:>5.0f} {r['rollouts']:>9,.0f} {r['tokens']:>8,.0f} {p1:>{w}}{mark}"
                     f"{ho:>{w}}{mark}".rstrip())
    if short:
        unit, what = short[0]["budget_unit"], "methods" if several else "runs"
        lines.append(f"{SHORT_MARK} stopped by the step cap ({short[0]['steps']:.0f} steps) before the budget of "
                     f"{short[0]['budget']:,} {unit}: {len(short)} of {len(rows)} {what} show their values after their "
                     f"last step, at the {unit} spent (not at equal budget; raise --steps or lower --budget)")
    return "\n".join(lines)


def _fmt_value(x: float) -> str:
    """A pass@1 value, or ``-`` for none (no held-out problems)."""
    return "-" if x != x else f"{x:.3f}"


def figure_title(result: CompareResult) -> str:
    """Two lines: the comparison (budget, seeds, learner) and the problem set in plain words."""
    r = result.runner
    budget = f"equal budget of {r.budget:,} {r.budget_unit}" if r.budget is not None else f"{r.steps} steps each"
    return (f"sim compare: {budget}, {r.batch_problems} problems per step, {_seed_words(result)}, "
            f"{r.policy} policy, {r.optimizer} lr {r.lr:g}\n{explain(result.spec)}")


def figure_note(result: CompareResult) -> str | None:
    """Why the held-out panel is flat under the tabular policy (None otherwise)."""
    if result.runner.policy == "tabular" and result.spec.n_heldout:
        return ("held-out problems are never trained on, and the tabular policy shares nothing between problems: "
                "every method stays at its starting value")
    return None


def figure_svg(result: CompareResult) -> str:
    """SVG text of exact pass@1 (training and held-out problems) against the cumulative budget
    spent, one line per method (with several seeds: the mean over seeds, and a band for the
    95 % interval; :func:`sims.figure.pass1_vs_budget_svg`)."""
    unit = result.runner.budget_unit
    rows = [{"label": r["label"], "seed": r["seed"], unit: r[unit], "pass1": r["pass1"],
             "heldout_pass1": r["heldout_pass1"]} for r in history_rows(result)]
    return pass1_vs_budget_svg(rows, figure_title(result), unit, result.runner.budget, note=figure_note(result))


def history_rows(result: CompareResult) -> list[dict[str, Any]]:
    """Every run's history rows with ``label`` (display name) and ``method`` (method name);
    each row has its run's ``seed``."""
    return [{"label": label, "method": name, **{k: v for k, v in row.items() if k != "method"}}
            for (label, name, _), runs in zip(result.methods, result.runs) for run in runs for row in run.history]


def compare_record(result: CompareResult) -> dict[str, Any]:
    """The JSON record of a comparison (resolved configs, seeds, versions, wall time, budgets).
    ``budget``, ``wall_time_s`` and ``step_wall_time_s`` of a method are its first seed's, and
    ``runs`` lists every seed's."""
    return {
        "kind": "sim-compare", "seed": result.seed, "seeds": result.seeds, "wall_time_s": result.wall_time_s,
        "problem_set_seed": result.problem_set_seed, "problem_set_seeds": result.problem_set_seeds,
        "problem_set_pinned": result.spec.pinned,
        "budget": {"unit": result.runner.budget_unit, "total": result.runner.budget},
        "config": {"spec": result.spec.to_dict(), "runner": dataclasses.asdict(result.runner)},
        "methods": [{"label": label, "method": name, "overrides": overrides, "algo": algo.to_dict(),
                     "budget": runs[0].ledger.totals(), "wall_time_s": runs[0].wall_time_s,
                     "step_wall_time_s": runs[0].step_wall_time_s,
                     "runs": [{"seed": seed, "budget": run.ledger.totals(), "wall_time_s": run.wall_time_s}
                              for seed, run in zip(result.seeds, runs)]}
                    for (label, name, overrides), algo, runs in zip(result.methods, result.algos, result.runs)],
        "versions": versions(),
    }


def csv_text(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """CSV text of ``rows`` (columns: ``columns``, or the union of the rows' keys in first-seen
    order); NaN and missing values are empty cells, as pandas writes them. The csv module, not
    pandas: importing pandas alone costs a tenth of ``sim compare``'s time budget."""
    import csv
    import io
    import math
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if (v := r.get(c)) is None or (isinstance(v, float) and math.isnan(v)) else v
                         for c in columns])
    return buf.getvalue()


def write_compare(out: str | Path, result: CompareResult, figure: bool = True) -> list[Path]:
    """Render everything in memory, then write the files atomically; returns their paths."""
    out = Path(out)
    summary = csv_text(summary_rows(result), list(SUMMARY_COLUMNS))
    history = csv_text(history_rows(result))
    svg = figure_svg(result) if figure else None
    paths = [write_text_atomic(out / "summary.csv", summary), write_text_atomic(out / "history.csv", history),
             write_json_atomic(out / "run.json", compare_record(result))]
    if svg is not None:
        paths.append(write_text_atomic(out / "pass1_vs_budget.svg", svg))
    return paths
