"""The exploration step of DEEP-GRPO, backend-agnostic.

``explore``: main chains -> failed set -> candidates -> branching plan -> branches -> labels
to the estimator -> advantages -> loss-ready :class:`~deepgrpo.batch.Batch`.
The policy update and the per-step record live in :mod:`deepgrpo.step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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
from deepgrpo.pivots import single_continuation


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
(:data:`deepgrpo.estimators.BACKEND_FEATURES`): the simulator's ``cand_oracle_success``, the exact
P(success | prefix), and ``cand_next_entropy`` (the simulator, the LLM backend, the TRL trainer),
the entropy of the policy's next-token distribution in the state after t tokens (0 at and after
the row's end)."""


def build_candidates(main: Rollouts, failed_rows: np.ndarray, prompt_index: np.ndarray,
                     group_success_rate: np.ndarray, replica: np.ndarray | None = None) -> CandidateSet:
    """Candidate pivots of the ``failed_rows`` of ``main`` with all standard features, plus
    the backend's own (:data:`CANDIDATE_EXTRA_PREFIX`); every failed trajectory at once.

    Args:
        main: main-chain rollouts (B rows).
        failed_rows: ``[F]`` rows of failed trajectories (increasing).
        prompt_index: ``[B]`` prompt of each main row.
        group_success_rate: ``[num_prompts]`` success rate of each prompt's main chains.
        replica: ``[num_prompts]`` replica (run) of each prompt (None: one run).
    """
    failed_rows = np.asarray(failed_rows, dtype=np.int64)
    seg = main.segment_ends
    ends_of = [seg[b] for b in failed_rows.tolist()]
    # rows often share one tensor of segment ends (a backend's per-problem table): each distinct
    # tensor is read once
    distinct = {id(e): e for e in ends_of}
    slot = {k: i for i, k in enumerate(distinct)}
    which = np.fromiter(map(slot.__getitem__, map(id, ends_of)), dtype=np.int64, count=len(ends_of))  # [F0]
    d_len = np.array([len(e) for e in distinct.values()], dtype=np.int64)  # [U]
    d_ends = (torch.cat(list(distinct.values())).numpy().astype(np.int64) if distinct else np.zeros(0, np.int64))
    L = d_len[which]  # [F0] segments = candidates per row
    rows, which = failed_rows[L > 0], which[L > 0]
    L = L[L > 0]
    F, N = rows.shape[0], int(L.sum())
    traj = np.repeat(rows, L)  # [N]
    first = np.cumsum(L) - L  # [F] each row's first candidate
    index = np.arange(N) - np.repeat(first, L)  # [N] candidate i within its row
    d_first = np.cumsum(d_len) - d_len  # [U]
    ends = d_ends[np.repeat(d_first[which], L) + index]  # [N] ends, row after row
    starts = np.empty(N, dtype=np.int64)  # [N] prefix lengths [0, e_0, ..., e_{L-2}] of each row
    if N:
        starts[1:] = ends[:-1]
        starts[first] = 0
    length = ends[first + L - 1]  # [F]
    lp = main.logprobs.detach().double().numpy()[rows]  # [F, T]
    Tw = lp.shape[1]
    lp = np.where(np.arange(Tw)[None, :] < length[:, None], lp, 0.0)  # only the chain's own tokens count
    cum = np.concatenate([np.zeros((F, 1)), np.cumsum(lp, axis=1)], axis=1)  # [F, T+1] log-prob of each prefix
    row_c = np.repeat(np.arange(F), L)  # [N] row of each candidate
    # max surprisal of each segment [start, end): one reduceat over the rows laid end to end, with an
    # index at each row's end so that no segment runs past its chain
    flat = np.concatenate([(-lp).reshape(-1), [0.0]])  # [F·T + 1]
    marks = np.empty(N + F, dtype=np.int64)
    pos = np.arange(N) + row_c  # where each candidate's start goes among the marks
    marks[pos] = row_c * Tw + starts
    marks[first + L - 1 + np.arange(F) + 1] = np.arange(F) * Tw + length
    seg_max = np.maximum.reduceat(flat, marks)[pos] if N else np.zeros(0)  # [N]
    prev = np.empty(N)
    if N:
        prev[1:] = seg_max[:-1]
        prev[first] = -np.inf
    n_cand = np.repeat(L, L)
    prompt = prompt_index[traj] if N else np.zeros(0, np.int64)
    features = {
        "rel_depth": (index + 1).astype(np.float64) / (n_cand + 1),
        "prefix_len": starts.astype(np.float64),
        "prefix_logprob": cum[row_c, starts],
        "prefix_mean_logprob": cum[row_c, starts] / np.maximum(starts, 1),
        "next_surprisal": seg_max,
        "prev_surprisal": prev,
        "group_success_rate": group_success_rate[prompt] if N else np.zeros(0),
        "prompt_index": _local_prompt(prompt, replica).astype(np.float64),
        "remaining_tokens": (np.repeat(length, L) - starts).astype(np.float64),
    }
    for key, value in main.extras.items():
        if key.startswith(CANDIDATE_EXTRA_PREFIX):  # [B, >= T+1]: the value at each candidate's prefix length
            v = value.detach().double().numpy()
            features[key[len(CANDIDATE_EXTRA_PREFIX):]] = v[traj, starts] if N else np.zeros(0)
    prompt = prompt.astype(np.int64)
    return CandidateSet(traj=traj.astype(np.int64), index=index.astype(np.int64), n_candidates=n_cand,
                        prefix_len=starts, prompt=prompt, features=features,
                        replica=(np.asarray(replica, dtype=np.int64)[prompt] if replica is not None
                                 else np.zeros(N, np.int64)))


