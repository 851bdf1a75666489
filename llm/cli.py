"""``deepgrpo llm {sft,train,eval}``: the LLM backend's command line.

    deepgrpo llm sft   --preset tiny-arith --out DIR [--steps N --seed S]
    deepgrpo llm train --preset tiny-arith --method deep-grpo [--model SFT_DIR] [--steps N] --out DIR
    deepgrpo llm train --model PATH --data FILE [--eval-data FILE] --method grpo --out DIR
    deepgrpo llm train --config recipes/gsm8k-qwen2.5-0.5b.json --lr 1e-5 --out DIR
    deepgrpo llm train --resume --out DIR [--steps N]
    deepgrpo llm eval  --model DIR [--data arith|FILE] [--eval-samples 4 --eval-pass-k 4]

Every field of the command's config dataclasses is a flag generated from them
(:mod:`deepgrpo.flags`); sources are layered as defaults < method preset < ``--config FILE``
< flags < ``--set``. Bad input gives a one-line error naming the option and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgrpo.config import AlgoConfig, ConfigError
from deepgrpo.flags import OneLineParser, OptionSet, UsageError, load_config_file
from deepgrpo.methods import METHODS, method_config, preset_overrides
from deepgrpo.overrides import resolve_key
from llm.evaluate import EvalConfig
from llm.sft import SFTConfig
from llm.trainer import RESUMABLE_CHANGES, TrainConfig


@dataclass
class LLMTrainSettings:
    """Everything ``llm train`` can set.

    train: the run (model, data, optimisation, evaluation, engine).
    algo: the method's configuration (the preset of ``train.method``, then overrides).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)


@dataclass
class LLMSFTSettings:
    """Everything ``llm sft`` can set.

    sft: supervised fine-tuning of the tiny-arith preset.
    """

    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class LLMEvalSettings:
    """Everything ``llm eval`` can set.

    eval: the held-out evaluation.
    """

    eval: EvalConfig = field(default_factory=EvalConfig)


BUILTIN_DATA = ("arith", "tiny-arith")
"""``--data`` values that name the built-in arithmetic task (in ``llm train``, ``llm eval`` and the studies)."""
EVAL_CAP = "train.eval.max_response_tokens"
"""Tied to ``train.sampling.max_response_tokens`` in ``llm train`` (the evaluation during training
uses the training cap): no flag, and ``--set``/``--config`` may only repeat that cap."""
TRAIN_OPTIONS = OptionSet(LLMTrainSettings, reserved=("preset", "out", "resume", "config", "set", "help"),
                          hidden=("train.overrides", EVAL_CAP))
SFT_OPTIONS = OptionSet(LLMSFTSettings, reserved=("preset", "out", "force", "threads", "config", "set", "help"))
EVAL_OPTIONS = OptionSet(LLMEvalSettings, reserved=("model", "data", "task", "threads", "out", "config", "set",
                                                    "help"))
OPTIONS = {"train": TRAIN_OPTIONS, "sft": SFT_OPTIONS, "eval": EVAL_OPTIONS}



def build_parser(prog: str = "deepgrpo llm", command: str = "llm") -> argparse.ArgumentParser:
    """The ``deepgrpo llm`` parser with its three sub-commands."""
    p = OneLineParser(prog=prog, description="LLM backend: SFT of the tiny preset, RL training, evaluation.")
    sub = p.add_subparsers(dest="sub", required=True)

    what = "train the tiny-arith preset from scratch and save a checkpoint"
    s = sub.add_parser("sft", help=what, description=what[0].upper() + what[1:] + ".")
    s.add_argument("--preset", default="tiny-arith", choices=["tiny-arith"], help="model/task preset")
    s.add_argument("--out", required=True, help="output directory (a transformers checkpoint)")
    s.add_argument("--threads", default="2", help="torch CPU threads (default: 2)")
    s.add_argument("--force", action="store_true", help="overwrite an existing --out")
    SFT_OPTIONS.add_arguments(s)

    what = "RL training with the core's exploration step and loss"
    t = sub.add_parser("train", help=what, description=what + "; the held-out evaluation runs before the first and "
                       "after the last step (and every --eval-every steps).")
    t.add_argument("--preset", choices=["tiny-arith"], default=None,
                   help="tiny-arith: built-in arithmetic task; --model defaults to an SFT run in OUT/init")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (only --steps, --budget, --threads, "
                        "--checkpoint-every, "
                        "--eval-every and --tensorboard may change; they are recorded)")
    TRAIN_OPTIONS.add_arguments(t)

    what = "greedy mean@1 and sampled pass@k of a checkpoint"
    e = sub.add_parser("eval", help=what, description="Held-out " + what + ".")
    e.add_argument("--model", required=True, help="a model directory, or a training run directory holding one")
    e.add_argument("--data", default="arith", help="'arith' (built-in held-out set) or a JSONL/parquet file")
    e.add_argument("--task", choices=["arith", "gsm8k", "math"], default=None,
                   help="the task of --data (default: detected from the file)")
    e.add_argument("--threads", default="2", help="torch CPU threads (default: 2)")
    e.add_argument("--out", default=None,
                   help="JSON file for the results (default MODEL/eval/DATA.json, beside a run's checkpoint "
                        "directory, never inside it)")
    EVAL_OPTIONS.add_arguments(e)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # a missing sub-command is named by its choices
    return p


