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
from sims.runner import RunnerConfig, TrainResult, train
from sims.spec import TokenTreeSpec, describe

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

SUMMARY_COLUMNS = ("label", "method", "budget_unit", "budget", "steps", "rollouts", "tokens",
                   "pass1_at_budget", "heldout_pass1_at_budget", "final_pass1", "final_heldout_pass1",
                   "initial_pass1", "initial_heldout_pass1", "final_pass8", "gain_per_1k_rollouts",
                   "gain_per_1m_tokens", "all_fail_groups_per_step", "pivot_before_error", "branch_success",
                   "reached_budget")
"""Columns of ``summary.csv``: ``*_at_budget`` are interpolated at exactly the budget (empty
without a budget, or for a run the step cap stopped first: ``reached_budget`` false), ``final_*``
are the values after the last step (spent: ``rollouts``, ``tokens``)."""


@dataclass
class CompareResult:
    """The runs of one comparison: ``runs[i]`` belongs to ``methods[i]``."""

    spec: TokenTreeSpec
    runner: RunnerConfig
    seed: int
    problem_set_seed: int
    methods: list[tuple[str, str, dict[str, Any]]]
    algos: list[AlgoConfig]
    runs: list[TrainResult]
    wall_time_s: float


def run_compare(spec: TokenTreeSpec, runner: RunnerConfig = COMPARE_RUNNER, seed: int = 0,
                methods: tuple[tuple[str, str, dict[str, Any]], ...] = COMPARE_METHODS) -> CompareResult:
    """Train every method of ``methods`` on ``spec`` with the same run seed (hence the same
    problem set and starting policy) and loop (the same total budget)."""
    t0 = time.perf_counter()
    algos = [method_config(name, **overrides) for _, name, overrides in methods]  # validate all first
    runs = [train(spec, algo, runner, seed=seed, method=label) for (label, _, _), algo in zip(methods, algos)]
    return CompareResult(spec=spec, runner=runner, seed=seed, problem_set_seed=spec.problem_set_seed(seed),
                         methods=list(methods), algos=algos, runs=runs, wall_time_s=time.perf_counter() - t0)


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


def summary_rows(result: CompareResult) -> list[dict[str, Any]]:
    """One row per method (see :data:`SUMMARY_COLUMNS`)."""
    out = []
    k = result.runner.pass_k
    budget, unit = result.runner.budget, result.runner.budget_unit
    for (label, name, _), run in zip(result.methods, result.runs):
        h = run.history
        first, last = h[0], h[-1]
        gain = last["pass1"] - first["pass1"]
        out.append({
            "label": label, "method": name, "budget_unit": unit, "budget": budget, "steps": last["step"],
            "rollouts": last["rollouts"], "tokens": last["tokens"],
            "pass1_at_budget": value_at_budget(h, "pass1", budget, unit),
            "heldout_pass1_at_budget": value_at_budget(h, "heldout_pass1", budget, unit),
            "final_pass1": last["pass1"], "final_heldout_pass1": last["heldout_pass1"],
            "initial_pass1": first["pass1"], "initial_heldout_pass1": first["heldout_pass1"],
            "final_pass8": last[f"pass{k}"] if k == 8 else float("nan"),
            "gain_per_1k_rollouts": 1000.0 * gain / last["rollouts"] if last["rollouts"] else float("nan"),
            "gain_per_1m_tokens": 1e6 * gain / last["tokens"] if last["tokens"] else float("nan"),
            "all_fail_groups_per_step": _mean(h[1:], "all_fail_groups"),
            "pivot_before_error": _mean(h[1:], "pivot_before_error"),
            "branch_success": _mean(h[1:], "branch_success"),
            "reached_budget": budget is None or last[unit] >= budget,
        })
    return out


def _unit_words(unit: str) -> str:
    return "generated tokens (main chains + branch suffixes)" if unit == "tokens" else "rollouts (main + branches)"


def format_header(result: CompareResult) -> str:
    """The lines above the table: spec, seed, problem set, and the budget with its unit."""
    r, spec = result.runner, result.spec
    pinned = "pinned by --spec-seed" if spec.pinned else "drawn from the seed"
    lines = [f"sim compare: {describe(spec)}; {r.batch_problems} problems per step, seed {result.seed}, "
             f"problem set {result.problem_set_seed} ({pinned}), {r.policy} policy, {r.optimizer} lr {r.lr:g}"]
    if r.budget is None:
        lines.append(f"equal steps ({r.steps} per method; no budget): values after the last step")
    else:
        lines.append(f"equal budget: {r.budget:,} {_unit_words(r.budget_unit)} per method; each method runs until it "
                     f"has spent it; pass@1 at exactly {r.budget:,} {r.budget_unit} (interpolated)")
    return "\n".join(lines)