def _local_prompt(prompt: np.ndarray, replica: np.ndarray | None) -> np.ndarray:
    """``[N]`` each prompt's index within its own run (``replica``: ``[P]`` non-decreasing)."""
    if replica is None or prompt.size == 0:
        return prompt
    replica = np.asarray(replica, dtype=np.int64)
    return prompt - np.searchsorted(replica, replica[prompt], side="left")


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
                   group_size: int, replica: np.ndarray | None = None) -> Batch:
    """Concatenate main rows and aux rows (prefix + suffix) into one :class:`Batch`
    (advantages still zero). Main groups are prompt ids 0..P-1, aux groups P + plan point.
    ``replica``: ``[P]`` the replica of each prompt (None: one run); rows carry it as
    :attr:`Batch.replica`."""
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
    prompt_of_row = torch.cat(prompt_index).long()
    rep = torch.zeros(Bm + A, dtype=torch.long) if replica is None else torch.from_numpy(
        np.asarray(replica, dtype=np.int64))[prompt_of_row]
    return Batch(prompts=list(prompts), prompt_index=prompt_of_row, tokens=torch.cat(tokens).long(),
                 old_logprobs=torch.cat(old_lp).float(), response_mask=response_mask,
                 trainable_mask=trainable, stream=torch.cat(stream).long(), group=torch.cat(group).long(),
                 pivot_depth=torch.cat(depth).float(), prefix_len=prefix_len,
                 rewards=torch.cat(rewards), advantages=torch.zeros(Bm + A), segment_ends=seg_ends,
                 extras=extras, replica=rep)


@dataclass
class ExplorationPlan:
    """Steps 2-4 of an exploration step, computed from the main chains alone.

    candidates, plan, p_hat: as in :class:`ExploreResult` (every replica's, in replica order).
    group_success: ``[P]`` success rate of each prompt's G main chains.
    failed_rows: ``[F]`` main rows with reward <= ``failure_threshold``.
    replica: ``[P]`` the replica of each prompt (all 0 for one run).
    """

    candidates: CandidateSet
    plan: BranchPlan
    p_hat: np.ndarray | None
    group_success: np.ndarray
    failed_rows: np.ndarray
    replica: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.replica is None:
            self.replica = np.zeros(self.group_success.shape[0], dtype=np.int64)

    def requests(self, prompts: Sequence[Any], main: Rollouts) -> list[SampleRequest]:
        """One :class:`SampleRequest` per plan point: its exact prefix tokens and ``n`` continuations."""
        plan = self.plan
        tokens = main.tokens
        return [SampleRequest(prompts[p], tokens[t, :c], n) for p, t, c, n in
                zip(plan.prompt.tolist(), plan.traj.tolist(), plan.prefix_len.tolist(), plan.n.tolist())]


