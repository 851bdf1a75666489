"""``deepgrpo sim``: train in the simulator (``run``) and compare methods (``compare``).

    deepgrpo sim run --method deep-grpo [--steps 30 --seed 0 --out DIR --depth 12 ...]
    deepgrpo sim compare [--out DIR --seed 0 ...]

Every option of :class:`~sims.spec.TokenTreeSpec` and :class:`~sims.runner.RunnerConfig` is a
flag (``--vocab-size``, ``--recovery``, ``--batch-problems``...). Invalid values stop with one
line naming the option and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from deepgrpo.config import ConfigError, parse_flat_value

SPEC_HELP = {
    "depth": "T, steps (tokens) per chain", "vocab_size": "V, tokens per step (>= 2)",
    "n_problems": "problems in the set", "segment_len": "steps per segment (pivot unit)",
    "ability_mean": "logit of per-step correctness", "ability_std": "its spread over problems",
    "n_crux": "crux steps per problem", "crux_depth_low": "crux positions: lowest relative depth",
    "crux_depth_high": "crux positions: highest relative depth", "crux_hardness_mean": "logits a crux subtracts",
    "crux_hardness_std": "spread of crux hardness", "heterogeneity": "0..1, between-problem variation of cruxes",
    "recovery": "fatal | constant | decay", "recovery_prob": "rho, chance to notice a mistake (0..1)",
    "recovery_decay": "rate of the decay model", "shared_policy": "share logits across problems",
    "seed": "seed of the problem set",
}
RUNNER_HELP = {
    "steps": "training steps", "batch_problems": "problems per step", "lr": "Adam learning rate",
    "max_grad_norm": "gradient clipping", "pass_k": "k of the logged pass@k",
    "micro_batch_size": "rows per micro-batch",
}
ALGO_FLAGS = {"G": int, "K": int, "gamma": float, "n_pivots": int, "n_cut_points": int, "lam": float,
              "kl_coef": float}
"""Method overrides exposed as flags of ``run`` (any other field: ``--set NAME=VALUE``)."""


class UsageError(Exception):
    """A command-line error (printed as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def _flag(field_name: str, prefix: str = "") -> str:
    return "--" + prefix + field_name.replace("_", "-")


def _algo_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str],
                           title: str, rename: dict[str, str]) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = rename.get(f.name, _flag(f.name))
        dest = flag[2:].replace("-", "_")
        default = f.default
        kind = type(default) if default is not None else (int if "size" in f.name else float)
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{helps.get(f.name, '')} (default: {default})")
        else:
            group.add_argument(flag, dest=dest, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"{helps.get(f.name, '')} (default: {default})")


