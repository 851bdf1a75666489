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
    if problems.variable_length:
        own = problems.lengths[problem]  # [B]
        lengths = own if lengths is None else torch.minimum(lengths, own)
    wrong = tokens != problems.correct[problem, :L]  # [B, L]
    if lengths is not None:
        wrong = wrong & (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1))  # freeze after the prefix
    allowed = problems.recovery_allowed[:L]
    if bool(allowed.all()):  # recovery always possible: derailed after t iff token t was wrong
        derailed = wrong
    elif not bool(allowed.any()):  # fatal: derailed after t iff any wrong token so far
        derailed = wrong.cummax(dim=1).values
    else:  # general rule: derailed after t iff wrong, or derailed before and no recovery at t
        derailed = torch.empty_like(wrong)
        prev = torch.zeros(B, dtype=torch.bool)
        for t in range(L):
            prev = wrong[:, t] | (prev & ~allowed[t])
            derailed[:, t] = prev
    if lengths is not None:  # a frozen row keeps the status its prefix reached
        j = torch.arange(L).unsqueeze(0)
        last = derailed.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1))  # [B, 1]
        last = last & (lengths > 0).unsqueeze(1)
        derailed = torch.where(j < lengths.unsqueeze(1), derailed, last)
    status = torch.zeros(B, L + 1, dtype=torch.long)
    status[:, 1:] = derailed.long()
    return status


def token_logprobs(log_probs: torch.Tensor, problem: torch.Tensor, status: torch.Tensor,
                   tokens: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` log π(tokens[b, t] | problem[b], t, status[b, t]) gathered from a
    ``[n, T, 2, V]`` table (keeps the table's gradient). ``status``: ``[B, >= L]``."""
    n, T, _, V = log_probs.shape
    L = tokens.shape[1]
    steps = torch.arange(L).unsqueeze(0)  # [1, L]
    flat = ((problem.unsqueeze(1) * T + steps) * 2 + status[:, :L]) * V + tokens  # [B, L]
    return log_probs.reshape(-1)[flat]


def sample_chains(problems: ProblemSet, log_probs: torch.Tensor, problem: torch.Tensor,
                  generator: torch.Generator, prefix: torch.Tensor | None = None,
                  prefix_len: torch.Tensor | None = None) -> SampledChains:
    """Sample B chains of ``problem`` under ``log_probs``, continuing given prefixes exactly.

    Args:
        problems: the problem set (correct tokens, recovery rule).
        log_probs: ``[n, T, 2, V]`` log π of the sampling policy (no gradient needed).
        problem: ``LongTensor [B]``.
        generator: torch Generator; draws one uniform per (row, step).
        prefix: ``LongTensor [B, >= max(prefix_len)]`` prefix tokens (None: from the root).
        prefix_len: ``LongTensor [B]`` tokens of ``prefix`` to keep per row (positions before
            it are copied, the status they reach is replayed, the rest is sampled).

    Returns: :class:`SampledChains`. Rows of problems shorter than T stop at their problem's
    length (padding after it: token 0, log-prob 0, status frozen).
    """
    T, V = problems.T, problems.V
    B = problem.shape[0]
    lengths = problems.lengths[problem]  # [B]
    varlen = problems.variable_length
    if varlen:
        active = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B] step t visited by row b
    n2 = problems.n * 2
    lp = log_probs.detach().float().transpose(0, 1).contiguous()  # [T, n, 2, V]
    cdf_t = lp.exp().cumsum(-1)  # [T, n, 2, V]
    cdf_t[..., -1] = 2.0  # every uniform falls at or before the last token (no rounding overflow)
    u = torch.rand(T, B, generator=generator)  # [T, B]
    # the loop runs in numpy: its per-op overhead is a few times below torch's on the small
    # batches of a training step, and it is as fast on large ones (same float32 CDF and
    # uniforms, so the draws are exactly those of the torch formulation)
    cdf = cdf_t.reshape(T, n2, V).numpy()  # row 2p + s of step t
    ut_all = u.numpy()  # [T, B]
    problem_np = problem.numpy()
    # step-major [T, B] layouts keep every per-step vector contiguous
    correct = np.ascontiguousarray(problems.correct.numpy()[problem_np].T)  # [T, B]
    allowed = problems.recovery_allowed.tolist()
    row_base = problem_np * 2  # [B]
    tokens_tb = np.empty((T, B), dtype=np.int64)
    flat_tb = np.empty((T, B), dtype=np.int64)  # index of (t, p, s, token) into lp.reshape(-1)
    derailed = np.zeros((T + 1, B), dtype=bool)  # status before step t (True = derailed)
    first_error = np.zeros(B, dtype=np.int64)
    clean = np.ones(B, dtype=bool)  # no wrong token yet
    off = derailed[0]
    if varlen:
        active_np = active.numpy()
    max_prefix = 0 if prefix is None or B == 0 else int(prefix_len.max())
    if max_prefix:
        prefix_tb = np.ascontiguousarray(prefix[:, :max_prefix].numpy().T)  # [P, B]
        keep = np.arange(max_prefix)[:, None] < prefix_len.numpy()[None, :]  # [P, B]
    for t in range(T):
        row = row_base + off  # [B] row of (problem, status) at step t
        rows = cdf[t].take(row, axis=0)  # [B, V]
        ut = ut_all[t]
        if V <= 8:  # inverse-CDF draw: number of CDF entries below u (columns: faster for small V)
            tok = (rows[:, 0] < ut).astype(np.int64)
            for v in range(1, V - 1):
                tok += rows[:, v] < ut
        else:
            tok = (rows < ut[:, None]).sum(-1)
        if t < max_prefix:
            tok = np.where(keep[t], prefix_tb[t], tok)
        if varlen:
            act = active_np[t]
            tok[~act] = 0
        tokens_tb[t] = tok
        np.add(row * V, tok, out=flat_tb[t])
        flat_tb[t] += t * n2 * V
        wrong = tok != correct[t]  # [B]
        if varlen:
            wrong &= act
            clean &= ~wrong
            first_error += clean & act
            # correct token -> on track if it was on track or recovery is allowed at t (sims.spec)
            off = np.where(act, wrong if allowed[t] else (off | wrong), off)
        else:
            clean &= ~wrong
            first_error += clean
            off = wrong if allowed[t] else (off | wrong)
        derailed[t + 1] = off
    tokens = torch.from_numpy(tokens_tb.T.copy())  # [B, T]
    status = torch.from_numpy(derailed.T.astype(np.int64))  # [B, T+1]
    logprobs = lp.reshape(-1).take(torch.from_numpy(flat_tb))  # [T, B]
    if varlen:
        logprobs = logprobs.masked_fill(~active, 0.0)
    logprobs = logprobs.t()  # [B, T]
    rewards = torch.from_numpy(~off).float()  # [B] on track after the last step
    first_error = torch.from_numpy(first_error)
    return SampledChains(tokens=tokens, logprobs=logprobs, status=status, first_error=first_error, rewards=rewards,
                         lengths=lengths)


def suffixes(full: torch.Tensor, prefix_len: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``[B, T]``: row b = ``full[b, prefix_len[b]:]`` left-aligned, padded with ``fill``."""
    B, T = full.shape
    j = torch.arange(T).unsqueeze(0)  # [1, T]
    src = (j + prefix_len.unsqueeze(1)).clamp(max=T - 1)  # [B, T]
    out = full.gather(1, src)
    return out.masked_fill(j >= (T - prefix_len).unsqueeze(1), fill)