def _spans(sorted_ids: np.ndarray, R: int) -> np.ndarray:
    """``[R + 1]`` boundaries of each id's block in the non-decreasing ``sorted_ids``."""
    return np.searchsorted(sorted_ids, np.arange(R + 1), side="left")


def _check_replicas(replica: np.ndarray, R: int) -> None:
    if replica.size and (replica.min() < 0 or replica.max() >= R or np.any(np.diff(replica) < 0)):
        raise ValueError(f"replica ids must be non-decreasing integers in [0, {R}) (prompts grouped by run)")


def plan_exploration(main: Rollouts, n_prompts: int, config: AlgoConfig,
                     estimator: RecoverabilityEstimator | None, rng: np.random.Generator) -> ExplorationPlan:
    """Failed set, candidates, P̂ and the branching plan of the G·P main chains ``main``
    (prompt-major rows) of one run, capped at ``aux_budget`` continuations per prompt
    (:func:`plan_replicas` with one replica)."""
    return plan_replicas(main, np.zeros(n_prompts, np.int64), config, [estimator], [rng])


def plan_replicas(main: Rollouts, replica: np.ndarray, config: AlgoConfig,
                  estimators: Sequence[RecoverabilityEstimator | None],
                  rngs: Sequence[np.random.Generator]) -> ExplorationPlan:
    """:func:`plan_exploration` for R runs at once: ``replica`` ``[P]`` (non-decreasing) names the
    run of each prompt; run r's P̂ comes from ``estimators[r]`` and its random choices from
    ``rngs[r]``, so its plan is the one it would get alone."""
    ec = config.explore
    replica = np.asarray(replica, dtype=np.int64)
    G, P, R = ec.G, replica.shape[0], len(rngs)
    _check_replicas(replica, R)
    if len(estimators) != R:
        raise ValueError(f"{len(estimators)} estimators for {R} replicas")
    if len(main) != P * G:
        raise ValueError(f"backend returned {len(main)} main rollouts, expected {P} prompts x {G}")
    rewards = main.rewards.detach().double().numpy()  # [P*G]
    success = rewards > ec.failure_threshold
    group_success = success.reshape(P, G).mean(1) if P else np.zeros(0)  # [P]
    failed_rows = np.flatnonzero(~success)
    # root-only sampling (GRPO) never branches: no candidates to build
    cands = build_candidates(main, failed_rows[:0] if ec.strategy == "root" else failed_rows,
                             np.repeat(np.arange(P), G), group_success, replica)
    p_hat = None
    if ec.strategy in ("deep", "informative") and len(cands) and any(e is not None for e in estimators):
        span = _spans(cands.replica, R)
        parts = []
        for r in range(R):
            a, b = int(span[r]), int(span[r + 1])
            if b > a:
                e = estimators[r]
                parts.append(np.ones(b - a) if e is None else np.asarray(
                    e.predict({k: v[a:b] for k, v in cands.features.items()}), dtype=np.float64))
        p_hat = np.concatenate(parts)
    q = p_hat
    if ec.strategy == "informative" and p_hat is not None:
        # the informative utility needs the chance that one continuation succeeds; a learned P̂ is
        # fitted to the labels this core gives it, "any of the point's K continuations succeeded"
        per_one = np.repeat([bool(getattr(e, "per_continuation", False)) for e in estimators],
                            np.diff(_spans(cands.replica, R)))
        q = np.where(per_one, p_hat, single_continuation(p_hat, ec.K))
    plan = cap_plan(plan_branches(cands, ec, q, rngs), ec.aux_budget, rngs)
    return ExplorationPlan(cands, plan, p_hat, group_success, failed_rows, replica)


