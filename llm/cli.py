"""``deepgrpo llm {sft,train,eval}``: the LLM backend's command line.

    deepgrpo llm sft   --preset tiny-arith --out DIR [--steps N --seed S]
    deepgrpo llm train --preset tiny-arith --method deep-grpo [--model SFT_DIR] [--steps N] --out DIR
    deepgrpo llm train --model PATH --data FILE [--eval-data FILE] --method grpo --out DIR
    deepgrpo llm train --resume --out DIR
    deepgrpo llm eval  --checkpoint DIR [--data arith|FILE] [--samples 4 --pass-k 4]

Bad input gives a one-line error naming the option and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from deepgrpo.config import ConfigError, parse_flat_value
from deepgrpo.methods import METHODS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)




def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set {it!r} is invalid: expected KEY=VALUE (e.g. gamma=1.0)")
        k, v = it.split("=", 1)
        out[k.strip()] = parse_flat_value(v.strip())
    return out


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="LLM backend: SFT of the tiny preset, RL training, evaluation.")
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser)

    s = sub.add_parser("sft", help="train the tiny-arith preset from scratch and save a checkpoint")
    s.add_argument("--preset", default="tiny-arith", choices=["tiny-arith"], help="model/task preset")
    s.add_argument("--out", required=True, help="output directory (a transformers checkpoint)")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600)")
    s.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 128)")
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    s.add_argument("--eval-every", type=int, default=0, help="quick greedy accuracy every N steps")
    s.add_argument("--force", action="store_true", help="overwrite an existing --out")

    t = sub.add_parser("train", help="RL training with the core's exploration step and loss")
    t.add_argument("--preset", choices=["tiny-arith"], default=None,
                   help="tiny-arith: built-in arithmetic task; --model defaults to an SFT run in OUT/init")
    t.add_argument("--model", default=None, help="local model directory (initial policy)")
    t.add_argument("--reference", default=None, help="reference model directory (default: --model)")
    t.add_argument("--data", default=None, help="training file (JSONL/parquet, GSM8K/MATH/arith format)")
    t.add_argument("--eval-data", default=None, help="held-out file (default: a split of --data)")
    t.add_argument("--task", choices=["arith", "gsm8k", "math"], default=None, help="override task detection")
    t.add_argument("--method", default="deep-grpo", help=f"one of: {', '.join(METHODS)}")
    t.add_argument("--G", type=int, default=None, help="main-chain group size (GRPO's N)")
    t.add_argument("--K", type=int, default=None, help="continuations per pivot")
    t.add_argument("--kl-coef", type=float, default=None, help="KL coefficient (default 1e-4)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="further method overrides (gamma, lam, n_pivots, aux_budget, ...)")
    t.add_argument("--prompts", type=int, default=None, help="prompts per step (default 64)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default 60)")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    t.add_argument("--warmup", type=int, default=None, help="linear lr warm-up steps (default 5)")
    t.add_argument("--max-tokens", type=int, default=None, help="response length cap (default 64)")
    t.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    t.add_argument("--segmenter", choices=["sentence", "line", "step", "fixed"], default=None)
    t.add_argument("--micro-batch", type=int, default=None, help="rows per backward pass (default 256)")
    t.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (0: start/end only)")
    t.add_argument("--eval-problems", type=int, default=None, help="held-out problems (default 512)")
    t.add_argument("--eval-samples", type=int, default=None, help="samples per held-out problem (default 4)")
    t.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default 5)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the trainer's passes")
    t.add_argument("--no-tensorboard", action="store_true")
    t.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollout engine (vllm needs the vllm package)")
    t.add_argument("--config", default=None, help="JSON recipe with a 'train' section (a TrainConfig, e.g. "
                   "recipes/gsm8k-qwen2.5-0.5b.json); --set, --steps, --seed and --engine still apply")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")

    e = sub.add_parser("eval", help="greedy mean@1 and sampled pass@k of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="model directory or training run directory")
    e.add_argument("--data", default="arith", help="'arith' (built-in held-out set) or a JSONL/parquet file")
    e.add_argument("--task", choices=["arith", "gsm8k", "math"], default=None)
    e.add_argument("--problems", type=int, default=512, help="problems to evaluate")
    e.add_argument("--samples", type=int, default=4, help="sampled responses per problem")
    e.add_argument("--pass-k", type=int, default=None, help="k of pass@k (default: --samples)")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--max-tokens", type=int, default=64, help="response length cap")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--out", default=None, help="JSON file for the results (default CHECKPOINT/eval_results.json)")
    return p


def _check_new_dir(path: str, force: bool, option: str = "--out") -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} = {path!r} is invalid: it exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise ConfigError(f"{option} = {path!r} is invalid: directory is not empty (pass --force, or --resume)")
    return p


def _positive(name: str, value: int | float | None, integer: bool = True, zero_ok: bool = False) -> None:
    if value is None:
        return
    if (value < 0) or (value == 0 and not zero_ok):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} = {value} is invalid: expected {kind} {'>= 0' if zero_ok else '> 0'}")


def cmd_sft(a: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from llm.models import is_model_dir
    from llm.sft import SFTConfig, train_sft

    for name in ("steps", "batch_size", "threads"):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name))
    _positive("--lr", a.lr, integer=False)
    _positive("--eval-every", a.eval_every, zero_ok=True)
    out = _check_new_dir(a.out, a.force)
    cfg = SFTConfig(seed=a.seed, eval_every=a.eval_every)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size),
                                                        ("lr", a.lr)) if v is not None})
    torch.set_num_threads(a.threads)
    res = train_sft(cfg, out=out, progress=True)
    assert is_model_dir(out)
    print(json.dumps({"out": str(out), **res["eval"], "wall_time_s": round(res["wall_time_s"], 1),
                      "params": res["params"]}))
    return 0


def train_config_from_args(a: argparse.Namespace) -> Any:
    from llm.backend import SamplingConfig
    from llm.evaluate import EvalConfig
    from llm.trainer import TrainConfig

    if a.method not in METHODS:
        raise ConfigError(f"--method = {a.method!r} is invalid: expected one of {', '.join(METHODS)}")
    for name in ("G", "K", "prompts", "steps", "max_tokens", "micro_batch", "eval_problems", "checkpoint_every",
                 "threads"):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name))
    _positive("--eval-every", a.eval_every, zero_ok=True)
    _positive("--warmup", a.warmup, zero_ok=True)
    _positive("--eval-samples", a.eval_samples, zero_ok=True)
    _positive("--lr", a.lr, integer=False)
    _positive("--temperature", a.temperature, integer=False)
    _positive("--kl-coef", a.kl_coef, integer=False, zero_ok=True)
    if a.preset is None and a.model is None:
        raise ConfigError("--model is required unless --preset tiny-arith is given")
    for opt, path in (("--model", a.model), ("--reference", a.reference)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{opt} = {path!r} is invalid: not a model directory (no config.json)")
    for opt, path in (("--data", a.data), ("--eval-data", a.eval_data)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{opt} = {path!r} is invalid: no such file")
    if a.preset == "tiny-arith" and a.data is not None:
        raise ConfigError("--data is invalid with --preset tiny-arith (the preset uses the built-in arithmetic task)")
    overrides = _parse_sets(a.set)
    for k, v in (("G", a.G), ("K", a.K), ("kl_coef", a.kl_coef)):
        if v is not None:
            overrides[k] = v
    sampling = SamplingConfig(max_response_tokens=a.max_tokens or 64, temperature=a.temperature or 1.0)
    ev = EvalConfig(n_problems=a.eval_problems or 512,
                    samples=4 if a.eval_samples is None else a.eval_samples,
                    pass_k=max(1, min(4, 4 if a.eval_samples is None else a.eval_samples)),
                    temperature=sampling.temperature, max_response_tokens=sampling.max_response_tokens)
    kw: dict[str, Any] = dict(model=a.model or "", reference=a.reference, data=a.data, eval_data=a.eval_data,
                              task=a.task, method=a.method, overrides=overrides, sampling=sampling, eval=ev,
                              segmenter=a.segmenter, bf16=a.bf16, tensorboard=not a.no_tensorboard,
                              engine=a.engine)
    for key, val in (("prompts_per_step", a.prompts), ("steps", a.steps), ("lr", a.lr),
                     ("micro_batch_size", a.micro_batch), ("eval_every", a.eval_every),
                     ("lr_warmup_steps", a.warmup),
                     ("checkpoint_every", a.checkpoint_every), ("seed", a.seed), ("threads", a.threads)):
        if val is not None:
            kw[key] = val
    return TrainConfig(**kw)


def train_config_from_recipe(a: argparse.Namespace) -> Any:
    """A :class:`~llm.trainer.TrainConfig` from the JSON recipe ``--config`` (its ``train`` section),
    with ``--set``, ``--steps``, ``--seed`` and ``--engine`` applied on top; model and data paths
    are checked before anything runs."""
    from llm.trainer import TrainConfig

    path = Path(a.config)
    if not path.is_file():
        raise ConfigError(f"--config = {a.config!r} is invalid: no such file")
    try:
        recipe = json.loads(path.read_text())
        d = dict(recipe["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"--config = {a.config!r} is invalid: expected JSON with a 'train' object ({e})") from None
    d["overrides"] = {**d.get("overrides", {}), **_parse_sets(a.set)}
    for key, val in (("steps", a.steps), ("seed", a.seed)):
        if val is not None:
            _positive(f"--{key}", val, zero_ok=True)
            d[key] = val
    if a.engine != "hf":
        d["engine"] = a.engine
    for opt in ("model", "reference"):
        p = d.get(opt)
        if p and not (Path(p) / "config.json").is_file():
            raise ConfigError(f"--config {opt} = {p!r} is invalid: not a model directory (no config.json)")
    for opt in ("data", "eval_data"):
        p = d.get(opt)
        if p and not Path(p).is_file():
            raise ConfigError(f"--config {opt} = {p!r} is invalid: no such file")
    try:
        return TrainConfig.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"--config = {a.config!r} is invalid: {e}") from None


def cmd_train(a: argparse.Namespace) -> int:
    import dataclasses

    from llm.trainer import TrainConfig, Trainer

    out = Path(a.out)
    if a.resume:
        cfg_file = out / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"--resume is invalid: {str(cfg_file)!r} does not exist")
        cfg = TrainConfig.from_dict(json.loads(cfg_file.read_text())["train"])
        if a.steps is not None:
            _positive("--steps", a.steps)
            cfg = dataclasses.replace(cfg, steps=a.steps)
    elif a.config is not None:
        cfg = train_config_from_recipe(a)
        _check_new_dir(a.out, force=False)
    else:
        cfg = train_config_from_args(a)
        _check_new_dir(a.out, force=False)
        if a.preset == "tiny-arith" and a.model is None:
            from llm.sft import SFTConfig, train_sft
            init = out / "init"
            print(f"no --model given: training the tiny-arith SFT start in {init}", file=sys.stderr)
            train_sft(SFTConfig(seed=cfg.seed), out=init, progress=True)
            cfg = dataclasses.replace(cfg, model=str(init))
    summary = Trainer(cfg, out, resume=a.resume, progress=True).run()
    print(json.dumps({"out": str(out), "method": summary["method"], "steps": summary["steps"],
                      "before": summary["before"], "after": summary["after"], "budget": summary["budget"],
                      "wall_time_s": round(summary["wall_time_s"], 1)}))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from deepgrpo.records import write_json_atomic
    from llm.checkpoint import resolve_model_dir
    from llm.evaluate import EvalConfig, evaluate
    from llm.hf_engine import HFEngine
    from llm.models import load_causal_lm, load_tokenizer
    from llm.tasks import arithmetic_heldout, load_problems, make_prompts

    model_dir = resolve_model_dir(a.checkpoint)
    if model_dir is None:
        raise ConfigError(f"--checkpoint = {a.checkpoint!r} is invalid: no model directory there (no config.json)")
    for name in ("problems", "max_tokens", "threads"):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name))
    _positive("--samples", a.samples, zero_ok=True)
    _positive("--temperature", a.temperature, integer=False)
    k = a.pass_k if a.pass_k is not None else max(a.samples, 1)
    if a.samples and not 1 <= k <= a.samples:
        raise ConfigError(f"--pass-k = {k} is invalid: expected an integer in [1, --samples = {a.samples}]")
    cfg = EvalConfig(n_problems=a.problems, samples=a.samples, pass_k=k if a.samples else 1,
                     temperature=a.temperature, max_response_tokens=a.max_tokens, seed=a.seed)
    if a.data in ("arith", "tiny-arith"):
        problems = arithmetic_heldout(a.problems)
    elif Path(a.data).is_file():
        problems = load_problems(a.data, a.task)[:a.problems]
    else:
        raise ConfigError(f"--data = {a.data!r} is invalid: expected 'arith' or an existing JSONL/parquet file")
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, trainable=False)
    res = evaluate(HFEngine(model, [tok.eos_token_id], tok.pad_token_id), tok, make_prompts(problems, tok), cfg)
    out = Path(a.out) if a.out else model_dir / "eval_results.json"
    record = {"checkpoint": str(model_dir), "data": a.data, **res, "config": vars(a)}
    write_json_atomic(out, record)
    print(json.dumps(res))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo llm", command: str = "llm") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser(prog).parse_args(argv)
    _quiet_transformers()
    return {"sft": cmd_sft, "train": cmd_train, "eval": cmd_eval}[a.sub](a)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
