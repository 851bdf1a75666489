"""``deepgrpo study NAME``, ``deepgrpo report --results DIR`` and
``deepgrpo report --llm-runs DIR [DIR ...] --out OUTDIR``.

Every command here checks its arguments first (a bad one is one line, ``prog: error: ...``, and
exit code 2: :class:`OneLineParser`), then claims its output directory (:func:`claim_output`:
writable, and one writer at a time), and only then starts work.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deepgrpo.config import ConfigError
from deepgrpo.flags import OneLineParser
from deepgrpo.records import Interrupted, claim_output


def _study_parser(prog: str) -> argparse.ArgumentParser:
    from analysis.studies import STUDIES
    p = OneLineParser(prog=prog, description="Run a study in the simulator at equal total budget: "
                      "each variant's learning rate is tuned first on tuning seeds (1000, 1001, ...), then "
                      "every variant runs on the evaluation seeds until it has spent the budget. "
                      "Resumable: finished runs in --out are skipped; Ctrl-C keeps them.")
    p.add_argument("name", choices=[*STUDIES, "all"],
                   help="the study, or 'all' for every simulator study in turn; `regime-map` (where DEEP-GRPO wins, "
                        "its own options), `theory` (exact oracle curves) and "
                        "the LLM studies `llm-recoverability` and `llm-compare` take their own options (see "
                        "`deepgrpo study llm-recoverability --help`)")
    p.add_argument("--seeds", type=int, default=5, help="paired evaluation seeds per variant, each with its own "
                   "problem set (default 5)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced size: a fifth of the budget, 3 rates on 1 "
                      "tuning seed (every study in about a minute on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="a pipeline check: two variants per study, a small "
                      "budget, 2 rates on 1 tuning seed (a few seconds per study)")
    p.add_argument("--budget-unit", choices=["tokens", "rollouts"], default="tokens",
                   help="what stops every run: its total generated tokens (default) or rollouts")
    p.add_argument("--budget", type=int, default=None, help="total budget per run in --budget-unit (default: the "
                   "size's: full 100,000 tokens / 15,000 rollouts)")
    p.add_argument("--policy", choices=["tabular", "features"], default=None,
                   help="the simulator's policy class for every run (default: the simulator's, tabular)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=None,
                   help="the simulator's optimizer for every run (default: the simulator's, adam)")
    p.add_argument("--lr-grid", default=None, metavar="LR,LR,...",
                   help="learning rates tried for every variant (default: the size's multiples of the "
                   "simulator's default rate)")
    p.add_argument("--out", default="results", help="results directory (default ./results)")
    p.add_argument("--workers", type=int, default=None, help="processes (default and at most: the CPUs this "
                   "process may use)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo study", command: str = "study") -> int:
    """Entry point of ``deepgrpo study`` and ``deepgrpo report``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command == "report":
        p = OneLineParser(prog=prog, description="Write DIR/REPORT.md from the studies in DIR, or "
                          "curves and a report of LLM training runs (--llm-runs ... --out OUTDIR).")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--results", help="results directory of `deepgrpo study`")
        src.add_argument("--llm-runs", nargs="+", metavar="DIR", help="run directories of `deepgrpo llm train` "
                         "(grouped by method and seed)")
        p.add_argument("--out", help="output directory of --llm-runs (runs.csv, curves.csv, summary.csv, PNGs, "
                       "REPORT.md)")
        p.add_argument("--readme", metavar="README.md", help="with --results: also rewrite the README's simulator "
                       "results (between its regime-map markers) from the regime map in DIR")
        args = p.parse_args(argv)
        if args.readme and not args.results:
            raise ConfigError("--readme goes with --results DIR (the regime map's results)", owner="--readme")
        if args.llm_runs:
            if not args.out:
                raise ConfigError("--llm-runs needs --out OUTDIR", owner="--out")
            from deepgrpo.records import check_writable_dir
            check_writable_dir(args.out, "--out")  # locked once the runs are read (write_llm_report)
            from analysis.llm_runs import write_llm_report
            path = write_llm_report(args.llm_runs, args.out)
        else:
            if args.out:
                raise ConfigError("--out goes with --llm-runs; --results writes DIR/REPORT.md", owner="--out")
            from analysis.report import write_report
            if Path(args.results).exists():  # a missing directory is "no study results" below
                claim_output(args.results, "--results")
            try:
                path = write_report(args.results)
            except FileNotFoundError as e:
                raise ConfigError(str(e), owner="--results", value=args.results) from None
            if args.readme:
                from analysis.regime_map import STUDY, update_readme
                if not (Path(args.results) / STUDY / "per_run.csv").is_file():
                    raise ConfigError(f"--readme needs the regime map in {args.results}: run `deepgrpo study "
                                      f"regime-map --out {args.results}` first", owner="--readme")
                print(f"wrote {update_readme(args.readme, args.results)}")
        print(f"wrote {path}")
        return 0
    if argv[:1] == ["llm-recoverability"]:  # an LLM study with its own options (analysis/llm_recoverability.py)
        from analysis.llm_recoverability import main as llm_recoverability_main
        return llm_recoverability_main(argv[1:], prog=f"{prog} llm-recoverability")
    if argv[:1] == ["theory"]:  # exact curves from the oracle, no training (analysis/theory.py)
        from analysis.theory import main as theory_main
        return theory_main(argv[1:], prog=f"{prog} theory")
    if argv[:1] == ["regime-map"]:  # the regime map and gain decomposition (analysis/regime_map.py)
        from analysis.regime_map import main as regime_map_main
        return regime_map_main(argv[1:], prog=f"{prog} regime-map")
    if argv[:1] == ["llm-compare"]:  # methods on a real LM at equal generated tokens (analysis/llm_compare.py)
        from analysis.llm_compare import main as llm_compare_main
        return llm_compare_main(argv[1:], prog=f"{prog} llm-compare")
    args = _study_parser(prog).parse_args(argv)
    from analysis.protocol import TUNING_SEED_BASE
    from analysis.sweep import cap_workers
    if not 1 <= args.seeds <= TUNING_SEED_BASE:
        raise ConfigError(f"--seeds = {args.seeds} is invalid: expected an integer in [1, {TUNING_SEED_BASE}] "
                          f"(evaluation seeds stay below the tuning seeds {TUNING_SEED_BASE}, ...)")
    if args.budget is not None and args.budget < 1:
        raise ConfigError(f"--budget = {args.budget} is invalid: expected an integer in [1, inf)")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers = {args.workers} is invalid: expected an integer in [1, inf)")
    from analysis.studies import STUDIES, run_study
    names = list(STUDIES) if args.name == "all" else [args.name]
    t0 = time.perf_counter()
    runner = {k: v for k, v in (("policy", args.policy), ("optimizer", args.optimizer)) if v is not None}
    rates = None
    if args.lr_grid is not None:
        bad = ConfigError(f"--lr-grid = {args.lr_grid!r} is invalid: expected comma-separated numbers > 0")
        try:
            rates = [float(x) for x in args.lr_grid.split(",")]
        except ValueError:
            raise bad from None
        if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
            raise bad
    claim_output(args.out)
    workers = cap_workers(args.workers, prog)
    done: list[str] = []
    for name in names:
        t = time.perf_counter()
        size = "quick" if args.quick else "smoke" if args.smoke else "full"
        try:
            d = run_study(name, args.out, seeds=args.seeds, size=size, workers=workers,
                          progress=not args.no_progress, budget_unit=args.budget_unit, budget=args.budget,
                          runner=runner, rates=rates)
        except Interrupted as e:
            before = f"finished studies kept: {', '.join(done)}; " if done else ""
            raise Interrupted(f"{before}{e}") from None
        done.append(name)
        print(f"{name}: {d} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return 0
