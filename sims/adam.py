"""Adam for the simulator's logit tables, numerically the algorithm of ``torch.optim.Adam``
(defaults: no weight decay, no amsgrad).

Why not ``torch.optim.Adam`` itself: in torch >= 2.4, ``torch.optim.Optimizer.__init__`` lazily
imports ``torch._dynamo`` (about 2 s on this project's 2-core CI machines), which alone would
break the simulator's budget of "``deepgrpo sim compare`` in under 5 s". The update is the same
(``tests/test_sims_runner.py`` checks it against ``torch.optim.Adam``), and the object offers the
two methods the core's :func:`deepgrpo.update_policy` calls: ``zero_grad`` and ``step``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class LogitAdam:
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's update rule and bias corrections.

    Args:
        params: parameters to update (their ``.grad`` is read by :meth:`step`).
        lr: step size.
        betas: decay rates of the first and second moment estimates.
        eps: added to the bias-corrected root second moment.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params]
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.state = [{"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            st["step"] += 1
            t = st["step"]
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            bias1 = 1 - b1 ** t
            bias2_sqrt = math.sqrt(1 - b2 ** t)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bias1)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "state": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in self.state]}
