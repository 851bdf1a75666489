"""RL training of a causal LM with the core's exploration step and loss (GRPO, DEEP-GRPO, ...).

A training step is exactly the core's loop, nothing LLM-specific in between::

    prompts = next P problems of the data stream
    result  = deepgrpo.explore(backend, prompts, algo, estimator, rng, ledger)
    metrics = deepgrpo.update_policy(backend, result.batch, algo.loss, optimizer, params, micro_batch)
    engine.sync_weights(policy)

Outputs in ``out``: ``config.json`` (resolved config + versions), ``metrics.jsonl`` (one row per
step; evaluation columns ``eval/...`` at evaluation steps), TensorBoard events in ``tb/``,
``checkpoint/`` (see :mod:`llm.checkpoint`) and ``summary.json`` at the end. A run resumed from
its checkpoint reproduces the metrics of the uninterrupted run (same machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepgrpo import BudgetLedger, explore, make_estimator, method_config, step_record, update_policy
from deepgrpo.config import AlgoConfig, ConfigError, check_choice, check_range, dataclass_from_dict, invalid
from deepgrpo.distributed import GatheredEstimator, shard, world
from deepgrpo.ledger import BUDGET_UNITS, budget_spent
from deepgrpo.records import json_line, versions, write_json_atomic, write_text_atomic
from llm.backend import LLMBackend, SamplingConfig, check_context, check_sampling_fits, uses_next_entropy
from llm.checkpoint import (
    check_checkpoint,
    load_trainer_state,
    recover_interrupted,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    tensors_to_numpy,
)
from llm.evaluate import EvalConfig, evaluate
from llm.hf_engine import DEFAULT_MAX_BATCH_SIZE, HFEngine
from llm.models import ModelLimits, load_causal_lm, load_tokenizer, model_limits, named_os_error
from llm.segmenters import SEGMENTERS, TASK_DEFAULT_SEGMENTER, make_segmenter
from llm.tasks import (
    TASKS,
    ArithmeticConfig,
    ArithmeticStream,
    FileStream,
    Problem,
    Prompt,
    arithmetic_heldout,
    arithmetic_problem,
    encode_prompt,
    load_problems,
    make_prompts,
    question_key,
    split_heldout,
)

PRESETS = ("tiny-arith",)
ENGINES = ("hf", "vllm")

RESUMABLE_CHANGES = ("train.steps", "train.budget", "train.threads", "train.checkpoint_every", "train.eval_every",
                     "train.tensorboard")
"""Settings a resumed run may change (applied and recorded); any other change is refused."""


@dataclass
class TrainConfig:
    """An RL run on a causal LM (DEEP-GRPO paper, arXiv 2602.14169, §4 setup unless noted).

    Model and data
        model: local model directory of the initial policy (for ``tiny-arith``: an SFT checkpoint
            from ``deepgrpo llm sft``).
        reference: frozen reference model directory (None = ``model``).
        data: JSONL/parquet file in GSM8K/MATH/arith format (None = the built-in arithmetic task; on the
            command line also ``arith``, as in ``llm eval``).
        eval_data: held-out file (None = a crc32 split of ``data``, or the arithmetic held-out set).
            Training never sees a held-out question: problems of ``data`` whose question
            (whitespace ignored) is also in ``eval_data`` are dropped, with a counted warning;
            with the built-in arithmetic task, its questions are skipped by the stream.
        task: ``arith`` | ``gsm8k`` | ``math`` (None = detected from ``data``).
        arith: difficulty knobs of the arithmetic task.
    Algorithm
        method: a method name (grpo, deep-grpo, ...; ``deepgrpo methods`` lists them).
        overrides: overrides of the method's :class:`AlgoConfig` by dotted key or field name
            (``explore.G`` or ``G``, ``loss.lam``...; GRPO's N is ``G``). The command line
            fills it from the algorithm's flags and ``--set`` with the keys that differ from the
            method's preset.
        prompts_per_step: prompts per exploration step (paper: 64). With ``G``, ``K`` and
            ``n_pivots`` it sets a step's responses, at most prompts_per_step x G x
            (1 + n_pivots x K); a run whose step could not hold them in this machine's memory
            (about 64 bytes per sampled token, plus the KV cache of the rows decoded together
            on a CPU) is refused before it starts.
        segmenter: how responses are cut into pivot candidates (None = the task's default:
            ``step`` for arith, ``line`` for gsm8k, ``sentence`` for math).
        segment_tokens: segment length of the ``fixed`` segmenter.
        sampling: rollout length cap, temperature (paper: 1.0), top-p. The longest prompt
            plus ``sampling.max_response_tokens`` must fit in the model's context
            (``max_position_embeddings``); the held-out evaluation during training uses the
            same cap.
    Optimisation
        steps: training steps (a cap when ``budget`` is set).
        budget: stop at the first step boundary where the run has spent at least this much in
            ``budget_unit`` (summed over data-parallel ranks; it overshoots by less than one
            step), so that methods are compared at equal budget; None = exactly ``steps`` steps.
        budget_unit: ``rollouts`` (main + aux) or ``tokens`` (generated tokens, main + aux).
        lr: AdamW learning rate (paper: 1e-6 for 0.5B models; tiny-arith: 1e-4).
        lr_warmup_steps: linear warm-up from 0 (0 = constant lr). On the tiny preset's
            peaked SFT policy, Adam's sign-like first step at lr 3e-4 lowers the log-probs of
            *both* positive- and negative-advantage samples and the reward drops from 0.51 to
            0.32 in one step (measured); a short warm-up to 1e-4 avoids it.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's moment coefficients.
        adam_eps: AdamW's epsilon.
        max_grad_norm: gradient clipping (paper: 1.0).
        micro_batch_size: rows per backward pass (gradients accumulate to the full batch).
        logprob_chunk_size: rows per forward pass when scoring.
        bf16: bfloat16 autocast for the trainer's forward passes on the run's device (CPU or CUDA;
            float32 weights; adds a rollout-vs-trainer mismatch).
    Bookkeeping
        eval_every: evaluate every this many steps (and always before the first and after the
            last step); 0 = only before and after.
        eval: the evaluation settings.
        checkpoint_every: save a checkpoint every this many steps (and at the end).
        seed: every random choice of the run.
        threads: torch CPU threads.
        tensorboard: also write TensorBoard events.
        engine: rollout engine, ``hf`` (transformers generate, with the trainer's own module) or
            ``vllm`` (a vLLM engine, weights synced after every update).
        vllm: options of the vLLM engine (the fields of ``VLLMEngineConfig`` in
            llm/vllm_engine.py) for engine ``vllm``, e.g. ``{"dtype": "bfloat16",
            "gpu_memory_utilization": 0.4, "enforce_eager": false}`` on a GPU; ``seed`` defaults
            to the run's.
        device: where policy and reference live: ``auto`` (CUDA if available), ``cpu``, ``cuda``.
    """

    model: str = ""
    reference: str | None = None
    data: str | None = None
    eval_data: str | None = None
    task: str | None = None
    arith: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    method: str = "deep-grpo"
    overrides: dict[str, Any] = field(default_factory=dict)
    prompts_per_step: int = 64
    segmenter: str | None = None
    segment_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    steps: int = 60
    budget: int | None = None
    budget_unit: str = "tokens"
    lr: float = 1e-4
    lr_warmup_steps: int = 5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int = 256
    logprob_chunk_size: int = 256
    bf16: bool = False
    eval_every: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint_every: int = 5
    seed: int = 0
    threads: int = 2
    tensorboard: bool = True
    engine: str = "hf"
    vllm: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"

    def __post_init__(self) -> None:
        o = type(self).__name__
        if self.task is not None:
            check_choice(o, "task", self.task, TASKS)
        if self.segmenter is not None:
            check_choice(o, "segmenter", self.segmenter, SEGMENTERS)
        check_range(o, "segment_tokens", self.segment_tokens, 1, None, integer=True)
        check_range(o, "prompts_per_step", self.prompts_per_step, 1, None, integer=True)
        check_range(o, "steps", self.steps, 1, None, integer=True)
        if self.budget is not None:
            check_range(o, "budget", self.budget, 1, None, integer=True)
        check_choice(o, "budget_unit", self.budget_unit, BUDGET_UNITS)
        check_range(o, "lr", self.lr, 0.0, None, lo_open=True)
        check_range(o, "lr_warmup_steps", self.lr_warmup_steps, 0, None, integer=True)
        check_range(o, "weight_decay", self.weight_decay, 0.0, None)
        check_range(o, "adam_eps", self.adam_eps, 0.0, None, lo_open=True)
        check_range(o, "max_grad_norm", self.max_grad_norm, 0.0, None, lo_open=True)
        check_range(o, "micro_batch_size", self.micro_batch_size, 1, None, integer=True)
        check_range(o, "logprob_chunk_size", self.logprob_chunk_size, 1, None, integer=True)
        check_range(o, "eval_every", self.eval_every, 0, None, integer=True)
        check_range(o, "checkpoint_every", self.checkpoint_every, 1, None, integer=True)
        check_range(o, "threads", self.threads, 1, None, integer=True)
        check_choice(o, "engine", self.engine, ENGINES)
        check_choice(o, "device", self.device, ("auto", "cpu", "cuda"))
        self.algo()  # validates method and overrides

    def check_device(self) -> None:
        """Raise :class:`ConfigError` if ``device = "cuda"`` and no CUDA device is available
        (checked when a run starts, so that a GPU recipe can be validated on any machine)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise invalid(type(self).__name__, "device", self.device, "auto or cpu: no CUDA device is available")

    def algo(self) -> AlgoConfig:
        """The resolved algorithm: the method's preset with ``overrides`` (typed path)."""
        return method_config(self.method, self.overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` through the typed path: values converted by their
        annotations, an unknown key is a :class:`ConfigError` naming it."""
        return dataclass_from_dict(cls, d)


@dataclass
class RunData:
    """What a run trains and evaluates on.

    stream: the training problems (``problem_at(i)``).
    heldout: the held-out prompts.
    task: ``arith``, ``gsm8k`` or ``math``.
    """

    stream: Any
    heldout: list[Prompt]
    task: str


class ExcludingStream:
    """A problem stream without the questions in ``excluded`` (:func:`~llm.tasks.question_key`
    values): ``problem_at(i)`` is ``stream.problem_at(i)`` unless its question is excluded, then
    the first allowed problem at ``i + k * 2**40`` (k = 1, 2, ...), so that it still depends on
    ``i`` alone (a resumed run needs only its data position). Keeps an evaluation file's
    questions out of the built-in arithmetic training stream."""

    def __init__(self, stream: Any, excluded: set[str]) -> None:
        self.stream = stream
        self.excluded = set(excluded)

    def problem_at(self, i: int) -> Problem:
        j = int(i)
        while True:
            p = self.stream.problem_at(j)
            if question_key(p.question) not in self.excluded:
                return p
            j += 2 ** 40


def step_rows(cfg: TrainConfig, world_size: int = 1) -> int:
    """The most responses one training step samples on one rank: its share of the prompts
    times G main chains and, for branching methods, up to n_pivots x K continuations per main
    chain (capped by ``aux_budget`` per prompt)."""
    ec = cfg.algo().explore
    prompts = -(-cfg.prompts_per_step // max(world_size, 1))
    aux = 0 if ec.strategy == "root" else ec.G * ec.n_pivots * ec.K
    if ec.aux_budget is not None:
        aux = min(aux, ec.aux_budget)
    return prompts * (ec.G + aux)


def _longest(prompts: list[tuple[int, str]]) -> tuple[int, str]:
    return max(prompts, default=(0, "no problem"))


def _described(p: Problem) -> str:
    return f"problem {str(p.id)[:60]!r}"


def load_run_data(cfg: TrainConfig, tokenizer: Any, limits: ModelLimits | None = None, world_size: int = 1,
                  kv_on_host: bool = True) -> RunData:
    """The run's training stream and held-out prompts, after checking that their sizes fit:
    every prompt plus ``sampling.max_response_tokens`` in the model's context
    (``limits.context``), and a training step's and an evaluation's responses in this machine's
    memory (:func:`llm.backend.check_sampling_fits`; the KV cache counts when ``kv_on_host``).
    Everything is checked before anything is allocated; a file that cannot be split, or whose
    questions are all held out, is a :class:`ConfigError` naming ``--data`` and the file."""
    limits = limits or ModelLimits(context=None, kv_bytes_per_token=0)
    kv = limits.kv_bytes_per_token if kv_on_host else 0
    cap = cfg.sampling.max_response_tokens
    ec = cfg.algo().explore
    step_factors = [("TrainConfig", "prompts_per_step", cfg.prompts_per_step, 64), ("ExploreConfig", "G", ec.G, 8)]
    if ec.strategy != "root":
        step_factors += [("ExploreConfig", "K", ec.K, 8), ("ExploreConfig", "n_pivots", ec.n_pivots, 1)]
    step_factors.append(("SamplingConfig", "max_response_tokens", cap, 64))
    samples = max(cfg.eval.samples, 1)
    eval_factors = [("EvalConfig", "n_problems", cfg.eval.n_problems, 512), ("EvalConfig", "samples", samples, 4),
                    ("SamplingConfig", "max_response_tokens", cap, 64)]

    def check(longest_train: tuple[int, str], longest_held: tuple[int, str], n_held: int, data: str,
              held_option: str, held_data: str) -> None:
        check_context(longest_train[0], cap, limits.context, "SamplingConfig", "--data", data, longest_train[1])
        check_context(longest_held[0], cap, limits.context, "SamplingConfig", held_option, held_data,
                      longest_held[1])
        check_sampling_fits(step_rows(cfg, world_size), longest_train[0], cap, step_factors, "a training step",
                            kv, DEFAULT_MAX_BATCH_SIZE)
        check_sampling_fits(n_held * samples, longest_held[0], cap, eval_factors, "the held-out evaluation", kv,
                            DEFAULT_MAX_BATCH_SIZE)

    if cfg.data is None:
        if cfg.task not in (None, "arith"):
            raise ConfigError(f"task = {cfg.task!r} needs --data (only arith is built in)")
        a = cfg.arith
        worst = arithmetic_problem([10 ** a.max_digits - 1] * a.max_terms)  # the longest question the task draws
        longest = (len(encode_prompt(worst, tokenizer)), f"the longest arithmetic question ({worst.question!r})")
        stream: Any = ArithmeticStream(cfg.arith, seed=cfg.seed)
        if cfg.eval_data is None:
            check(longest, longest, cfg.eval.n_problems, "arith", "--data", "arith")  # before drawing the held-out set
            return RunData(stream, make_prompts(arithmetic_heldout(cfg.eval.n_problems, cfg.arith), tokenizer),
                           "arith")
        held = load_problems(cfg.eval_data, "arith", option="--eval-data")
        held_prompts = make_prompts(held[:cfg.eval.n_problems], tokenizer)
        longest_held = _longest([(len(p.ids), _described(p.problem)) for p in held_prompts])
        check(longest, longest_held, len(held_prompts), "arith", "--eval-data", cfg.eval_data)
        return RunData(ExcludingStream(stream, {question_key(p.question) for p in held}), held_prompts, "arith")
    problems = load_problems(cfg.data, cfg.task)
    task = problems[0].task
    if cfg.eval_data is not None:
        held = load_problems(cfg.eval_data, task, option="--eval-data")
        held_keys = {question_key(p.question) for p in held}
        train = [p for p in problems if question_key(p.question) not in held_keys]
        if not train:
            raise ConfigError(f"--data = {cfg.data!r} is invalid: each of its {len(problems)} questions is also in "
                              f"--eval-data = {cfg.eval_data!r}, and a held-out question is never trained on; pass "
                              "an evaluation file disjoint from the training file (or no --eval-data, to hold out "
                              "part of --data)", owner="--data", value=cfg.data)
        if len(train) < len(problems):
            warnings.warn(f"--data = {cfg.data!r}: dropped {len(problems) - len(train)} of {len(problems)} problems "
                          f"whose question is also in --eval-data = {cfg.eval_data!r} (a held-out question is never "
                          "trained on)", stacklevel=2)
    else:
        try:
            train, held = split_heldout(problems)
        except ConfigError as e:
            raise ConfigError(f"--data = {cfg.data!r} is invalid: {e}", owner="--data", value=cfg.data) from None
    held_prompts = make_prompts(held[:cfg.eval.n_problems], tokenizer)
    longest_train = _longest([(len(encode_prompt(p, tokenizer)), _described(p)) for p in train])
    longest_held = _longest([(len(p.ids), _described(p.problem)) for p in held_prompts])
    held_option, held_data = ("--eval-data", cfg.eval_data) if cfg.eval_data is not None else ("--data", cfg.data)
    check(longest_train, longest_held, len(held_prompts), cfg.data, held_option, str(held_data))
    return RunData(FileStream(train, seed=cfg.seed), held_prompts, task)


def _differing_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(setting, checkpoint's value, run's value)`` for every setting outside
    :data:`RESUMABLE_CHANGES` on which a checkpoint's stored config and the run's config differ."""
    from deepgrpo.overrides import leaf_values
    old, new = leaf_values(TrainConfig.from_dict(saved)), leaf_values(cfg)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and "train." + k not in RESUMABLE_CHANGES]


@contextlib.contextmanager
def _writer_thread_errors_reraised() -> Iterator[None]:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails (a full
    disk): the writer raises the same error in the training thread at its next call, where it
    is reported in one line."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs (or resumes) the training loop.

    ``resume`` continues from ``out/checkpoint``; a run that stopped before its first
    checkpoint has none, and resuming it starts again from step 0 (``restarted`` is then
    True). A checkpoint whose stored config differs from ``config`` in a setting outside
    :data:`RESUMABLE_CHANGES` is refused (two runs wrote to one directory).
    """

    def __init__(self, config: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
                 resume_changes: dict[str, Any] | None = None) -> None:
        self.cfg = config
        self.resume_changes = dict(resume_changes or {})
        self.out = Path(out)
        self.progress = progress
        self.algo = config.algo()
        torch.set_num_threads(config.threads)
        ckpt = self.out / "checkpoint"
        recover_interrupted(ckpt)
        self.resumed = resume
        self.restarted = resume and not ckpt.exists()  # stopped before its first checkpoint: start again
        resuming = resume and not self.restarted
        state = None
        if resuming:  # resuming never starts over from a broken checkpoint (which would overwrite the results)
            check_checkpoint(ckpt)
            state = load_trainer_state(ckpt)
            self._check_state_config(state, ckpt)
        # sizes are checked against the model's config and the machine's memory before anything is allocated
        self.tokenizer = load_tokenizer(config.model)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                              else config.device)
        data = load_run_data(config, self.tokenizer, model_limits(ckpt if resuming else config.model,
                                                                 "--resume" if resuming else "--model"),
                             world_size, kv_on_host=config.engine == "hf" and device.type == "cpu")
        self.stream, self.heldout, self.task = data.stream, data.heldout, data.task
        self.policy = load_causal_lm(ckpt if resuming else config.model, option="--resume" if resuming else "--model")
        self.reference = None
        if self.algo.loss.kl_coef > 0:
            self.reference = load_causal_lm(config.reference or config.model, trainable=False,
                                            option="--reference" if config.reference else "--model")
        # data parallel under torchrun: one process per rank, prompts sharded, gradients summed,
        # the estimator fed with every rank's (features, label) pairs (deepgrpo.distributed)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo")
        self.rank, self.world_size = world()
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.policy.to(device)
        if self.reference is not None:
            self.reference.to(device)
        seg_kind = config.segmenter or TASK_DEFAULT_SEGMENTER[self.task]
        self.segmenter = make_segmenter(seg_kind, self.tokenizer, size=config.segment_tokens)
        stops = [self.tokenizer.eos_token_id]
        if config.engine == "vllm":  # built before the trainer's seeding: vLLM re-seeds the process
            from llm.vllm_engine import VLLMEngine, VLLMEngineConfig
            self.engine = VLLMEngine(ckpt if resuming else config.model, stops,
                                     VLLMEngineConfig(**{"seed": config.seed, **config.vllm}))
            self.engine.sync_weights(self.policy)
        else:
            self.engine = HFEngine(self.policy, stops, self.tokenizer.pad_token_id)
        estimator = make_estimator(self.algo.estimator)
        # an engine without entropies (vLLM) gets the selector's next_entropy from a forward pass
        self.backend = LLMBackend(self.policy, self.reference, self.tokenizer, self.engine, self.segmenter,
                                  config.sampling, seed=config.seed + 1 + 1000 * self.rank,
                                  logprob_chunk_size=config.logprob_chunk_size,
                                  bf16=config.bf16, entropy_feature=uses_next_entropy(estimator))
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0)
        self.estimator = estimator
        if self.world_size > 1:
            self.estimator = GatheredEstimator(self.estimator)
        self.ledger = BudgetLedger()
        self.rng = np.random.default_rng(config.seed if self.world_size == 1 else [config.seed, self.rank])
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.step = 0
        self.saved_step: int | None = None
        self.data_pos = 0
        self.rows: list[dict[str, Any]] = []
        self.wall_time = 0.0
        self._warned_grad_norm = False
        self._spent: tuple[int | None, int] = (None, 0)  # (step, budget spent over all ranks) of finished()
        if state is not None:
            self._load_state(state)
            self.saved_step = self.step
            if config.steps < self.step:
                raise invalid(type(config).__name__, "steps", config.steps,
                              f"an integer >= {self.step}, the steps this run has already taken")

    # -- state ----------------------------------------------------------------------------------
    def _check_state_config(self, state: dict[str, Any], ckpt: Path) -> None:
        """Refuse a checkpoint written with other settings than this run's (outside
        :data:`RESUMABLE_CHANGES`): two runs that wrote to one ``--out`` must not be mixed."""
        try:
            differ = _differing_settings(state["config"], self.cfg)
        except (ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"--resume is invalid: the config stored in {str(ckpt)!r} is not a run config ({e})",
                              owner="--resume", value=str(ckpt)) from None
        if differ:
            key, theirs, ours = differ[0]
            more = f" (and {len(differ) - 1} more settings)" if len(differ) > 1 else ""
            raise ConfigError(f"--resume is invalid: the checkpoint in {str(ckpt)!r} was written with {key} = "
                              f"{theirs!r}, but the run's config ({self.out / 'config.json'}) has {key} = {ours!r}"
                              f"{more}: another run wrote to this --out; start a new run in another --out",
                              owner="--resume", field=key, value=ours)

    def _state(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (see :mod:`llm.checkpoint`)."""
        return {"step": self.step, "data_pos": self.data_pos, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "estimator": self.estimator.state_dict(), "ledger": self.ledger.state_dict(),
                "rng": rng_states(self.rng), "backend": self.backend.state_dict(), "rows": self.rows,
                "wall_time": self.wall_time, "config": self.cfg.to_dict()}

    def _load_state(self, st: dict[str, Any]) -> None:
        self.step, self.data_pos = int(st["step"]), int(st["data_pos"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.estimator.load_state_dict(tensors_to_numpy(st["estimator"]))
        self.ledger.load_state_dict(st["ledger"])
        restore_rng_states(st["rng"], self.rng)
        self.backend.load_state_dict(tensors_to_numpy(st["backend"]))
        self.rows = list(st["rows"])
        self.wall_time = float(st["wall_time"])

    def save(self) -> None:
        """Checkpoint the run (rank 0; atomic: see :mod:`llm.checkpoint`). ``saved_step`` is
        updated as soon as the new checkpoint is in place (a Ctrl-C during the swap waits)."""
        if self.rank != 0:
            return

        def committed() -> None:
            self.saved_step = self.step

        save_checkpoint(self.out / "checkpoint", self.policy, self.tokenizer, self._state(), committed=committed)

    # -- one step -------------------------------------------------------------------------------
    def next_prompts(self) -> list[Prompt]:
        P = self.cfg.prompts_per_step
        problems = [self.stream.problem_at(self.data_pos + i) for i in range(P)]
        self.data_pos += P
        return make_prompts(problems, self.tokenizer)

    def train_step(self) -> dict[str, Any]:
        t0 = time.time()
        prompts = shard(self.next_prompts(), self.rank, self.world_size)  # this rank's share
        self.policy.train()
        res = explore(self.backend, prompts, self.algo, self.estimator, self.rng, self.ledger)
        t1 = time.time()
        self.backend.reset_diagnostics()
        upd = update_policy(self.backend, res.batch, self.algo.loss, self.optimizer, self.params,
                            micro_batch_size=self.cfg.micro_batch_size, max_grad_norm=self.cfg.max_grad_norm,
                            data_parallel=self.world_size > 1)
        lr = float(self.optimizer.param_groups[0]["lr"])
        with warnings.catch_warnings():  # the schedule follows training steps, also when a step was skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.engine.sync_weights(self.policy)
        t2 = time.time()
        G = self.algo.explore.G
        main_r = res.main.rewards.reshape(len(prompts), G)  # [P, G]
        # the core's record (budget, rewards, pivots, loss parts, estimator), then this backend's columns
        row: dict[str, Any] = {"step": self.step + 1, **step_record(res, upd, self.ledger, self.estimator)}
        row.update({
            f"pass@{G}": float((main_r > 0).any(1).float().mean()),
            "truncated_frac": float(res.main.truncated.float().mean()),
            "response_len": float(res.main.lengths.float().mean()),
            "batch_rows": float(len(res.batch)),
            "lr": lr, "time_explore_s": t1 - t0, "time_update_s": t2 - t1,
        })
        row.update(self.backend.diagnostics())
        self._check_grad_norm(row)
        return row

    def _check_grad_norm(self, row: dict[str, Any]) -> None:
        """Record in ``row["grad_norm_nonfinite"]`` (1 or 0) whether the step's gradient norm was
        infinite or NaN (metrics.jsonl then holds ``grad_norm: null``: NaN and Infinity are not
        JSON), and warn the first time it happens in this process, naming the step."""
        gn = row.get("grad_norm")
        bad = isinstance(gn, (int, float)) and not math.isfinite(gn)
        row["grad_norm_nonfinite"] = float(bad)
        if bad and not self._warned_grad_norm:
            self._warned_grad_norm = True
            warnings.warn(f"step {row['step']}: the gradient norm is {gn} (recorded as grad_norm = null, "
                          "grad_norm_nonfinite = 1 in metrics.jsonl; later such steps are recorded without "
                          "a warning); lower --lr if it repeats", RuntimeWarning, stacklevel=2)

    def run_eval(self) -> dict[str, float]:
        """The held-out evaluation of the current policy (with a progress bar unless quiet)."""
        cfg = dataclasses.replace(self.cfg.eval, max_response_tokens=self.cfg.sampling.max_response_tokens)
        when = f"after step {self.step}" if self.step else "before training"
        res = evaluate(self.engine, self.tokenizer, self.heldout, cfg, progress=self.progress,
                       desc=f"held-out evaluation {when}")
        return {f"eval/{k}": v for k, v in res.items()}

    # -- the loop -------------------------------------------------------------------------------
    def write_outputs(self) -> None:
        if self.rank != 0:
            return
        write_text_atomic(self.out / "metrics.jsonl", "".join(json_line(r) + "\n" for r in self.rows))

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train up to ``config.steps`` (from the resumed step, if any). ``until`` stops right
        after that step without the final checkpoint, as a killed run would (for tests and for
        running a long job in chunks). A failed write (disk full...) raises ``OSError`` naming
        the file; the previous checkpoint and complete metrics stay, so the run resumes."""
        with _writer_thread_errors_reraised():
            return self._run(until)

    def _run(self, until: int | None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        lead = self.rank == 0  # with data parallelism, rank 0 evaluates and writes everything
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            resumes = []
            old = self.out / "config.json"
            if old.is_file():
                resumes = list(json.loads(old.read_text()).get("resumes", []))
            if self.resumed:  # a resumed run records where it resumed and what it changed
                resumes.append({"at_step": self.step, "changed": self.resume_changes})
            write_json_atomic(self.out / "config.json", {"train": cfg.to_dict(), "algo": self.algo.to_dict(),
                                                          "world_size": self.world_size, "versions": versions(),
                                                          "resumes": resumes})
        writer = None
        if cfg.tensorboard and lead:
            from torch.utils.tensorboard import SummaryWriter
            try:
                writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step)
            except OSError as e:
                raise named_os_error(e, self.out / "tb") from None
        if self.step == 0 and not self.rows and lead:
            t = time.time()
            row = {"step": 0, **self.run_eval()}
            self.wall_time += time.time() - t
            self.rows.append(row)
            self._log(writer, row)
            self.write_outputs()
        budget_bound = cfg.budget is not None
        if budget_bound:  # the budget ends the run (--steps only caps it): count what is spent
            bar = tqdm(total=cfg.budget, initial=min(self.spent(), cfg.budget), desc=f"train {cfg.method}",
                       unit=f" {cfg.budget_unit}", unit_scale=True, disable=not self.progress)
        else:
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.method}", unit="step",
                       disable=not self.progress)
        while not self.finished():
            t = time.time()
            row = self.train_step()
            self.step += 1
            last = self.finished()
            if lead and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                row.update(self.run_eval())
            self.wall_time += time.time() - t
            row["wall_time_s"] = self.wall_time
            self.rows.append(row)
            self._log(writer, row)
            self.write_outputs()
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save()
            bar.update(min(self.spent(), cfg.budget) - bar.n if budget_bound else 1)
            bar.set_postfix(**({"step": self.step} if budget_bound else {}), reward=f"{row['reward_main']:.3f}",
                            rollouts=int(row["rollouts"]))
            if until is not None and self.step >= until:
                break
        bar.close()
        if writer is not None:
            try:
                writer.close()
            except OSError as e:
                raise named_os_error(e, self.out / "tb") from None
        summary = self.summary()
        if self.finished() and lead:
            write_json_atomic(self.out / "summary.json", summary)
        return summary

    def finished(self) -> bool:
        """True once the run took ``steps`` steps or spent its ``budget`` (summed over ranks)."""
        if self.step >= self.cfg.steps:
            return True
        if self.cfg.budget is None:
            return False
        spent = budget_spent(self.ledger, self.cfg.budget_unit)
        if self.world_size > 1:
            t = torch.tensor([float(spent)], dtype=torch.float64)
            dist.all_reduce(t)
            spent = int(t.item())
        self._spent = (self.step, spent)
        return spent >= self.cfg.budget

    def spent(self) -> int:
        """The budget spent so far in ``budget_unit``, summed over ranks as :meth:`finished`
        last summed it (this rank's own spending before the first call)."""
        step, spent = self._spent
        return spent if step == self.step else budget_spent(self.ledger, self.cfg.budget_unit) * self.world_size

    def _log(self, writer: Any, row: dict[str, Any]) -> None:
        if writer is None:
            return
        try:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and np.isfinite(v):
                    writer.add_scalar(k, v, row["step"])
            writer.flush()
        except OSError as e:  # raised here by TensorBoard's writer thread, without a file name
            raise named_os_error(e, self.out / "tb") from None

    def summary(self) -> dict[str, Any]:
        evals = [r for r in self.rows if "eval/greedy_mean@1" in r]
        first, last = (evals[0], evals[-1]) if evals else ({}, {})
        return {"method": self.cfg.method, "steps": self.step, "algo": self.algo.to_dict(),
                "before": {k[5:]: v for k, v in first.items() if k.startswith("eval/")},
                "after": {k[5:]: v for k, v in last.items() if k.startswith("eval/")},
                "budget": self.ledger.totals(), "wall_time_s": self.wall_time, "versions": versions()}
