"""DEEP-GRPO inside TRL: :class:`DeepGRPOTrainer`, a ``trl.GRPOTrainer`` subclass driven by the core.

TRL (``trl==1.16.*``) keeps everything it is good at — datasets and prompt templating,
accelerate (multi-GPU / multi-node, DeepSpeed ZeRO, FSDP), PEFT, transformers or vLLM-colocate
generation, reward functions, checkpointing and logging. The core (:mod:`deepgrpo`) owns
exploration and the loss, unchanged (DEEP-GRPO, arXiv 2602.14169):

1. TRL generates and scores the G main completions of each prompt (``num_generations`` = G).
2. The core cuts the failed ones into segments (:mod:`llm.segmenters`), builds the candidate
   pivots (:func:`deepgrpo.explore.build_candidates`), scores them with the recoverability
   estimator and picks the branch points (:func:`deepgrpo.branching.plan_branches`,
   :func:`deepgrpo.branching.cap_plan`).
3. K continuations per pivot are generated from the exact prompt + prefix token ids through
   TRL's own generation call (``GRPOTrainer._generate_single_turn``: transformers ``generate`` or
   vLLM colocate) and rewarded by the same reward functions on prefix + suffix.
4. Every process's (features, label) pairs update every process's estimator
   (:class:`deepgrpo.distributed.GatheredEstimator`).
5. :func:`deepgrpo.explore.assemble_batch` + :func:`deepgrpo.advantages.group_advantages` give
   the main rows (one advantage group per prompt) and the aux rows (one group per pivot, the
   shared prefix masked out of the loss); zero-advantage rows are dropped if configured.
6. The loss of each micro-batch is :func:`deepgrpo.losses.dual_stream_loss` with per-stream
   denominators of the whole *global* generation batch (summed over processes), so that the
   gradients accumulated over micro-batches and averaged over processes equal the gradient of
   the loss of the global batch.

Row counts differ between processes (each has its own number of aux rows): every process pads
its batch with loss-free rows to the same multiple of ``steps_per_generation``, so TRL's even
split into micro-batches never drops a row and every process runs the same number of forward
passes (as ZeRO-3 and FSDP require).

Checkpoints are TRL's plus one JSON file per process (``deepgrpo_state_<rank>.json``: estimator,
branch RNG, budget ledgers), written before TRL's files; TRL writes ``trainer_state.json`` last,
so only a finished save has it. ``train(resume_from_checkpoint=True)`` takes the newest finished
checkpoint, and a checkpoint without its DEEP-GRPO state is refused (see
:attr:`DeepGRPOConfig.resume_without_deep_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepgrpo.batch import AUX, MAIN, Batch, Rollouts
from deepgrpo.branching import BranchPlan
from deepgrpo.config import (
    AdvantageConfig,
    AlgoConfig,
    ConfigError,
    EstimatorConfig,
    ExploreConfig,
    LossConfig,
    check_choice,
    check_range,
    invalid,
)
from deepgrpo.distributed import GatheredEstimator
from deepgrpo.estimators import make_estimator
from deepgrpo.explore import ExploreResult, finish_exploration, plan_exploration
from deepgrpo.ledger import BudgetLedger
from deepgrpo.losses import dual_stream_loss, loss_denominators
from deepgrpo.step import explore_columns
from llm.segmenters import SEGMENTERS, make_segmenter

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("llm.trl_trainer needs TRL: pip install -e '.[llm,trl]'") from e
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

_EXPLORE = ExploreConfig()
_LOSS = LossConfig()
_ESTIMATOR = EstimatorConfig()
_ADVANTAGE = AdvantageConfig()

LOSS_TYPE_AGGREGATION = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
                         "dr_grpo": "seq-mean-token-sum-norm"}
"""TRL ``loss_type`` -> the core's per-stream aggregation (other loss types are rejected)."""

STREAM_SUM_COLUMNS = ("failed", "all_fail_groups", "candidates", "pivots", "nonzero_main", "nonzero_aux",
                      "step_rollouts_main", "step_rollouts_aux", "step_tokens_main", "step_tokens_aux")
"""Exploration columns summed over processes."""
STREAM_MEAN_COLUMNS = {"reward_main": "step_rollouts_main", "reward_aux": "step_rollouts_aux",
                       "branch_success": "pivots", "pivot_depth_mean": "pivots",
                       "pivot_prefix_tokens_mean": "pivots"}
"""Exploration columns averaged over processes, weighted by the column they are a mean over."""
LOSS_COLUMNS = ("loss", "pg_main", "pg_aux", "kl_main", "kl_aux")
"""Loss parts logged per optimizer step (sums over micro-batches and processes = global values)."""
CUMULATIVE_COLUMNS = ("rollouts_main", "rollouts_aux", "tokens_main", "tokens_aux", "rollouts", "tokens")
"""Running totals of the run: each log line carries the latest value, never a mean over the window."""
LATEST_PREFIXES = ("est_",)
"""Columns that describe the current state (the estimator's coefficients): latest value, like
:data:`CUMULATIVE_COLUMNS`. Every other column is a mean over the logging window (e.g. ``step_*``,
``pivots``: the mean per generation step of the steps since the previous log line)."""
CORE_FIELD_OPTIONS = {("ExploreConfig", "G"): "num_generations", ("ExploreConfig", "K"): "K",
                      ("ExploreConfig", "strategy"): "strategy", ("ExploreConfig", "gamma"): "gamma",
                      ("ExploreConfig", "n_pivots"): "n_pivots", ("ExploreConfig", "n_cut_points"): "n_cut_points",
                      ("ExploreConfig", "aux_budget"): "aux_budget",
                      ("ExploreConfig", "failure_threshold"): "failure_threshold",
                      ("LossConfig", "lam"): "lam", ("LossConfig", "dual_clip"): "dual_clip",
                      ("LossConfig", "kl_coef"): "beta", ("LossConfig", "clip_low"): "epsilon",
                      ("EstimatorConfig", "kind"): "estimator", ("EstimatorConfig", "buffer_size"):
                      "estimator_buffer_size", ("EstimatorConfig", "min_per_class"): "estimator_min_per_class"}
"""The core's (config, field) -> the DeepGRPOConfig option holding the same value, so that an invalid
value is reported under the name the user set."""
TRAINER_STATE_FILE = "trainer_state.json"
"""TRL's (transformers') last file of a checkpoint; with the DEEP-GRPO state files written before it,
its presence marks a complete checkpoint."""
STATE_FILE = "deepgrpo_state_{rank}.json"
"""Per-process file in each checkpoint: estimator, branch RNG and budget ledgers (JSON: data, never code)."""


