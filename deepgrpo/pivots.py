"""Candidate pivots, DEEP-GRPO's utility, and pivot sampling (paper §3.2).

A failed trajectory cut into L segments has L candidate pivots i = 0..L-1: candidate i is the
state after the first i segments (i = 0 is the root; the end of the last segment is never a
candidate). Its relative depth is r_i = (i+1)/(L+1).
"""

from __future__ import annotations

import numpy as np


def candidate_depths(n_segments: int) -> np.ndarray:
    """``[L]`` relative depths r_i = (i+1)/(L+1) of the L candidates of an L-segment trajectory."""
    if n_segments < 0:
        raise ValueError(f"n_segments must be >= 0, got {n_segments}")
    return np.arange(1, n_segments + 1, dtype=np.float64) / (n_segments + 1)


def candidate_prefix_lengths(segment_ends: np.ndarray) -> np.ndarray:
    """``[L]`` prefix lengths (in tokens) of the L candidates given ``[L]`` segment ends:
    ``[0, e_0, ..., e_{L-2}]``."""
    ends = np.asarray(segment_ends, dtype=np.int64).reshape(-1)
    if ends.size == 0:
        return ends
    return np.concatenate([[0], ends[:-1]])


def pivot_utility(p_hat: np.ndarray, rel_depth: np.ndarray, gamma: float = 2.0) -> np.ndarray:
    """Unnormalised utility Q(i) = P̂(success | r_i) · r_i^γ.

    Args:
        p_hat: ``[L]`` estimated recoverability of each candidate.
        rel_depth: ``[L]`` relative depths in (0, 1).
        gamma: depth exponent γ >= 0 (γ = 0: recoverability only).

    Returns: ``[L]`` non-negative utilities.
    """
    p = np.clip(np.asarray(p_hat, dtype=np.float64), 0.0, 1.0)
    return p * np.power(np.asarray(rel_depth, dtype=np.float64), gamma)


def single_continuation(p_any: np.ndarray, K: int) -> np.ndarray:
    """The chance q that one continuation succeeds, from the chance ``p_any`` that at least one of
    K independent continuations does: ``p_any = 1 - (1 - q)^K``, so ``q = 1 - (1 - p_any)^(1/K)``.
    ``[N]`` from ``[N]`` (clipped to [0, 1])."""
    p = np.clip(np.asarray(p_any, dtype=np.float64), 0.0, 1.0)
    return 1.0 - np.power(1.0 - p, 1.0 / K)


def informative_utility(q: np.ndarray, K: int, cost: np.ndarray | float = 1.0) -> np.ndarray:
    """Chance that K continuations from a candidate form a *mixed* group (some succeed, some
    fail: the only groups with non-zero advantages), per unit of cost:
    (1 - q^K - (1 - q)^K) / max(cost, 1), where ``q`` ``[N]`` is the chance that *one*
    continuation succeeds (not that any of K does: see :func:`single_continuation`) and ``cost``
    the candidate's tokens left to generate (budgets in tokens) or 1 (budgets in rollouts, where
    every candidate's K continuations cost the same). ``[N]``."""
    p = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    mixed = 1.0 - p ** K - (1.0 - p) ** K
    return np.clip(mixed, 0.0, 1.0) / np.maximum(np.asarray(cost, dtype=np.float64), 1.0)


def utility_scores(utility: np.ndarray) -> np.ndarray:
    """Log-utilities for :func:`gumbel_top_k`: ``log Q`` where Q > 0, and a score far below any
    positive candidate (but still ordered at random) where Q = 0."""
    q = np.asarray(utility, dtype=np.float64)
    if np.any(q < 0) or not np.all(np.isfinite(q)):
        raise ValueError("utility must be finite and non-negative")
    with np.errstate(divide="ignore"):
        return np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), -1e6)


def gumbel_top_k(scores: np.ndarray, k: int, rng: np.random.Generator,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Per row, ``k`` distinct column indices drawn without replacement with probability
    ∝ exp(score) (successive draws; Gumbel-top-k, i.e. Plackett-Luce sampling).

    Args:
        scores: ``[F, L]`` log-weights (use :func:`utility_scores` for utilities).
        k: draws per row.
        rng: numpy Generator.
        valid: ``[F, L]`` bool, False for padding columns (never drawn).

    Returns: ``[F, k]`` int64 indices in draw order; -1 where a row has fewer than k valid
    columns.
    """
    s = np.asarray(scores, dtype=np.float64)
    F, L = s.shape
    if F == 0 or L == 0 or k <= 0:
        return np.full((F, max(k, 0)), -1, dtype=np.int64)
    return top_k_keyed(s + rng.gumbel(size=(F, L)), k, valid)


def top_k_keyed(keyed: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Per row, the ``k`` valid columns with the highest ``keyed`` value (scores plus their
    Gumbel noise: :func:`gumbel_top_k`), in decreasing order (ties: the lower column first).

    Args:
        keyed: ``[F, L]`` keys.
        k: columns per row.
        valid: ``[F, L]`` bool, False for padding columns (never picked).

    Returns: ``[F, k]`` int64 column indices; -1 where a row has fewer than k valid columns.
    Padding columns after a row's valid ones change nothing, so a row's picks do not depend on
    the width of the matrix it sits in (other replicas' rows).
    """
    F, L = keyed.shape
    if valid is None:
        valid = np.ones((F, L), dtype=bool)
    if F == 0 or L == 0 or k <= 0:
        return np.full((F, max(k, 0)), -1, dtype=np.int64)
    keyed = np.where(valid, keyed, -np.inf)  # [F, L]
    order = np.argsort(-keyed, axis=1, kind="stable")[:, :k]  # [F, min(k, L)]
    ok = np.take_along_axis(valid, order, axis=1)
    out = np.where(ok, order, -1)
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((F, k - out.shape[1]), -1)], axis=1)
    return out.astype(np.int64)


def split_evenly(total: int, parts: int) -> np.ndarray:
    """``[parts]`` non-negative integers summing to ``total``, differing by at most 1
    (the first ``total % parts`` get one more)."""
    if parts <= 0:
        return np.zeros(0, dtype=np.int64)
    return split_evenly_rows(total, np.array([parts]), parts)[0]


def split_evenly_rows(total: int, parts: np.ndarray, width: int) -> np.ndarray:
    """``[F, width]``: row f splits ``total`` evenly (:func:`split_evenly`) over its first
    ``parts[f]`` columns (0 elsewhere; a row with no parts is all 0)."""
    parts = np.asarray(parts, dtype=np.int64).reshape(-1)  # [F]
    m = np.maximum(parts, 1)[:, None]  # [F, 1]
    col = np.arange(width)[None, :]  # [1, width]
    out = total // m + (col < total % m)  # [F, width]
    return np.where(col < parts[:, None], out, 0).astype(np.int64)
