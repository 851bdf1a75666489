"""The policy update and the per-step record: one vocabulary for every backend.

A training step in any backend is ``explore`` -> :func:`update_policy` -> :func:`step_record`.
The record holds everything the core computes, under the names of :data:`STEP_COLUMNS`;
a backend only adds its own columns (the simulator: exact oracle values; the LLM trainer:
evaluation and engine diagnostics), so that ``analysis/`` reads runs of both backends alike.

=============================  ===============================================================
budget, cumulative             ``rollouts``, ``tokens`` and per stream ``rollouts_main``,
                               ``rollouts_aux``, ``tokens_main``, ``tokens_aux`` (generated
                               tokens: a branch counts only its suffix)
budget, this step              ``step_rollouts_main``, ``step_rollouts_aux``,
                               ``step_tokens_main``, ``step_tokens_aux``
rewards                        ``reward_main`` (mean over the G·P main chains), ``reward_aux``
                               (mean over the branches; NaN without branches)
failures                       ``failed`` (main chains with reward <= threshold),
                               ``all_fail_groups`` (prompts whose G chains all failed)
pivots                         ``candidates``, ``pivots`` (branch points), ``pivot_depth_mean``,
                               ``pivot_depth_std``, ``pivot_depth_p10/p50/p90`` (relative depth
                               r), ``pivot_prefix_tokens_mean``, ``branch_success`` (fraction of
                               branch points with >= 1 successful continuation)
signal                         ``nonzero_main``, ``nonzero_aux``: samples with |A| >= eps
loss                           ``loss``, ``pg_main``, ``pg_aux``, ``kl_main``, ``kl_aux``,
                               ``clip_fraction`` (ordinary PPO clip), ``dual_clip_fraction``
                               (dual-clip cap), ``grad_norm``
estimator                      ``est_<coefficient>`` (NaN before the first fit), ``est_buffer``
=============================  ===============================================================

Pivot statistics are NaN in a step without branch points; step 0 (before any update) has
zero budget and NaN everywhere else (:func:`initial_record`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from deepgrpo.batch import Backend, Batch
from deepgrpo.config import LossConfig
from deepgrpo.explore import PIVOT_SUMMARIES, ExploreResult
from deepgrpo.ledger import BudgetLedger
from deepgrpo.losses import dual_stream_loss, loss_denominators, replica_denominators

BUDGET_COLUMNS = ("rollouts", "tokens", "rollouts_main", "rollouts_aux", "tokens_main", "tokens_aux")
"""Cumulative budget columns (from :meth:`BudgetLedger.totals`)."""
STEP_BUDGET_COLUMNS = ("step_rollouts_main", "step_rollouts_aux", "step_tokens_main", "step_tokens_aux")
"""This step's budget columns."""
EXPLORE_COLUMNS = ("reward_main", "reward_aux", "failed", "all_fail_groups", "candidates", "pivots",
                   "pivot_depth_mean", "pivot_depth_std", "pivot_depth_p10", "pivot_depth_p50",
                   "pivot_depth_p90", "pivot_prefix_tokens_mean", "branch_success", "nonzero_main",
                   "nonzero_aux")
"""Columns computed from one :class:`~deepgrpo.explore.ExploreResult`."""
UPDATE_COLUMNS = ("loss", "pg_main", "pg_aux", "kl_main", "kl_aux", "clip_fraction", "dual_clip_fraction",
                  "grad_norm")
"""Columns returned by :func:`update_policy`."""
STEP_COLUMNS = BUDGET_COLUMNS + STEP_BUDGET_COLUMNS + EXPLORE_COLUMNS + UPDATE_COLUMNS + ("est_buffer",)
"""Every fixed column of the core's step record (``est_<coefficient>`` columns come on top)."""