@dataclass
class DeepGRPOConfig(GRPOConfig):
    r"""Configuration of :class:`DeepGRPOTrainer`: TRL's ``GRPOConfig`` plus DEEP-GRPO's options.

    The defaults of the DEEP-GRPO options are the core's (:class:`deepgrpo.config.ExploreConfig`,
    :class:`~deepgrpo.config.LossConfig`, :class:`~deepgrpo.config.EstimatorConfig`), i.e. the
    authors' reference values. They are validated by building the core's configs, so invalid values
    raise the core's :class:`~deepgrpo.config.ConfigError`.

    Parameters that map onto TRL's own fields:
        num_generations: G, main chains per prompt (paper §3.1: G = 8).
        beta: KL coefficient β (paper: 1e-4; default changed from TRL's 0.0). k3 estimator.
        epsilon, epsilon_high: PPO clip range (paper: 0.2).
        loss_type: per-stream aggregation: ``dapo``/``bnpo`` = token mean over the global batch
            (the paper's), ``grpo`` = mean of per-sequence token means, ``dr_grpo`` = token sums
            over ``max_completion_length``. Other TRL loss types are rejected.
        scale_rewards: ``none`` (paper, default here) or ``group`` (divide each advantage group by
            its sample std); ``batch`` is rejected.
        max_completion_length: cap on a response (prefix + suffix for a branch).

    Parameters > Pivots and branches (paper §3.2-3.3)
        strategy (`str`): how branch points are chosen in failed completions; ``deep`` is
            DEEP-GRPO's Q(i) ∝ P̂(success | r_i)·r_i^γ. See :data:`deepgrpo.config.BRANCHING_STRATEGIES`.
        K (`int`): continuations per pivot (paper: 8).
        gamma (`float`): depth exponent γ (paper: 2).
        n_pivots (`int`): pivots per failed completion (paper: 1).
        n_cut_points (`int`): cut points per failed completion of the dispersed tree baselines.
        aux_budget (`int` or `None`): cap on branch continuations per prompt (None = no cap).
        failure_threshold (`float`): a completion with reward <= this is failed (paper: 0).
        segmenter (`str`): how completions are cut into steps whose starts are the candidate
            pivots: ``line``, ``sentence``, ``step`` (``,``/``;``, the arithmetic task) or
            ``fixed`` (``segment_size`` tokens).
        segment_size (`int`): tokens per segment of the ``fixed`` segmenter.
        segment_min_tokens (`int`): shorter text segments are merged into the next one.

    Parameters > Recoverability estimator (paper §3.2)
        estimator (`str`): ``position`` (logistic regression on relative depth, the paper's),
            ``state`` (depth plus state features) or ``selector`` (the learned informative
            selector, for strategy ``informative``: the chance that one continuation succeeds,
            on features that include ``next_entropy``, the entropy of the policy's sampling
            distribution at the cut; it costs one more no-grad forward pass over the main
            completions per generation, and needs sampling by temperature and top_p alone:
            top_k, min_p and repetition_penalty at their defaults).
        estimator_buffer_size (`int`): FIFO buffer of (features, label) pairs (paper: 10,000).
        estimator_min_per_class (`int`): P̂ = 1 until each class has more points than this (paper: 10).

    Parameters > Dual-stream loss (paper §3.4)
        lam (`float`): λ, weight of the aux stream (paper: 1).
        dual_clip (`float` or `None`): dual-clip constant c (the authors' runs: 3).
        kl_weighted_by_lambda (`bool`): multiply the aux stream's KL by λ too (authors: no).
        drop_zero_advantage (`bool`): drop rows with |A| < 1e-8 (they carry no signal).
        G (`int` or `None`): the paper's name for ``num_generations``; if given it must equal it.

    Parameters > Checkpoints
        resume_without_deep_state (`bool`): what resuming from a checkpoint without this process's
            DEEP-GRPO state file (``deepgrpo_state_<rank>.json``: estimator, branch RNG, budget
            ledgers; e.g. a checkpoint of a plain ``GRPOTrainer``) does. ``False`` (default): fail
            with a ``ConfigError`` naming the file. ``True``: continue from TRL's checkpoint with a
            fresh estimator, branch RNG and ledgers (the logged budget then restarts at 0).

    Mixture-of-experts models: ``router_aux_loss_coef`` (TRL's; None = the model config's value,
    >= 0) weights the router's load-balancing loss, added to the core's loss as TRL adds it (its mean
    over the micro-batches and processes of a step), and logged as ``router_aux_loss``; 0 turns it off.

    Logging: with ``logging_steps`` > 1 the running totals (``rollouts_main``, ``rollouts_aux``,
    ``tokens_main``, ``tokens_aux``, ``rollouts``, ``tokens``) and the estimator's ``est_*``
    coefficients are logged at their latest value; every other column (``step_*``, ``pivots``,
    losses, ...) is the mean per step over the steps since the previous log line, as in TRL.
    """

    strategy: str = field(default=_EXPLORE.strategy, metadata={"help": "Branching strategy (deep = DEEP-GRPO)."})
    K: int = field(default=_EXPLORE.K, metadata={"help": "Continuations per pivot (paper: 8)."})
    gamma: float = field(default=_EXPLORE.gamma, metadata={"help": "Depth exponent γ of the pivot utility."})
    n_pivots: int = field(default=_EXPLORE.n_pivots, metadata={"help": "Pivots per failed completion."})
    n_cut_points: int = field(default=_EXPLORE.n_cut_points,
                              metadata={"help": "Cut points per failed completion (dispersed baselines)."})
    aux_budget: int | None = field(default=_EXPLORE.aux_budget,
                                   metadata={"help": "Cap on branch continuations per prompt (None = no cap)."})
    failure_threshold: float = field(default=_EXPLORE.failure_threshold,
                                     metadata={"help": "Reward <= this counts as failed."})
    segmenter: str = field(default="line", metadata={"help": "Step segmenter: line, sentence, step or fixed."})
    segment_size: int = field(default=16, metadata={"help": "Tokens per segment of the fixed segmenter."})
    segment_min_tokens: int = field(default=1, metadata={"help": "Minimum tokens per text segment."})
    estimator: str = field(default=_ESTIMATOR.kind,
                           metadata={"help": "Recoverability estimator: position, state or selector."})
    estimator_buffer_size: int = field(default=_ESTIMATOR.buffer_size, metadata={"help": "Estimator FIFO size."})
    estimator_min_per_class: int = field(default=_ESTIMATOR.min_per_class,
                                         metadata={"help": "Points per class before the estimator is fitted."})
    lam: float = field(default=_LOSS.lam, metadata={"help": "λ, weight of the aux (branch) stream."})
    dual_clip: float | None = field(default=_LOSS.dual_clip, metadata={"help": "Dual-clip constant c (None = off)."})
    kl_weighted_by_lambda: bool = field(default=_LOSS.kl_weighted_by_lambda,
                                        metadata={"help": "Multiply the aux stream's KL by λ."})
    drop_zero_advantage: bool = field(default=_ADVANTAGE.drop_zero,
                                      metadata={"help": "Drop rows whose advantage is ~0."})
    G: int | None = field(default=None, metadata={"help": "The paper's G; must equal num_generations if set."})
    # TRL fields whose defaults change to the paper's
    beta: float = field(default=_LOSS.kl_coef, metadata={"help": "KL coefficient β (k3 estimator)."})
    scale_rewards: str = field(default="none", metadata={"help": "Advantage std scaling: none or group."})
    resume_without_deep_state: bool = field(
        default=False, metadata={"help": "Resume from a checkpoint without a DEEP-GRPO state file with a fresh "
                                         "estimator, branch RNG and budget ledgers (default: refuse it)."})

    def __post_init__(self) -> None:
        if self.generation_batch_size is None:  # checked before TRL's own, less specific check of the same
            self._check_whole_groups(self.steps_per_generation or self.gradient_accumulation_steps)
        super().__post_init__()
        o = "DeepGRPOConfig"
        check_choice(o, "segmenter", self.segmenter, SEGMENTERS)
        check_range(o, "segment_size", self.segment_size, 1, None, integer=True)
        check_range(o, "segment_min_tokens", self.segment_min_tokens, 1, None, integer=True)
        if self.G is not None and self.G != self.num_generations:
            raise ConfigError(f"{o}.G = {self.G!r} is invalid: expected num_generations = {self.num_generations} "
                              "(TRL's name for G; set one of them)", owner=o, field="G", value=self.G)
        check_choice(o, "loss_type", self.loss_type, LOSS_TYPE_AGGREGATION)
        check_choice(o, "scale_rewards", self.scale_rewards, ("none", "group"))
        check_choice(o, "multi_objective_aggregation", self.multi_objective_aggregation, ("sum_then_normalize",))
        check_choice(o, "importance_sampling_level", self.importance_sampling_level, ("token",))
        unsupported = {  # option -> (value that is supported, why others are not)
            "top_entropy_quantile": (1.0, "the core's loss trains every trainable token"),
            "off_policy_mask_threshold": (None, "the core's loss has no off-policy mask"),
            "delta": (None, "two-sided clipping is not the core's; use dual_clip"),
            "entropy_coef": (0.0, "the core's loss has no entropy bonus"),
            "use_adaptive_entropy": (False, "the core's loss has no entropy bonus"),
            "mask_truncated_completions": (False, "truncated completions get reward 0 in the core, not a mask"),
            "vllm_enable_sleep_mode": (False, "branches are generated after the main chains in the same step"),
        }
        for name, (ok, why) in unsupported.items():
            value = getattr(self, name, ok)
            if value != ok:
                raise ConfigError(f"{o}.{name} = {value!r} is not supported by DeepGRPOTrainer: expected {ok!r} "
                                  f"({why})", owner=o, field=name, value=value)
        if self.use_vllm and self.vllm_mode != "colocate":
            raise ConfigError(f"{o}.vllm_mode = {self.vllm_mode!r} is not supported by DeepGRPOTrainer: expected "
                              "'colocate' (the vLLM server generates num_generations per gathered prompt and cannot "
                              "serve per-process branch counts)", owner=o, field="vllm_mode", value=self.vllm_mode)
        if self.use_vllm and self.vllm_tensor_parallel_size != 1:
            raise ConfigError(f"{o}.vllm_tensor_parallel_size = {self.vllm_tensor_parallel_size!r} is not supported "
                              "by DeepGRPOTrainer: expected 1 (a tensor-parallel group assumes equal prompt counts "
                              "on its processes; branch counts differ)", owner=o,
                              field="vllm_tensor_parallel_size", value=self.vllm_tensor_parallel_size)
        if (self.use_vllm and self.vllm_importance_sampling_correction
                and self.vllm_importance_sampling_mode != "token_truncate"):
            raise ConfigError(f"{o}.vllm_importance_sampling_mode = {self.vllm_importance_sampling_mode!r} is not "
                              "supported by DeepGRPOTrainer: expected 'token_truncate' (the core's truncated "
                              "importance sampling, capped at vllm_importance_sampling_clip_max), or set "
                              "vllm_importance_sampling_correction=False", owner=o,
                              field="vllm_importance_sampling_mode", value=self.vllm_importance_sampling_mode)
        if self.steps_per_generation != self.gradient_accumulation_steps:
            raise ConfigError(f"{o}.steps_per_generation = {self.steps_per_generation!r} is not supported by "
                              f"DeepGRPOTrainer: expected gradient_accumulation_steps = "
                              f"{self.gradient_accumulation_steps} (one optimizer step per generation batch: the "
                              "loss denominators are those of the whole generation batch)", owner=o,
                              field="steps_per_generation", value=self.steps_per_generation)
        self._check_whole_groups(self.steps_per_generation)
        if self.eval_strategy != "no":
            raise ConfigError(f"{o}.eval_strategy = {self.eval_strategy!r} is not supported by DeepGRPOTrainer: "
                              "expected 'no' (evaluate checkpoints with `deepgrpo llm eval`)", owner=o,
                              field="eval_strategy", value=self.eval_strategy)
        if self.router_aux_loss_coef is not None:
            check_range(o, "router_aux_loss_coef", self.router_aux_loss_coef, 0.0, None)
        if self.estimator == "selector":  # its next_entropy feature models temperature and top_p only
            _check_entropy_sampling(self)
        try:
            self.algo_config()  # the core's validation and messages
        except ConfigError as e:
            option = CORE_FIELD_OPTIONS.get((e.owner or "", e.field or ""))
            if option is None or e.allowed is None:
                raise
            raise invalid(o, option, getattr(self, option), e.allowed) from None

    def _check_whole_groups(self, steps_per_generation: int) -> None:
        """Each process's generation batch must be whole groups of G (``num_generations``) rows."""
        rows = self.per_device_train_batch_size * steps_per_generation
        if isinstance(self.num_generations, int) and self.num_generations > 0 and rows % self.num_generations:
            o = "DeepGRPOConfig"
            raise ConfigError(f"{o}.per_device_train_batch_size = {self.per_device_train_batch_size!r} is invalid: "
                              f"per_device_train_batch_size x steps_per_generation = {rows} must be a multiple of "
                              f"num_generations = {self.num_generations} (each process must hold whole groups to "
                              "branch from its own failed completions)", owner=o,
                              field="per_device_train_batch_size", value=self.per_device_train_batch_size)

    def algo_config(self) -> AlgoConfig:
        """The core's :class:`~deepgrpo.config.AlgoConfig` of these settings (validates them)."""
        tis_cap = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            tis_cap = self.vllm_importance_sampling_clip_max
        aggregation = LOSS_TYPE_AGGREGATION[self.loss_type]
        norm_length = self.max_completion_length if aggregation == "seq-mean-token-sum-norm" else None
        return AlgoConfig(
            explore=ExploreConfig(G=self.num_generations, K=self.K, strategy=self.strategy, gamma=self.gamma,
                                  n_pivots=self.n_pivots, n_cut_points=self.n_cut_points,
                                  aux_budget=self.aux_budget, failure_threshold=self.failure_threshold),
            advantage=AdvantageConfig(scale_std=self.scale_rewards == "group", drop_zero=self.drop_zero_advantage),
            loss=LossConfig(clip_low=self.epsilon,
                            clip_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
                            dual_clip=self.dual_clip, lam=self.lam, aggregation=aggregation,
                            norm_length=norm_length,
                            kl_coef=self.beta, kl_weighted_by_lambda=self.kl_weighted_by_lambda, tis_cap=tis_cap),
            estimator=EstimatorConfig(kind=self.estimator, buffer_size=self.estimator_buffer_size,
                                      min_per_class=self.estimator_min_per_class),
        )