SHORT_MARK = "*"
"""Marks, in the printed table, a run the step cap stopped before the budget."""


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed table: method, steps, budget spent, exact pass@1 on the training and held-out
    problems at the budget (or after the last step without one), and their starting values.
    A run the step cap stopped before the budget shows its values after its last step, marked
    :data:`SHORT_MARK` and explained below the table."""
    at_budget = bool(rows) and rows[0]["budget"] is not None
    where = "at budget" if at_budget else "final"
    head = (f"{'method':<36} {'steps':>5} {'rollouts':>9} {'tokens':>8} {'pass@1':>7} {'held-out':>8}   "
            f"({where}; start {rows[0]['initial_pass1']:.3f} / {_fmt_value(rows[0]['initial_heldout_pass1'])})" if rows
            else "")
    lines = [head, "-" * len(head)]
    short = [r for r in rows if not r["reached_budget"]]
    for r in rows:
        at = at_budget and r["reached_budget"]
        p1, ho = ("pass1_at_budget", "heldout_pass1_at_budget") if at else ("final_pass1", "final_heldout_pass1")
        mark = " " if at or not at_budget else SHORT_MARK
        lines.append(f"{r['label']:<36} {r['steps']:>5} {r['rollouts']:>9,d} {r['tokens']:>8,d} {r[p1]:>7.3f}{mark}"
                     f"{_fmt_value(r[ho]):>8}{mark}".rstrip())
    if short:
        unit = short[0]["budget_unit"]
        lines.append(f"{SHORT_MARK} stopped by the step cap ({short[0]['steps']} steps) before the budget of "
                     f"{short[0]['budget']:,} {unit}: {len(short)} of {len(rows)} runs show their values after their "
                     f"last step, at the {unit} spent (not at equal budget; raise --steps or lower --budget)")
    return "\n".join(lines)


def _fmt_value(x: float) -> str:
    """A pass@1 value, or ``-`` for none (no held-out problems)."""
    return "-" if x != x else f"{x:.3f}"


def figure_title(result: CompareResult) -> str:
    r = result.runner
    budget = f"equal budget {r.budget:,} {r.budget_unit}" if r.budget is not None else f"{r.steps} steps"
    return (f"sim compare: {budget}, {r.batch_problems} problems/step, seed {result.seed}, "
            f"problem set {result.problem_set_seed}, {r.policy} policy, {r.optimizer} lr {r.lr:g}\n"
            f"{describe(result.spec)}")


def figure_svg(result: CompareResult) -> str:
    """SVG text of exact pass@1 (training and held-out problems) against the cumulative budget
    spent, one line per method (:func:`sims.figure.pass1_vs_budget_svg`)."""
    unit = result.runner.budget_unit
    rows = [{"label": r["label"], unit: r[unit], "pass1": r["pass1"], "heldout_pass1": r["heldout_pass1"]}
            for r in history_rows(result)]
    return pass1_vs_budget_svg(rows, figure_title(result), unit, result.runner.budget)


def history_rows(result: CompareResult) -> list[dict[str, Any]]:
    """Every run's history rows with ``label`` (display name) and ``method`` (method name)."""
    return [{"label": label, "method": name, **{k: v for k, v in row.items() if k != "method"}}
            for (label, name, _), run in zip(result.methods, result.runs) for row in run.history]


def compare_record(result: CompareResult) -> dict[str, Any]:
    """The JSON record of a comparison (resolved configs, seed, versions, wall time, budgets)."""
    return {
        "kind": "sim-compare", "seed": result.seed, "wall_time_s": result.wall_time_s,
        "problem_set_seed": result.problem_set_seed, "problem_set_pinned": result.spec.pinned,
        "budget": {"unit": result.runner.budget_unit, "total": result.runner.budget},
        "config": {"spec": result.spec.to_dict(), "runner": dataclasses.asdict(result.runner)},
        "methods": [{"label": label, "method": name, "overrides": overrides, "algo": algo.to_dict(),
                     "budget": run.ledger.totals(), "wall_time_s": run.wall_time_s,
                     "step_wall_time_s": run.step_wall_time_s}
                    for (label, name, overrides), algo, run in zip(result.methods, result.algos, result.runs)],
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