def _collect(args: argparse.Namespace, cls: type, rename: dict[str, str]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        dest = rename.get(f.name, _flag(f.name))[2:].replace("-", "_")
        value = getattr(args, dest, None)
        if value is not None:
            out[f.name] = value
    return out


SPEC_RENAME = {"seed": "--spec-seed"}


def _option_of(message: str) -> str | None:
    """The command-line flag a ConfigError message is about (``Owner.field = ...``)."""
    from sims.runner import RunnerConfig
    m = re.match(r"^(?:(\w+)\.)?(\w+) = ", message)
    if not m:
        return None
    owner, name = m.group(1), m.group(2)
    if owner == "TokenTreeSpec":
        return SPEC_RENAME.get(name, _flag(name))
    if owner == "RunnerConfig" or (owner is None and name in {f.name for f in dataclasses.fields(RunnerConfig)}):
        return _flag(name)
    if owner is None and name == "method":
        return "--method"
    if name in ALGO_FLAGS:
        return _algo_flag(name)
    return "--set"


def _parser(prog: str) -> argparse.ArgumentParser:
    from sims.runner import RunnerConfig
    from sims.spec import TokenTreeSpec

    top = _Parser(prog=prog, description="Token-tree simulator: train with the DEEP-GRPO core, compare methods.")
    sub = top.add_subparsers(dest="sub", metavar="{run,compare}", parser_class=_Parser)
    run = sub.add_parser("run", help="one training run -> DIR/history.csv, DIR/run.json",
                         description="Train one method; write DIR/history.csv (one row per step) and DIR/run.json.")
    run.add_argument("--method", required=True, help="a method name (see `deepgrpo methods`)")
    run.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    run.add_argument("--out", type=Path, default=None, help="output directory (default: runs/sim-METHOD-seedS)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    algo = run.add_argument_group("method overrides")
    for name, kind in ALGO_FLAGS.items():
        algo.add_argument(_algo_flag(name), dest="algo_" + name,
                          type=kind, default=None, metavar=kind.__name__.upper())
    algo.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="any other AlgoConfig field (e.g. --set aggregation=seq-mean-token-mean)")
    cmp_ = sub.add_parser("compare", help="GRPO N=8..64 vs a tree baseline vs DEEP-GRPO -> table, CSV, PNG",
                          description="Compare GRPO (N in 8, 16, 32, 64), a TreeRL-like baseline and DEEP-GRPO.")
    cmp_.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    cmp_.add_argument("--out", type=Path, default=Path("runs/sim-compare"),
                      help="output directory (default: runs/sim-compare)")
    cmp_.add_argument("--no-figure", action="store_true", help="skip the PNG (and the seaborn import)")
    for p in (run, cmp_):
        _add_dataclass_options(p, TokenTreeSpec, SPEC_HELP, "problem set (TokenTreeSpec)", SPEC_RENAME)
        _add_dataclass_options(p, RunnerConfig, RUNNER_HELP, "training loop (RunnerConfig)", {})
    return top




def _cmd_run(args: argparse.Namespace) -> int:
    from deepgrpo.methods import method_config
    from sims.runner import RunnerConfig, train, write_run
    from sims.spec import TokenTreeSpec

    spec = TokenTreeSpec(**_collect(args, TokenTreeSpec, SPEC_RENAME))
    runner = RunnerConfig(**_collect(args, RunnerConfig, {}))
    overrides = {name: getattr(args, "algo_" + name) for name in ALGO_FLAGS if getattr(args, "algo_" + name) is not None}
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"argument --set: expected NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_flat_value(value.strip())
    algo = method_config(args.method, **overrides)
    out = args.out if args.out is not None else Path("runs") / f"sim-{args.method}-seed{args.seed}"
    result = train(spec, algo, runner, seed=args.seed, method=args.method, progress=not args.quiet)
    hist, rec = write_run(out, spec, algo, runner, args.seed, args.method, result)
    last, k = result.history[-1], runner.pass_k
    print(f"{args.method}: exact pass@1 {result.history[0]['pass1']:.3f} -> {last['pass1']:.3f}, "
          f"pass@{k} {last[f'pass{k}']:.3f}, rollouts {last['rollouts']:,}, tokens {last['tokens']:,}, "
          f"{result.wall_time_s:.2f} s -> {hist}, {rec}")
    return 0


def _cmd_compare(args: argparse.Namespace, worker: Any = None) -> int:
    from sims.compare import format_table, run_compare, summary_rows, write_compare
    from sims.runner import RunnerConfig
    from sims.spec import TokenTreeSpec, describe

    t0 = time.perf_counter()
    spec = TokenTreeSpec(**_collect(args, TokenTreeSpec, SPEC_RENAME))
    runner = RunnerConfig(**_collect(args, RunnerConfig, {}))
    result = run_compare(spec, runner, seed=args.seed)
    paths = write_compare(args.out, result, figure=not args.no_figure, worker=worker)
    print(f"sim compare: {describe(spec)}; {runner.steps} steps x {runner.batch_problems} problems, seed {args.seed}")
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
    worker = None
    if argv[:1] == ["compare"] and not {"--no-figure", "-h", "--help"} & set(argv):
        from sims.figure import FigureWorker
        worker = FigureWorker()  # a child process imports seaborn while this one trains
    try:
        parser = _parser(prog)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.sub is None:
            parser.print_help()
            return 2
        return _cmd_run(args) if args.sub == "run" else _cmd_compare(args, worker)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        option = _option_of(str(e))
        where = f"{option}: " if option else ""
        print(f"{prog}: error: {where}{e}", file=sys.stderr)
        return 2
    finally:
        if worker is not None:
            worker.close()


if __name__ == "__main__":
    sys.exit(main())