LOGPROB_FEATURES = ("prefix_logprob", "prefix_mean_logprob", "next_surprisal", "prev_surprisal")
"""Candidate features computed from the main completions' sampling log-probs."""

ENTROPY_SAMPLING_DEFAULTS = {"top_k": (0, None, -1), "min_p": (None, 0.0), "repetition_penalty": (1.0,)}
"""Sampling options under which the entropy the trainer computes (temperature and top_p) is that
of the distribution completions are drawn from: option -> values that leave it unchanged."""


def _check_entropy_sampling(args: DeepGRPOConfig) -> None:
    """Refuse sampling options that :meth:`DeepGRPOTrainer._next_entropies` does not model (the
    candidate feature ``next_entropy`` would not be the sampling distribution's entropy)."""
    o = "DeepGRPOConfig"
    extra = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else {}
    for name, ok in ENTROPY_SAMPLING_DEFAULTS.items():
        value = extra.get(name, getattr(args, name, ok[0]))
        if value not in ok:
            raise ConfigError(f"{o}.{name} = {value!r} is not supported with estimator = {args.estimator!r}: expected "
                              f"{ok[0]!r} (the candidate feature next_entropy is the entropy of the sampling "
                              "distribution, computed from temperature and top_p only)", owner=o, field=name,
                              value=value, allowed=repr(ok[0]))
    for name in ("temperature", "top_p"):
        if name in extra and extra[name] != getattr(args, name):
            raise ConfigError(f"{o}.generation_kwargs sets {name} = {extra[name]!r}, not the option {name} = "
                              f"{getattr(args, name)!r}: the candidate feature next_entropy is computed from the "
                              "options; set the option instead", owner=o, field="generation_kwargs")


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily set ``obj.name = value``."""
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


def _right_pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` from B lists (T = the longest), right-padded with ``value``."""
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=dtype)
    for b, r in enumerate(rows):
        if len(r):
            out[b, :len(r)] = torch.tensor(list(r), dtype=dtype)
    return out


