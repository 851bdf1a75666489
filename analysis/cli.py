"""``deepgrpo study NAME``, ``deepgrpo report --results DIR`` and
``deepgrpo report --llm-runs DIR [DIR ...] --out OUTDIR``.

Every command here checks its arguments first (a bad one is one line, ``prog: error: ...``, and
exit code 2: :class:`OneLineParser`), then claims its output directory (:func:`claim_output`:
writable, and one writer at a time), and only then starts work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deepgrpo.config import ConfigError, check_choice, check_range, invalid
from deepgrpo.flags import OneLineParser, OptionSet
from deepgrpo.records import Interrupted, claim_output

OWN_PARSERS = {
    "regime-map": "analysis.regime_map",
    "theory": "analysis.theory",
    "llm-recoverability": "analysis.llm_recoverability",
    "llm-compare": "analysis.llm_compare",
}
"""Studies with their own options: ``study NAME ...`` runs ``module.main``; each module's
``add_arguments(parser)`` declares its options and ``DESCRIPTION`` says what it does."""


@dataclass
class SimStudyOptions:
    """Settings of a simulator study.

    seeds: paired evaluation seeds per variant, each with its own problem set (at most 1000:
        evaluation seeds stay below the tuning seeds 1000, 1001, ...).
    budget_unit: what stops every run: its total generated tokens (tokens) or rollouts (rollouts).
    budget: total budget per run in the budget unit (None = the size's: full 100,000 tokens or
        15,000 rollouts).
    policy: the simulator's policy class for every run, tabular, features or skills (None = the
        simulator's default, tabular; skills needs problem sets with skills).
    optimizer: the simulator's optimizer for every run, adam or sgd (None = the simulator's
        default, adam).
    lr_grid: learning rates tried for every variant (None = the size's multiples of the
        simulator's default rate).
    workers: processes running the study's runs (None = the CPUs this process may use, also the
        most it takes).
    """

    seeds: int = 5
    budget_unit: str = "tokens"
    budget: int | None = None
    policy: str | None = None
    optimizer: str | None = None
    lr_grid: tuple[float, ...] | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        from analysis.protocol import TUNING_SEED_BASE
        from deepgrpo.ledger import BUDGET_UNITS
        o = type(self).__name__
        check_range(o, "seeds", self.seeds, 1, TUNING_SEED_BASE, integer=True)
        check_choice(o, "budget_unit", self.budget_unit, BUDGET_UNITS)
        if self.budget is not None:
            check_range(o, "budget", self.budget, 1, None, integer=True)
        if self.policy is not None:
            from sims.policy import POLICY_CLASSES
            check_choice(o, "policy", self.policy, POLICY_CLASSES)
        if self.optimizer is not None:
            check_choice(o, "optimizer", self.optimizer, ("adam", "sgd"))
        if self.lr_grid is not None:
            if not self.lr_grid:
                raise invalid(o, "lr_grid", self.lr_grid, "at least one learning rate")
            for rate in self.lr_grid:
                check_range(o, "lr_grid", rate, 0.0, None, lo_open=True)
        if self.workers is not None:
            check_range(o, "workers", self.workers, 1, None, integer=True)


SIM_STUDY_OPTIONS = OptionSet(SimStudyOptions, reserved=("quick", "smoke", "out", "no_progress", "config", "set",
                                                          "help"))


def _add_sim_study_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced size: a fifth of the budget, 3 rates on 1 "
                      "tuning seed (every study in about a minute on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="a pipeline check: two variants per study, a small "
                      "budget, 2 rates on 1 tuning seed (a few seconds per study)")
    p.add_argument("--out", default="results", help="results directory (default: ./results)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    SIM_STUDY_OPTIONS.add_arguments(p)


SIM_STUDY_DESCRIPTION = ("Each variant's learning rate is tuned first on tuning seeds (1000, 1001, ...), then every "
                         "variant runs on the evaluation seeds until it has spent the budget. Resumable: finished "
                         "runs in --out are skipped; Ctrl-C keeps them.")


def build_parser(prog: str = "deepgrpo study", command: str = "study", own: bool = True) -> argparse.ArgumentParser:
    """The parser of ``deepgrpo study`` (one sub-command per study; with ``own``, the studies with
    their own options too, which imports their modules) or of ``deepgrpo report``."""
    if command == "report":
        return _report_parser(prog)
    from analysis.studies import STUDIES
    p = OneLineParser(prog=prog, description="Run a study. The simulator studies compare methods at equal total "
                      "budget: " + SIM_STUDY_DESCRIPTION[0].lower() + SIM_STUDY_DESCRIPTION[1:])
    sub = p.add_subparsers(dest="name", required=True)
    for name, study in STUDIES.items():
        _add_sim_study_arguments(sub.add_parser(name, help=study.question, description=f"{study.question} "
                                                f"{SIM_STUDY_DESCRIPTION}"))
    _add_sim_study_arguments(sub.add_parser("all", help="every simulator study in turn",
                                            description=f"Every simulator study in turn. {SIM_STUDY_DESCRIPTION}"))
    if own:
        for name, module_name in OWN_PARSERS.items():
            module = importlib.import_module(module_name)
            module.add_arguments(sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION))
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # a missing study is named by its choices, not "name"
    return p


def _report_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Write DIR/REPORT.md from the studies in DIR, or "
                      "curves and a report of LLM training runs (--llm-runs ... --out OUTDIR).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", metavar="DIR", help="results directory of deepgrpo study")
    src.add_argument("--llm-runs", nargs="+", metavar="DIR", help="run directories of deepgrpo llm train "
                     "(grouped by method and seed)")
    p.add_argument("--out", metavar="OUTDIR", help="output directory of --llm-runs (runs.csv, curves.csv, "
                   "summary.csv, PNGs, REPORT.md)")
    p.add_argument("--readme", metavar="README.md", help="with --results: also rewrite the README's simulator "
                   "results (between its regime-map markers) from the regime map in DIR")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo study", command: str = "study") -> int:
    """Entry point of ``deepgrpo study`` and ``deepgrpo report``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command == "report":
        p = _report_parser(prog)
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
    if argv[:1] and argv[0] in OWN_PARSERS:  # a study with its own options (and its own main)
        module = importlib.import_module(OWN_PARSERS[argv[0]])
        return int(module.main(argv[1:], prog=f"{prog} {argv[0]}") or 0)
    # the simulator studies' parser; --help (or no study) shows every study
    parser = build_parser(prog, own=not argv or argv[0].startswith("-"))
    args = parser.parse_args(argv)
    opts = SIM_STUDY_OPTIONS.resolve_named(args, SimStudyOptions())
    from analysis.studies import STUDIES, run_study
    from analysis.sweep import cap_workers
    names = list(STUDIES) if args.name == "all" else [args.name]
    t0 = time.perf_counter()
    runner = {k: v for k, v in (("policy", opts.policy), ("optimizer", opts.optimizer)) if v is not None}
    rates = list(opts.lr_grid) if opts.lr_grid is not None else None
    claim_output(args.out)
    workers = cap_workers(opts.workers, prog)
    done: list[str] = []
    for name in names:
        t = time.perf_counter()
        size = "quick" if args.quick else "smoke" if args.smoke else "full"
        try:
            d = run_study(name, args.out, seeds=opts.seeds, size=size, workers=workers,
                          progress=not args.no_progress, budget_unit=opts.budget_unit, budget=opts.budget,
                          runner=runner, rates=rates)
        except Interrupted as e:
            before = f"finished studies kept: {', '.join(done)}; " if done else ""
            raise Interrupted(f"{before}{e}") from None
        done.append(name)
        print(f"{name}: {d} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return 0