def finish_exploration(prompts: Sequence[Any], main: Rollouts, aux: Rollouts | None, planned: ExplorationPlan,
                       config: AlgoConfig, estimator: RecoverabilityEstimator | None,
                       ledger: BudgetLedger | None = None) -> ExploreResult:
    """Steps 5-6 once the plan's continuations ``aux`` are sampled (rows in plan order, ``plan.n[j]``
    per point; None if the plan is empty): labels (y = any success at the point) to the
    estimator, the loss-ready batch with group (or tree) advantages, the budget and the stats
    (:func:`finish_replicas` with one replica)."""
    return finish_replicas(prompts, main, aux, planned, config, [estimator],
                           [ledger if ledger is not None else BudgetLedger()]).results[0]


@dataclass
class ReplicaStep:
    """One exploration step of R runs (:func:`explore_replicas`).

    batch: the loss-ready batch of every run (:attr:`Batch.replica` names each row's run), for
        :func:`deepgrpo.step.update_replicas`.
    results: R :class:`ExploreResult`, one per run, each as that run alone would have produced
        it (its own rows, candidates, plan, labels, budget and stats, with indices local to the
        run); ``results[r].batch`` is the shared ``batch``.
    """

    batch: Batch
    results: list[ExploreResult]


def _select_rollouts(ro: Rollouts, a: int, b: int) -> Rollouts:
    """Rows ``a:b`` of ``ro`` (views; unchecked: slices of checked rollouts)."""
    if a == 0 and b == len(ro):
        return ro
    out = object.__new__(Rollouts)
    out.__dict__.update(tokens=ro.tokens[a:b], logprobs=ro.logprobs[a:b], mask=ro.mask[a:b], rewards=ro.rewards[a:b],
                        segment_ends=ro.segment_ends[a:b], truncated=ro.truncated[a:b],
                        extras={k: v[a:b] for k, v in ro.extras.items()})
    return out


