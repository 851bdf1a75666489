"""Branching strategies: where to cut failed trajectories and how many continuations to draw.

Every strategy turns a :class:`CandidateSet` (all candidate pivots of the failed trajectories
of one step) into a :class:`BranchPlan`. All non-root strategies spend the same number of
continuations per failed trajectory, ``n_pivots · K``, so they compare at equal budget:

========================  =======================================================================
``root``                  no branching (plain GRPO)
``deep``                  DEEP-GRPO: ``n_pivots`` points ∝ P̂(r_i)·r_i^γ, K continuations each
``depth-only``            as ``deep`` with P̂ = 1 (utility r_i^γ)
``random-pivot``          ``n_pivots`` points uniformly at random, K continuations each
``root-only``            the root only (paper's "root-only" ablation: K extra root samples in
                          their own aux group per failed chain)
``max-surprisal``         TreeRL-like: M points whose *next* segment holds the highest-surprisal
                          token (-log p of the sampled token; the branch resamples it)
``low-prob``              FR3E-like: M points right *after* the lowest-probability token (the
                          prefix keeps that token; branches explore what follows it)
``uniform``               M points uniformly at random (dispersed)
========================  =======================================================================

Dispersed strategies split the ``n_pivots · K`` continuations over their M points as evenly as
possible (so M = 4, K = 8 gives 2 continuations per point).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deepgrpo.config import DENSE_STRATEGIES, ExploreConfig
from deepgrpo.pivots import gumbel_top_k, pivot_utility, split_evenly, utility_scores

DENSE = DENSE_STRATEGIES
DISPERSED = ("max-surprisal", "low-prob", "uniform")


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
    """

    traj: np.ndarray
    index: np.ndarray
    n_candidates: np.ndarray
    prefix_len: np.ndarray
    prompt: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

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
    traj, prompt, prefix_len, rel_depth: ``[P]`` copied from the candidate set.
    n: ``[P]`` continuations to draw from each point (>= 1).
    """

    candidate: np.ndarray
    traj: np.ndarray
    prompt: np.ndarray
    prefix_len: np.ndarray
    rel_depth: np.ndarray
    n: np.ndarray

    def __len__(self) -> int:
        return int(self.candidate.shape[0])

    @property
    def total_continuations(self) -> int:
        """Σ n: the aux rollouts this plan generates."""
        return int(self.n.sum())

    @classmethod
    def from_candidates(cls, cands: CandidateSet, rows: np.ndarray, n: np.ndarray) -> "BranchPlan":
        """Plan of candidate ``rows`` ``[P]`` with ``n`` ``[P]`` continuations each (points with n = 0 dropped)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = np.asarray(n, dtype=np.int64)
        keep = n > 0
        rows, n = rows[keep], n[keep]
        return cls(candidate=rows, traj=cands.traj[rows], prompt=cands.prompt[rows],
                   prefix_len=cands.prefix_len[rows], rel_depth=cands.rel_depth[rows], n=n)


def _padded(cands: CandidateSet, values: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay per-candidate ``values`` [N] out as ``[F, Lmax]`` (one row per failed trajectory).

    Returns (matrix [F, Lmax], valid [F, Lmax], candidate row [F, Lmax] (-1 on padding)).
    """
    trajs, first = np.unique(cands.traj, return_index=True)
    F = trajs.shape[0]
    Lmax = int(cands.n_candidates.max()) if len(cands) else 0
    row_of = np.searchsorted(trajs, cands.traj)  # [N] -> 0..F-1
    mat = np.full((F, Lmax), fill, dtype=np.float64)
    cand_row = np.full((F, Lmax), -1, dtype=np.int64)
    mat[row_of, cands.index] = values
    cand_row[row_of, cands.index] = np.arange(len(cands))
    return mat, cand_row >= 0, cand_row


def plan_branches(cands: CandidateSet, config: ExploreConfig, p_hat: np.ndarray | None,
                  rng: np.random.Generator) -> BranchPlan:
    """The branching plan of ``config.strategy`` for the candidates of the failed trajectories.

    Args:
        cands: candidate set of N candidates.
        config: :class:`ExploreConfig` (strategy, K, gamma, n_pivots, n_cut_points).
        p_hat: ``[N]`` estimated recoverability (used by ``deep`` only; None = all ones).
        rng: numpy Generator; the only source of randomness.

    Returns: :class:`BranchPlan`.
    """
    s = config.strategy
    empty = BranchPlan.from_candidates(cands, np.zeros(0, np.int64), np.zeros(0, np.int64))
    if s == "root" or len(cands) == 0:
        return empty
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
        else:  # random-pivot
            scores = np.zeros_like(r)
        mat, valid, cand_row = _padded(cands, scores, -np.inf)
        picks = gumbel_top_k(mat, k, rng, valid)  # [F, k]
        counts = np.where(picks >= 0, config.K, 0)  # [F, k]
    else:
        k = config.n_cut_points
        total = config.n_pivots * config.K
        if s == "uniform":
            scores = np.zeros_like(r)
            mat, valid, cand_row = _padded(cands, scores, -np.inf)
            picks = gumbel_top_k(mat, k, rng, valid)
        else:
            key = "next_surprisal" if s == "max-surprisal" else "prev_surprisal"
            scores = np.asarray(cands.features[key], dtype=np.float64)
            mat, valid, cand_row = _padded(cands, scores, -np.inf)
            # highest score first; ties broken at random; -inf (e.g. the root for low-prob) last
            tie = rng.random(mat.shape) * 1e-9
            finite = np.isfinite(mat)
            keyed = np.where(valid, np.where(finite, mat + tie, -1e12 + tie), -np.inf)
            order = np.argsort(-keyed, axis=1, kind="stable")[:, :k]
            picks = np.where(np.take_along_axis(valid, order, axis=1), order, -1)
        n_points = (picks >= 0).sum(1)  # [F]
        counts = np.zeros(picks.shape, dtype=np.int64)
        for f in range(picks.shape[0]):
            m = int(n_points[f])
            counts[f, :m] = split_evenly(total, m)
    rows = np.take_along_axis(cand_row, np.maximum(picks, 0), axis=1)  # [F, k]
    ok = picks >= 0
    return BranchPlan.from_candidates(cands, rows[ok], counts[ok])


def cap_plan(plan: BranchPlan, max_per_prompt: int | None, rng: np.random.Generator) -> BranchPlan:
    """Cap the continuations of each prompt's branches at ``max_per_prompt`` (equal-budget
    comparisons). Points are kept in a random order until the cap; the last kept point may get
    fewer continuations. None = no cap."""
    if max_per_prompt is None or len(plan) == 0:
        return plan
    order = rng.permutation(len(plan))
    n = plan.n.copy()
    used: dict[int, int] = {}
    for j in order:
        p = int(plan.prompt[j])
        left = max_per_prompt - used.get(p, 0)
        n[j] = max(0, min(int(n[j]), left))
        used[p] = used.get(p, 0) + int(n[j])
    keep = n > 0
    return BranchPlan(candidate=plan.candidate[keep], traj=plan.traj[keep], prompt=plan.prompt[keep],
                      prefix_len=plan.prefix_len[keep], rel_depth=plan.rel_depth[keep], n=n[keep])