class DeepGRPOTrainer(GRPOTrainer):
    """DEEP-GRPO with TRL's machinery (see the module docstring).

    Takes ``GRPOTrainer``'s arguments with ``args`` a :class:`DeepGRPOConfig`, plus:

    Args:
        estimator: the recoverability estimator (default: the core's ``make_estimator`` of
            ``args.estimator``); wrapped so that every process learns from every process's
            branches. Its state is ``trainer.estimator.state_dict()``.

    Reward functions must be Python callables (sync or async) taking TRL's reward arguments;
    they score main completions and branches (prefix + suffix) alike. Reward *models*, tools,
    environments and ``rollout_func`` are rejected.

    After each generation, ``trainer.last_exploration`` holds this process's
    :class:`~deepgrpo.explore.ExploreResult` (main and branch rollouts, candidates, plan, batch).
    """

    _tag_names = ["trl", "grpo", "deep-grpo"]
    _name = "DEEP-GRPO"

    def __init__(self, model: Any, reward_funcs: Any = None, args: DeepGRPOConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: Any = None,
                 optimizers: tuple = (None, None), quantization_config: Any = None, peft_config: Any = None,
                 estimator: Any = None, **unsupported: Any) -> None:
        if args is None:
            raise ConfigError("DeepGRPOTrainer.args = None is invalid: expected a DeepGRPOConfig", field="args")
        if not isinstance(args, DeepGRPOConfig):
            raise ConfigError(f"DeepGRPOTrainer.args = {type(args).__name__} is invalid: expected a DeepGRPOConfig",
                              field="args", value=args)
        for name, value in unsupported.items():
            if value is not None:
                raise ConfigError(f"DeepGRPOTrainer.{name} is not supported: DEEP-GRPO branches single-turn "
                                  "completions generated by the trainer itself", field=name)
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        for f in funcs:
            if f is None or isinstance(f, (str, torch.nn.Module)) or not callable(f):
                raise ConfigError(f"DeepGRPOTrainer.reward_funcs = {f!r} is not supported: expected Python callables "
                                  "(reward models would run different numbers of forward passes per process)",
                                  field="reward_funcs", value=f)
        if eval_dataset is not None:
            raise ConfigError("DeepGRPOTrainer.eval_dataset is not supported: evaluate checkpoints separately",
                              field="eval_dataset")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                         callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
                         peft_config=peft_config)
        if getattr(self._tokenizer, "padding_side", "left") != "left":
            self._tokenizer.padding_side = "left"
        self.algo = args.algo_config()
        self.segmenter = make_segmenter(args.segmenter, self._tokenizer, args.segment_size, args.segment_min_tokens)
        self.estimator = GatheredEstimator(estimator if estimator is not None else make_estimator(self.algo.estimator))
        if self._needs_next_entropy():
            _check_entropy_sampling(args)
        self.branch_rng = np.random.default_rng([int(args.seed), int(self.accelerator.process_index)])
        self.ledger = BudgetLedger()  # this process's budget
        self._global_ledger = BudgetLedger()  # all processes' (logged)
        self.last_exploration: ExploreResult | None = None
        self._main_rewards_per_func: torch.Tensor | None = None
        # LOSS_COLUMNS, clipped tokens, dual-clipped tokens, trainable tokens, router loss
        self._loss_sums = torch.zeros(len(LOSS_COLUMNS) + 4, dtype=torch.float64)
        self._micro_steps = 0

    # -- TRL hooks ---------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's reward computation for the main completions (gathered ``[B_global, F]``), kept
        so that the core sees the same rewards TRL logs."""
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._main_rewards_per_func = per_func
        return per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Main chains by TRL, then the core's exploration step; returns the loss-ready rows of
        this process (padded, see the module docstring) as a dict of tensors."""
        if not self.model.training:
            raise ConfigError("DeepGRPOTrainer does not evaluate (eval_strategy must be 'no')", field="eval_strategy")
        ec = self.algo.explore
        G = ec.G
        # 1. main chains, scored by TRL (its reference pass is skipped: done below for all rows)
        with _attribute(self, "beta", 0.0):
            out = super()._generate_and_score_completions(inputs)
        device = self.accelerator.device
        prompt_ids, prompt_mask = out["prompt_ids"].cpu(), out["prompt_mask"].cpu()  # [Bm, Lp]
        completion_ids, completion_mask = out["completion_ids"].cpu(), out["completion_mask"].cpu()  # [Bm, Tm]
        Bm = prompt_ids.shape[0]
        P = Bm // G
        rewards = self._local_main_rewards(Bm)  # [Bm]
        sampling_lp = out.get("sampling_per_token_logps")
        entropies = None
        if self._needs_next_entropy():  # the selector's candidate feature next_entropy
            lp, entropies = self._next_entropies(prompt_ids, prompt_mask, completion_ids, completion_mask,
                                                 with_logps=sampling_lp is None and self._needs_logprob_features())
            if lp is not None:
                sampling_lp = lp
        elif sampling_lp is None and self._needs_logprob_features():
            sampling_lp = self._logps(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        main = self._main_rollouts(completion_ids, completion_mask.bool(), rewards,
                                   None if sampling_lp is None else sampling_lp.cpu().float(), entropies)
        # 2. failed set, candidates, P̂ and the branching plan: the core's
        planned = plan_exploration(main, P, self.algo, self.estimator, self.branch_rng)
        # 3. branches through TRL's generation call (every process calls it: collective under ZeRO-3/FSDP)
        prompt_lists = [prompt_ids[b][prompt_mask[b].bool()].tolist() for b in range(Bm)]
        aux = self._generate_branches(inputs, prompt_lists, main, planned.plan)
        # 4. labels to the estimator, the loss-ready batch with its advantages, budget and stats: the core's
        self.last_exploration = finish_exploration(list(range(P)), main, aux, planned, self.algo, self.estimator,
                                                   self.ledger)
        batch = self.last_exploration.batch
        self._log_exploration(explore_columns(self.last_exploration))
        # 5. rows for TRL: padded to the same multiple of steps_per_generation on every process
        return self._loss_inputs(batch, prompt_ids, prompt_mask, device)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The core's dual-stream loss of one micro-batch (global per-stream denominators), plus
        the weighted router load-balancing loss of a mixture-of-experts model if it is enabled."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        W = inputs["completion_ids"].shape[1]
        lp, _, router_loss = self._get_per_token_logps_and_entropies(  # lp: [b, W]; router_loss: 0-dim or None
            model, ids, attn, W, compute_aux_loss=self.aux_loss_enabled)
        batch = batch_from_inputs(inputs, lp)
        den = {MAIN: float(inputs["den_main"]), AUX: float(inputs["den_aux"])}
        out = dual_stream_loss(batch, lp, inputs.get("ref_per_token_logps"), self.algo.loss, den)
        self._accumulate_loss_metrics(out.metrics, None if router_loss is None else float(router_loss.detach()))
        # DDP/ZeRO/FSDP average gradients over processes; the global loss is their sum
        loss = out.loss * self.accelerator.num_processes
        if router_loss is not None:
            # as TRL adds it: the mean over the micro-batches of the step (and, by the gradient
            # average, over processes); padding rows' prompt tokens count in the router statistics
            loss = loss + self.router_aux_loss_coef * router_loss / self.args.gradient_accumulation_steps
        return loss

    # -- exploration pieces ------------------------------------------------------------------------
    def _estimator_features(self) -> tuple[str, ...]:
        """The candidate features the estimator reads (its ``feature_names``; none if it has none)."""
        return tuple(getattr(self.estimator.inner, "feature_names", ()))

    def _needs_logprob_features(self) -> bool:
        """Whether candidate features need the main completions' sampling log-probs."""
        return (self.algo.explore.strategy in ("max-surprisal", "low-prob") or self.algo.estimator.kind == "state"
                or bool(set(self._estimator_features()) & set(LOGPROB_FEATURES)))

    def _needs_next_entropy(self) -> bool:
        """Whether the estimator reads the candidate feature ``next_entropy`` (the selector)."""
        return "next_entropy" in self._estimator_features()

    def _next_entropies(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, with_logps: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The main completions' per-token entropy of the sampling distribution ``[B, T]`` (float32,
        0 at masked positions) and, with ``with_logps``, their log-probs ``[B, T]`` (TRL's
        :meth:`_get_per_token_logps_and_entropies`, at the sampling temperature), from no-grad
        forward passes of the policy over prompt + completion in chunks of
        ``per_device_train_batch_size`` rows (the same number on every process).

        With ``top_p = 1`` the sampling distribution is softmax(logits / temperature), whose
        entropy TRL's fused LM head returns beside the log-probs (one pass, no ``[B, T, V]``
        logits); with ``top_p < 1`` the logits of each chunk go through
        :func:`llm.engine.sampling_log_probs` (the nucleus renormalised, as the HF engine samples).
        """
        from llm.engine import distribution_entropy, sampling_log_probs
        dev = self.accelerator.device
        T = completion_ids.shape[1]
        mask = completion_mask.bool()
        ids = torch.cat([prompt_ids, completion_ids], dim=1).to(dev)
        attn = torch.cat([prompt_mask, completion_mask.long()], dim=1).to(dev)
        rows = self.args.per_device_train_batch_size
        lp = None
        with torch.no_grad():
            if self.top_p >= 1.0:
                lp, ent, _ = self._get_per_token_logps_and_entropies(self.model, ids, attn, T, batch_size=rows,
                                                                     compute_entropy=True)
            else:
                parts = []
                for s in range(0, ids.shape[0], rows):
                    with self.accelerator.autocast():
                        logits = self.model(input_ids=ids[s:s + rows], attention_mask=attn[s:s + rows]).logits
                    logp = sampling_log_probs(logits[:, -T - 1:-1], self.temperature, self.top_p)  # [b, T, V]
                    parts.append(distribution_entropy(logp))
                ent = torch.cat(parts)
                if with_logps:
                    lp = self._logps(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        ent = torch.where(mask, ent.float().cpu(), 0.0)  # [B, T]
        return (lp if with_logps else None), ent

    def _local_main_rewards(self, Bm: int) -> torch.Tensor:
        """``[Bm]`` weighted reward sum of this process's main completions (unscorable -> 0)."""
        per_func = self._main_rewards_per_func
        if per_func is None:
            raise RuntimeError("TRL did not compute the main completions' rewards")
        start = self.accelerator.process_index * Bm
        local = per_func[start:start + Bm].float().cpu()  # [Bm, F]
        return (local * self.reward_weights.float().cpu().unsqueeze(0)).nansum(dim=1)

    def _main_rollouts(self, completion_ids: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                       logprobs: torch.Tensor | None, entropies: torch.Tensor | None = None) -> Rollouts:
        """The core's view of TRL's main completions (tokens ``[Bm, Tm]`` incl. EOS, right-padded);
        ``entropies`` ``[Bm, Tm]`` (of the sampling distribution of each token) become the
        candidate feature ``next_entropy`` (extra ``cand_next_entropy`` ``[Bm, Tm+1]``, 0 at and
        after each row's end)."""
        lengths = mask.sum(-1).tolist()
        eos = set(self.eos_token_ids)
        ends = [self.segmenter(completion_ids[b, :n].tolist()) for b, n in enumerate(lengths)]
        truncated = torch.tensor([n == 0 or int(completion_ids[b, n - 1]) not in eos for b, n in enumerate(lengths)])
        lp = torch.zeros(mask.shape) if logprobs is None else torch.where(mask, torch.nan_to_num(logprobs), 0.0)
        tokens = torch.where(mask, completion_ids, torch.zeros_like(completion_ids))
        extras = {}
        if entropies is not None:
            ent = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.float64)  # [Bm, Tm+1]
            ent[:, :-1] = torch.where(mask, entropies.double(), 0.0)
            extras["cand_next_entropy"] = ent
        return Rollouts(tokens=tokens, logprobs=lp, mask=mask, rewards=rewards.float(), segment_ends=ends,
                        truncated=truncated, extras=extras)

    def _generate_branches(self, inputs: list[dict[str, Any]], prompt_lists: list[list[int]], main: Rollouts,
                           plan: BranchPlan) -> Rollouts | None:
        """K continuations (``plan.n[j]``) of each plan point's exact prompt + prefix ids, via
        ``_generate_single_turn``; rewarded on prefix + suffix. Every process calls the generator
        when any process branches (a one-row dummy if it has none), as sharded models require."""
        owners = [j for j in range(len(plan)) for _ in range(int(plan.n[j]))]
        any_branch = self.accelerator.reduce(torch.tensor([float(len(owners))], device=self.accelerator.device),
                                             reduction="sum").item() > 0
        if not any_branch:
            return None
        cap = self.max_completion_length
        prefixes = [main.tokens[int(plan.traj[j]), :int(plan.prefix_len[j])].tolist() for j in owners]
        rows = [prompt_lists[int(plan.traj[j])] + pf for j, pf in zip(owners, prefixes)]
        budget = [cap - len(pf) for pf in prefixes]
        if not rows:  # a dummy generation keeps collective calls aligned; its output is discarded
            rows, budget = [prompt_lists[0]], [1]
        new_tokens = max(budget)
        with self._max_new_tokens(new_tokens):
            suffixes, logprobs = self._generate_single_turn(rows, None, {}, 1)
        if not owners:
            return None
        eos = set(self.eos_token_ids)
        suffixes = [list(s)[:n] for s, n in zip(suffixes, budget)]
        if logprobs is not None:
            logprobs = [[float("nan") if x is None else float(x) for x in lp][:len(s)]
                        for lp, s in zip(logprobs, suffixes)]
        truncated = torch.tensor([len(s) == 0 or int(s[-1]) not in eos for s in suffixes])
        full = [pf + s for pf, s in zip(prefixes, suffixes)]
        parent = [int(plan.traj[j]) for j in owners]
        rewards = self._score([inputs[b] for b in parent], full)
        tokens = _right_pad(suffixes, 0, torch.long)  # [A, S]
        mask = _right_pad([[1] * len(s) for s in suffixes], 0, torch.long).bool()  # [A, S]
        lp = torch.zeros(tokens.shape) if logprobs is None else _right_pad(logprobs, 0.0, torch.float32)
        return Rollouts(tokens=tokens, logprobs=torch.nan_to_num(lp), mask=mask, rewards=rewards,
                        segment_ends=[self.segmenter(f) for f in full], truncated=truncated)

    @contextlib.contextmanager
    def _max_new_tokens(self, n: int) -> Iterator[None]:
        """Generate at most ``n`` tokens in the calls made inside (transformers and vLLM paths)."""
        with contextlib.ExitStack() as stack:
            if self.use_vllm:
                stack.enter_context(_attribute(self.vllm_generation, "max_completion_length", n))
            else:
                stack.enter_context(_attribute(self.generation_config, "max_new_tokens", n))
                kwargs = dict(self.generation_kwargs, max_new_tokens=n)
                stack.enter_context(_attribute(self, "generation_kwargs", kwargs))
            yield

    def _score(self, rows: list[dict[str, Any]], completion_ids: list[list[int]]) -> torch.Tensor:
        """``[A]`` weighted reward sum of completions (token ids of prefix + suffix) of the prompts
        of dataset ``rows``, computed on this process only (unscorable -> 0)."""
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [x["prompt"] for x in rows]
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")]
        kwargs: dict[str, Any] = {k: [x[k] for x in rows] for k in keys}
        kwargs.update(trainer_state=self.state, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        per_func = torch.zeros(len(rows), len(self.reward_funcs))  # [A, F]
        for i, func in enumerate(self.reward_funcs):
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            if inspect.isawaitable(values):
                loop = getattr(self, "async_loop", None)
                values = (asyncio.run_coroutine_threadsafe(values, loop).result() if loop is not None
                          else asyncio.run(values))
            if len(values) != len(rows):
                raise ValueError(f"reward function {self.reward_func_names[i]!r} returned {len(values)} rewards for "
                                 f"{len(rows)} branch completions")
            per_func[:, i] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        return (per_func * self.reward_weights.float().cpu().unsqueeze(0)).nansum(dim=1)

    # -- loss-ready rows -----------------------------------------------------------------------------
    def _logps(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
               completion_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` per-token log-probs of the completions (no gradient), in TRL's chunks."""
        dev = self.accelerator.device
        ids = torch.cat([prompt_ids, completion_ids], dim=1).to(dev)
        attn = torch.cat([prompt_mask, completion_mask.long()], dim=1).to(dev)
        with torch.no_grad():
            lp, _, _ = self._get_per_token_logps_and_entropies(
                model, ids, attn, completion_ids.shape[1], batch_size=self.args.per_device_train_batch_size)
        return lp

    def _reference_logps(self, *tensors: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` reference log-probs (a separate model, or the PEFT model with the adapter off)."""
        if self.ref_model is not None:
            return self._logps(self.ref_model, *tensors)
        from trl.trainer.utils import use_adapter
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            return self._logps(self.model, *tensors)

    def _loss_inputs(self, batch: Batch, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     device: torch.device) -> dict[str, Any]:
        """This process's rows as TRL-style tensors, padded with loss-free rows to R rows (the
        largest row count over processes, rounded up to a multiple of ``steps_per_generation``)."""
        G = self.algo.explore.G
        spg = self.args.steps_per_generation
        n = len(batch)
        n_max = int(self.accelerator.reduce(torch.tensor([float(n)], device=device), reduction="max").item())
        R = max(spg, -(-n_max // spg) * spg)
        den = loss_denominators(batch, self.algo.loss, floor=False)  # raw: summed over processes, then floored
        den_global = self.accelerator.reduce(torch.tensor([den[MAIN], den[AUX]], dtype=torch.float64,
                                                          device=device), reduction="sum").cpu().clamp(min=1.0)
        pad = R - n
        W = batch.tokens.shape[1]
        src = (batch.prompt_index * G).long()  # [n] a main row of the row's prompt
        src = torch.cat([src, torch.zeros(pad, dtype=torch.long)])  # [R]
        response = torch.cat([batch.response_mask, torch.zeros(pad, W, dtype=torch.bool)])  # [R, W]
        tokens = torch.cat([batch.tokens, torch.zeros(pad, W, dtype=torch.long)])
        tokens = torch.where(response, tokens, torch.full_like(tokens, int(self._tokenizer.pad_token_id)))
        out: dict[str, Any] = {
            "prompt_ids": prompt_ids[src],  # [R, Lp]
            "prompt_mask": prompt_mask[src],
            "completion_ids": tokens,  # [R, W]
            "completion_mask": response.long(),
            "trainable_mask": torch.cat([batch.trainable_mask, torch.zeros(pad, W, dtype=torch.bool)]),
            "stream": torch.cat([batch.stream, torch.full((pad,), MAIN, dtype=torch.long)]),  # [R]
            "group": torch.cat([batch.group, torch.full((pad,), -1, dtype=torch.long)]),
            "advantages": torch.cat([batch.advantages.float(), torch.zeros(pad)]),
            "rewards": torch.cat([batch.rewards.float(), torch.zeros(pad)]),
            "prefix_len": torch.cat([batch.prefix_len, torch.zeros(pad, dtype=torch.long)]),
            "pivot_depth": torch.cat([batch.pivot_depth, torch.zeros(pad)]),
            "prompt_index": torch.cat([batch.prompt_index, torch.full((pad,), -1, dtype=torch.long)]),
            "row": torch.cat([batch.extras["row"].long(), torch.full((pad,), -1, dtype=torch.long)]),
        }
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.algo.loss.tis_cap is not None or self.use_vllm:
            # rollout-engine log-probs: the ratio's denominator (or the TIS weight's)
            out["old_per_token_logps"] = torch.cat([batch.old_logprobs, torch.zeros(pad, W)])
        elif self.args.gradient_accumulation_steps % generate_every:
            # generations reused over several optimizer steps: freeze today's log-probs
            out["old_per_token_logps"] = self._logps(self.model, out["prompt_ids"], out["prompt_mask"],
                                                     out["completion_ids"], out["completion_mask"]).cpu()
        if self.algo.loss.kl_coef > 0:
            out["ref_per_token_logps"] = self._reference_logps(out["prompt_ids"], out["prompt_mask"],
                                                               out["completion_ids"], out["completion_mask"]).cpu()
        out = {k: v.to(device) for k, v in out.items()}
        out["den_main"] = den_global[0].clone()  # 0-dim: kept whole by TRL's split
        out["den_aux"] = den_global[1].clone()
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    STATE_FILE = STATE_FILE  # the module's name of the per-process state file, kept as a class attribute too

    def deep_state(self) -> dict[str, Any]:
        """What a resumed run needs besides TRL's own checkpoint (JSON-ready)."""
        return {"estimator": self.estimator.state_dict(), "branch_rng": self.branch_rng.bit_generator.state,
                "ledger": [vars(s) for s in self.ledger.steps],
                "global_ledger": [vars(s) for s in self._global_ledger.steps]}

    def load_deep_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`deep_state`."""
        from deepgrpo.ledger import StepBudget
        self.estimator.load_state_dict(state["estimator"])
        self.branch_rng.bit_generator.state = state["branch_rng"]
        self.ledger.steps = [StepBudget(**s) for s in state["ledger"]]
        self._global_ledger.steps = [StepBudget(**s) for s in state["global_ledger"]]

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """TRL's ``train``. ``resume_from_checkpoint=True`` resumes from the newest *complete*
        checkpoint of ``output_dir`` (a save cut short by a kill or a full disk is skipped); a
        checkpoint without this process's DEEP-GRPO state file is refused unless
        ``args.resume_without_deep_state`` (see :class:`DeepGRPOConfig`)."""
        checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _checkpoint_to_resume(self, requested: str | bool | None) -> str | None:
        """The checkpoint directory ``train`` resumes from (None: a new run), checked complete."""
        if requested is None or requested is False:
            return None
        rank = self.accelerator.process_index
        with_state = not self.args.resume_without_deep_state
        if requested is True:
            found = last_complete_checkpoint(self.args.output_dir, rank, with_state)
            step = -1 if found is None else checkpoint_step(found)
            # every process resumes from the same step: the oldest of the processes' newest
            step = -int(self.accelerator.reduce(torch.tensor([-step], device=self.accelerator.device),
                                                reduction="max").item())
            if step < 0:
                raise ConfigError(f"resume_from_checkpoint = True is invalid: {self.args.output_dir!r} holds no "
                                  f"complete checkpoint ({PREFIX_CHECKPOINT_DIR}-N with {TRAINER_STATE_FILE}"
                                  + (f" and {STATE_FILE.format(rank=rank)}" if with_state else "")
                                  + "); start without it", field="resume_from_checkpoint", value=True)
            requested = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        check_checkpoint(requested, rank, with_state)
        return str(requested)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """TRL's checkpoint, with every process's DEEP-GRPO state written *before* it: TRL writes
        ``trainer_state.json`` last, so a checkpoint that has it has the state files too, and a
        save cut short (kill, full disk) has no ``trainer_state.json`` and is never resumed from."""
        from deepgrpo.records import failpoint, write_json_atomic
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # an older save of this step must not look complete while this one is written
            (folder / TRAINER_STATE_FILE).unlink(missing_ok=True)
        write_json_atomic(folder / STATE_FILE.format(rank=self.accelerator.process_index), self.deep_state())
        failpoint("trl-checkpoint-state-written")
        self.accelerator.wait_for_everyone()  # all state files are on disk before TRL's last file
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """TRL's, then this process's DEEP-GRPO state (JSON; never unpickled)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        rank = self.accelerator.process_index
        path = Path(checkpoint) / STATE_FILE.format(rank=rank)
        if not path.is_file():
            check_checkpoint(checkpoint, rank, not self.args.resume_without_deep_state)  # raises if it must
            warnings.warn(f"{str(path)!r} does not exist: continuing with a fresh estimator, branch RNG and budget "
                          "ledgers (resume_without_deep_state=True)", stacklevel=2)
            return
        state = read_deep_state(path)
        try:
            self.load_deep_state(state)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"resume_from_checkpoint = {str(checkpoint)!r} is invalid: {str(path)!r} is not a "
                              f"DEEP-GRPO state of this configuration ({type(e).__name__}: {e})",
                              field="resume_from_checkpoint", value=str(checkpoint)) from None

    # -- logging -------------------------------------------------------------------------------------
    def _log_exploration(self, local: dict[str, float]) -> None:
        """Log the core's exploration columns over all processes (sums, or weighted means)."""
        means = list(STREAM_MEAN_COLUMNS)
        vals = [local[k] for k in STREAM_SUM_COLUMNS]
        for k in means:
            w = local[STREAM_MEAN_COLUMNS[k]]
            v = local[k]
            vals += [0.0 if (w == 0 or v != v) else v * w]
        t = self.accelerator.reduce(torch.tensor(vals, dtype=torch.float64, device=self.accelerator.device),
                                    reduction="sum").cpu().tolist()
        total = dict(zip(STREAM_SUM_COLUMNS, t))
        row = dict(total)
        for k, s in zip(means, t[len(STREAM_SUM_COLUMNS):]):
            w = total[STREAM_MEAN_COLUMNS[k]]
            row[k] = s / w if w else float("nan")
        # cumulative budget of the run (all processes)
        self._global_ledger.record(0, int(total["step_rollouts_main"]), int(total["step_rollouts_aux"]),
                                   int(total["step_tokens_main"]), int(total["step_tokens_aux"]))
        for k, v in self._global_ledger.totals().items():
            if k != "prompts":
                row[k] = float(v)
        inner = self.estimator.inner
        if hasattr(inner, "coefficients"):
            row.update({f"est_{k}": float(v) for k, v in inner.coefficients().items()})
        for k, v in row.items():
            self._metrics["train"][k].append(float(v))

    def _accumulate_loss_metrics(self, metrics: dict[str, float], router_loss: float | None = None) -> None:
        """Sum loss parts and clip counts over the micro-batches of an optimizer step; log the
        global values (summed over processes) at its last micro-batch. ``router_loss``: the
        micro-batch's unweighted MoE load-balancing loss (logged as its mean over the step)."""
        n = metrics["trainable_tokens_main"] + metrics["trainable_tokens_aux"]
        self._loss_sums += torch.tensor([metrics[k] for k in LOSS_COLUMNS]
                                        + [metrics["clip_fraction"] * n, metrics["dual_clip_fraction"] * n, n,
                                           router_loss or 0.0], dtype=torch.float64)
        self._micro_steps += 1
        if self._micro_steps % self.args.gradient_accumulation_steps:
            return
        t = self.accelerator.reduce(self._loss_sums.to(self.accelerator.device), reduction="sum").cpu().tolist()
        self._loss_sums.zero_()
        for k, v in zip(LOSS_COLUMNS, t):
            self._metrics["train"][k].append(v)
        clipped, dual_clipped, tokens, router = t[len(LOSS_COLUMNS):]
        tokens = max(tokens, 1.0)
        self._metrics["train"]["clip_fraction"].append(clipped / tokens)
        self._metrics["train"]["dual_clip_fraction"].append(dual_clipped / tokens)
        if router_loss is not None:
            micro_batches = self.args.gradient_accumulation_steps * self.accelerator.num_processes
            self._metrics["train"]["router_aux_loss"].append(router / micro_batches)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, except that running totals (:data:`CUMULATIVE_COLUMNS`) and the estimator's
        coefficients are logged at their latest value instead of their mean over the window."""
        for key, values in self._metrics["train"].items():
            if values and (key in CUMULATIVE_COLUMNS or key.startswith(LATEST_PREFIXES)):
                del values[:-1]
        super().log(logs, start_time)


# -- checkpoints on disk ----------------------------------------------------------------------------------

def checkpoint_step(path: str | os.PathLike) -> int:
    """N of a ``checkpoint-N`` directory (-1 for any other name)."""
    m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", Path(path).name)
    return int(m.group(1)) if m else -1


def checkpoint_is_complete(path: str | os.PathLike, rank: int = 0, with_state: bool = True) -> bool:
    """True if ``path`` is a checkpoint TRL finished (its last file, ``trainer_state.json``, exists)
    holding process ``rank``'s DEEP-GRPO state file (unless ``with_state`` is False)."""
    p = Path(path)
    return (p / TRAINER_STATE_FILE).is_file() and (not with_state or (p / STATE_FILE.format(rank=rank)).is_file())


