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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
        estimator (`str`): ``position`` (logistic regression on relative depth, the paper's) or
            ``state`` (depth plus state features).
        estimator_buffer_size (`int`): FIFO buffer of (features, label) pairs (paper: 10,000).
        estimator_min_per_class (`int`): P̂ = 1 until each class has more points than this (paper: 10).

    Parameters > Dual-stream loss (paper §3.4)
        lam (`float`): λ, weight of the aux stream (paper: 1).
        dual_clip (`float` or `None`): dual-clip constant c (the authors' runs: 3).
        kl_weighted_by_lambda (`bool`): multiply the aux stream's KL by λ too (authors: no).
        drop_zero_advantage (`bool`): drop rows with |A| < 1e-8 (they carry no signal).
        G (`int` or `None`): the paper's name for ``num_generations``; if given it must equal it.
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
    estimator: str = field(default=_ESTIMATOR.kind, metadata={"help": "Recoverability estimator: position or state."})
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

    def __post_init__(self) -> None:
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
            "router_aux_loss_coef": (None, "MoE auxiliary losses are not part of the core's loss"),
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
        rows = self.per_device_train_batch_size * self.steps_per_generation
        if rows % self.num_generations:
            raise ConfigError(f"{o}.per_device_train_batch_size = {self.per_device_train_batch_size!r} is invalid: "
                              f"per_device_train_batch_size x steps_per_generation = {rows} must be a multiple of "
                              f"num_generations = {self.num_generations} (each process must hold whole groups to "
                              "branch from its own failed completions)", owner=o,
                              field="per_device_train_batch_size", value=self.per_device_train_batch_size)
        if self.eval_strategy != "no":
            raise ConfigError(f"{o}.eval_strategy = {self.eval_strategy!r} is not supported by DeepGRPOTrainer: "
                              "expected 'no' (evaluate checkpoints with `deepgrpo llm eval`)", owner=o,
                              field="eval_strategy", value=self.eval_strategy)
        self.algo_config()  # the core's validation and messages

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
        if self.aux_loss_enabled:
            raise ConfigError("DeepGRPOTrainer does not support MoE router auxiliary losses: set "
                              "router_aux_loss_coef=0.0", field="router_aux_loss_coef")
        if getattr(self._tokenizer, "padding_side", "left") != "left":
            self._tokenizer.padding_side = "left"
        self.algo = args.algo_config()
        self.segmenter = make_segmenter(args.segmenter, self._tokenizer, args.segment_size, args.segment_min_tokens)
        self.estimator = GatheredEstimator(estimator if estimator is not None else make_estimator(self.algo.estimator))
        self.branch_rng = np.random.default_rng([int(args.seed), int(self.accelerator.process_index)])
        self.ledger = BudgetLedger()  # this process's budget
        self._global_ledger = BudgetLedger()  # all processes' (logged)
        self.last_exploration: ExploreResult | None = None
        self._main_rewards_per_func: torch.Tensor | None = None
        self._loss_sums = torch.zeros(len(LOSS_COLUMNS) + 3, dtype=torch.float64)
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
        if sampling_lp is None and self._needs_logprob_features():
            sampling_lp = self._logps(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        main = self._main_rollouts(completion_ids, completion_mask.bool(), rewards,
                                   None if sampling_lp is None else sampling_lp.cpu().float())
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
        """The core's dual-stream loss of one micro-batch (global per-stream denominators)."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        W = inputs["completion_ids"].shape[1]
        lp, _, _ = self._get_per_token_logps_and_entropies(model, ids, attn, W)  # [b, W]
        batch = batch_from_inputs(inputs, lp)
        den = {MAIN: float(inputs["den_main"]), AUX: float(inputs["den_aux"])}
        out = dual_stream_loss(batch, lp, inputs.get("ref_per_token_logps"), self.algo.loss, den)
        self._accumulate_loss_metrics(out.metrics)
        # DDP/ZeRO/FSDP average gradients over processes; the global loss is their sum
        return out.loss * self.accelerator.num_processes

    # -- exploration pieces ------------------------------------------------------------------------
    def _needs_logprob_features(self) -> bool:
        """Whether candidate features need the main completions' sampling log-probs."""
        return self.algo.explore.strategy in ("max-surprisal", "low-prob") or self.algo.estimator.kind == "state"

    def _local_main_rewards(self, Bm: int) -> torch.Tensor:
        """``[Bm]`` weighted reward sum of this process's main completions (unscorable -> 0)."""
        per_func = self._main_rewards_per_func
        if per_func is None:
            raise RuntimeError("TRL did not compute the main completions' rewards")
        start = self.accelerator.process_index * Bm
        local = per_func[start:start + Bm].float().cpu()  # [Bm, F]
        return (local * self.reward_weights.float().cpu().unsqueeze(0)).nansum(dim=1)

    def _main_rollouts(self, completion_ids: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                       logprobs: torch.Tensor | None) -> Rollouts:
        """The core's view of TRL's main completions (tokens ``[Bm, Tm]`` incl. EOS, right-padded)."""
        lengths = mask.sum(-1).tolist()
        eos = set(self.eos_token_ids)
        ends = [self.segmenter(completion_ids[b, :n].tolist()) for b, n in enumerate(lengths)]
        truncated = torch.tensor([n == 0 or int(completion_ids[b, n - 1]) not in eos for b, n in enumerate(lengths)])
        lp = torch.zeros(mask.shape) if logprobs is None else torch.where(mask, torch.nan_to_num(logprobs), 0.0)
        tokens = torch.where(mask, completion_ids, torch.zeros_like(completion_ids))
        return Rollouts(tokens=tokens, logprobs=lp, mask=mask, rewards=rewards.float(), segment_ends=ends,
                        truncated=truncated)

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
    STATE_FILE = "deepgrpo_state_{rank}.json"
    """Per-process file in each checkpoint: estimator, branch RNG and budget ledgers."""

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

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        import os

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from deepgrpo.records import write_json_atomic
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        write_json_atomic(os.path.join(folder, self.STATE_FILE.format(rank=self.accelerator.process_index)),
                          self.deep_state())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        import json
        import os
        path = os.path.join(checkpoint, self.STATE_FILE.format(rank=self.accelerator.process_index))
        if os.path.exists(path):
            with open(path) as f:
                self.load_deep_state(json.load(f))

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

    def _accumulate_loss_metrics(self, metrics: dict[str, float]) -> None:
        """Sum loss parts and clip counts over the micro-batches of an optimizer step; log the
        global values (summed over processes) at its last micro-batch."""
        n = metrics["trainable_tokens_main"] + metrics["trainable_tokens_aux"]
        self._loss_sums += torch.tensor([metrics[k] for k in LOSS_COLUMNS]
                                        + [metrics["clip_fraction"] * n, metrics["dual_clip_fraction"] * n, n],
                                        dtype=torch.float64)
        self._micro_steps += 1
        if self._micro_steps % self.args.gradient_accumulation_steps:
            return
        t = self.accelerator.reduce(self._loss_sums.to(self.accelerator.device), reduction="sum").cpu().tolist()
        self._loss_sums.zero_()
        for k, v in zip(LOSS_COLUMNS, t):
            self._metrics["train"][k].append(v)
        tokens = max(t[-1], 1.0)
        self._metrics["train"]["clip_fraction"].append(t[-3] / tokens)
        self._metrics["train"]["dual_clip_fraction"].append(t[-2] / tokens)


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

    model: local causal-LM directory (nothing is downloaded).
    data: local JSONL/parquet file in the GSM8K or MATH format (``llm.tasks.load_problems``).
    task: ``gsm8k`` | ``math`` | ``arith`` (None: detected from the file's columns).
    """

    model: str = field(metadata={"help": "Local model directory."})
    data: str = field(metadata={"help": "Local JSONL/parquet file (GSM8K or MATH format)."})
    task: str | None = field(default=None, metadata={"help": "gsm8k, math or arith (default: detected)."})


def main(argv: Sequence[str] | None = None) -> None:
    """``[accelerate launch ...] python -m llm.trl_trainer --model DIR --data FILE --output_dir OUT
    [any DeepGRPOConfig / GRPOConfig option]``: DEEP-GRPO with TRL on a local model and dataset."""
    from transformers import AutoTokenizer, HfArgumentParser

    from llm.tasks import load_problems
    script, args = HfArgumentParser((ScriptArguments, DeepGRPOConfig)).parse_args_into_dataclasses(argv)
    tokenizer = AutoTokenizer.from_pretrained(script.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    problems = load_problems(script.data, script.task)
    dataset = task_dataset(problems, conversational=bool(getattr(tokenizer, "chat_template", None)))
    trainer = DeepGRPOTrainer(model=script.model, reward_funcs=task_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
