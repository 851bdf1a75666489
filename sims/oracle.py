"""Exact ground truth of the simulator under the current policy.

Only the probability of the correct token in each (problem, step, status) matters for success,
so a backward dynamic programme over (step, status) gives, in O(n·T):

    W[p, T, on] = 1,  W[p, T, derailed] = 0
    W[p, t, on] = q_on · W[p, t+1, on] + (1 - q_on) · W[p, t+1, derailed]
    W[p, t, der] = a_t · q_der · W[p, t+1, on] + (1 - a_t · q_der) · W[p, t+1, derailed]

with q_s = π(correct | p, t, s) and a_t = 1 if recovery is allowed at step t (never under
``fatal``). A problem with L_p < T steps ends at L_p: its padding steps t >= L_p leave W
unchanged (W[p, t] = W[p, t+1]), so W[p, L_p] is its terminal value.
W[p, t, s] is the exact P(success | a prefix of length t that reached status s).
pass@1 of problem p is W[p, 0, on] and pass@k = 1 - (1 - pass@1)^k (k independent samples).
"""

from __future__ import annotations

import numpy as np
import torch

from sims.policy import TokenTreePolicy
from sims.sampler import replay_status
from sims.spec import DERAILED, ON_TRACK, ProblemSet


def _allowed(problems: ProblemSet) -> np.ndarray:
    """``float64 [1, T]`` (one rule) or ``[n, T]`` (a stack of runs with different rules)."""
    allowed = problems.recovery_allowed.numpy().astype(np.float64)
    return allowed if allowed.ndim == 2 else allowed[None, :]


def success_table(problems: ProblemSet, correct_probs: torch.Tensor) -> torch.Tensor:
    """``DoubleTensor [n, T + 1, 2]``: exact P(success | step t reached in status s).

    Args:
        problems: the problem set (for the recovery rule).
        correct_probs: ``[n, T, 2]`` π(correct token | p, t, s) (see
            :meth:`TokenTreePolicy.correct_probs`).
    """
    q = correct_probs.detach().double().numpy()  # [n, T, 2] (numpy: T tiny steps, no op overhead)
    n, T, _ = q.shape
    allowed = _allowed(problems)  # [1 | n, T]
    q_on = q[:, :, ON_TRACK]  # [n, T]
    q_der = allowed * q[:, :, DERAILED]  # [n, T] P(back on track | derailed)
    if problems.variable_length:  # padding steps are identities: on -> on, derailed -> derailed
        pad = ~problems.step_mask().numpy()  # [n, T]
        q_on = np.where(pad, 1.0, q_on)
        q_der = np.where(pad, 0.0, q_der)
    W = np.zeros((n, T + 1, 2))
    W[:, T, ON_TRACK] = 1.0
    for t in range(T - 1, -1, -1):
        on, der = W[:, t + 1, ON_TRACK], W[:, t + 1, DERAILED]
        W[:, t, ON_TRACK] = der + q_on[:, t] * (on - der)
        W[:, t, DERAILED] = der + q_der[:, t] * (on - der)
    return torch.from_numpy(W)


def status_distribution(problems: ProblemSet, correct_probs: torch.Tensor) -> torch.Tensor:
    """``DoubleTensor [n, T + 1, 2]``: exact P(status s after t steps) of a chain sampled from the
    root (the forward counterpart of :func:`success_table`; padding steps keep the status).

    Args:
        problems: the problem set (for the recovery rule and lengths).
        correct_probs: ``[n, T, 2]`` π(correct token | p, t, s).
    """
    q = correct_probs.detach().double().numpy()  # [n, T, 2]
    n, T, _ = q.shape
    allowed = _allowed(problems)  # [1 | n, T]
    q_on = q[:, :, ON_TRACK]  # [n, T] P(stay on track | on track)
    q_der = allowed * q[:, :, DERAILED]  # [n, T] P(back on track | derailed)
    if problems.variable_length:
        pad = ~problems.step_mask().numpy()  # [n, T]
        q_on = np.where(pad, 1.0, q_on)
        q_der = np.where(pad, 0.0, q_der)
    D = np.zeros((n, T + 1, 2))
    D[:, 0, ON_TRACK] = 1.0
    for t in range(T):
        on, der = D[:, t, ON_TRACK], D[:, t, DERAILED]
        D[:, t + 1, ON_TRACK] = on * q_on[:, t] + der * q_der[:, t]
        D[:, t + 1, DERAILED] = on * (1 - q_on[:, t]) + der * (1 - q_der[:, t])
    return torch.from_numpy(D)


