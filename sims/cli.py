"""``deepgrpo sim``: train in the simulator (``run``) and compare methods (``compare``).

    deepgrpo sim run --method deep-grpo [--steps 30 --seed 0 --out DIR --depth 12 ...]
    deepgrpo sim compare [--out DIR --seed 0 ...]

Every field of :class:`~sims.spec.TokenTreeSpec`, :class:`~sims.runner.RunnerConfig` and (for
``run``) the method's :class:`~deepgrpo.config.AlgoConfig` is a flag generated from the
dataclasses (:mod:`deepgrpo.flags`); sources are layered as defaults < method preset <
``--config FILE`` < flags < ``--set``. Invalid values stop with one line naming the option and
exit code 2, before anything is written; so do sizes that cannot fit in memory
(:mod:`sims.memory`), an ``--out`` that cannot be written, and an ``--out`` another process is
writing to (one writer per directory: :func:`deepgrpo.records.lock_output`). ``sim run`` never
replaces a finished run (a directory holding ``run.json``, which it writes last) unless given
``--force``; a directory a killed run left without ``run.json`` is simply reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgrpo.config import AlgoConfig, ConfigError
from deepgrpo.flags import OneLineParser, OptionSet, UsageError, load_config_file
from sims.runner import RunnerConfig
from sims.spec import TokenTreeSpec


@dataclass
class SimRunSettings:
    """Everything ``sim run`` can set.

    algo: the method's configuration (the method's preset, then overrides).
    spec: the simulated problem set.
    runner: the training loop.
    """

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    spec: TokenTreeSpec = field(default_factory=TokenTreeSpec)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def _compare_runner() -> RunnerConfig:
    from sims.compare import COMPARE_RUNNER
    return dataclasses.replace(COMPARE_RUNNER)


@dataclass
class SimCompareSettings:
    """Everything ``sim compare`` can set.

    spec: the simulated problem set (drawn from the run seed unless ``--spec-seed`` pins it).
    runner: the training loop of every compared method; by default every method runs until it
        has spent the same budget of generated tokens (``--budget``, ``--budget-unit``;
        ``--steps`` is then only a cap).
    seeds: runs per method, with the run seeds --seed, --seed + 1, ... (each its own problem set
        unless --spec-seed pins one); with more than one, the table shows means and 95 % intervals
        and the figure mean curves with bands.
    """

    spec: TokenTreeSpec = field(default_factory=TokenTreeSpec)
    runner: RunnerConfig = field(default_factory=_compare_runner)
    seeds: int = 1

    def __post_init__(self) -> None:
        from deepgrpo.config import check_range
        check_range(type(self).__name__, "seeds", self.seeds, 1, 1000, integer=True)


RUN_OPTIONS = OptionSet(SimRunSettings, reserved=("method", "seed", "out", "no_progress", "force", "config", "set"))
COMPARE_OPTIONS = OptionSet(SimCompareSettings, reserved=("seed", "out", "no_figure", "config", "set"))


def build_parser(prog: str = "deepgrpo sim", command: str = "sim") -> argparse.ArgumentParser:
    """The ``deepgrpo sim`` parser with its sub-commands ``run`` and ``compare``."""
    top = OneLineParser(prog=prog, description="Token-tree simulator: train with the DEEP-GRPO core, compare methods.")
    sub = top.add_subparsers(dest="sub", metavar="{run,compare}")
    run = sub.add_parser("run", help="one training run -> DIR/history.csv, DIR/run.json",
                         description="Train one method; write DIR/history.csv (one row per step) and DIR/run.json.")
    run.add_argument("--method", default=None, help="a method name (deepgrpo methods lists them); may come from "
                                                     "--config")
    run.add_argument("--seed", default=None, metavar="INT", help="run seed (default: 0)")
    run.add_argument("--out", type=_out_path, default=None, help="output directory (default: runs/sim-METHOD-seedS)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--force", action="store_true", help="replace a finished run in --out (by default a directory "
                                                          "holding one is refused)")
    RUN_OPTIONS.add_arguments(run)
    cmp_ = sub.add_parser("compare", help="GRPO N=8..64, root-only, a tree baseline, DEEP-GRPO at equal budget -> "
                                          "table, CSV, SVG",
                          description="Compare GRPO (N in 8, 16, 32, 64), the root-only ablation, a TreeRL-like "
                                      "baseline and DEEP-GRPO at an equal token budget on a problem set drawn "
                                      "from the seed (training and held-out pass@1).")
    cmp_.add_argument("--seed", default=None, metavar="INT", help="run seed (default: 0)")
    cmp_.add_argument("--out", type=_out_path, default=Path("runs/sim-compare"),
                      help="output directory (default: runs/sim-compare)")
    cmp_.add_argument("--no-figure", action="store_true", help="skip the SVG figure")
    COMPARE_OPTIONS.add_arguments(cmp_)
    return top


def _seed(value: Any, option: str = "--seed") -> int:
    from deepgrpo.overrides import coerce
    try:
        seed = coerce("run", "seed", int, value)
    except ConfigError:
        seed = -1
    if seed < 0:
        raise ConfigError(f"{option} = {value!r} is invalid: expected an integer in [0, inf)", owner=option,
                          value=value, allowed="an integer in [0, inf)")
    return seed


FINISHED_RUN = "run.json"
"""The file a finished ``sim run`` leaves in its directory (written last: a run killed earlier
leaves no finished run, and its directory may be reused)."""


def _out_path(text: str) -> Path:
    """``--out`` as a path; an empty one is refused (``Path("")`` would be the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("--out is empty: name a directory (use . for the current one)")
    return Path(text)


def _claim_out(out: Path, force: bool | None = None) -> None:
    """Make ``out`` this process's output directory before any work: writable (else a
    :class:`ConfigError` naming ``--out``), locked against a second writer
    (:func:`deepgrpo.records.lock_output`), and, for ``sim run`` (``force`` not None), not
    holding a finished run unless ``force``."""
    from deepgrpo.records import claim_output
    claim_output(out, "--out")
    if force is not None and (out / FINISHED_RUN).is_file():
        if not force:
            raise ConfigError(f"--out = {str(out)!r} is invalid: it holds a finished run ({FINISHED_RUN}); choose "
                              "another --out, or pass --force to replace it", owner="--out", value=str(out),
                              allowed="a directory without a finished run")
        # replaced: until the new run writes its own, the directory holds no finished run (a run
        # stopped half-way must not leave the old record beside the new history)
        (out / FINISHED_RUN).unlink()


def resolve_run(args: argparse.Namespace) -> tuple[str, int, SimRunSettings]:
    """(method, seed, settings) of ``sim run`` from its layered sources."""
    from deepgrpo.methods import method_config
    file_layer, own = {}, {}
    if args.config is not None:
        file_layer, own = RUN_OPTIONS.file_values(load_config_file(args.config), extra=("method", "seed"))
    method = args.method if args.method is not None else own.get("method")
    if method is None:
        raise UsageError("the following arguments are required: --method (or `method` in --config)")
    seed = _seed(args.seed if args.seed is not None else own.get("seed", 0))
    base = SimRunSettings(algo=method_config(method))
    settings = RUN_OPTIONS.build(base, file_layer, RUN_OPTIONS.flag_values(args), RUN_OPTIONS.set_values(args.set))
    return method, seed, settings


def resolve_compare(args: argparse.Namespace) -> tuple[int, SimCompareSettings]:
    """(seed, settings) of ``sim compare`` from its layered sources."""
    file_layer, own = {}, {}
    if args.config is not None:
        file_layer, own = COMPARE_OPTIONS.file_values(load_config_file(args.config), extra=("seed",))
    seed = _seed(args.seed if args.seed is not None else own.get("seed", 0))
    settings = COMPARE_OPTIONS.build(SimCompareSettings(), file_layer, COMPARE_OPTIONS.flag_values(args),
                                     COMPARE_OPTIONS.set_values(args.set))
    return seed, settings


def _cmd_run(args: argparse.Namespace) -> int:
    from sims.memory import check_fits
    from sims.runner import train, write_run

    method, seed, s = resolve_run(args)
    check_fits(s.spec, s.runner, s.algo)
    out = args.out if args.out is not None else Path("runs") / f"sim-{method}-seed{seed}"
    _claim_out(out, force=args.force)
    result = train(s.spec, s.algo, s.runner, seed=seed, method=method, progress=not args.no_progress)
    hist, rec = write_run(out, s.spec, s.algo, s.runner, seed, method, result)
    last, k = result.history[-1], s.runner.pass_k
    first = result.history[0]
    held = (f" (held-out {first['heldout_pass1']:.3f} -> {last['heldout_pass1']:.3f})"
            if result.problems.n_heldout else "")
    print(f"{method}: exact pass@1 {first['pass1']:.3f} -> {last['pass1']:.3f}{held}, "
          f"pass@{k} {last[f'pass{k}']:.3f}, {last['step']} steps, rollouts {last['rollouts']:,}, "
          f"tokens {last['tokens']:,}, problem set {result.problem_set_seed}, {result.wall_time_s:.2f} s "
          f"-> {hist}, {rec}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from deepgrpo.methods import method_config
    from sims.compare import COMPARE_METHODS, format_header, format_table, run_compare, summary_rows, write_compare
    from sims.memory import check_fits

    t0 = time.perf_counter()
    seed, s = resolve_compare(args)
    for _, name, overrides in COMPARE_METHODS:
        check_fits(s.spec, s.runner, method_config(name, **overrides))
    _claim_out(args.out)
    result = run_compare(s.spec, s.runner, seed=seed, seeds=s.seeds)
    paths = write_compare(args.out, result, figure=not args.no_figure)
    print(format_header(result))
    print(format_table(summary_rows(result)))
    print(f"wrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - t0:.2f} s)")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo sim", command: str = "sim") -> int:
    """Entry point of ``deepgrpo sim``; returns the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch
    # the simulator's tensors are tiny ([B, V] per step): intra-op threads only add overhead
    # (and contend with other processes); one thread is several times faster here
    torch.set_num_threads(1)
    options = COMPARE_OPTIONS if argv[:1] == ["compare"] else RUN_OPTIONS
    try:
        parser = build_parser(prog)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.sub is None:
            parser.print_help()
            return 2
        return _cmd_run(args) if args.sub == "run" else _cmd_compare(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        option = options.option_of(e) or ("--method" if e.field == "method" else None)
        where = f"{option}: " if option and not str(e).startswith(option) else ""
        print(f"{prog}: error: {where}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
