"""Vectorised sampling of token chains and deterministic replay of their status.

All functions work on B chains at once with a Python loop over the T steps only (never one per
sample). Randomness comes only from the ``torch.Generator`` passed in: one uniform per
(chain, step), turned into a token by inverse-CDF sampling over the V tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sims.spec import ON_TRACK, ProblemSet


@dataclass
class SampledChains:
    """B full chains (prefix + sampled suffix), laid out over T steps; row b has ``lengths[b]``
    steps (its problem's length) and padding after them.

    tokens: ``LongTensor [B, T]`` (0 on padding).
    logprobs: ``FloatTensor [B, T]`` log π of each token in the state it was emitted from, under
        the policy used for sampling (prefix positions included; 0 on padding).
    status: ``LongTensor [B, T + 1]`` status *before* step t (column T: the final status); it
        stays frozen over padding.
    first_error: ``LongTensor [B]`` first step whose token was wrong (the row's length if none).
    rewards: ``FloatTensor [B]`` 1 iff on track after the row's last step.
    lengths: ``LongTensor [B]`` steps of each row's problem.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    status: torch.Tensor
    first_error: torch.Tensor
    rewards: torch.Tensor
    lengths: torch.Tensor

    @property
    def on_track(self) -> torch.Tensor:
        """``BoolTensor [B, T]`` on track *after* step t."""
        return self.status[:, 1:] == ON_TRACK


def replay_status(problems: ProblemSet, problem: torch.Tensor, tokens: torch.Tensor,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``LongTensor [B, L + 1]``: status before each step of given token prefixes.

    Args:
        problems: the problem set.
        problem: ``LongTensor [B]`` problem of each row.
        tokens: ``LongTensor [B, L]`` tokens from step 0 (L <= T).
        lengths: ``LongTensor [B]`` valid tokens per row (None: all L); the status stays
            frozen after a row's last valid token, so column ``lengths[b]`` is the status
            reached by row b's prefix. Tokens past a row's problem length are never valid.
    """
    B, L = tokens.shape
    # numpy: a handful of [B, L] integer and boolean operations (exact), without torch's per-op cost
    problem_np = problem.numpy()
    lengths_np = None if lengths is None else lengths.numpy()
    if problems.variable_length:
        own = problems.lengths.numpy()[problem_np]  # [B]
        lengths_np = own if lengths_np is None else np.minimum(lengths_np, own)
    wrong = tokens.numpy() != problems.correct.numpy()[problem_np, :L]  # [B, L]
    if lengths_np is not None:
        wrong &= np.arange(L)[None, :] < lengths_np[:, None]  # freeze after the prefix
    allowed = problems.recovery_allowed.numpy()
    # [L], or [B, L] in a stack of runs with different rules (each row its own)
    allowed = allowed[problem_np, :L] if allowed.ndim == 2 else allowed[:L]
    if allowed.all():  # recovery always possible: derailed after t iff token t was wrong
        derailed = wrong
    elif not allowed.any():  # fatal: derailed after t iff any wrong token so far
        derailed = np.logical_or.accumulate(wrong, axis=1)
    else:  # general rule: derailed after t iff wrong, or derailed before and no recovery at t
        derailed = np.empty_like(wrong)
        prev = np.zeros(B, dtype=bool)
        for t in range(L):
            prev = wrong[:, t] | (prev & ~allowed[..., t])
            derailed[:, t] = prev
    if lengths_np is not None and L:  # a frozen row keeps the status its prefix reached
        lengths_np = np.minimum(lengths_np, L)  # (a row longer than the tokens given keeps them all)
        last = derailed[np.arange(B), np.maximum(lengths_np - 1, 0)] & (lengths_np > 0)  # [B]
        derailed = np.where(np.arange(L)[None, :] < lengths_np[:, None], derailed, last[:, None])
    status = np.zeros((B, L + 1), dtype=np.int64)
    status[:, 1:] = derailed
    return torch.from_numpy(status)


def token_logprobs(log_probs: torch.Tensor, problem: torch.Tensor, status: torch.Tensor,
                   tokens: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` log π(tokens[b, t] | problem[b], t, status[b, t]) gathered from a
    ``[n, T, 2, V]`` table (keeps the table's gradient). ``status``: ``[B, >= L]``."""
    n, T, _, V = log_probs.shape
    L = tokens.shape[1]
    flat = ((problem.numpy()[:, None] * T + np.arange(L)) * 2 + status[:, :L].numpy()) * V + tokens.numpy()  # [B, L]
    return log_probs.reshape(-1)[torch.from_numpy(flat)]


@dataclass
class SamplingTable:
    """A policy's log-probs laid out for :func:`sample_chains` (what it would otherwise rebuild on
    every call; one table serves every call at the same weights, e.g. a step's main chains and
    its branches).

    log_probs: ``float32 ndarray [T, n·2, V]`` log π, step-major (row 2p + s of step t), read for
        the sampled tokens' log-probs.
    cdf: ``float32 ndarray [T, n·2, V]`` its cumulative probabilities over the tokens, laid out
        alike, the last entry of each row set to 2 so that every uniform falls at or before the
        last token (no rounding overflow).
    """

    log_probs: np.ndarray
    cdf: np.ndarray

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor) -> SamplingTable:
        """The table of ``log_probs`` ``[n, T, 2, V]`` (no gradient kept)."""
        n, T, _, V = log_probs.shape
        lp_t = log_probs.detach().float().transpose(0, 1).contiguous()  # [T, n, 2, V]
        cdf_t = lp_t.exp().cumsum(-1)  # [T, n, 2, V]
        cdf_t[..., -1] = 2.0
        return cls(log_probs=lp_t.reshape(T, n * 2, V).numpy(), cdf=cdf_t.reshape(T, n * 2, V).numpy())


def sample_chains(problems: ProblemSet, log_probs: torch.Tensor | SamplingTable, problem: torch.Tensor,
                  generator: torch.Generator | None, prefix: torch.Tensor | None = None,
                  prefix_len: torch.Tensor | None = None, uniforms: torch.Tensor | None = None) -> SampledChains:
    """Sample B chains of ``problem`` under ``log_probs``, continuing given prefixes exactly.

    Args:
        problems: the problem set (correct tokens, recovery rule).
        log_probs: ``[n, T, 2, V]`` log π of the sampling policy (no gradient needed), or its
            :class:`SamplingTable` (the same draws, without rebuilding the CDF).
        problem: ``LongTensor [B]``.
        generator: torch Generator; draws one uniform per (row, step), ``torch.rand(T, B)``.
        uniforms: ``[T, B]`` those uniforms, drawn by the caller (then ``generator`` is unused):
            how several runs' rows are sampled together, each run's from its own generator.
        prefix: ``LongTensor [B, >= max(prefix_len)]`` prefix tokens (None: from the root).
        prefix_len: ``LongTensor [B]`` tokens of ``prefix`` to keep per row (positions before
            it are copied, the status they reach is replayed, the rest is sampled).

    Returns: :class:`SampledChains`. Rows of problems shorter than T stop at their problem's
    length (padding after it: token 0, log-prob 0, status frozen).
    """
    T, V = problems.T, problems.V
    B = problem.shape[0]
    table = log_probs if isinstance(log_probs, SamplingTable) else SamplingTable.from_log_probs(log_probs)
    cdf, lp = table.cdf, table.log_probs  # [T, n·2, V] row 2p + s of step t
    u = torch.rand(T, B, generator=generator) if uniforms is None else uniforms  # [T, B]
    # the loop runs in numpy: its per-op overhead is a few times below torch's on the small
    # batches of a training step, and it is as fast on large ones (same float32 CDF and
    # uniforms, so the draws are exactly those of the torch formulation); what does not depend
    # on the status reached so far (padding) is done for all T steps at once
    ut_all = u.numpy()  # [T, B]
    problem_np = problem.numpy()
    lengths = problems.lengths.numpy()[problem_np]  # [B]
    # step-major [T, B] layouts keep every per-step vector contiguous
    correct = problems.correct_steps.take(problem_np, axis=1)  # [T, B]
    varlen = problems.variable_length
    if varlen:
        active = np.arange(T)[:, None] < lengths[None, :]  # [T, B] step t visited by row b
        # padding steps draw token 0 (u = 0: no CDF entry lies below it) and count as correct
        ut_all = np.where(active, ut_all, np.float32(0))
        correct = np.where(active, correct, 0)
    per_row = problems.recovery_allowed.dim() == 2  # a stack of runs with different rules
    if per_row:
        forbidden_tb = np.ascontiguousarray(~problems.recovery_allowed.numpy()[problem_np].T)  # [T, B]
    allowed = [True] * T if per_row else problems.recovery_allowed.tolist()
    row_base = problem_np * 2  # [B]
    tokens_tb = np.empty((T, B), dtype=np.int64)
    logprobs_tb = np.empty((T, B), dtype=lp.dtype)  # log π of each sampled token
    wrong = np.empty(B, dtype=bool)  # token t was wrong
    derailed = np.zeros((T + 1, B), dtype=bool)  # status before step t (True = derailed)
    off = derailed[0]
    clean = np.ones(B, dtype=bool)  # no wrong token yet
    first_error = np.zeros(B, dtype=np.int64)  # steps before the first wrong one (padding never wrong)
    max_prefix = 0 if prefix is None or B == 0 else int(prefix_len.max())
    if max_prefix:
        prefix_np = prefix.numpy()  # [B, >= P] (column t read at step t)
        keep = np.arange(max_prefix)[:, None] < prefix_len.numpy()[None, :]  # [P, B]
    for t in range(T):
        at = row_base + off  # [B] row 2p + s of step t's tables: the (problem, status) reached
        rows = cdf[t].take(at, axis=0)  # [B, V] its CDF
        ut = ut_all[t]
        if V <= 8:  # inverse-CDF draw: number of CDF entries below u (columns: faster for small V)
            tok = (rows[:, 0] < ut).astype(np.int64)
            for v in range(1, V - 1):
                tok += rows[:, v] < ut
        else:
            tok = (rows < ut[:, None]).sum(-1)
        if t < max_prefix:
            tok = np.where(keep[t], prefix_np[:, t], tok)
        tokens_tb[t] = tok
        at *= V
        at += tok
        lp[t].reshape(-1).take(at, out=logprobs_tb[t])  # log π(token | problem, t, status)
        np.not_equal(tok, correct[t], out=wrong)
        np.greater(clean, wrong, out=clean)  # clean and not wrong
        first_error += clean
        # correct token -> on track if it was on track or recovery is allowed at t (sims.spec);
        # a padding step (never wrong) keeps the status
        if per_row:  # wrong, or derailed before and no recovery at t (padding steps keep the status)
            step = wrong | (off & forbidden_tb[t])
            derailed[t + 1] = np.where(active[t], step, off) if varlen else step
        elif not allowed[t]:
            np.logical_or(off, wrong, out=derailed[t + 1])
        elif varlen:
            derailed[t + 1] = np.where(active[t], wrong, off)
        else:
            derailed[t + 1] = wrong
        off = derailed[t + 1]
    if varlen:
        first_error = np.minimum(first_error, lengths)  # a chain without errors: its length
    tokens = torch.from_numpy(tokens_tb.T.copy())  # [B, T]
    status = torch.from_numpy(derailed.T.astype(np.int64))  # [B, T+1]
    if varlen:
        logprobs_tb[~active] = 0.0
    logprobs = torch.from_numpy(logprobs_tb).t()  # [B, T]
    rewards = torch.from_numpy(~off).float()  # [B] on track after the last step
    return SampledChains(tokens=tokens, logprobs=logprobs, status=status, first_error=torch.from_numpy(first_error),
                         rewards=rewards, lengths=torch.from_numpy(lengths))


def suffixes(full: torch.Tensor, prefix_len: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``[B, T]``: row b = ``full[b, prefix_len[b]:]`` left-aligned, padded with ``fill`` (no
    gradient: ``full`` holds sampled tokens or their sampling log-probs)."""
    B, T = full.shape
    j = np.arange(T)[None, :]  # [1, T]
    pl = prefix_len.numpy()[:, None]  # [B, 1]
    col = np.minimum(j + pl, T - 1)  # [B, T] column of row b's token j + pl
    a = full.detach().numpy()
    if a.T.flags.c_contiguous and not a.flags.c_contiguous:  # step-major memory (the sampler's)
        out = a.T.reshape(-1).take(col * B + np.arange(B)[:, None])
    else:
        out = np.ascontiguousarray(a).reshape(-1).take(col + (np.arange(B) * T)[:, None])
    out[j >= T - pl] = fill
    return torch.from_numpy(out)