def _positive_int(option: str, value: Any) -> int:
    from deepgrpo.overrides import coerce
    try:
        n = coerce(option, "value", int, value)
    except ConfigError:
        n = 0
    if n < 1:
        raise ConfigError(f"{option} = {value!r} is invalid: expected an integer in [1, inf)", owner=option,
                          value=value, allowed="an integer in [1, inf)")
    return n


def _check_new_dir(path: str, force: bool | None, option: str = "--out", hint: str = "") -> Path:
    """``path`` if a new output directory can be made there (``force`` None: the command has no
    ``--force``); checked before any work, so a bad ``--out`` never costs a run."""
    from deepgrpo.records import check_writable_dir
    p = check_writable_dir(path, option)
    if p.is_dir() and any(p.iterdir()) and not force:
        raise ConfigError(f"{option} = {path!r} is invalid: directory is not empty ({hint or 'choose another'})",
                          owner=option)
    return p


def _layers(options: OptionSet, a: argparse.Namespace, extra: tuple[str, ...] = ("description",)
            ) -> list[dict[str, Any]]:
    """The command's layers after the preset: ``--config`` file, explicit flags, ``--set``."""
    file_layer: dict[str, Any] = {}
    if a.config is not None:
        data = load_config_file(a.config)
        file_layer, _ = options.file_values(_recipe_overrides(data), extra=extra)
    return [file_layer, options.flag_values(a), options.set_values(a.set)]


def _recipe_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe's ``train.overrides`` (algorithm keys) moved to the ``algo`` section."""
    train = data.get("train")
    if not isinstance(train, dict) or "overrides" not in train:
        return data
    train = dict(train)
    overrides = train.pop("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("--config: train.overrides is invalid: expected a mapping of algorithm settings",
                          owner="--config")
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        try:
            flat["algo." + resolve_key(AlgoConfig, key).key] = value
        except ConfigError as e:
            raise ConfigError(f"--config: train.overrides: {e}", owner="--config", field=key) from None
    out = {k: v for k, v in data.items() if k != "train"}
    out["train"] = train
    out.update(flat)
    return out


def _method_of(layers: list[dict[str, Any]], default: str) -> str:
    method = default
    for layer in layers:
        method = layer.get("train.method", method)
    if method not in METHODS:
        raise ConfigError(f"--method = {method!r} is invalid: expected one of {', '.join(METHODS)}",
                          owner="--method", field="method", value=method)
    return method