def update_policy(backend: Backend, batch: Batch, config: LossConfig, optimizer: torch.optim.Optimizer,
                  parameters: Iterable[torch.nn.Parameter], micro_batch_size: int | None = None,
                  max_grad_norm: float | None = 1.0, data_parallel: bool = False) -> dict[str, float]:
    """One optimizer step of one run on ``batch`` with the dual-stream loss, accumulated over
    micro-batches (:func:`update_replicas` with one run).

    The per-stream denominators come from the whole batch (:func:`loss_denominators`), so the
    accumulated gradient equals the full-batch gradient whatever the micro-batch size.
    The reference pass is skipped when ``config.kl_coef == 0``.

    With ``data_parallel`` (torch.distributed initialised, ``batch`` = this rank's share), the
    denominators are summed over ranks and the gradients all-reduced (summed) before clipping,
    so every rank takes the step a single process would take on the union of the batches
    (see :mod:`deepgrpo.distributed`). Every rank must call it, even with an empty batch.

    Returns: the :data:`UPDATE_COLUMNS`: loss parts summed over micro-batches (``loss``,
    ``pg_main``, ``pg_aux``, ``kl_main``, ``kl_aux``; this rank's share when data-parallel),
    token-weighted ``clip_fraction`` and ``dual_clip_fraction``, ``grad_norm``; and ``skipped``
    (1 when no step was taken: the batch carried no gradient, or its norm was infinite or NaN —
    as in verl's actor, such a step is skipped rather than let clipping turn it into NaN weights).
    """
    return update_replicas(backend, batch, config, optimizer, parameters, 1, micro_batch_size, max_grad_norm,
                           data_parallel)[0]


