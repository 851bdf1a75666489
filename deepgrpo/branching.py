"""Branching strategies: where to cut failed trajectories and how many continuations to draw.

Every strategy turns a :class:`CandidateSet` (all candidate pivots of the failed trajectories
of one step) into a :class:`BranchPlan`. All non-root strategies spend the same number of
continuations per failed trajectory, ``n_pivots · K``, so they compare at equal budget:

========================  =======================================================================
``root``                  no branching (plain GRPO)
``deep``                  DEEP-GRPO: ``n_pivots`` points ∝ P̂(r_i)·r_i^γ, K continuations each
``depth-only``            as ``deep`` with P̂ = 1 (utility r_i^γ)
``random-pivot``          ``n_pivots`` points uniformly at random, K continuations each
``informative``           the ``n_pivots`` points with the highest chance of a mixed K-group per
                          unit of cost, (1 - q^K - (1 - q)^K) / cost, q the chance that one
                          continuation succeeds (``p_hat`` here; the core converts a learned
                          any-of-K P̂), cost the suffix tokens or 1 (``informative_cost``; ties at random)
``root-only``            the root only (paper's "root-only" ablation: K extra root samples in
                          their own aux group per failed chain)
``max-surprisal``         TreeRL-like: M points whose *next* segment holds the highest-surprisal
                          token (-log p of the sampled token; the branch resamples it)
``low-prob``              FR3E-like: M points right *after* the lowest-probability token (the
                          prefix keeps that token; branches explore what follows it)
``uniform``               M points uniformly at random (dispersed)
========================  =======================================================================

Dispersed strategies split the ``n_pivots · K`` continuations over their M points as evenly as
possible (so M = 4, K = 8 gives 2 continuations per point); a configuration that would give a
point a single continuation is rejected (:class:`~deepgrpo.config.ExploreConfig`), and
:func:`cap_plan` never cuts a point down to one: a one-continuation group has advantage 0.

:func:`plan_tree` describes the sampling tree of a step (main chains cut at their branch
points, branches as leaves) for TreeRL-style advantages (:func:`deepgrpo.advantages.tree_advantages`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from deepgrpo.config import DENSE_STRATEGIES, DISPERSED_STRATEGIES, ExploreConfig
from deepgrpo.pivots import informative_utility, pivot_utility, split_evenly_rows, top_k_keyed, utility_scores

DENSE = DENSE_STRATEGIES
DISPERSED = DISPERSED_STRATEGIES


@dataclass
class CandidateSet:
    """All candidate pivots of a step's failed trajectories, flattened (N candidates).

    traj: ``[N]`` row of the candidate's trajectory in the main rollouts.
    index: ``[N]`` candidate index i within its trajectory (0 = root).
    n_candidates: ``[N]`` L of its trajectory (number of candidates = number of segments).
    prefix_len: ``[N]`` prefix length in tokens.
    prompt: ``[N]`` prompt index (within the step) of its trajectory.
    features: name -> ``[N]`` array; always holds ``rel_depth`` = (i+1)/(L+1) and the other
        entries of :data:`deepgrpo.estimators.CANDIDATE_FEATURES`, plus ``prev_surprisal``
        (max -log p over the prefix's last segment, -inf at the root) used by ``low-prob``.
    replica: ``[N]`` the run (replica) the candidate belongs to, non-decreasing (None: all 0,
        one run); see :func:`deepgrpo.explore.explore_replicas`.
    """

    traj: np.ndarray
    index: np.ndarray
    n_candidates: np.ndarray
    prefix_len: np.ndarray
    prompt: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    replica: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.replica is None:
            self.replica = np.zeros(self.traj.shape[0], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.traj.shape[0])

    @property
    def rel_depth(self) -> np.ndarray:
        """``[N]`` relative depth r of each candidate."""
        return self.features["rel_depth"]


@dataclass
class BranchPlan:
    """Branch points chosen for one step (P points).

    candidate: ``[P]`` row into the :class:`CandidateSet`.
    traj, prompt, prefix_len, rel_depth, replica: ``[P]`` copied from the candidate set.
    n: ``[P]`` continuations to draw from each point (>= 1).
    """

    candidate: np.ndarray
    traj: np.ndarray
    prompt: np.ndarray
    prefix_len: np.ndarray
    rel_depth: np.ndarray
    n: np.ndarray
    replica: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.replica is None:
            self.replica = np.zeros(self.candidate.shape[0], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.candidate.shape[0])

    @property
    def total_continuations(self) -> int:
        """Σ n: the aux rollouts this plan generates."""
        return int(self.n.sum())

    @classmethod
    def from_candidates(cls, cands: CandidateSet, rows: np.ndarray, n: np.ndarray) -> BranchPlan:
        """Plan of candidate ``rows`` ``[P]`` with ``n`` ``[P]`` continuations each (points with n = 0 dropped)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = np.asarray(n, dtype=np.int64)
        keep = n > 0
        rows, n = rows[keep], n[keep]
        return cls(candidate=rows, traj=cands.traj[rows], prompt=cands.prompt[rows],
                   prefix_len=cands.prefix_len[rows], rel_depth=cands.rel_depth[rows], n=n,
                   replica=cands.replica[rows])

    def select(self, keep: np.ndarray) -> BranchPlan:
        """The points ``keep`` (bool ``[P]`` or indices), everything else unchanged."""
        return BranchPlan(candidate=self.candidate[keep], traj=self.traj[keep], prompt=self.prompt[keep],
                          prefix_len=self.prefix_len[keep], rel_depth=self.rel_depth[keep], n=self.n[keep],
                          replica=self.replica[keep])


Rngs = np.random.Generator | Sequence[np.random.Generator]
"""One numpy Generator (one run), or one per replica (:attr:`CandidateSet.replica` indexes it)."""


def _rng_list(rng: Rngs) -> Sequence[np.random.Generator]:
    return [rng] if isinstance(rng, np.random.Generator) else rng


@dataclass
class _Layout:
    """Candidates laid out one row per failed trajectory (F rows, trajectories in order).

    row_of: ``[N]`` each candidate's row; valid, cand_row: ``[F, Lmax]`` (cand_row -1 on padding);
    replica: ``[F]`` each row's replica; width: ``[F]`` each row's number of candidates.
    """

    row_of: np.ndarray
    valid: np.ndarray
    cand_row: np.ndarray
    replica: np.ndarray
    width: np.ndarray

    @classmethod
    def of(cls, cands: CandidateSet) -> _Layout:
        trajs, first = np.unique(cands.traj, return_index=True)
        F = trajs.shape[0]
        Lmax = int(cands.n_candidates.max()) if len(cands) else 0
        row_of = np.searchsorted(trajs, cands.traj)  # [N] -> 0..F-1
        cand_row = np.full((F, Lmax), -1, dtype=np.int64)
        cand_row[row_of, cands.index] = np.arange(len(cands))
        return cls(row_of, cand_row >= 0, cand_row, cands.replica[first], cands.n_candidates[first])

    def matrix(self, cands: CandidateSet, values: np.ndarray, fill: float) -> np.ndarray:
        """Per-candidate ``values`` [N] as ``[F, Lmax]`` (``fill`` on padding)."""
        mat = np.full(self.cand_row.shape, fill, dtype=np.float64)
        mat[self.row_of, cands.index] = values
        return mat

    def noise(self, rngs: Sequence[np.random.Generator],
              draw: Callable[[np.random.Generator, tuple[int, int]], np.ndarray]) -> np.ndarray:
        """``[F, Lmax]`` random numbers: each replica's rows get ``draw(rngs[r], (F_r, L_r))`` from
        its own generator (L_r: its widest row), exactly what that replica would draw alone, in
        their first L_r columns (0 elsewhere)."""
        out = np.zeros(self.cand_row.shape)
        if out.size == 0:
            return out
        bounds = np.flatnonzero(np.diff(self.replica)) + 1
        for a, b in zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [len(self.replica)]]).tolist()):
            L = int(self.width[a:b].max())
            out[a:b, :L] = draw(rngs[int(self.replica[a])], (b - a, L))
        return out