def last_complete_checkpoint(output_dir: str | os.PathLike, rank: int = 0, with_state: bool = True) -> Path | None:
    """The ``checkpoint-N`` directory of ``output_dir`` with the largest N that is complete
    (:func:`checkpoint_is_complete`); None if there is none."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) >= 0
             and checkpoint_is_complete(p, rank, with_state)]
    return max(found, key=checkpoint_step, default=None)


def check_checkpoint(path: str | os.PathLike, rank: int = 0, with_state: bool = True) -> Path:
    """``Path(path)`` if it is a complete checkpoint to resume process ``rank`` from, else a
    :class:`~deepgrpo.config.ConfigError` naming ``resume_from_checkpoint`` and what is missing."""
    p = Path(path)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"resume_from_checkpoint = {str(path)!r} is invalid: {why}", field="resume_from_checkpoint",
                           value=str(path), allowed="a complete checkpoint directory")

    if not p.is_dir():
        raise bad("no such directory")
    if not (p / TRAINER_STATE_FILE).is_file():
        raise bad(f"not a complete checkpoint: it has no {TRAINER_STATE_FILE} (a save cut short by a kill or a full "
                  f"disk, or not a {PREFIX_CHECKPOINT_DIR}-N directory); pass an earlier checkpoint, or true for the "
                  "newest complete one")
    state = STATE_FILE.format(rank=rank)
    if with_state and not (p / state).is_file():
        raise bad(f"it has no DEEP-GRPO state file {state} (estimator, branch RNG, budget ledgers of process {rank}): "
                  "a checkpoint of another trainer, or of a run with fewer processes; set resume_without_deep_state "
                  "to true to continue with a fresh estimator, branch RNG and ledgers")
    return p


def read_deep_state(path: str | os.PathLike) -> dict[str, Any]:
    """The DEEP-GRPO state in JSON file ``path`` (data only: nothing is unpickled); a file that is
    not one is a :class:`~deepgrpo.config.ConfigError` naming it."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"resume_from_checkpoint = {str(Path(path).parent)!r} is invalid: {str(path)!r} {why}",
                           field="resume_from_checkpoint", value=str(Path(path).parent))
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"is not a JSON DEEP-GRPO state ({str(e).splitlines()[0][:120]})") from None
    keys = ("estimator", "branch_rng", "ledger", "global_ledger")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise bad(f"is not a DEEP-GRPO state (expected a JSON object with {', '.join(keys)})")
    return state


