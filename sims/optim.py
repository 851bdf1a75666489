"""Optimizers of the simulator's policies (``RunnerConfig.optimizer``): Adam, the algorithm of
``torch.optim.Adam`` (defaults: no weight decay, no amsgrad), and plain SGD on the same loss, for
R runs at once: every parameter's first dimension is the run, and each run has its own step
size, step count and moments (they agree with ``torch.optim`` to rounding: a per-run step size is
a tensor, not torch's fused scalar).

Why the optimizer is a setting: Adam divides each coordinate's step by its running gradient
scale, so on a table of logits every entry with a consistent gradient sign moves by about lr
per step whatever the gradient's size; differences between methods that show up as gradient
*size* (λ, the number of samples behind an advantage) are flattened. SGD keeps them.

Why not ``torch.optim.Adam`` / ``torch.optim.SGD`` themselves: in torch >= 2.4,
``torch.optim.Optimizer.__init__`` lazily imports ``torch._dynamo`` (about 2 s on this project's
2-core CI machines), which alone would break the simulator's budget ("``deepgrpo sim compare``
within 2x the time of ``import torch``", ``benchmarks/bench_sim.py``). The updates are the same
(``tests/test_sims_training.py`` checks them against ``torch.optim``, to 1e-6), and the objects offer
what the core's :func:`deepgrpo.step.update_replicas` calls: ``zero_grad`` and ``step_replicas``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

OPTIMIZERS = ("adam", "sgd")
"""Names accepted by ``RunnerConfig.optimizer``."""

DEFAULT_LR = {"adam": 0.2, "sgd": 100.0}
"""A working learning rate per optimizer on the simulator's policies with the default gradient
clipping (Adam moves each logit by about lr per step; SGD's step scales with the gradient's
size, so it needs a far larger rate). Studies tune around it."""


class _Optimizer:
    """The part both optimizers share: their parameters, ``zero_grad`` and ``step``.

    Every parameter's first dimension is the run (``[R, ...]``; R = 1 for one run), and each run
    has its own step size (``lr``: one number, or R). :meth:`step_replicas` steps only the runs
    it is given; :meth:`step` steps them all.
    """

    params: list[torch.nn.Parameter]
    lr: float | list[float]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def _lr(self, p: torch.Tensor) -> torch.Tensor:
        """``[R, 1, ...]`` each run's step size, shaped to broadcast over ``p``."""
        R = p.shape[0]
        lr = torch.tensor(self.lr if isinstance(self.lr, list) else [self.lr] * R, dtype=p.dtype)
        if lr.shape[0] != R:
            raise ValueError(f"{lr.shape[0]} learning rates for a parameter of {R} runs")
        return lr.view(R, *([1] * (p.dim() - 1)))

    def step(self) -> None:
        """Step every run."""
        if self.params:
            self.step_replicas(torch.ones(self.params[0].shape[0], dtype=torch.bool))

    def step_replicas(self, active: torch.Tensor) -> None:
        raise NotImplementedError


def _lr_value(lr: float | Sequence[float]) -> float | list[float]:
    return float(lr) if isinstance(lr, (int, float)) else [float(x) for x in lr]


class LogitSGD(_Optimizer):
    """Plain stochastic gradient descent: ``p <- p - lr · grad`` (no momentum, no decay).

    Args:
        params: parameters to update (their ``.grad`` is read by :meth:`step`), ``[R, ...]``.
        lr: step size (one, or one per run).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float | Sequence[float] = 1.0) -> None:
        self.params = [p for p in params]
        self.lr = _lr_value(lr)

    @torch.no_grad()
    def step_replicas(self, active: torch.Tensor) -> None:
        """Step the runs where ``active`` (``BoolTensor [R]``) is True; the others are untouched."""
        for p in self.params:
            if p.grad is None:
                continue
            keep = active.view(-1, *([1] * (p.dim() - 1)))
            p.copy_(torch.where(keep, p - self._lr(p) * p.grad, p))

    def state_dict(self) -> dict:
        return {"lr": self.lr}


class LogitAdam(_Optimizer):
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's update rule and bias corrections, each
    run with its own step count (a run that skips a step keeps its moments and count).

    Args:
        params: parameters to update (their ``.grad`` is read by :meth:`step`), ``[R, ...]``.
        lr: step size (one, or one per run).
        betas: decay rates of the first and second moment estimates.
        eps: added to the bias-corrected root second moment.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float | Sequence[float] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params]
        self.lr, self.betas, self.eps = _lr_value(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.state = [{"step": torch.zeros(p.shape[0], dtype=torch.float64), "exp_avg": torch.zeros_like(p),
                       "exp_avg_sq": torch.zeros_like(p)} for p in self.params]

    @torch.no_grad()
    def step_replicas(self, active: torch.Tensor) -> None:
        """Step the runs where ``active`` (``BoolTensor [R]``) is True; the others are untouched."""
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            keep = active.view(shape)
            st["step"] += active.double()
            t = st["step"]  # [R]
            bias1 = 1 - b1 ** t  # [R] float64, as Python floats would be
            bias2_sqrt = torch.sqrt(1 - b2 ** t)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m_new = m.lerp(p.grad, 1 - b1)
            v_new = (v * b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v_new.sqrt() / bias2_sqrt.to(p.dtype).view(shape)).add_(self.eps)
            step_size = (self._lr(p).double() / bias1.view(shape)).to(p.dtype)  # [R, 1, ...]
            p.copy_(torch.where(keep, p - step_size * (m_new / denom), p))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))

    def state_dict(self) -> dict:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "state": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in self.state]}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter],
                   lr: float | Sequence[float]) -> LogitAdam | LogitSGD:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) on ``params`` with step size ``lr``
    (one, or one per run)."""
    if name == "adam":
        return LogitAdam(params, lr=lr)
    if name == "sgd":
        return LogitSGD(params, lr=lr)
    raise ValueError(f"optimizer = {name!r} is invalid: expected one of {', '.join(OPTIMIZERS)}")