def plan_branches(cands: CandidateSet, config: ExploreConfig, p_hat: np.ndarray | None,
                  rng: Rngs) -> BranchPlan:
    """The branching plan of ``config.strategy`` for the candidates of the failed trajectories.

    Args:
        cands: candidate set of N candidates (of one run, or of several replicas:
            :attr:`CandidateSet.replica`).
        config: :class:`ExploreConfig` (strategy, K, gamma, n_pivots, n_cut_points).
        p_hat: ``[N]`` estimated recoverability (used by ``deep`` and ``informative``; None = all ones):
            for ``informative``, the chance that one continuation succeeds.
        rng: numpy Generator, or one per replica; the only source of randomness. A replica's
            draws come from its own generator and equal those it would make alone.

    Returns: :class:`BranchPlan`.
    """
    s = config.strategy
    empty = BranchPlan.from_candidates(cands, np.zeros(0, np.int64), np.zeros(0, np.int64))
    if s == "root" or len(cands) == 0:
        return empty
    rngs = _rng_list(rng)
    lay = _Layout.of(cands)
    valid, cand_row = lay.valid, lay.cand_row
    r = cands.rel_depth
    if s in DENSE:
        k = config.n_pivots
        if s == "deep":
            p = np.ones(len(cands)) if p_hat is None else np.asarray(p_hat, dtype=np.float64)
            scores = utility_scores(pivot_utility(p, r, config.gamma))
        elif s == "depth-only":
            scores = utility_scores(pivot_utility(np.ones_like(r), r, config.gamma))
        elif s == "root-only":
            scores = np.where(cands.index == 0, 0.0, -1e6)
        elif s == "informative":  # argmax: log-utilities scaled so the Gumbel noise only breaks ties
            q = np.ones(len(cands)) if p_hat is None else np.asarray(p_hat, dtype=np.float64)
            cost = cands.features["remaining_tokens"] if config.informative_cost == "tokens" else 1.0
            u = informative_utility(q, config.K, cost)
            scores = 1e6 * utility_scores(u)
        else:  # random-pivot
            scores = np.zeros_like(r)
        mat = lay.matrix(cands, scores, -np.inf)
        picks = top_k_keyed(mat + lay.noise(rngs, lambda g, shape: g.gumbel(size=shape)), k, valid)  # [F, k]
        counts = np.where(picks >= 0, config.K, 0)  # [F, k]
    else:
        k = config.n_cut_points
        total = config.n_pivots * config.K
        if s == "uniform":
            mat = lay.matrix(cands, np.zeros_like(r), -np.inf)
            picks = top_k_keyed(mat + lay.noise(rngs, lambda g, shape: g.gumbel(size=shape)), k, valid)
        else:
            key = "next_surprisal" if s == "max-surprisal" else "prev_surprisal"
            mat = lay.matrix(cands, np.asarray(cands.features[key], dtype=np.float64), -np.inf)
            # highest score first; ties broken at random; -inf (e.g. the root for low-prob) last
            tie = lay.noise(rngs, lambda g, shape: g.random(shape)) * 1e-9
            finite = np.isfinite(mat)
            keyed = np.where(valid, np.where(finite, mat + tie, -1e12 + tie), -np.inf)
            picks = top_k_keyed(keyed, k, valid)
        counts = split_evenly_rows(total, (picks >= 0).sum(1), picks.shape[1])  # [F, k]
    rows = np.take_along_axis(cand_row, np.maximum(picks, 0), axis=1)  # [F, k]
    ok = picks >= 0
    return BranchPlan.from_candidates(cands, rows[ok], counts[ok])


