"""The exploration step of DEEP-GRPO, backend-agnostic.

``explore``: main chains -> failed set -> candidates -> branching plan -> branches -> labels
to the estimator -> advantages -> loss-ready :class:`~deepgrpo.batch.Batch`.
The policy update and the per-step record live in :mod:`deepgrpo.step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepgrpo.advantages import group_advantages, nonzero_advantage, tree_advantages
from deepgrpo.batch import AUX, MAIN, Backend, Batch, Rollouts, SampleRequest
from deepgrpo.branching import BranchPlan, CandidateSet, cap_plan, plan_branches, plan_tree
from deepgrpo.config import AlgoConfig
from deepgrpo.estimators import RecoverabilityEstimator
from deepgrpo.ledger import BudgetLedger, StepBudget
from deepgrpo.pivots import candidate_depths, candidate_prefix_lengths


@dataclass
class ExploreResult:
    """Everything one exploration step produced.

    batch: the loss-ready batch (samples with |A| < eps dropped if configured).
    main: the G·P main-chain rollouts (rows prompt-major: prompt p owns rows p·G .. p·G+G-1).
    aux: the branch rollouts (rows in plan order, ``plan.n[j]`` rows per point), or None.
    candidates, plan: the failed trajectories' candidate pivots and the chosen branch points.
    labels: ``[P]`` 1 if at least one continuation of plan point j succeeded.
    p_hat: ``[N]`` the estimator's prediction for every candidate (None unless ``deep``).
    budget: this step's :class:`~deepgrpo.ledger.StepBudget`.
    stats: scalar diagnostics (see :func:`explore`).
    """

    batch: Batch
    main: Rollouts
    aux: Rollouts | None
    candidates: CandidateSet
    plan: BranchPlan
    labels: np.ndarray
    p_hat: np.ndarray | None
    budget: StepBudget
    stats: dict[str, float]


CANDIDATE_EXTRA_PREFIX = "cand_"
"""A main-rollout extra named ``cand_NAME`` of shape ``[B, >= T + 1]`` (a value per prefix
length) becomes the candidate feature ``NAME``: how a backend hands the core what only it knows
(the simulator: ``cand_oracle_success``, the exact P(success | prefix))."""


def build_candidates(main: Rollouts, failed_rows: np.ndarray, prompt_index: np.ndarray,
                     group_success_rate: np.ndarray) -> CandidateSet:
    """Candidate pivots of the ``failed_rows`` of ``main`` with all standard features, plus
    the backend's own (:data:`CANDIDATE_EXTRA_PREFIX`).

    Args:
        main: main-chain rollouts (B rows).
        failed_rows: ``[F]`` rows of failed trajectories.
        prompt_index: ``[B]`` prompt of each main row.
        group_success_rate: ``[num_prompts]`` success rate of each prompt's main chains.
    """
    lp_all = main.logprobs.detach().double().numpy()  # [B, T]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "traj", "index", "n_candidates", "prefix_len", "rel_depth", "prefix_logprob",
        "next_surprisal", "prev_surprisal", "remaining")}
    for b in failed_rows.tolist():
        ends = main.segment_ends[b].numpy().astype(np.int64)  # [L]
        L = ends.shape[0]
        if L == 0:
            continue
        starts = candidate_prefix_lengths(ends)  # [L]
        length = int(ends[-1])
        surprisal = -lp_all[b, :length]  # [len]
        cum = np.concatenate([[0.0], np.cumsum(lp_all[b, :length])])
        seg_max = np.maximum.reduceat(surprisal, starts) if length > 0 else np.zeros(L)  # [L]
        parts["traj"].append(np.full(L, b))
        parts["index"].append(np.arange(L))
        parts["n_candidates"].append(np.full(L, L))
        parts["prefix_len"].append(starts)
        parts["rel_depth"].append(candidate_depths(L))
        parts["prefix_logprob"].append(cum[starts])
        parts["next_surprisal"].append(seg_max)
        parts["prev_surprisal"].append(np.concatenate([[-np.inf], seg_max[:-1]]))
        parts["remaining"].append(length - starts)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    traj = cat["traj"].astype(np.int64)
    prefix_len = cat["prefix_len"].astype(np.int64)
    prompt = prompt_index[traj] if traj.size else np.zeros(0, np.int64)
    features = {
        "rel_depth": cat["rel_depth"].astype(np.float64),
        "prefix_len": prefix_len.astype(np.float64),
        "prefix_logprob": cat["prefix_logprob"],
        "prefix_mean_logprob": cat["prefix_logprob"] / np.maximum(prefix_len, 1),
        "next_surprisal": cat["next_surprisal"],
        "prev_surprisal": cat["prev_surprisal"],
        "group_success_rate": group_success_rate[prompt] if traj.size else np.zeros(0),
        "prompt_index": prompt.astype(np.float64),
        "remaining_tokens": cat["remaining"].astype(np.float64),
    }
    for key, value in main.extras.items():
        if key.startswith(CANDIDATE_EXTRA_PREFIX):  # [B, >= T+1]: the value at each candidate's prefix length
            v = value.detach().double().numpy()
            features[key[len(CANDIDATE_EXTRA_PREFIX):]] = v[traj, prefix_len] if traj.size else np.zeros(0)
    return CandidateSet(traj=traj, index=cat["index"].astype(np.int64),
                        n_candidates=cat["n_candidates"].astype(np.int64), prefix_len=prefix_len,
                        prompt=prompt.astype(np.int64), features=features)


def _pad_to(t: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
    if t.shape[1] >= width:
        return t[:, :width]
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def _splice(prefix_src: torch.Tensor, suffix: torch.Tensor, prefix_len: torch.Tensor,
            suffix_len: torch.Tensor, width: int) -> torch.Tensor:
    """``[A, width]``: row j = prefix_src[j, :prefix_len[j]] ++ suffix[j, :suffix_len[j]] ++ 0."""
    t = torch.arange(width).unsqueeze(0)  # [1, W]
    pl = prefix_len.unsqueeze(1)  # [A, 1]
    src = _pad_to(prefix_src, width)  # [A, W]
    idx = (t - pl).clamp(min=0, max=max(suffix.shape[1] - 1, 0))  # [A, W]
    suf = suffix.gather(1, idx) if suffix.shape[1] > 0 else torch.zeros_like(src)
    out = torch.where(t < pl, src, torch.where(t < pl + suffix_len.unsqueeze(1), suf, torch.zeros_like(src)))
    return out


def assemble_batch(prompts: Sequence[Any], main: Rollouts, aux: Rollouts | None, plan: BranchPlan,
                   group_size: int) -> Batch:
    """Concatenate main rows and aux rows (prefix + suffix) into one :class:`Batch`
    (advantages still zero). Main groups are prompt ids 0..P-1, aux groups P + plan point."""
    Bm = len(main)
    P = len(prompts)
    main_prompt = torch.arange(P).repeat_interleave(group_size)  # [Bm]
    if aux is None or len(plan) == 0:
        W = main.tokens.shape[1]
        A = 0
    else:
        A = len(aux)
        point = torch.from_numpy(np.repeat(np.arange(len(plan)), plan.n))  # [A]
        parent = torch.from_numpy(plan.traj)[point]  # [A]
        pl = torch.from_numpy(plan.prefix_len)[point]  # [A]
        sl = aux.lengths  # [A]
        W = max(main.tokens.shape[1], int((pl + sl).max()))
    tokens = [_pad_to(main.tokens, W)]
    old_lp = [_pad_to(main.logprobs.detach(), W)]
    resp = [_pad_to(main.mask, W, False)]
    stream = [torch.full((Bm,), MAIN)]
    group = [main_prompt.clone()]
    depth = [torch.zeros(Bm)]
    prefix = [torch.zeros(Bm, dtype=torch.long)]
    prompt_index = [main_prompt]
    parent_all = [torch.full((Bm,), -1)]
    seg_ends = list(main.segment_ends)
    rewards = [main.rewards.float()]
    if A:
        tokens.append(_splice(main.tokens[parent], aux.tokens, pl, sl, W))
        old_lp.append(_splice(main.logprobs.detach()[parent], aux.logprobs.detach(), pl, sl, W))
        resp.append(torch.arange(W).unsqueeze(0) < (pl + sl).unsqueeze(1))
        stream.append(torch.full((A,), AUX))
        group.append(P + point)
        depth.append(torch.from_numpy(plan.rel_depth).float()[point])
        prefix.append(pl)
        prompt_index.append(torch.from_numpy(plan.prompt)[point])
        parent_all.append(parent)
        seg_ends += list(aux.segment_ends)
        rewards.append(aux.rewards.float())
    response_mask = torch.cat(resp).bool()
    prefix_len = torch.cat(prefix).long()
    trainable = response_mask & (torch.arange(W).unsqueeze(0) >= prefix_len.unsqueeze(1))
    # parent: the main row an aux row continues (-1 for main rows); row: the index before any
    # rows are dropped (zero advantage), to map a batch row back to its rollout
    extras: dict[str, torch.Tensor] = {"parent": torch.cat(parent_all).long(), "row": torch.arange(Bm + A)}
    for k, v in main.extras.items():
        if aux is None or A == 0:
            extras[k] = v
        elif k in aux.extras:
            extras[k] = torch.cat([v, aux.extras[k].to(v.dtype)])
    return Batch(prompts=list(prompts), prompt_index=torch.cat(prompt_index).long(), tokens=torch.cat(tokens).long(),
                 old_logprobs=torch.cat(old_lp).float(), response_mask=response_mask,
                 trainable_mask=trainable, stream=torch.cat(stream).long(), group=torch.cat(group).long(),
                 pivot_depth=torch.cat(depth).float(), prefix_len=prefix_len,
                 rewards=torch.cat(rewards), advantages=torch.zeros(Bm + A), segment_ends=seg_ends,
                 extras=extras)


@dataclass
class ExplorationPlan:
    """Steps 2-4 of an exploration step, computed from the main chains alone.

    candidates, plan, p_hat: as in :class:`ExploreResult`.
    group_success: ``[P]`` success rate of each prompt's G main chains.
    failed_rows: ``[F]`` main rows with reward <= ``failure_threshold``.
    """

    candidates: CandidateSet
    plan: BranchPlan
    p_hat: np.ndarray | None
    group_success: np.ndarray
    failed_rows: np.ndarray

    def requests(self, prompts: Sequence[Any], main: Rollouts) -> list[SampleRequest]:
        """One :class:`SampleRequest` per plan point: its exact prefix tokens and ``n`` continuations."""
        plan = self.plan
        return [SampleRequest(prompts[int(plan.prompt[j])], main.tokens[int(plan.traj[j]), :int(plan.prefix_len[j])]
                              .clone(), int(plan.n[j])) for j in range(len(plan))]


def plan_exploration(main: Rollouts, n_prompts: int, config: AlgoConfig,
                     estimator: RecoverabilityEstimator | None, rng: np.random.Generator) -> ExplorationPlan:
    """Failed set, candidates, P̂ and the branching plan of the G·P main chains ``main``
    (prompt-major rows), capped at ``aux_budget`` continuations per prompt."""
    ec = config.explore
    G, P = ec.G, n_prompts
    if len(main) != P * G:
        raise ValueError(f"backend returned {len(main)} main rollouts, expected {P} prompts x {G}")
    rewards = main.rewards.detach().double().numpy()  # [P*G]
    success = rewards > ec.failure_threshold
    group_success = success.reshape(P, G).mean(1) if P else np.zeros(0)  # [P]
    failed_rows = np.flatnonzero(~success)
    # root-only sampling (GRPO) never branches: skip the per-failed-chain candidate loop
    cands = build_candidates(main, failed_rows[:0] if ec.strategy == "root" else failed_rows,
                             np.repeat(np.arange(P), G), group_success)
    p_hat = None
    if ec.strategy in ("deep", "informative") and estimator is not None and len(cands):
        p_hat = np.asarray(estimator.predict(cands.features), dtype=np.float64)
    plan = cap_plan(plan_branches(cands, ec, p_hat, rng), ec.aux_budget, rng)
    return ExplorationPlan(cands, plan, p_hat, group_success, failed_rows)


def finish_exploration(prompts: Sequence[Any], main: Rollouts, aux: Rollouts | None, planned: ExplorationPlan,
                       config: AlgoConfig, estimator: RecoverabilityEstimator | None,
                       ledger: BudgetLedger | None = None) -> ExploreResult:
    """Steps 5-6 once the plan's continuations ``aux`` are sampled (rows in plan order, ``plan.n[j]``
    per point; None if the plan is empty): labels (y = any success at the point) to the
    estimator, the loss-ready batch with group (or tree) advantages, the budget and the stats."""
    ec = config.explore
    P, G = len(prompts), ec.G
    plan, cands = planned.plan, planned.candidates
    labels = np.zeros(0)
    if len(plan):
        if aux is None or len(aux) != plan.total_continuations:
            raise ValueError(f"backend returned {0 if aux is None else len(aux)} aux rollouts, "
                             f"expected {plan.total_continuations}")
        point = np.repeat(np.arange(len(plan)), plan.n)
        ok = (aux.rewards.detach().double().numpy() > ec.failure_threshold).astype(np.float64)
        labels = (np.bincount(point, weights=ok, minlength=len(plan)) > 0).astype(np.float64)
    else:
        aux = None
    if estimator is not None:  # called every step (possibly empty): a gathered estimator is collective
        estimator.update({k: v[plan.candidate] for k, v in cands.features.items()}, labels)

    batch = assemble_batch(prompts, main, aux, plan, G)
    if config.advantage.tree:
        aux_len = aux.lengths if aux is not None else torch.zeros(0, dtype=torch.long)
        path, weight = plan_tree(plan, main.lengths, aux_len, G)
        batch.advantages = tree_advantages(batch.rewards, path, weight)
    else:
        batch.advantages = group_advantages(batch.rewards, batch.group, config.advantage)
    nz = nonzero_advantage(batch.advantages, config.advantage.zero_eps)
    if config.advantage.drop_zero:
        batch = batch.select(nz)

    tokens_main = int(main.lengths.sum())
    tokens_aux = int(aux.lengths.sum()) if aux is not None else 0
    ledger = ledger if ledger is not None else BudgetLedger()
    budget = ledger.record(P, len(main), len(aux) if aux is not None else 0, tokens_main, tokens_aux)
    n_main = P * G
    rewards = main.rewards.detach().double().numpy()
    stats = {
        "reward_main": float(rewards.mean()) if rewards.size else 0.0,
        "reward_aux": float(aux.rewards.float().mean()) if aux is not None else float("nan"),
        "failed": float(planned.failed_rows.size),
        "all_fail_groups": float((planned.group_success == 0).sum()),
        "candidates": float(len(cands)),
        "pivots": float(len(plan)),
        "branch_success": float(labels.mean()) if labels.size else float("nan"),
        "pivot_depth_mean": float(plan.rel_depth.mean()) if len(plan) else float("nan"),
        "nonzero_main": float(nz[:n_main].sum()),
        "nonzero_aux": float(nz[n_main:].sum()),
        "rollouts_main": float(budget.rollouts_main), "rollouts_aux": float(budget.rollouts_aux),
        "tokens_main": float(tokens_main), "tokens_aux": float(tokens_aux),
    }
    return ExploreResult(batch=batch, main=main, aux=aux, candidates=cands, plan=plan, labels=labels,
                         p_hat=planned.p_hat, budget=budget, stats=stats)


def explore(backend: Backend, prompts: Sequence[Any], config: AlgoConfig,
            estimator: RecoverabilityEstimator | None, rng: np.random.Generator,
            ledger: BudgetLedger | None = None) -> ExploreResult:
    """One DEEP-GRPO exploration step (paper Alg. 1, lines 3-12) on ``prompts``.

    1. G main chains per prompt from the root; reward them.
    2. Failed set: reward <= ``failure_threshold``.
    3. Candidates of each failed chain (one per segment start, root included) with features.
    4. Branching plan of ``config.explore.strategy`` (``deep`` uses ``estimator.predict``),
       capped at ``aux_budget`` continuations per prompt if set.
    5. Continuations from each plan point's exact prefix tokens; label y = any success; the
       (features, y) pairs update ``estimator``.
    6. Group-relative advantages (main: per prompt; aux: per pivot), or TreeRL-style tree
       advantages over the step's sampling tree with ``advantage.tree``
       (:func:`~deepgrpo.branching.plan_tree`); zero-advantage samples dropped if
       ``advantage.drop_zero``.

    Steps 2-4 are :func:`plan_exploration`, steps 5-6 :func:`finish_exploration`: a backend
    whose generation must be called collectively (e.g. TRL under ZeRO-3) calls the two around
    its own sampling.

    Args:
        backend: implements :class:`~deepgrpo.batch.Backend`.
        prompts: P backend prompt objects.
        config: :class:`AlgoConfig`.
        estimator: recoverability estimator (None: never updated; ``deep`` then uses P̂ = 1).
        rng: numpy Generator for every random choice of the core.
        ledger: if given, this step's budget is recorded in it.

    Returns: :class:`ExploreResult`; ``stats`` holds ``reward_main``, ``reward_aux``,
    ``failed``, ``candidates``, ``pivots``, ``branch_success``, ``pivot_depth_mean``,
    ``nonzero_main``, ``nonzero_aux``, ``rollouts_main/aux``, ``tokens_main/aux``.
    """
    main = backend.sample([SampleRequest(p, None, config.explore.G) for p in prompts])
    planned = plan_exploration(main, len(prompts), config, estimator, rng)
    aux = backend.sample(planned.requests(prompts, main)) if len(planned.plan) else None
    return finish_exploration(prompts, main, aux, planned, config, estimator, ledger)
