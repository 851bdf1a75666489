"""``deepgrpo report --results DIR``: assemble ``DIR/REPORT.md`` from the studies' results.

Every number in the report is computed from the tables in ``DIR/<study>/`` when the report is
written: the protocol paragraph (budget and unit, seeds and problem sets, the spread of the
initial pass@1, the tuned learning rates) from ``runs.csv``, ``tuned_lr.csv`` and ``study.json``;
the findings (each study's ``findings`` function) and the summary table from ``runs.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.protocol import TUNING_CRITERION, common_end, stopping
from analysis.stats import ALPHA, EQUIVALENCE_MARGIN
from analysis.studies import STUDIES
from analysis.tables import markdown_table
from deepgrpo.ledger import BUDGET_UNITS
from deepgrpo.records import write_text_atomic


def _seed_span(seeds) -> str:
    """``0-4`` for consecutive seeds, else a comma list."""
    s = sorted(int(x) for x in set(seeds))
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def _spread(values: pd.Series) -> str:
    """``mean 0.179, sd 0.031, range 0.142-0.221 over 5 seeds``."""
    v = values.to_numpy(np.float64)
    sd = f", sd {v.std(ddof=1):.3f}" if v.size > 1 else ""
    return f"mean {v.mean():.3f}{sd}, range {v.min():.3f}-{v.max():.3f} over {v.size} seeds"


def protocol_lines(runs: pd.DataFrame, tuned: pd.DataFrame | None, meta: dict) -> list[str]:
    """The protocol paragraph of one study, from its tables: budget and unit, steps taken,
    evaluation seeds and their problem sets, the spread of the initial pass@1 (training and
    held-out problems), the tuning seeds, grid, criterion and chosen rates."""
    unit, budget = stopping(runs)
    last = runs.loc[runs.groupby(["variant", "seed"]).step.idxmax()]
    reached = int((last[unit] >= budget).sum())
    out = [f"- *Budget:* every run stops at {budget:,} {unit} (the first step at which it has spent at least that; "
           f"cheaper methods take more steps: {int(last.step.min())}-{int(last.step.max())} steps here); "
           f"{reached} of {len(last)} runs reached the budget before the step cap. Common ranges: "
           + ", ".join(f"0-{common_end(runs, u):,.0f} {u}" for u in BUDGET_UNITS) + "."]
    start = runs[runs.step == 0].groupby("seed").first()
    sets = start["problem_set_seed"].nunique() if "problem_set_seed" in start else None
    line = (f"- *Seeds:* evaluation seeds {_seed_span(start.index)}"
            + (f" with {sets} distinct problem sets" if sets is not None else "")
            + f"; initial exact pass@1 (training problems) {_spread(start.pass1)}")
    if "heldout_pass1" in start:
        line += f"; held-out problems {_spread(start.heldout_pass1)}"
    out.append(line + ". Differences are paired over seeds (same seed = same problem set).")
    proto = meta.get("protocol", {})
    if tuned is not None and len(tuned):
        grid = ", ".join(f"{x:g}" for x in proto.get("lr_grid", sorted(tuned.lr.unique())))
        if proto.get("max_extensions"):
            lo, hi = proto["lr_limits"]
            grid += (f" (a variant whose best rate is at an end of its grid gets the next rate by a factor of 2, "
                     f"within {lo:g}-{hi:g})")
        seeds = proto.get("tuning_seeds")
        chosen = tuned[tuned.chosen.astype(bool)]
        rates = "; ".join(f"{r.variant}: {r.lr:g}" + (" (at the end of its grid: the best rate may lie beyond)"
                                                      if bool(r.edge) else "")
                          for r in chosen.itertuples())
        out.append(f"- *Learning rates:* tuned per variant over the grid {grid} on tuning seeds "
                   f"{_seed_span(seeds) if seeds else 'disjoint from the evaluation seeds'} (their own problem "
                   f"sets); criterion: {proto.get('tuning_criterion', TUNING_CRITERION)}. Chosen: {rates}.")
    runner = proto.get("runner", {})
    if runner:
        out.append("- *Training loop:* " + ", ".join(f"{k} = {v}" for k, v in runner.items()) + ".")
    return out


def build_report(results: str | Path) -> str:
    """The markdown text of the report for the results directory ``results``."""
    root = Path(results)
    lines = ["# DEEP-GRPO simulator studies", "",
             "Every table and finding below is computed from the run tables in this directory when the "
             "report is generated.", "",
             "**Protocol.** Methods are compared at equal total budget: every run stops once it has spent the "
             "study's budget (generated tokens unless stated otherwise), so cheaper methods take more steps. "
             "Each run's curve is interpolated onto a common budget grid; a finding reads either the value *at "
             "the budget* or the *AUC* (mean value over the common range, 0 up to the smallest final spending of "
             "any run) and names its unit. Each variant's learning rate is tuned first on tuning seeds disjoint "
             "from the evaluation seeds. Each seed draws its own problem set; held-out problems (never trained "
             f"on) are reported beside the training problems. Differences are paired over seeds with 95 % "
             f"t-intervals; when a finding compares several methods the p-values are Holm-corrected (family-wise "
             f"α = {ALPHA:g}) and each interval is at its Holm level; a difference is called *higher* or *lower* "
             f"only when Holm-significant, *equivalent* only when a paired equivalence test (TOST, margin "
             f"±{EQUIVALENCE_MARGIN:g} in pass@1) shows it after Holm correction, and *inconclusive* otherwise.",
             ""]
    found = 0
    missing = []
    for name, study in STUDIES.items():
        d = root / name
        if not (d / "runs.csv").exists():
            missing.append(name)
            continue
        lines += [f"## {name}", "", f"*Question:* {study.question}", ""]
        found += 1
        runs = pd.read_csv(d / "runs.csv")
        meta = json.loads((d / "study.json").read_text()) if (d / "study.json").exists() else {}
        tuned = pd.read_csv(d / "tuned_lr.csv") if (d / "tuned_lr.csv").exists() else None
        n_runs = runs.groupby(["variant", "seed"]).ngroups
        size = meta.get("size") if isinstance(meta.get("size"), str) else None
        n_tune = meta.get("tuning_cells")
        lines.append(f"{n_runs} runs ({runs.variant.nunique()} variants x {runs.seed.nunique()} seeds"
                     + (f", after {n_tune} tuning runs" if n_tune else "")
                     + (f", {size} size" if size not in (None, "full") else "")
                     + (f", {meta['wall_time_s']:.0f} s wall" if "wall_time_s" in meta else "") + ").")
        lines.append("")
        lines += ["**Protocol**", ""] + protocol_lines(runs, tuned, meta) + [""]
        if (d / f"{name}.png").exists():
            lines += [f"![{name}]({name}/{name}.png)", ""]
        lines += ["**Findings**", ""] + [f"- {f}" for f in study.findings(runs)] + [""]
        summary = study.summary(runs)
        lines += [markdown_table(summary), ""]
    from analysis.regime_map import report_section as regime_map_section
    regime = regime_map_section(root)  # the regime map and the paper's claims, if run here
    if regime is not None:
        found += 1
        lines += regime + [""]
    theory = root / "theory" / "section.md"  # the exact oracle curves (`deepgrpo study theory`), if run here
    if theory.is_file():
        lines += theory.read_text().splitlines() + [""]
    from analysis.llm_recoverability import report_section as llm_recoverability_section
    llm = llm_recoverability_section(root)  # the LLM study, from the same directory if it was run there
    if llm is not None:
        found += 1
        lines += llm + [""]
    if missing and found:
        lines += [f"Not run in this directory: {', '.join(missing)} (`deepgrpo study NAME --out {root}` produces "
                  "one).", ""]
    if found == 0:
        raise FileNotFoundError(f"no study results under {root}: run `deepgrpo study NAME --out {root}` first")
    return "\n".join(lines)


def write_report(results: str | Path) -> Path:
    """Write ``results/REPORT.md`` atomically and return its path."""
    path = Path(results) / "REPORT.md"
    write_text_atomic(path, build_report(results))
    return path
