"""The simulated policy: a torch module of logits per (problem, step, status, token).

``logits = base + delta``: ``base`` is the pre-trained policy of the spec (a fixed buffer, also
the KL reference) and ``delta`` the trainable part, zero at initialisation, so the initial
policy *is* the pre-trained one.

* tabular (default): ``delta`` is a free table ``[n, T, 2, V]``;
* shared (``TokenTreeSpec.shared_policy``): ``delta[p, t, s, v] = step[t, s, [v is correct]]
  + offset[p, s] · [v is correct]``, i.e. what is learnt at step t of one problem moves the same
  step of every problem (a crude model of an LLM's generalisation across prompts).
"""

from __future__ import annotations

import torch

from sims.spec import ProblemSet


class TokenTreePolicy(torch.nn.Module):
    """Logits ``[n, T, 2, V]`` of a simulated policy (see the module docstring)."""

    def __init__(self, problems: ProblemSet) -> None:
        super().__init__()
        self.shared = bool(problems.spec.shared_policy)
        n, T, V = problems.n, problems.T, problems.V
        self.register_buffer("base", problems.base_logits())  # [n, T, 2, V]
        self.register_buffer("base_log_probs", torch.log_softmax(self.base, dim=-1))  # [n, T, 2, V]
        onehot = torch.nn.functional.one_hot(problems.correct, V).bool().unsqueeze(2)  # [n, T, 1, V]
        self.register_buffer("is_correct", onehot)
        if self.shared:
            self.step_delta = torch.nn.Parameter(torch.zeros(T, 2, 2))  # [T, status, wrong/correct]
            self.problem_delta = torch.nn.Parameter(torch.zeros(n, 2))  # [n, status]
        else:
            self.delta = torch.nn.Parameter(torch.zeros(n, T, 2, V))

    def logits(self) -> torch.Tensor:
        """``[n, T, 2, V]`` current logits (with gradient)."""
        if not self.shared:
            return self.base + self.delta
        c = self.is_correct  # [n, T, 1, V]
        step = torch.where(c, self.step_delta[None, :, :, 1:2], self.step_delta[None, :, :, 0:1])  # [n, T, 2, V]
        offset = self.problem_delta[:, None, :, None] * c  # [n, T, 2, V]
        return self.base + step + offset

    def log_probs(self) -> torch.Tensor:
        """``[n, T, 2, V]`` log π(v | p, t, s) (with gradient)."""
        return torch.log_softmax(self.logits(), dim=-1)

    def reference_log_probs(self) -> torch.Tensor:
        """``[n, T, 2, V]`` log-probs of the pre-trained (reference) policy (no gradient)."""
        return self.base_log_probs

    @torch.no_grad()
    def correct_probs(self) -> torch.Tensor:
        """``DoubleTensor [n, T, 2]`` π(correct token | p, t, s), the oracle's input."""
        lp = self.log_probs().double()
        return lp.masked_fill(~self.is_correct, float("-inf")).logsumexp(-1).exp()

    @torch.no_grad()
    def entropy(self) -> torch.Tensor:
        """``FloatTensor [n, T, 2]`` entropy (nats) of π(· | p, t, s)."""
        lp = self.log_probs()
        return -(lp.exp() * lp).sum(-1)