def update_replicas(backend: Backend, batch: Batch, config: LossConfig, optimizer: Any,
                    parameters: Iterable[torch.nn.Parameter], n_replicas: int, micro_batch_size: int | None = None,
                    max_grad_norm: float | None = 1.0, data_parallel: bool = False) -> list[dict[str, float]]:
    """One optimizer step of each of the R runs in ``batch`` (:attr:`Batch.replica`), as each
    would take it alone (:func:`update_policy` is R = 1).

    Each run has its own parameters: with R > 1 every parameter's first dimension is the run
    (``[R, ...]``; with R = 1 any shape). Each run's loss is aggregated with its own per-stream
    denominators, its micro-batches are its own rows (:meth:`Batch.chunks`), its gradient norm
    is its own and is clipped on its own, and a run with no rows in the batch (no gradient) or a
    non-finite gradient norm takes no step. The optimizer steps the runs that take one:
    ``optimizer.step_replicas(BoolTensor [R])`` where it has that method (it must leave the
    other runs' parameters and state untouched), else ``optimizer.step()`` (R = 1 only).

    Returns: one dict of :data:`UPDATE_COLUMNS` and ``skipped`` per run (see :func:`update_policy`).
    """
    from deepgrpo.distributed import all_reduce_gradients, global_denominators
    R = int(n_replicas)
    per_replica_step = hasattr(optimizer, "step_replicas")
    if R > 1 and (data_parallel or not per_replica_step):
        raise ValueError("several runs in one update need an optimizer with step_replicas and no data parallelism")
    params = [p for p in parameters if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    if data_parallel:
        den: dict[int, Any] = global_denominators(loss_denominators(batch, config, floor=False))
    else:
        den = replica_denominators(batch, config, R)
    names = ("loss", "pg_main", "pg_aux", "kl_main", "kl_aux")
    totals = {k: torch.zeros(R, dtype=torch.float64) for k in (*names, "trainable_tokens", "clipped_tokens",
                                                            "dual_clipped_tokens")}
    for mb in batch.chunks(micro_batch_size or len(batch)) if len(batch) else []:
        lp = backend.logprobs(mb, "policy")  # [b, T]
        ref = backend.logprobs(mb, "reference") if config.kl_coef > 0 else None
        out = dual_stream_loss(mb, lp, ref, config, den, R)
        out.loss.backward()
        for k, v in out.replica_parts.items():
            totals[k] += v.detach().double()
    if data_parallel:
        for p in params:  # ranks without samples still take part in the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_gradients(params)
    has_rows = torch.bincount(batch.replica, minlength=R)[:R] > 0 if len(batch) else torch.zeros(R, dtype=torch.bool)
    if data_parallel:
        has_rows = torch.ones(R, dtype=torch.bool)  # every rank steps with the all-reduced gradient
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        has_rows = torch.zeros(R, dtype=torch.bool)
    n_tok = totals["trainable_tokens"].clamp(min=1)
    clip = (totals["clipped_tokens"] / n_tok).tolist()
    dual = (totals["dual_clipped_tokens"] / n_tok).tolist()
    parts = {k: totals[k].tolist() for k in names}
    if grads:
        # each run's gradient norm over all its parameters: the norm of the per-parameter norms,
        # as torch.nn.utils.clip_grad_norm_ computes one run's
        # (each run's norms contiguous, so that a run's sum of squares is reduced in the same order
        # whatever its batch-mates: a reduction across rows of [n, R] is not)
        norms = torch.stack([torch.linalg.vector_norm(g.detach().reshape(R, -1), dim=1) for g in grads],
                            dim=1)  # [R, n]
        grad_norm = torch.linalg.vector_norm(norms, dim=1)  # [R]
        if max_grad_norm is not None:
            coef = (max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)  # [R]
            for g in grads:
                g.mul_(coef.to(g.dtype).view(R, *([1] * (g.dim() - 1))) if g.dim() and R > 1 else coef.to(g.dtype)[0])
    else:
        grad_norm = torch.zeros(R)
    finite = torch.isfinite(grad_norm)
    step = has_rows & finite
    if per_replica_step:
        if bool(step.any()):
            optimizer.step_replicas(step)
    elif bool(step[0]):
        optimizer.step()
    elif grads:  # as verl's actor: an infinite or NaN gradient never reaches the weights
        optimizer.zero_grad(set_to_none=True)
    out = []
    gn = grad_norm.tolist()
    for r in range(R):
        row = {k: parts[k][r] for k in names}
        row.update(clip_fraction=clip[r], dual_clip_fraction=dual[r],
                   grad_norm=gn[r] if bool(has_rows[r]) else 0.0, skipped=0.0 if bool(step[r]) else 1.0)
        out.append(row)
    return out


def _estimator_columns(estimator: Any) -> dict[str, float]:
    if estimator is None or not hasattr(estimator, "coefficients"):
        return {"est_buffer": float("nan")}
    out = {f"est_{k}": float(v) for k, v in estimator.coefficients().items()}
    out["est_buffer"] = float(getattr(estimator, "buffer_len", float("nan")))
    return out


def explore_columns(result: ExploreResult) -> dict[str, float]:
    """The :data:`EXPLORE_COLUMNS` and :data:`STEP_BUDGET_COLUMNS` of one exploration step."""
    s = result.stats
    row = {k: float(s[k]) for k in ("reward_main", "reward_aux", "failed", "all_fail_groups", "candidates",
                                     "pivots", "branch_success", "nonzero_main", "nonzero_aux")}
    row.update(step_rollouts_main=int(result.budget.rollouts_main), step_rollouts_aux=int(result.budget.rollouts_aux),
               step_tokens_main=int(result.budget.tokens_main), step_tokens_aux=int(result.budget.tokens_aux))
    row.update({k: float(s[k]) for k in PIVOT_SUMMARIES})  # NaN without points
    return row


def step_record(result: ExploreResult, update: dict[str, float], ledger: BudgetLedger,
                estimator: Any = None) -> dict[str, float]:
    """The core's record of one training step (columns: see the module docstring).

    Args:
        result: the step's :func:`~deepgrpo.explore.explore` result.
        update: what :func:`update_policy` returned.
        ledger: the run's budget ledger (cumulative columns; it already holds this step).
        estimator: the run's recoverability estimator (``est_*`` columns), or None.
    """
    totals = ledger.totals()
    row: dict[str, float] = {k: int(totals[k]) for k in BUDGET_COLUMNS}  # counts stay integers
    row.update(explore_columns(result))
    row.update({k: float(update.get(k, float("nan"))) for k in UPDATE_COLUMNS})
    row.update(_estimator_columns(estimator))
    return row


def initial_record(estimator: Any = None) -> dict[str, float]:
    """The core's columns of step 0 (before any update): zero budget, NaN elsewhere."""
    nan = float("nan")
    row: dict[str, float] = {k: 0 for k in BUDGET_COLUMNS + STEP_BUDGET_COLUMNS}
    row.update({k: nan for k in EXPLORE_COLUMNS + UPDATE_COLUMNS})
    row.update({k: nan for k in _estimator_columns(estimator)})
    return row