def batch_from_inputs(inputs: dict[str, Any], logprobs: torch.Tensor) -> Batch:
    """The core :class:`~deepgrpo.batch.Batch` of one micro-batch of :class:`DeepGRPOTrainer` rows.

    ``old_logprobs`` are the rows' ``old_per_token_logps`` if present, else ``logprobs``
    detached (one optimizer step per generation: the ratio is exactly 1, as in TRL).
    """
    old = inputs.get("old_per_token_logps")
    B = inputs["completion_ids"].shape[0]
    return Batch(prompts=[], prompt_index=inputs["prompt_index"], tokens=inputs["completion_ids"],
                 old_logprobs=logprobs.detach() if old is None else old,
                 response_mask=inputs["completion_mask"].bool(), trainable_mask=inputs["trainable_mask"].bool(),
                 stream=inputs["stream"], group=inputs["group"], pivot_depth=inputs["pivot_depth"],
                 prefix_len=inputs["prefix_len"], rewards=inputs["rewards"], advantages=inputs["advantages"],
                 segment_ends=[torch.zeros(0, dtype=torch.long)] * B)


# -- datasets, rewards and a command line for the project's tasks ---------------------------------------

def task_dataset(problems: Sequence[Any], conversational: bool = False) -> Any:
    """A TRL dataset (``prompt``, ``answer``, ``task`` columns) of :class:`llm.tasks.Problem` s,
    phrased as the reference runs phrased them (:func:`llm.tasks.prompt_text`); ``conversational``
    gives chat-format prompts (one user message) for tokenizers with a chat template."""
    from datasets import Dataset

    from llm.tasks import prompt_text
    texts = [prompt_text(p) for p in problems]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": t}] for t in texts] if conversational else texts,
        "answer": [p.answer for p in problems], "task": [p.task for p in problems]})