def finish_replicas(prompts: Sequence[Any], main: Rollouts, aux: Rollouts | None, planned: ExplorationPlan,
                    config: AlgoConfig, estimators: Sequence[RecoverabilityEstimator | None],
                    ledgers: Sequence[BudgetLedger]) -> ReplicaStep:
    """:func:`finish_exploration` for the R runs of ``planned`` (:func:`plan_replicas`): each run's
    labels go to ``estimators[r]`` and its budget to ``ledgers[r]``."""
    ec = config.explore
    P, G, R = len(prompts), ec.G, len(ledgers)
    plan, cands, replica = planned.plan, planned.candidates, planned.replica
    if len(estimators) != R:
        raise ValueError(f"{len(estimators)} estimators for {R} ledgers")
    labels = successes = np.zeros(0)
    if len(plan):
        if aux is None or len(aux) != plan.total_continuations:
            raise ValueError(f"backend returned {0 if aux is None else len(aux)} aux rollouts, "
                             f"expected {plan.total_continuations}")
        point = np.repeat(np.arange(len(plan)), plan.n)
        ok = (aux.rewards.detach().double().numpy() > ec.failure_threshold).astype(np.float64)
        successes = np.bincount(point, weights=ok, minlength=len(plan))  # [P] successful continuations per point
        labels = (successes > 0).astype(np.float64)
    else:
        aux = None
    prompt_span = _spans(replica, R)  # [R+1] each run's prompts
    point_span = _spans(plan.replica, R)  # [R+1] each run's plan points
    cand_span = _spans(cands.replica, R)  # [R+1] each run's candidates
    aux_start = np.concatenate([[0], np.cumsum(plan.n)]) if len(plan) else np.zeros(1, np.int64)
    aux_span = aux_start[point_span]  # [R+1] each run's aux rows
    chosen = {k: v[plan.candidate] for k, v in cands.features.items()}
    trials = plan.n.astype(np.float64)  # [P] continuations per point
    for r, est in enumerate(estimators):
        if est is not None:  # called every step (possibly empty): a gathered estimator is collective
            a, b = int(point_span[r]), int(point_span[r + 1])
            if getattr(est, "learns_from_counts", False):  # the binomial counts (estimators module docstring)
                est.update({k: v[a:b] for k, v in chosen.items()}, labels[a:b], successes=successes[a:b],
                           trials=trials[a:b])
            else:
                est.update({k: v[a:b] for k, v in chosen.items()}, labels[a:b])

    batch = assemble_batch(prompts, main, aux, plan, G, replica)
    if config.advantage.tree:
        batch.advantages = _tree_advantages_by_run(batch, main, aux, plan, prompt_span, point_span, aux_span, G)
    else:
        batch.advantages = group_advantages(batch.rewards, batch.group, config.advantage)
    nz = nonzero_advantage(batch.advantages, config.advantage.zero_eps).numpy()
    if config.advantage.drop_zero:
        batch = batch.select(torch.from_numpy(nz))

    # every run's counts and means at once (rewards are compared, counted and averaged per run)
    main_run = np.repeat(replica, G)  # [P·G] each main row's run
    aux_run = np.repeat(plan.replica, plan.n) if aux is not None else np.zeros(0, np.int64)  # [A]

    def per_run(run: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(run, weights=values, minlength=R)[:R]

    n_main = P * G
    tokens_main = per_run(main_run, main.lengths.numpy().astype(np.float64)).astype(np.int64)
    tokens_aux = per_run(aux_run, aux.lengths.numpy().astype(np.float64)).astype(np.int64) if aux is not None \
        else np.zeros(R, np.int64)
    rewards = main.rewards.detach().double().numpy()
    aux_rewards = aux.rewards.double().numpy() if aux is not None else np.zeros(0)
    n_aux = np.diff(aux_span)
    # the branches' mean reward in float32, as numpy's float32 mean of each run's rows gives it
    aux_mean = (per_run(aux_run, aux_rewards).astype(np.float32) / np.maximum(n_aux, 1).astype(np.float32))
    stats = {
        "reward_main": np.where(np.diff(prompt_span) > 0, per_run(main_run, rewards) / np.maximum(per_run(main_run), 1),
                                0.0),
        "reward_aux": np.where(n_aux > 0, aux_mean.astype(np.float64), np.nan),
        "failed": per_run(main_run[planned.failed_rows]),
        "all_fail_groups": per_run(replica, (planned.group_success == 0).astype(np.float64)),
        "candidates": np.diff(cand_span).astype(np.float64),
        "pivots": np.diff(point_span).astype(np.float64),
        "branch_success": np.where(np.diff(point_span) > 0, per_run(plan.replica, labels)
                                   / np.maximum(np.diff(point_span), 1), np.nan),
        "nonzero_main": per_run(main_run, nz[:n_main].astype(np.float64)),
        "nonzero_aux": per_run(aux_run, nz[n_main:].astype(np.float64)),
        **_pivot_summaries(plan, point_span),
    }
    results = []
    for r in range(R):
        p0, p1 = int(prompt_span[r]), int(prompt_span[r + 1])
        m0, m1 = p0 * G, p1 * G
        j0, j1 = int(point_span[r]), int(point_span[r + 1])
        c0, c1 = int(cand_span[r]), int(cand_span[r + 1])
        x0, x1 = int(aux_span[r]), int(aux_span[r + 1])
        budget = ledgers[r].record(p1 - p0, m1 - m0, x1 - x0, int(tokens_main[r]), int(tokens_aux[r]))
        row = {k: float(v[r]) for k, v in stats.items()}
        row.update(rollouts_main=float(budget.rollouts_main), rollouts_aux=float(budget.rollouts_aux),
                   tokens_main=float(budget.tokens_main), tokens_aux=float(budget.tokens_aux))
        if R == 1:
            results.append(ExploreResult(batch=batch, main=main, aux=aux, candidates=cands, plan=plan, labels=labels,
                                         p_hat=planned.p_hat, budget=budget, stats=row))
            continue
        plan_r = plan.select(slice(j0, j1))
        plan_r.candidate = plan_r.candidate - c0
        plan_r.traj = plan_r.traj - m0
        plan_r.prompt = plan_r.prompt - p0
        lazy = {"main": functools.partial(_select_rollouts, main, m0, m1),
                "candidates": functools.partial(_select_candidates, cands, c0, c1, m0, p0)}
        eager = {"batch": batch, "plan": plan_r, "labels": labels[j0:j1], "budget": budget, "stats": row,
                 "p_hat": planned.p_hat[c0:c1] if planned.p_hat is not None else None}
        if aux is not None and x1 > x0:
            lazy["aux"] = functools.partial(_select_rollouts, aux, x0, x1)
        else:
            eager["aux"] = None
        results.append(_RunResult(eager, lazy))
    return ReplicaStep(batch=batch, results=results)


PIVOT_SUMMARIES = ("pivot_depth_mean", "pivot_depth_std", "pivot_depth_p10", "pivot_depth_p50", "pivot_depth_p90",
                   "pivot_prefix_tokens_mean")
"""Each run's summary of its plan's points (NaN without points): the mean, standard deviation and
10/50/90 % quantiles of their relative depth, and their mean prefix length in tokens."""


def _pivot_summaries(plan: BranchPlan, point_span: np.ndarray) -> dict[str, np.ndarray]:
    """``{name: [R]}`` of :data:`PIVOT_SUMMARIES` for the runs whose plan points are
    ``point_span[r]:point_span[r + 1]``. Runs with the same number of points are reduced as the
    rows of one array, each row on its own: the numbers numpy gives each run's points alone."""
    R = point_span.shape[0] - 1
    out = {k: np.full(R, np.nan) for k in PIVOT_SUMMARIES}
    count = np.diff(point_span)  # [R]
    depth = plan.rel_depth.astype(np.float64)  # [P]
    for c in np.unique(count[count > 0]).tolist():
        runs = np.flatnonzero(count == c)
        rows = point_span[runs][:, None] + np.arange(c)  # [k, c] the points of k runs with c each
        d = depth[rows]
        p10, p50, p90 = np.quantile(d, [0.1, 0.5, 0.9], axis=1)
        for k, v in zip(PIVOT_SUMMARIES, (d.mean(1), d.std(1), p10, p50, p90, plan.prefix_len[rows].mean(1))):
            out[k][runs] = v
    return out


def _select_candidates(cands: CandidateSet, c0: int, c1: int, m0: int, p0: int) -> CandidateSet:
    """Candidates ``c0:c1`` of ``cands`` (one run's) with their main rows and prompts counted from
    ``m0`` and ``p0``."""
    return CandidateSet(traj=cands.traj[c0:c1] - m0, index=cands.index[c0:c1], n_candidates=cands.n_candidates[c0:c1],
                        prefix_len=cands.prefix_len[c0:c1], prompt=cands.prompt[c0:c1] - p0,
                        features={k: v[c0:c1] for k, v in cands.features.items()}, replica=cands.replica[c0:c1])


class _RunResult(ExploreResult):
    """One run's :class:`ExploreResult` in a lockstep step: its main and aux rollouts and its
    candidates are sliced from the step's when first read (most callers read only its plan,
    labels, budget and stats); every field reads as an eager result's would."""

    def __init__(self, eager: dict[str, Any] | None = None, lazy: dict[str, Callable[[], Any]] | None = None,
                 **fields: Any) -> None:
        if eager is None:  # every field given (dataclasses.replace and the like): an eager result
            ExploreResult.__init__(self, **fields)
            eager, lazy = {}, {}
        self.__dict__.update(eager, _lazy=lazy)

    def __getattr__(self, name: str) -> Any:  # only for attributes not set yet
        lazy = self.__dict__.get("_lazy")
        if lazy is None or name not in lazy:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = lazy[name]()  # (copies share the dict of makers: none is removed)
        return value


def _tree_advantages_by_run(batch: Batch, main: Rollouts, aux: Rollouts | None, plan: BranchPlan,
                            prompt_span: np.ndarray, point_span: np.ndarray, aux_span: np.ndarray,
                            G: int) -> torch.Tensor:
    """``[B]`` TreeRL-style advantages of the batch's rows (before any row is dropped), each run's
    over its own sampling tree (:func:`~deepgrpo.branching.plan_tree`)."""
    Bm = len(main)
    adv = torch.zeros(len(batch))
    aux_len = aux.lengths if aux is not None else torch.zeros(0, dtype=torch.long)
    for r in range(len(prompt_span) - 1):
        m0, m1 = int(prompt_span[r]) * G, int(prompt_span[r + 1]) * G
        j0, j1 = int(point_span[r]), int(point_span[r + 1])
        x0, x1 = int(aux_span[r]), int(aux_span[r + 1])
        plan_r = plan.select(slice(j0, j1))
        plan_r.traj = plan_r.traj - m0
        rows = torch.cat([torch.arange(m0, m1), torch.arange(Bm + x0, Bm + x1)])
        path, weight = plan_tree(plan_r, main.lengths[m0:m1], aux_len[x0:x1], G)
        adv[rows] = tree_advantages(batch.rewards[rows], path, weight)
    return adv


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
       (features, y) pairs update ``estimator`` (with each point's successes and continuations
       too for an estimator that learns from counts: ``learns_from_counts``).
    6. Group-relative advantages (main: per prompt; aux: per pivot), or TreeRL-style tree
       advantages over the step's sampling tree with ``advantage.tree``
       (:func:`~deepgrpo.branching.plan_tree`); zero-advantage samples dropped if
       ``advantage.drop_zero``.

    Steps 2-4 are :func:`plan_exploration`, steps 5-6 :func:`finish_exploration`: a backend
    whose generation must be called collectively (e.g. TRL under ZeRO-3) calls the two around
    its own sampling. This is :func:`explore_replicas` with one run.

    Args:
        backend: implements :class:`~deepgrpo.batch.Backend`.
        prompts: P backend prompt objects.
        config: :class:`AlgoConfig`.
        estimator: recoverability estimator (None: never updated; ``deep`` then uses P̂ = 1).
        rng: numpy Generator for every random choice of the core.
        ledger: if given, this step's budget is recorded in it.

    Returns: :class:`ExploreResult`; ``stats`` holds ``reward_main``, ``reward_aux``,
    ``failed``, ``candidates``, ``pivots``, ``branch_success``, ``nonzero_main``, ``nonzero_aux``,
    the :data:`PIVOT_SUMMARIES`, ``rollouts_main/aux`` and ``tokens_main/aux``.
    """
    return explore_replicas(backend, prompts, np.zeros(len(prompts), np.int64), config, [estimator], [rng],
                            [ledger if ledger is not None else BudgetLedger()]).results[0]


def explore_replicas(backend: Backend, prompts: Sequence[Any], replica: np.ndarray, config: AlgoConfig,
                     estimators: Sequence[RecoverabilityEstimator | None], rngs: Sequence[np.random.Generator],
                     ledgers: Sequence[BudgetLedger]) -> ReplicaStep:
    """One exploration step of R independent runs that share ``config`` (:func:`explore` is R = 1).

    Prompts are grouped by run: ``replica[i]`` (non-decreasing, in [0, R)) is the run of
    ``prompts[i]``. Every run keeps its own recoverability estimator, random stream and budget
    ledger (``estimators[r]``, ``rngs[r]``, ``ledgers[r]``); the main chains and the branches of
    all runs are sampled in one backend call each, and candidates, plans and advantages are
    computed for all runs at once. A run's result does not depend on which runs share the step
    (given a backend whose draws for a run come from that run's own stream).

    Returns: :class:`ReplicaStep` (the shared loss-ready batch and one result per run).
    """
    G, tensors = config.explore.G, hasattr(backend, "sample_branches")
    if tensors:  # the same rollouts as root requests (empty prefixes), from tensors
        P = len(prompts)
        main = backend.sample_branches(prompts, torch.zeros(P, 0, dtype=torch.long), torch.zeros(P, dtype=torch.long),
                                       torch.full((P,), G, dtype=torch.long))
    else:
        main = backend.sample([SampleRequest(p, None, G) for p in prompts])
    planned = plan_replicas(main, replica, config, estimators, rngs)
    aux = None
    if len(planned.plan):
        plan = planned.plan
        if tensors:  # the same rollouts, from tensors
            aux = backend.sample_branches([prompts[p] for p in plan.prompt.tolist()], main.tokens[plan.traj],
                                          torch.from_numpy(plan.prefix_len), torch.from_numpy(plan.n))
        else:
            aux = backend.sample(planned.requests(prompts, main))
    return finish_replicas(prompts, main, aux, planned, config, estimators, ledgers)
