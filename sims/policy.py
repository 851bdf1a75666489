"""The simulated policy: a torch module of logits per (problem, step, status, token).

``logits = base + delta``: ``base`` is the pre-trained policy of the problem set (a fixed
buffer, also the KL reference) and ``delta`` the trainable part, zero at initialisation, so the
initial policy *is* the pre-trained one. Two classes (:data:`POLICY_CLASSES`):

* ``tabular``: ``delta`` is a free table ``[n, T, 2, V]``. Nothing transfers between problems:
  a problem that is never trained on (a held-out one) keeps its pre-trained logits exactly.
* ``features``: ``delta[p, t, s, v] = φ(p, t, s, v) · w`` with ``w ∈ R^D`` shared trainable
  weights and ``φ`` fixed random features ``~ N(0, 1/D)`` of dimension ``D = feature_dim``,
  drawn from the problem-set seed. ``φ`` is a function of the indices (problem, step, status,
  token) only: the policy is never told which token is correct (swapping the correct tokens of
  a problem set leaves every ``delta`` unchanged), so what it learns on one problem moves every
  other problem's logits through the overlap of their features — transfer and interference,
  the way shared weights of an LLM couple prompts. ``D`` is its capacity: with
  ``D >= n·T·2·V`` the features span every table; with fewer, updates must share directions.
  (1/D variance: ||φ||² ≈ 1, so one SGD step moves an entry's own logit as a table would, and
  its overlap with any other entry is of order 1/√D.)
"""

from __future__ import annotations

import numpy as np
import torch

from sims.spec import ProblemSet

POLICY_CLASSES = ("tabular", "features")
"""Policy classes of :class:`TokenTreePolicy` (``RunnerConfig.policy``)."""

FEATURE_STREAM = 2
"""``np.random.SeedSequence([problem_set_seed, FEATURE_STREAM])`` draws the features φ."""


def random_features(problems: ProblemSet, dim: int) -> torch.Tensor:
    """``FloatTensor [n·T·2·V, dim]`` the fixed features φ of every (problem, step, status,
    token), row-major in that order, ``~ N(0, 1/dim)``; drawn from the problem-set seed only
    (never from the correct tokens)."""
    n, T, V = problems.n, problems.T, problems.V
    seed = np.random.SeedSequence([problems.seed, FEATURE_STREAM]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(seed >> np.uint64(1)))
    return torch.randn(n * T * 2 * V, dim, generator=gen) / dim ** 0.5


class TokenTreePolicy(torch.nn.Module):
    """Logits ``[n, T, 2, V]`` of a simulated policy (see the module docstring).

    Args:
        problems: the problem set (base logits; the correct tokens only for :meth:`correct_probs`,
            the oracle's input, never for the trainable part).
        kind: ``tabular`` or ``features``.
        feature_dim: D, the features policy's number of shared weights.
    """

    def __init__(self, problems: ProblemSet, kind: str = "tabular", feature_dim: int = 256) -> None:
        super().__init__()
        if kind not in POLICY_CLASSES:
            raise ValueError(f"kind = {kind!r} is invalid: expected one of {', '.join(POLICY_CLASSES)}")
        self.kind = kind
        n, T, V = problems.n, problems.T, problems.V
        self.shape = (n, T, 2, V)
        self.register_buffer("base", problems.base_logits())  # [n, T, 2, V]
        self.register_buffer("base_log_probs", torch.log_softmax(self.base, dim=-1))  # [n, T, 2, V]
        onehot = torch.nn.functional.one_hot(problems.correct, V).bool().unsqueeze(2)  # [n, T, 1, V]
        self.register_buffer("is_correct", onehot)  # read by correct_probs (the oracle) only
        if kind == "tabular":
            self.delta = torch.nn.Parameter(torch.zeros(n, T, 2, V))
        else:
            self.register_buffer("features", random_features(problems, int(feature_dim)))  # [n·T·2·V, D]
            self.weight = torch.nn.Parameter(torch.zeros(int(feature_dim)))  # [D]

    def logit_delta(self) -> torch.Tensor:
        """``[n, T, 2, V]`` the trainable part of the logits (with gradient)."""
        if self.kind == "tabular":
            return self.delta
        return (self.features @ self.weight).view(self.shape)

    def logits(self) -> torch.Tensor:
        """``[n, T, 2, V]`` current logits (with gradient)."""
        return self.base + self.logit_delta()

    def log_probs(self) -> torch.Tensor:
        """``[n, T, 2, V]`` log π(v | p, t, s) (with gradient)."""
        return torch.log_softmax(self.logits(), dim=-1)

    def reference_log_probs(self) -> torch.Tensor:
        """``[n, T, 2, V]`` log-probs of the pre-trained (reference) policy (no gradient)."""
        return self.base_log_probs

    @torch.no_grad()
    def correct_probs(self, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``DoubleTensor [n, T, 2]`` π(correct token | p, t, s), the oracle's input (from
        ``log_probs`` ``[n, T, 2, V]`` if already computed)."""
        lp = (self.log_probs() if log_probs is None else log_probs).double()
        return lp.masked_fill(~self.is_correct, float("-inf")).logsumexp(-1).exp()

    @torch.no_grad()
    def entropy(self, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``FloatTensor [n, T, 2]`` entropy (nats) of π(· | p, t, s) (from ``log_probs`` if given)."""
        lp = self.log_probs() if log_probs is None else log_probs
        return -(lp.exp() * lp).sum(-1)
