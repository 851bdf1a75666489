"""``deepgrpo report --results DIR``: assemble ``DIR/REPORT.md`` from the studies' results.

Every number in the report is computed from ``DIR/<study>/runs.csv`` when the report is
written: the summary table, and the findings (each study's ``findings`` function).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.studies import STUDIES
from analysis.tables import markdown_table
from deepgrpo.records import write_text_atomic


def build_report(results: str | Path) -> str:
    """The markdown text of the report for the results directory ``results``."""
    root = Path(results)
    lines = ["# DEEP-GRPO simulator studies", "",
             "Every table and finding below is computed from the run tables in this directory when the "
             "report is generated. Values are means over paired seeds with 95 % t-intervals (±); "
             "differences are paired over seeds.", ""]
    found = 0
    for name, study in STUDIES.items():
        d = root / name
        lines += [f"## {name}", "", f"*Question:* {study.question}", ""]
        if not (d / "runs.csv").exists():
            lines += [f"Not run in this directory: `deepgrpo study {name} --out {root}` produces it.", ""]
            continue
        found += 1
        runs = pd.read_csv(d / "runs.csv")
        meta = json.loads((d / "study.json").read_text()) if (d / "study.json").exists() else {}
        n_runs = runs.groupby(["variant", "seed"]).ngroups
        size = meta.get("size") if isinstance(meta.get("size"), str) else None
        lines.append(f"{n_runs} runs ({runs.variant.nunique()} variants x {runs.seed.nunique()} seeds, "
                     f"{int(runs.step.max())} steps each{f', {size} size' if size not in (None, 'full') else ''}"
                     + (f", {meta['wall_time_s']:.0f} s wall" if "wall_time_s" in meta else "") + ").")
        lines.append("")
        if (d / f"{name}.png").exists():
            lines += [f"![{name}]({name}/{name}.png)", ""]
        lines += ["**Findings**", ""] + [f"- {f}" for f in study.findings(runs)] + [""]
        summary = study.summary(runs)
        lines += [markdown_table(summary), ""]
    if found == 0:
        raise FileNotFoundError(f"no study results under {root}: run `deepgrpo study NAME --out {root}` first")
    return "\n".join(lines)


def write_report(results: str | Path) -> Path:
    """Write ``results/REPORT.md`` atomically and return its path."""
    path = Path(results) / "REPORT.md"
    write_text_atomic(path, build_report(results))
    return path
