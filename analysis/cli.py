"""``deepgrpo study NAME`` and ``deepgrpo report --results DIR``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from deepgrpo.config import ConfigError


def _study_parser(prog: str) -> argparse.ArgumentParser:
    from analysis.studies import STUDIES
    p = argparse.ArgumentParser(prog=prog, description="Run a study in the simulator (resumable: finished "
                                "runs in --out are skipped).")
    p.add_argument("name", choices=[*STUDIES, "all"], help="the study, or 'all' for every study in turn")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds per variant (default 5)")
    p.add_argument("--quick", action="store_true", help="reduced size (every study in under a minute in total)")
    p.add_argument("--out", default="results", help="results directory (default ./results)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo study", command: str = "study") -> int:
    """Entry point of ``deepgrpo study`` and ``deepgrpo report``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command == "report":
        p = argparse.ArgumentParser(prog=prog, description="Write DIR/REPORT.md from the studies in DIR.")
        p.add_argument("--results", required=True, help="results directory of `deepgrpo study`")
        args = p.parse_args(argv)
        from analysis.report import write_report
        try:
            path = write_report(args.results)
        except FileNotFoundError as e:
            p.error(str(e))
        print(f"wrote {path}")
        return 0
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
        d = run_study(name, args.out, seeds=args.seeds, quick=args.quick, workers=args.workers,
                      progress=not args.no_progress)
        print(f"{name}: {d} ({time.perf_counter() - t:.1f} s)")
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return 0