def task_reward(completions: list[Any], answer: list[str], task: list[str], **_: Any) -> list[float]:
    """TRL reward function of the project's verifiers (:func:`llm.rewards.score`: exact match
    for ``arith``, the final-number rule for ``gsm8k``, math-verify for ``math``)."""
    from llm.rewards import score
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [score(t, text, a) for text, a, t in zip(texts, answer, task)]


@dataclass
class ScriptArguments:
    """Inputs of ``python -m llm.trl_trainer`` (the training options are DeepGRPOConfig's).

    model: local causal-LM directory (nothing is downloaded: anything else is refused).
    data: local JSONL/parquet file in the GSM8K or MATH format (``llm.tasks.load_problems``).
    task: ``gsm8k`` | ``math`` | ``arith`` (None: detected from the file's columns).
    """

    model: str = field(metadata={"help": "Local model directory (nothing is downloaded)."})
    data: str = field(metadata={"help": "Local JSONL/parquet file (GSM8K or MATH format)."})
    task: str | None = field(default=None, metadata={"help": "gsm8k, math or arith (default: detected)."})


PROG = "python -m llm.trl_trainer"
"""Name of the command in its messages."""


def main(argv: Sequence[str] | None = None) -> int:
    """``[accelerate launch ...] python -m llm.trl_trainer --model DIR --data FILE --output_dir OUT
    [any DeepGRPOConfig / GRPOConfig option]``: DEEP-GRPO with TRL on a local model and dataset.

    ``--resume_from_checkpoint DIR`` continues from checkpoint directory DIR, ``--resume_from_checkpoint
    true`` from the newest complete checkpoint in OUT. Returns the exit code: 0 when done; 2 with one
    line on stderr for bad input (naming the option) or a full disk; 130 after Ctrl-C and 143 after
    SIGTERM, with one line naming the last complete checkpoint (checkpoints are never left looking
    complete when they are not).
    """
    import errno
    import signal
    import threading

    from deepgrpo.records import Terminated, describe_os_error, release_output_locks, terminate_like_ctrl_c
    argv = list(sys.argv[1:] if argv is None else argv)
    output_dir: str | None = None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    terminate_like_ctrl_c()  # a scheduler's SIGTERM stops the run the way Ctrl-C does
    try:
        script, args = _parse_arguments(argv)
        output_dir = args.output_dir
        _run(script, args)
        return 0
    except ConfigError as e:
        print(f"{PROG}: error: {_error_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); {_saved_note(output_dir)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {_saved_note(output_dir)}", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as e:  # a full disk, a read-only or vanished path: one line naming it
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
            where = e.filename if e.filename is not None else f"under {output_dir}"
            print(f"{PROG}: error: {what}: {where}; {_saved_note(output_dir)}", file=sys.stderr)
        else:
            print(f"{PROG}: error: {describe_os_error(e)}; {_saved_note(output_dir)}", file=sys.stderr)
        return 2
    finally:
        release_output_locks()
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _parse_arguments(argv: Sequence[str]) -> tuple[ScriptArguments, DeepGRPOConfig]:
    """The command's two dataclasses; any problem (unknown option, bad value, an invalid
    DeepGRPOConfig or GRPOConfig) is a :class:`~deepgrpo.config.ConfigError` with a one-line message."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> Any:  # argparse prints the whole usage; one line instead
            raise ConfigError(message.splitlines()[0] if message else "invalid arguments")

    parser = Parser((ScriptArguments, DeepGRPOConfig), prog=PROG)
    try:
        script, args, unknown = parser.parse_args_into_dataclasses(list(argv), return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as e:  # TRL's and transformers' own checks of their options
        raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    if unknown:
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)} (see {PROG} --help)")
    return script, args


def _run(script: ScriptArguments, args: DeepGRPOConfig) -> None:
    """Check the inputs (before anything is loaded or written), train, save the final model."""
    from deepgrpo.records import check_writable_dir, lock_output
    from llm.models import check_model_dir, load_tokenizer
    from llm.tasks import load_problems
    if args.trust_remote_code or (args.model_init_kwargs or {}).get("trust_remote_code"):
        raise ConfigError("--trust_remote_code = True is not supported: files are data, never code (a model "
                          "directory's Python files are not run)", field="trust_remote_code", value=True)
    model_dir = check_model_dir(script.model, "--model")  # a hub name is not a directory: refused, not fetched
    problems = load_problems(script.data, script.task)
    check_writable_dir(args.output_dir, "--output_dir")
    if os.environ.get("RANK", "0") == "0":  # one writer per directory: the main process holds it for all ranks
        lock_output(args.output_dir, "--output_dir")
    resume = _resume_argument(args.resume_from_checkpoint)
    with_state = not args.resume_without_deep_state
    if isinstance(resume, str):
        check_checkpoint(resume, args.process_index, with_state)
    elif resume and last_complete_checkpoint(args.output_dir, args.process_index, with_state) is None:
        raise ConfigError(f"--resume_from_checkpoint = true is invalid: --output_dir = {args.output_dir!r} holds no "
                          "complete checkpoint; start without it", field="resume_from_checkpoint", value=True)
    tokenizer = load_tokenizer(model_dir, "--model")
    dataset = task_dataset(problems, conversational=bool(getattr(tokenizer, "chat_template", None)))
    trainer = DeepGRPOTrainer(model=str(model_dir), reward_funcs=task_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)


def _resume_argument(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint``: a checkpoint directory, ``true`` (the newest complete one in
    ``--output_dir``) or ``false``/unset (a new run)."""
    if value is None or str(value).strip().lower() in ("", "false", "none"):
        return None
    if str(value).strip().lower() == "true":
        return True
    return str(value)


def _error_line(e: ConfigError) -> str:
    """One line for ``e``, led by the option's flag when the message does not already name it."""
    text = " ".join(str(e).split())
    options = {f.name for cls in (ScriptArguments, DeepGRPOConfig) for f in dataclasses.fields(cls)}
    if e.field in options and text.startswith(f"{e.field} ="):
        text = f"--{text}"
    elif e.field in options and not text.startswith(f"--{e.field}"):
        text = f"--{e.field}: {text}"
    return text


def _saved_note(output_dir: str | None) -> str:
    """What is kept: the last complete checkpoint and how to continue from it."""
    last = None if output_dir is None else last_complete_checkpoint(output_dir)
    if last is None:
        return "no checkpoint was saved yet: start the run again"
    return f"the last complete checkpoint is {last}: continue with --resume_from_checkpoint {last}"


if __name__ == "__main__":
    sys.exit(main())
