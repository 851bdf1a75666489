"""``deepgrpo sim compare``: GRPO with N ∈ {8, 16, 32, 64}, a tree-style baseline and DEEP-GRPO
on one simulated problem set, same seed, same number of steps (the paper's protocol, arXiv
2602.14169 Table 1: each method spends its own per-step budget, which the table reports).

Outputs (all written atomically, only after every run finished):
    summary.csv              one row per method (final exact pass@1, budget, gain per 1,000 rollouts)
    history.csv              every run's per-step history (tidy; a ``label`` column names the method)
    run.json                 resolved configs, seed, versions, wall times, budgets
    pass1_vs_rollouts.png    exact pass@1 against cumulative rollouts (seaborn)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepgrpo.config import AlgoConfig
from deepgrpo.methods import method_config
from deepgrpo.records import atomic_write, versions, write_csv_atomic, write_json_atomic
from sims.figure import FigureWorker, pass1_vs_rollouts_png
from sims.runner import RunnerConfig, TrainResult, train
from sims.spec import TokenTreeSpec, describe

COMPARE_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("GRPO N=8", "grpo", {"G": 8}),
    ("GRPO N=16", "grpo", {"G": 16}),
    ("GRPO N=32", "grpo", {"G": 32}),
    ("GRPO N=64", "grpo", {"G": 64}),
    ("TreeRL-like (tree-surprisal)", "tree-surprisal", {}),
    ("DEEP-GRPO (G=8, K=8)", "deep-grpo", {}),
)
"""(label, method name, overrides) of the default comparison. The tree-style baseline is the
TreeRL-like max-surprisal rule, the tree method of the paper's main table."""

SUMMARY_COLUMNS = ("label", "method", "final_pass1", "initial_pass1", "final_pass8", "rollouts", "tokens",
                   "gain_per_1k_rollouts", "gain_per_1m_tokens", "all_fail_groups_per_step",
                   "pivot_before_error", "branch_success")


@dataclass
class CompareResult:
    """The runs of one comparison: ``runs[i]`` belongs to ``methods[i]``."""

    spec: TokenTreeSpec
    runner: RunnerConfig
    seed: int
    methods: list[tuple[str, str, dict[str, Any]]]
    algos: list[AlgoConfig]
    runs: list[TrainResult]
    wall_time_s: float


def run_compare(spec: TokenTreeSpec, runner: RunnerConfig, seed: int = 0,
                methods: tuple[tuple[str, str, dict[str, Any]], ...] = COMPARE_METHODS) -> CompareResult:
    """Train every method of ``methods`` on ``spec`` with the same seed and loop."""
    t0 = time.perf_counter()
    algos = [method_config(name, **overrides) for _, name, overrides in methods]  # validate all first
    runs = [train(spec, algo, runner, seed=seed, method=label) for (label, _, _), algo in zip(methods, algos)]
    return CompareResult(spec=spec, runner=runner, seed=seed, methods=list(methods), algos=algos, runs=runs,
                         wall_time_s=time.perf_counter() - t0)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r[key] == r[key]]  # drop NaN
    return sum(vals) / len(vals) if vals else float("nan")


def summary_rows(result: CompareResult) -> list[dict[str, Any]]:
    """One row per method (see :data:`SUMMARY_COLUMNS`)."""
    out = []
    k = result.runner.pass_k
    for (label, name, _), run in zip(result.methods, result.runs):
        first, last = run.history[0], run.history[-1]
        steps = run.history[1:]
        gain = last["pass1"] - first["pass1"]
        out.append({
            "label": label, "method": name, "final_pass1": last["pass1"], "initial_pass1": first["pass1"],
            "final_pass8": last[f"pass{k}"] if k == 8 else float("nan"),
            "rollouts": last["rollouts"], "tokens": last["tokens"],
            "gain_per_1k_rollouts": 1000.0 * gain / last["rollouts"] if last["rollouts"] else float("nan"),
            "gain_per_1m_tokens": 1e6 * gain / last["tokens"] if last["tokens"] else float("nan"),
            "all_fail_groups_per_step": _mean(steps, "all_fail_groups"),
            "pivot_before_error": _mean(steps, "pivot_before_error"),
            "branch_success": _mean(steps, "branch_success"),
        })
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed table: method, final exact pass@1, rollouts, tokens, gain per 1,000 rollouts."""
    head = f"{'method':<30} {'pass@1':>7} {'(start)':>7} {'rollouts':>9} {'tokens':>9} {'gain/1k rollouts':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<30} {r['final_pass1']:>7.3f} {r['initial_pass1']:>7.3f} {r['rollouts']:>9,d} "
                     f"{r['tokens']:>9,d} {r['gain_per_1k_rollouts']:>16.4f}")
    return "\n".join(lines)


def figure_title(result: CompareResult) -> str:
    return (f"sim compare: {result.runner.steps} steps x {result.runner.batch_problems} problems, "
            f"seed {result.seed}\n{describe(result.spec)}")


def figure_png(result: CompareResult, worker: FigureWorker | None = None) -> bytes:
    """PNG bytes of exact pass@1 against cumulative rollouts, one line per method (seaborn),
    rendered by ``worker`` (a pre-started :class:`~sims.figure.FigureWorker`) or in-process."""
    rows = [{"label": r["label"], "rollouts": r["rollouts"], "pass1": r["pass1"]} for r in history_rows(result)]
    if worker is not None:
        return worker.render(rows, figure_title(result))
    return pass1_vs_rollouts_png(rows, figure_title(result))


def history_rows(result: CompareResult) -> list[dict[str, Any]]:
    """Every run's history rows with ``label`` (display name) and ``method`` (method name)."""
    return [{"label": label, "method": name, **{k: v for k, v in row.items() if k != "method"}}
            for (label, name, _), run in zip(result.methods, result.runs) for row in run.history]


def compare_record(result: CompareResult) -> dict[str, Any]:
    """The JSON record of a comparison (resolved configs, seed, versions, wall time, budgets)."""
    return {
        "kind": "sim-compare", "seed": result.seed, "wall_time_s": result.wall_time_s,
        "config": {"spec": result.spec.to_dict(), "runner": dataclasses.asdict(result.runner)},
        "methods": [{"label": label, "method": name, "overrides": overrides, "algo": algo.to_dict(),
                     "budget": run.ledger.totals(), "wall_time_s": run.wall_time_s,
                     "step_wall_time_s": run.step_wall_time_s}
                    for (label, name, overrides), algo, run in zip(result.methods, result.algos, result.runs)],
        "versions": versions(),
    }


def write_compare(out: str | Path, result: CompareResult, figure: bool = True,
                  worker: FigureWorker | None = None) -> list[Path]:
    """Render everything in memory, then write the files atomically; returns their paths."""
    import pandas as pd

    out = Path(out)
    rows = summary_rows(result)
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    history = pd.DataFrame(history_rows(result))
    png = figure_png(result, worker) if figure else None
    paths = [write_csv_atomic(out / "summary.csv", summary), write_csv_atomic(out / "history.csv", history),
             write_json_atomic(out / "run.json", compare_record(result))]
    if png is not None:
        paths.append(atomic_write(out / "pass1_vs_rollouts.png", lambda p: p.write_bytes(png)))
    return paths