def cap_plan(plan: BranchPlan, max_per_prompt: int | None, rng: Rngs) -> BranchPlan:
    """Cap the continuations of each prompt's branches at ``max_per_prompt`` (equal-budget
    comparisons). Points are kept in a random order until the cap; the last kept point may get
    fewer continuations, but never a single one out of several (a group of one has advantage 0:
    such a point is dropped instead). None = no cap. ``rng``: one Generator, or one per replica
    (:attr:`BranchPlan.replica`; each replica's points are shuffled by its own)."""
    if max_per_prompt is None or len(plan) == 0:
        return plan
    rngs = _rng_list(rng)
    rep = plan.replica
    bounds = np.flatnonzero(np.diff(rep)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(plan)]])
    order = np.concatenate([a + rngs[int(rep[a])].permutation(b - a) for a, b in zip(starts.tolist(), ends.tolist())])
    planned = plan.n[order]  # [P] in the order points are considered
    prompt = plan.prompt[order]
    if bool((planned < 2).any()):  # points planned with one continuation: the sequential rule
        n_sorted = planned.copy()
        used: dict[int, int] = {}
        for j in range(len(order)):
            p = int(prompt[j])
            left = max_per_prompt - used.get(p, 0)
            n_sorted[j] = max(0, min(int(planned[j]), left))
            if n_sorted[j] == 1 and planned[j] > 1:
                n_sorted[j] = 0
            used[p] = used.get(p, 0) + int(n_sorted[j])
    else:
        # with every point planned >= 2, greedy filling keeps min(cap, Σ planned so far) per prompt;
        # a point cut to one continuation is dropped, and nothing after it in its prompt fits
        by = np.argsort(prompt, kind="stable")  # prompt-major, consideration order within a prompt
        cum = np.cumsum(planned[by])
        first = np.concatenate([[True], prompt[by][1:] != prompt[by][:-1]])
        base = np.maximum.accumulate(np.where(first, cum - planned[by], 0))  # the prompt's start
        c = cum - base
        kept = np.minimum(c, max_per_prompt) - np.minimum(c - planned[by], max_per_prompt)
        kept = np.where(kept == 1, 0, kept)
        n_sorted = np.empty_like(planned)
        n_sorted[by] = kept
    n = np.empty_like(plan.n)
    n[order] = n_sorted
    keep = n > 0
    out = plan.select(keep)
    out.n = n[keep]
    return out


