"""``deepgrpo study NAME``, ``deepgrpo report --results DIR`` and
``deepgrpo report --llm-runs DIR [DIR ...] --out OUTDIR``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from deepgrpo.config import ConfigError


def _study_parser(prog: str) -> argparse.ArgumentParser:
    from analysis.studies import STUDIES
    p = argparse.ArgumentParser(prog=prog, description="Run a study in the simulator (resumable: finished "
                                "runs in --out are skipped).")
    p.add_argument("name", choices=[*STUDIES, "all"], help="the study, or 'all' for every study in turn")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds per variant (default 5)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced size (every study in under a minute in total)")
    size.add_argument("--smoke", action="store_true", help="a pipeline check: two variants per study, 4 short "
                      "steps (a second or two per study)")
    p.add_argument("--out", default="results", help="results directory (default ./results)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo study", command: str = "study") -> int:
    """Entry point of ``deepgrpo study`` and ``deepgrpo report``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command == "report":
        p = argparse.ArgumentParser(prog=prog, description="Write DIR/REPORT.md from the studies in DIR, or "
                                    "curves and a report of LLM training runs (--llm-runs ... --out OUTDIR).")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--results", help="results directory of `deepgrpo study`")
        src.add_argument("--llm-runs", nargs="+", metavar="DIR", help="run directories of `deepgrpo llm train` "
                         "(grouped by method and seed)")
        p.add_argument("--out", help="output directory of --llm-runs (runs.csv, curves.csv, summary.csv, PNGs, "
                       "REPORT.md)")
        args = p.parse_args(argv)
        if args.llm_runs:
            if not args.out:
                raise ConfigError("--llm-runs needs --out OUTDIR", owner="--out")
            from analysis.llm_runs import write_llm_report
            path = write_llm_report(args.llm_runs, args.out)
        else:
            if args.out:
                raise ConfigError("--out goes with --llm-runs; --results writes DIR/REPORT.md", owner="--out")
            from analysis.report import write_report
            try:
                path = write_report(args.results)
            except FileNotFoundError as e:
                raise ConfigError(str(e), owner="--results", value=args.results) from None
        print(f"wrote {path}")
        return 0
    if argv[:1] == ["llm-recoverability"]:  # an LLM study with its own options (analysis/llm_recoverability.py)
        from analysis.llm_recoverability import main as llm_recoverability_main
        return llm_recoverability_main(argv[1:], prog=f"{prog} llm-recoverability")
    args = _study_parser(prog).parse_args(argv)
    if args.seeds < 1:
        raise ConfigError(f"--seeds = {args.seeds} is invalid: expected an integer in [1, inf)")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers = {args.workers} is invalid: expected an integer in [1, inf)")
    from analysis.studies import STUDIES, run_study
    names = list(STUDIES) if args.name == "all" else [args.name]
    t0 = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        size = "quick" if args.quick else "smoke" if args.smoke else "full"
        d = run_study(name, args.out, seeds=args.seeds, size=size, workers=args.workers,
                      progress=not args.no_progress)
        print(f"{name}: {d} ({time.perf_counter() - t:.1f} s)")
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return 0
