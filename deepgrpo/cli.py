"""The ``deepgrpo`` command: the composition root (the only core module that imports backends).

Sub-commands are dispatched lazily so that, e.g., ``deepgrpo sim`` never imports transformers:

    deepgrpo sim {run,compare}       simulator backend (sims/)
    deepgrpo study NAME              studies in the simulator (analysis/)
    deepgrpo report --results DIR    assemble REPORT.md from study results (analysis/)
    deepgrpo report --llm-runs RUN.. curves of LLM runs against rollouts and tokens (analysis/)
    deepgrpo llm {sft,train,eval}    transformers / vLLM backend (llm/)
    deepgrpo methods                 list the named methods
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deepgrpo import __version__
from deepgrpo.config import ConfigError
from deepgrpo.flags import OneLineParser
from deepgrpo.records import (
    Interrupted,
    describe_os_error,
    exit_code_of_interrupt,
    release_output_locks,
    terminate_like_ctrl_c,
)

COMMANDS = {
    "sim": ("sims.cli", "simulator backend: sim run, sim compare"),
    "study": ("analysis.cli", "run a study: study NAME [--seeds 5] [--quick|--smoke] [--out DIR] (study --help "
                              "lists them)"),
    "report": ("analysis.cli", "write DIR/REPORT.md from study results: report --results DIR, or curves of LLM "
                               "runs: report --llm-runs RUN [RUN ...] --out DIR"),
    "llm": ("llm.cli", "LLM backend: llm sft, llm train, llm eval"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="deepgrpo",
        description="DEEP-GRPO testbed: pivot-based dense exploration for RL on language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<8} {v[1]}" for k, v in COMMANDS.items())
        + "\n  methods  list the named methods (the same names in every backend)"
        + "\n\nEvery command takes --help. Flags are never abbreviated.",
    )
    p.add_argument("--version", action="version", version=f"deepgrpo {__version__}")
    p.add_argument("command", choices=[*COMMANDS, "methods"], help="what to run")
    return p


def _methods_parser(prog: str = "deepgrpo methods", command: str = "methods") -> argparse.ArgumentParser:
    return OneLineParser(prog=prog, description="List the named methods and the settings each one changes "
                                                "(the same names in every backend).")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``deepgrpo COMMAND`` (its sub-commands included), built by the command's
    own module: what ``--help`` prints, and what ``tests/test_cli_help.py`` walks."""
    if command == "methods":
        return _methods_parser()
    module = importlib.import_module(COMMANDS[command][0])
    return module.build_parser(f"deepgrpo {command}", command=command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deepgrpo`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv)  # prints and exits 0
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS and cmd != "methods":
        print(f"deepgrpo: error: unknown command {cmd!r}: expected one of {', '.join([*COMMANDS, 'methods'])}",
              file=sys.stderr)
        return 2
    terminate_like_ctrl_c()  # a scheduler's SIGTERM stops a command the way Ctrl-C does
    try:
        if cmd == "methods":
            _methods_parser().parse_args(rest)  # --help, or a one-line error for anything else
            from deepgrpo.methods import METHODS
            for name, overrides in METHODS.items():
                print(f"{name:<16} {overrides}")
            return 0
        module = importlib.import_module(COMMANDS[cmd][0])
        return int(module.main(rest, prog=f"deepgrpo {cmd}", command=cmd) or 0)
    except ConfigError as e:
        print(f"deepgrpo {cmd}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"deepgrpo {cmd}: {_stopped_by()}; {e}", file=sys.stderr)
        return exit_code_of_interrupt()
    except KeyboardInterrupt:
        print(f"deepgrpo {cmd}: {_stopped_by()}; results are written only when complete, so nothing was left "
              "half-written", file=sys.stderr)
        return exit_code_of_interrupt()
    except OSError as e:  # disk full, read-only or vanished paths: one line, and the directory stays resumable
        print(f"deepgrpo {cmd}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"deepgrpo {cmd}: error: out of memory; choose smaller sizes", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("transformers", "tokenizers", "datasets", "math_verify", "vllm", "trl"):
            print(f"deepgrpo {cmd}: error: missing optional dependency {e.name!r}; "
                  f"install it with: pip install -e '.[llm]'", file=sys.stderr)
            return 2
        raise
    finally:
        release_output_locks()


def _stopped_by() -> str:
    return "terminated (SIGTERM)" if exit_code_of_interrupt() == 143 else "interrupted"

if __name__ == "__main__":
    sys.exit(main())
