"""Optimizers of the simulator's policies (``RunnerConfig.optimizer``): Adam, numerically the
algorithm of ``torch.optim.Adam`` (defaults: no weight decay, no amsgrad), and plain SGD on the
same loss.

Why the optimizer is a setting: Adam divides each coordinate's step by its running gradient
scale, so on a table of logits every entry with a consistent gradient sign moves by about lr
per step whatever the gradient's size; differences between methods that show up as gradient
*size* (λ, the number of samples behind an advantage) are flattened. SGD keeps them.

Why not ``torch.optim.Adam`` / ``torch.optim.SGD`` themselves: in torch >= 2.4,
``torch.optim.Optimizer.__init__`` lazily imports ``torch._dynamo`` (about 2 s on this project's
2-core CI machines), which alone would break the simulator's budget ("``deepgrpo sim compare``
within 2x the time of ``import torch``", ``benchmarks/bench_sim.py``). The updates are the same
(``tests/test_sims_training.py`` checks them against ``torch.optim``), and the objects offer the
two methods the core's :func:`deepgrpo.update_policy` calls: ``zero_grad`` and ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adam", "sgd")
"""Names accepted by ``RunnerConfig.optimizer``."""

DEFAULT_LR = {"adam": 0.2, "sgd": 100.0}
"""A working learning rate per optimizer on the simulator's policies with the default gradient
clipping (Adam moves each logit by about lr per step; SGD's step scales with the gradient's
size, so it needs a far larger rate). Studies tune around it."""


class _Optimizer:
    """The part both optimizers share: their parameters and ``zero_grad``."""

    params: list[torch.nn.Parameter]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


class LogitSGD(_Optimizer):
    """Plain stochastic gradient descent: ``p <- p - lr · grad`` (no momentum, no decay).

    Args:
        params: parameters to update (their ``.grad`` is read by :meth:`step`).
        lr: step size.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1.0) -> None:
        self.params = [p for p in params]
        self.lr = float(lr)

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr}


class LogitAdam(_Optimizer):
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


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> LogitAdam | LogitSGD:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) on ``params`` with step size ``lr``."""
    if name == "adam":
        return LogitAdam(params, lr=lr)
    if name == "sgd":
        return LogitSGD(params, lr=lr)
    raise ValueError(f"optimizer = {name!r} is invalid: expected one of {', '.join(OPTIMIZERS)}")