def plan_tree(plan: BranchPlan, main_lengths: torch.Tensor, aux_lengths: torch.Tensor,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling tree of one step, as root-to-leaf paths for
    :func:`deepgrpo.advantages.tree_advantages`, rows ordered like the step's batch before any
    row is dropped (:func:`deepgrpo.explore.assemble_batch`: the main rows, then the aux rows
    in plan order, ``plan.n[j]`` per point).

    Prompt p's root is node p. Main chain b (of prompt b // group_size) with branch points at
    prefix lengths c_1 < ... < c_m is cut into the segment nodes [0, c_1), [c_1, c_2), ...,
    [c_m, length) (an empty first segment when c_1 = 0 is skipped); its path is the root and
    its segments. A continuation from point c_i of chain b is a leaf of its own, below the
    segment that ends at c_i (below the root when c_i = 0). Weights are the tokens each row
    trains in each node: every token of a main row; only the suffix (the leaf) of a branch row,
    whose prefix is masked out of its gradient.

    Args:
        plan: the step's branching plan (P points).
        main_lengths: ``LongTensor [Bm]`` generated tokens of each main row.
        aux_lengths: ``LongTensor [A]`` suffix tokens of each aux row (A = Σ plan.n).
        group_size: G, main rows per prompt.

    Returns: ``(path LongTensor [Bm + A, D], weight FloatTensor [Bm + A, D])``, -1 / 0 padded.
    """
    Bm = int(main_lengths.shape[0])
    A = int(aux_lengths.shape[0])
    n_prompts = Bm // group_size
    main_len = main_lengths.long().numpy()  # [Bm]
    traj = np.asarray(plan.traj, dtype=np.int64)  # [P]
    cut = np.asarray(plan.prefix_len, dtype=np.int64)  # [P]
    stride = int(np.bincount(traj, minlength=1).max()) + 2 if traj.size else 2
    D = stride + 1  # root + at most (cuts + 1) segments, or root + segments above a cut + leaf
    path = np.full((Bm + A, D), -1, dtype=np.int64)
    weight = np.zeros((Bm + A, D))
    # main chains without branch points: the root and one node holding the whole chain
    rows = np.arange(Bm)
    path[:Bm, 0] = rows // group_size
    path[:Bm, 1] = n_prompts + rows * stride
    weight[:Bm, 1] = main_len
    if not traj.size:
        return torch.from_numpy(path), torch.from_numpy(weight).float()
    # chains with branch points: their distinct cuts in order, then the chain's end, are the
    # bounds k = 0..m of the segments [previous bound, bound k) (node n_prompts + b·stride + k);
    # only a first segment of no tokens (a cut at 0) is left out
    order = np.lexsort((cut, traj))  # [P] chain-major, cuts ascending
    distinct = np.ones(order.size, dtype=bool)
    distinct[1:] = (traj[order][1:] != traj[order][:-1]) | (cut[order][1:] != cut[order][:-1])
    ub, uc = traj[order][distinct], cut[order][distinct]  # [U] distinct (chain, cut) pairs
    new_chain = np.ones(ub.size, dtype=bool)
    new_chain[1:] = ub[1:] != ub[:-1]
    chain = np.cumsum(new_chain) - 1  # [U] index among the chains with cuts
    first = np.flatnonzero(new_chain)  # [C] first distinct cut of each chain
    k = np.arange(ub.size) - first[chain]  # [U] rank of the cut in its chain
    m = np.diff(np.append(first, ub.size))  # [C] distinct cuts per chain
    b_c = ub[first]  # [C]
    skip = (uc[first] == 0).astype(np.int64)  # [C] the chain's first segment is empty
    # bounds: chain c's m_c cuts then its end, at positions first_c + c .. first_c + c + m_c
    eb = np.concatenate([ub, b_c])
    ek = np.concatenate([k, m])
    eend = np.concatenate([uc, main_len[b_c]])
    echain = np.concatenate([chain, np.arange(b_c.size)])
    pos = np.concatenate([np.arange(ub.size) + chain, first + m + np.arange(b_c.size)])
    by = np.empty_like(pos)
    by[pos] = np.arange(pos.size)
    eb, ek, eend, echain = eb[by], ek[by], eend[by], echain[by]  # [U + C] bounds in order
    estart = np.where(ek > 0, np.roll(eend, 1), 0)
    kept = (ek > 0) | (eend > 0)
    col = 1 + ek - skip[echain]
    path[eb[kept], col[kept]] = n_prompts + eb[kept] * stride + ek[kept]
    weight[eb[kept], col[kept]] = (eend - estart)[kept]
    if A:
        # point j's continuations: leaves below the path of its chain down to the node ending at
        # its cut (the root alone for a cut at 0)
        u = np.empty(order.size, dtype=np.int64)
        u[order] = np.cumsum(distinct) - 1  # [P] the point's distinct (chain, cut) pair
        # [P] nodes above its leaves: the root and the segments up to its cut (at the chain's end:
        # also the end's segment, of no tokens)
        depth = 2 + k[u] - skip[chain[u]] + (cut == main_len[traj])
        n = np.asarray(plan.n, dtype=np.int64)
        parent = np.repeat(traj, n)  # [A]
        d = np.repeat(depth, n)  # [A]
        aux = np.arange(Bm, Bm + A)
        above = np.arange(D)[None, :] < d[:, None]  # [A, D]
        path[Bm:] = np.where(above, path[parent], -1)
        path[aux, d] = n_prompts + Bm * stride + np.arange(A)
        weight[aux, d] = aux_lengths.long().numpy()
    return torch.from_numpy(path), torch.from_numpy(weight).float()