def failed_state_recoverability(W: torch.Tensor, D: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact recoverability of the states a *failed* chain passes through, by depth.

    With s(X_k) = P(success | the state after k steps) (``W``) and X_k distributed as ``D``,
    for each problem and depth k (all ``DoubleTensor [n, T + 1]``):

    - ``p``: the root's success rate (the same at every k: E[s(X_k)] = p);
    - ``mean_s``: E[s(X_k)] (equals ``p``: s(X_k) is a martingale);
    - ``mean_s2``: E[s(X_k)²];
    - ``given_fail``: E[s(X_k) | the chain fails] = Σ_x P(x) s(x) (1 - s(x)) / (1 - p), computed
      directly from the joint law of (X_k, failure); NaN where p = 1;
    - ``identity``: (p - E[s(X_k)²]) / (1 - p), the same quantity by the identity that makes
      position-only pivots no better per continuation than the root: it is <= p, since
      E[s²] >= E[s]² = p².
    """
    p = W[:, 0, ON_TRACK].unsqueeze(1).expand(-1, W.shape[1])  # [n, T+1]
    mean_s = (D * W).sum(-1)
    mean_s2 = (D * W * W).sum(-1)
    fail = 1.0 - p
    safe = torch.where(fail > 0, fail, torch.ones_like(fail))
    nan = torch.full_like(p, float("nan"))
    given_fail = torch.where(fail > 0, (D * W * (1 - W)).sum(-1) / safe, nan)
    identity = torch.where(fail > 0, (p - mean_s2) / safe, nan)
    return {"p": p, "mean_s": mean_s, "mean_s2": mean_s2, "given_fail": given_fail, "identity": identity}


def prefix_success(W: torch.Tensor, extras: dict[str, torch.Tensor], rows: torch.Tensor,
                   prefix_len: torch.Tensor) -> torch.Tensor:
    """``[N]`` exact P(success | prefix) of one continuation of main-rollout ``rows`` ``[N]`` cut
    after ``prefix_len`` ``[N]`` tokens, read from the table ``W [n, T+1, 2]`` with the status the
    prefix reached (from the rollouts' ``on_track [B, T]`` and ``problem [B]`` extras)."""
    on_track = extras["on_track"][rows]  # [N, T] on track after each step
    after = on_track.gather(1, (prefix_len - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [N]
    reached_on = torch.where(prefix_len > 0, after.bool(), torch.ones_like(after, dtype=torch.bool))
    status = torch.where(reached_on, ON_TRACK, DERAILED)
    return W[extras["problem"][rows].long(), prefix_len, status]


def exact_pass_at_k(pass1: torch.Tensor, k: int) -> torch.Tensor:
    """Exact pass@k = 1 - (1 - pass@1)^k of independent samples (same shape as ``pass1``)."""
    if k < 1:
        raise ValueError(f"k = {k} is invalid: expected an integer >= 1")
    return 1.0 - (1.0 - pass1) ** k


class ExactOracle:
    """Exact success probabilities of a :class:`TokenTreePolicy` on its problem set."""

    def __init__(self, problems: ProblemSet, policy: TokenTreePolicy) -> None:
        self.problems = problems
        self.policy = policy

    def table(self) -> torch.Tensor:
        """``[n, T + 1, 2]`` P(success | t, status) under the current policy (recomputed)."""
        return success_table(self.problems, self.policy.correct_probs())

    def pass1(self) -> torch.Tensor:
        """``DoubleTensor [n]`` exact pass@1 per problem."""
        return self.table()[:, 0, ON_TRACK]

    def pass_k(self, k: int) -> torch.Tensor:
        """``DoubleTensor [n]`` exact pass@k per problem."""
        return exact_pass_at_k(self.pass1(), k)

    def mean_pass_k(self, k: int = 1) -> float:
        """Exact expected pass@k over the whole problem set (uniform over problems)."""
        return float(self.pass_k(k).mean())

    def status_distribution(self) -> torch.Tensor:
        """``[n, T + 1, 2]`` exact P(status after t steps) under the current policy."""
        with torch.no_grad():
            return status_distribution(self.problems, self.policy.correct_probs())

    def success_given_prefix(self, problem: torch.Tensor, prefix: torch.Tensor,
                             prefix_len: torch.Tensor) -> torch.Tensor:
        """``DoubleTensor [B]`` exact P(success | problem, prefix tokens) for B prefixes.

        Args:
            problem: ``LongTensor [B]``.
            prefix: ``LongTensor [B, L]`` tokens from step 0 (padded).
            prefix_len: ``LongTensor [B]`` valid prefix tokens per row.
        """
        status = replay_status(self.problems, problem, prefix, prefix_len)  # [B, L+1]
        reached = status.gather(1, prefix_len.unsqueeze(1)).squeeze(1)  # [B]
        return self.table()[problem, prefix_len, reached]