def resolve_train(a: argparse.Namespace, base_train: TrainConfig | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of ``llm train`` from its layered sources (on top of
    ``base_train`` when resuming): the algorithm's settings end in ``train.overrides`` as the
    keys that differ from the method's preset."""
    layers = _layers(TRAIN_OPTIONS, a)
    fresh = base_train is None  # a resumed run keeps the evaluation cap its config.json recorded
    base_train = base_train or TrainConfig()
    method = _method_of(layers, base_train.method)
    base = LLMTrainSettings(train=dataclasses.replace(base_train, method=method),
                            algo=base_train.algo() if method == base_train.method else method_config(method))
    settings = TRAIN_OPTIONS.build(base, *layers)
    train = settings.train
    # the evaluation during training uses the training cap: another value is refused, never ignored,
    # and a new run records the cap it evaluates with
    cap = train.sampling.max_response_tokens
    asked = [(source, layer[EVAL_CAP]) for source, layer in zip(("--config", "--flags", "--set"), layers)
             if EVAL_CAP in layer]
    if asked and asked[-1][1] != cap:
        source, value = asked[-1]
        raise ConfigError(f"{source}: {EVAL_CAP} = {value!r} is invalid: llm train evaluates with the training cap, "
                          f"--max-response-tokens (now {cap}); set that instead", owner=source,
                          field="max_response_tokens", value=value, allowed=f"{cap} (= --max-response-tokens)")
    if fresh:
        train = dataclasses.replace(train, eval=dataclasses.replace(train.eval, max_response_tokens=cap))
    if train.data in BUILTIN_DATA:  # the built-in arithmetic task, spelled as in llm eval and the studies
        train = dataclasses.replace(train, data=None)
    return dataclasses.replace(train, overrides=preset_overrides(method, settings.algo))


def _check_paths(cfg: TrainConfig, preset: str | None) -> None:
    from llm.models import check_model_dir
    if preset is None and not cfg.model:
        raise ConfigError("--model is required unless --preset tiny-arith is given", owner="--model")
    for opt, path in (("--model", cfg.model), ("--reference", cfg.reference)):
        if path:
            check_model_dir(path, opt)
    for opt, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{opt} = {path!r} is invalid: no such file", owner=opt)
    if preset == "tiny-arith" and cfg.data is not None:
        raise ConfigError("--data is invalid with --preset tiny-arith (the preset uses the built-in arithmetic task)",
                          owner="--data")


def _resolved_paths(cfg: TrainConfig) -> TrainConfig:
    """Model and data paths stored absolute, so a resumed run works from any directory."""
    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else p
    return dataclasses.replace(cfg, model=absolute(cfg.model) or "", reference=absolute(cfg.reference),
                               data=absolute(cfg.data), eval_data=absolute(cfg.eval_data))


def cmd_sft(a: argparse.Namespace) -> int:
    """``llm sft``: train the tiny-arith preset and save it."""
    import torch

    from deepgrpo.records import claim_output
    from llm.models import is_model_dir
    from llm.sft import train_sft

    threads = _positive_int("--threads", a.threads)
    settings = SFT_OPTIONS.build(LLMSFTSettings(), *_layers(SFT_OPTIONS, a))
    claim_output(a.out, "--out")  # a writable directory with one writer, held until the command ends
    out = _check_new_dir(a.out, a.force, hint="pass --force to replace it")
    torch.set_num_threads(threads)
    try:
        res = train_sft(settings.sft, out=out, progress=True)
    except OSError as e:  # named by the output, not by the hidden temporary directory it was written in
        if e.filename is not None and any(part.startswith(f".{out.name}.") for part in Path(e.filename).parts):
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    assert is_model_dir(out)
    print(json.dumps({"out": str(out), **res["eval"], "wall_time_s": round(res["wall_time_s"], 1),
                      "params": res["params"]}))
    return 0


def _resume_config(a: argparse.Namespace, out: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The config of a resumed run and the changes it applies (only :data:`RESUMABLE_CHANGES`)."""
    from deepgrpo.overrides import leaf_values
    cfg_file = out / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--resume is invalid: {str(cfg_file)!r} does not exist", owner="--resume")
    try:
        saved = TrainConfig.from_dict(json.loads(cfg_file.read_text())["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume is invalid: {str(cfg_file)!r} is not a run config ({e})",
                          owner="--resume") from None
    cfg = resolve_train(a, saved)
    old, new = leaf_values(saved), leaf_values(cfg)
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    refused = [k for k in changed if "train." + k not in RESUMABLE_CHANGES]
    if refused:
        raise ConfigError(f"--resume cannot change {', '.join(refused)} (the run was made with "
                          + ", ".join(f"{k} = {changed[k][0]!r}" for k in refused)
                          + "); start a new run in another --out", owner="--resume", field=refused[0])
    return cfg, {k: v for k, (_, v) in changed.items()}


def _check_preset_sizes(cfg: TrainConfig) -> None:
    """The size checks of :func:`llm.trainer.load_run_data` for a tiny-arith run whose SFT start
    is still to be trained (so that a bad size is refused before minutes of SFT)."""
    import os

    from llm.models import build_char_tokenizer, limits_of_config, tiny_model_config
    from llm.trainer import load_run_data
    tok = build_char_tokenizer()
    load_run_data(cfg, tok, limits_of_config(tiny_model_config(tok, SFTConfig().model)),
                  int(os.environ.get("WORLD_SIZE", "1")), kv_on_host=cfg.engine == "hf")


def cmd_train(a: argparse.Namespace) -> int:
    """``llm train``: RL training (new run or ``--resume``)."""
    from deepgrpo.records import Interrupted, claim_output
    from llm.trainer import Trainer

    out = Path(a.out)
    changes: dict[str, Any] = {}
    if a.resume:
        if not (out / "config.json").is_file():
            raise ConfigError(f"--resume is invalid: {str(out / 'config.json')!r} does not exist (is --out a run "
                              "directory of deepgrpo llm train?)", owner="--resume")
        claim_output(out, "--out")  # one writer per run directory, held until the command ends
        cfg, changes = _resume_config(a, out)
    else:
        cfg = resolve_train(a)
        _check_paths(cfg, a.preset)
        cfg.check_device()
        if a.preset == "tiny-arith" and not cfg.model:
            _check_preset_sizes(cfg)
        claim_output(out, "--out")
        _check_new_dir(a.out, force=None, hint="use another --out, or --resume to continue the run there")
        cfg = _resolved_paths(cfg)
        if a.preset == "tiny-arith" and not cfg.model:
            from llm.sft import SFTConfig, train_sft
            init = out / "init"
            print(f"no --model given: training the tiny-arith SFT start in {init}", file=sys.stderr)
            train_sft(SFTConfig(seed=cfg.seed), out=init, progress=True)
            cfg = dataclasses.replace(cfg, model=str(init.resolve()))
    trainer = None

    def kept() -> str:
        """What a stopped run kept, and the command that continues it."""
        if not (out / "config.json").is_file():  # nothing written yet: the same command starts it
            return "nothing was written yet; run the same command again"
        resume = f"deepgrpo llm train --resume --out {out}"
        if trainer is None or trainer.saved_step is None:
            return (f"no checkpoint was saved yet ({out / 'metrics.jsonl'} holds the finished steps); start the run "
                    f"again from step 0 with: {resume}")
        return f"the last checkpoint (step {trainer.saved_step}) is in {out / 'checkpoint'}; continue with: {resume}"

    try:
        trainer = Trainer(cfg, out, resume=a.resume, progress=True, resume_changes=changes)
        if trainer.restarted:
            print(f"{a.prog}: {out} has no checkpoint (the run stopped before its first one): starting it again "
                  "from step 0 with its config.json", file=sys.stderr)
        summary = trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(kept()) from None
    except OSError as e:  # disk full, read-only or vanished paths: one line saying what is kept and how to go on
        from deepgrpo.records import describe_os_error
        what = describe_os_error(e).split("; free some space")[0]
        fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        print(f"{a.prog}: error: {what}; {fix}: {kept()}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "method": summary["method"], "steps": summary["steps"],
                      "before": summary["before"], "after": summary["after"], "budget": summary["budget"],
                      "wall_time_s": round(summary["wall_time_s"], 1)}))
    return 0


def _eval_out(a: argparse.Namespace) -> Path:
    """Where ``llm eval`` writes: ``--out``, or ``MODEL/eval/DATA.json`` (``DATA`` = ``arith``
    or the data file's stem). Never inside a run's ``checkpoint/``, which the next save replaces:
    ``--model RUN/checkpoint`` writes ``RUN/eval/DATA.json``, as ``--model RUN`` does."""
    if a.out is not None:
        out = Path(a.out)
        if out.is_dir() or not out.name:
            raise ConfigError(f"--out = {a.out!r} is invalid: it is a directory; expected a JSON file path",
                              owner="--out")
        return out
    from llm.models import is_model_dir
    name = "arith" if a.data in BUILTIN_DATA else Path(a.data).stem
    base = Path(a.model)
    if base.name == "checkpoint" and (base.parent / "config.json").is_file() and not is_model_dir(base.parent):
        base = base.parent  # a training run's checkpoint: write beside it, in the run directory
    return base / "eval" / f"{name}.json"


def cmd_eval(a: argparse.Namespace) -> int:
    """``llm eval``: held-out greedy/sampled accuracy and pass@k of a checkpoint."""
    import torch

    from deepgrpo.records import check_writable_dir, lock_output, write_json_atomic
    from llm.backend import check_context, check_sampling_fits
    from llm.checkpoint import resolve_model_dir
    from llm.evaluate import evaluate
    from llm.hf_engine import DEFAULT_MAX_BATCH_SIZE, HFEngine
    from llm.models import check_model_dir, load_causal_lm, load_tokenizer, model_limits
    from llm.tasks import ArithmeticConfig, arithmetic_heldout, arithmetic_problem, load_problems, make_prompts

    threads = _positive_int("--threads", a.threads)
    cfg = EVAL_OPTIONS.build(LLMEvalSettings(), *_layers(EVAL_OPTIONS, a)).eval
    model_dir = resolve_model_dir(a.model)
    if model_dir is None:
        check_model_dir(a.model, "--model")  # says what is wrong with it
    check_model_dir(model_dir, "--model")
    out = _eval_out(a)
    try:  # before the evaluation, not after it
        check_writable_dir(out.parent, "--out")
    except ConfigError as e:
        why = str(e).split(" is invalid: ", 1)[-1]
        default = "" if a.out is not None else " (the default beside --model; pass --out FILE elsewhere)"
        raise ConfigError(f"--out = {str(out)!r} is invalid: {why}{default}", owner="--out", value=str(out),
                          allowed=e.allowed) from None
    tok = load_tokenizer(model_dir, option="--model")
    limits = model_limits(model_dir, "--model")
    samples = max(cfg.samples, 1)
    factors = [("EvalConfig", "n_problems", cfg.n_problems, 512), ("EvalConfig", "samples", samples, 4),
               ("EvalConfig", "max_response_tokens", cfg.max_response_tokens, 64)]
    if a.data in BUILTIN_DATA:
        a_cfg = ArithmeticConfig()
        worst = make_prompts([arithmetic_problem([10 ** a_cfg.max_digits - 1] * a_cfg.max_terms)], tok)[0]
        check_context(len(worst.ids), cfg.max_response_tokens, limits.context, "EvalConfig", "--data", a.data,
                      "the longest arithmetic question")
        check_sampling_fits(cfg.n_problems * samples, len(worst.ids), cfg.max_response_tokens, factors,
                            "the evaluation", limits.kv_bytes_per_token, DEFAULT_MAX_BATCH_SIZE)
        problems = arithmetic_heldout(cfg.n_problems)
    elif Path(a.data).is_file():
        problems = load_problems(a.data, a.task)[:cfg.n_problems]
    else:
        raise ConfigError(f"--data = {a.data!r} is invalid: expected 'arith' or an existing JSONL/parquet file",
                          owner="--data")
    prompts = make_prompts(problems, tok)
    longest = max(prompts, key=lambda p: len(p.ids))
    check_context(len(longest.ids), cfg.max_response_tokens, limits.context, "EvalConfig", "--data", a.data,
                  f"problem {str(longest.problem.id)[:60]!r}")
    check_sampling_fits(len(prompts) * samples, len(longest.ids), cfg.max_response_tokens, factors, "the evaluation",
                        limits.kv_bytes_per_token, DEFAULT_MAX_BATCH_SIZE)
    lock_output(out, "--out")  # one writer per results file, held until the command ends
    torch.set_num_threads(threads)
    model = load_causal_lm(model_dir, trainable=False, option="--model")
    res = evaluate(HFEngine(model, [tok.eos_token_id], tok.pad_token_id), tok, prompts, cfg, progress=True)
    record = {"checkpoint": str(model_dir), "data": a.data, **res, "config": dataclasses.asdict(cfg)}
    write_json_atomic(out, record)
    print(f"{a.prog} eval: results written to {out}", file=sys.stderr)
    print(json.dumps({"out": str(out), **res}))
    return 0


@contextmanager
def _one_line_warnings(prog: str) -> Iterator[None]:
    """Show every warning as one line, ``PROG: warning: MESSAGE``, for the command's duration."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo llm", command: str = "llm") -> int:
    """Entry point of ``deepgrpo llm``; returns the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser(prog).parse_args(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    a.prog = prog
    _quiet_transformers()
    try:
        with _one_line_warnings(prog):
            return {"sft": cmd_sft, "train": cmd_train, "eval": cmd_eval}[a.sub](a)
    except ConfigError as e:
        option = OPTIONS[a.sub].option_of(e)
        where = f"{option}: " if option and not str(e).startswith(option) else ""
        print(f"{prog}: error: {where}{e}", file=sys.stderr)
        return 2


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
