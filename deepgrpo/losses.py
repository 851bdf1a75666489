"""Clipped policy-gradient surrogate, KL estimators, aggregation and the dual-stream loss.

Pure tensor functions in the style of verl's ``core_algos``. ``B`` rows, ``T`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepgrpo.batch import AUX, MAIN, Batch
from deepgrpo.config import LossConfig

LOG_RATIO_CLAMP = 20.0
"""The log-ratio log π - log π_old is clamped to [-20, 20] before ``exp`` (verl's bound)."""
KL_CLAMP = 10.0
"""The per-token k3 estimate is clamped to [-10, 10] (verl's bound)."""


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float = 0.2,
                      dual_clip: float | None = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate loss (to be minimised), with the dual clip of verl.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (with gradient).
        old_logprobs: ``[B, T]`` sampling-policy log-probs.
        advantages: ``[B]`` or ``[B, T]``.
        clip_low, clip_high: ratio clip range ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: if set (c > 1), tokens with A < 0 have their loss capped at ``-c·A``.

    The log-ratio is clamped to [-20, 20] before ``exp`` so that any log-prob gap gives a
    finite loss and gradient.

    Returns:
        ``(loss [B, T], clipped [B, T] bool, dual_clipped [B, T] bool)`` where
        ``loss = -min(ρA, clip(ρ)A)`` (then ``min(loss, -c·A)`` where A < 0), ``clipped`` marks
        tokens whose ordinary clip branch was active and ``dual_clipped`` those whose loss was
        capped by the dual clip.
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages  # [B, 1|T]
    log_ratio = torch.clamp(logprobs - old_logprobs.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    dual = torch.zeros_like(was_clipped)
    if dual_clip is not None:
        cap = -adv * dual_clip  # positive where A < 0
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
    return loss, was_clipped, dual


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman's k1/k2/k3).

    Args:
        logprobs: ``[B, T]`` log π of the sampled tokens (with gradient).
        ref_logprobs: ``[B, T]`` log π_ref of the same tokens.
        estimator: ``k1`` = log π - log π_ref; ``k2`` = ½ (log π - log π_ref)²;
            ``k3`` = exp(log π_ref - log π) - (log π_ref - log π) - 1 (unbiased, >= 0), with
            the log-ratio clamped to [-20, 20] and the estimate to [-10, 10] (verl's bounds).

    Returns: ``[B, T]``.
    """
    d = logprobs - ref_logprobs.detach()  # log π - log π_ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        neg = torch.clamp(-d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(neg) - neg - 1.0, -KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl estimator {estimator!r} is invalid: expected one of k1, k2, k3")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_length: int | None = None, denominator: float | None = None) -> torch.Tensor:
    """Reduce per-token values to a scalar over the positions in ``mask``.

    Args:
        values: ``[B, T]``.
        mask: ``[B, T]`` bool (or 0/1).
        mode: ``token-mean``: Σ v·m / Σ m (every token weighs the same);
            ``seq-mean-token-mean``: mean over rows with >= 1 token of (Σ_t v·m / Σ_t m);
            ``seq-mean-token-sum-norm`` (Dr.GRPO): Σ v·m / (B · norm_length), a constant
            normaliser with ``norm_length`` defaulting to T.
        norm_length: the constant of ``seq-mean-token-sum-norm``.
        denominator: overrides the mode's denominator (Σ m, number of rows with tokens, or
            B · norm_length). Pass the *whole batch's* value (:func:`aggregation_denominator`)
            when summing micro-batch losses so that accumulation equals the full-batch loss.

    Returns: a scalar tensor; 0 (still attached to ``values``) when the mask is empty.
    """
    m = mask.to(values.dtype)
    if mode == "seq-mean-token-mean":
        per_row_count = m.sum(-1)  # [B]
        numerator = ((values * m).sum(-1) / per_row_count.clamp(min=1.0)).sum()
    elif mode in ("token-mean", "seq-mean-token-sum-norm"):
        numerator = (values * m).sum()
    else:
        raise ValueError(f"aggregation {mode!r} is invalid: expected token-mean, seq-mean-token-mean "
                         "or seq-mean-token-sum-norm")
    if denominator is None:
        denominator = aggregation_denominator(mask, mode, norm_length)
    return numerator / max(float(denominator), 1e-12)


def aggregation_denominator(mask: torch.Tensor, mode: str, norm_length: int | None = None,
                            floor: bool = True) -> float:
    """The denominator :func:`aggregate` uses for ``mask`` (``[B, T]``): Σ mask, rows with tokens,
    or B · norm_length; at least 1 unless ``floor`` is off (0 for an empty mask: the raw count,
    which sums correctly over data-parallel ranks)."""
    if mode == "token-mean":
        raw = float(mask.sum())
    elif mode == "seq-mean-token-mean":
        raw = float((mask.sum(-1) > 0).sum())
    elif mode == "seq-mean-token-sum-norm":
        raw = mask.shape[0] * float(norm_length or mask.shape[1])
    else:
        raise ValueError(f"aggregation {mode!r} is invalid: expected token-mean, seq-mean-token-mean "
                         "or seq-mean-token-sum-norm")
    return max(raw, 1.0) if floor else raw


def replica_denominators(batch: Batch, config: LossConfig | None = None, n_replicas: int = 1,
                         floor: bool = True) -> dict[int, np.ndarray]:
    """Per-run, per-stream aggregation denominators of a whole batch, ``{MAIN: [R], AUX: [R]}``
    (float64): what :func:`aggregation_denominator` gives for the rows of run r
    (:attr:`Batch.replica`) in that stream; floored at 1 unless ``floor`` is off."""
    cfg = config or LossConfig()
    mask = batch.trainable_mask & batch.response_mask  # [B, T]
    T = mask.shape[1]
    key = (batch.replica * 2 + batch.stream).numpy()  # [B] (run, stream) of each row
    size = 2 * n_replicas
    if cfg.aggregation == "token-mean":
        raw = np.bincount(key, weights=mask.sum(-1).numpy(), minlength=size)
    elif cfg.aggregation == "seq-mean-token-mean":
        raw = np.bincount(key, weights=(mask.sum(-1) > 0).numpy(), minlength=size)
    elif cfg.aggregation == "seq-mean-token-sum-norm":
        raw = np.bincount(key, minlength=size) * float(cfg.norm_length or T)
    else:
        raise ValueError(f"aggregation {cfg.aggregation!r} is invalid: expected token-mean, seq-mean-token-mean "
                         "or seq-mean-token-sum-norm")
    raw = raw.astype(np.float64).reshape(n_replicas, 2)
    if floor:
        raw = np.maximum(raw, 1.0)
    return {MAIN: raw[:, MAIN], AUX: raw[:, AUX]}


def loss_denominators(batch: Batch, config: LossConfig | None = None, floor: bool = True) -> dict[int, float]:
    """Per-stream aggregation denominators of a whole batch of one run, ``{MAIN: d, AUX: d}``.

    Pass them to :func:`dual_stream_loss` for every micro-batch of ``batch``: the sum of the
    micro-batch losses then equals the loss of the whole batch. With ``floor=False`` an empty
    stream gives 0 (raw counts: sum them over data-parallel ranks, then floor the sum; see
    :func:`deepgrpo.distributed.global_denominators`).
    """
    den = replica_denominators(batch, config, 1, floor)
    return {s: float(v[0]) for s, v in den.items()}


@dataclass
class LossOutput:
    """The dual-stream loss and its parts (scalar tensors, summed over runs; ``loss`` has
    gradient), and each run's own parts.

    replica_parts: ``[R]`` tensors per run: ``loss``, ``pg_main``, ``pg_aux``, ``kl_main``,
        ``kl_aux`` (with gradient), and the token counts ``trainable_tokens``, ``clipped_tokens``,
        ``dual_clipped_tokens`` (no gradient).
    """

    loss: torch.Tensor
    pg_main: torch.Tensor
    pg_aux: torch.Tensor
    kl_main: torch.Tensor
    kl_aux: torch.Tensor
    clip_fraction: torch.Tensor
    dual_clip_fraction: torch.Tensor
    metrics: dict[str, float]
    replica_parts: dict[str, torch.Tensor]


def dual_stream_loss(batch: Batch, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                     config: LossConfig | None = None,
                     denominators: dict[int, float | np.ndarray] | None = None,
                     n_replicas: int | None = None) -> LossOutput:
    """DEEP-GRPO's loss  L = L_main + λ·L_aux + β·(KL_main + λ'·KL_aux)  (λ' = 1 by default,
    the authors' loss), of each run in the batch; ``loss`` is their sum (runs have separate
    parameters, so each run's gradient is its own loss's).

    Each stream's clipped surrogate and KL are aggregated separately over its own trainable
    tokens (``batch.trainable_mask``: aux rows exclude their frozen prefix, so prefix tokens get
    exactly zero gradient), per run (:attr:`Batch.replica`). λ' = λ if
    ``config.kl_weighted_by_lambda`` else 1.

    Args:
        batch: the loss-ready :class:`Batch` (B rows).
        logprobs: ``[B, T]`` policy log-probs of ``batch.tokens`` (with gradient).
        ref_logprobs: ``[B, T]`` reference log-probs, or None when ``kl_coef == 0``.
        config: :class:`LossConfig`.
        denominators: per-stream denominators of the whole batch when ``batch`` is a
            micro-batch (see :func:`loss_denominators`, or :func:`replica_denominators` for
            several runs: ``[R]`` per stream); None = this batch's own.
        n_replicas: R, the number of runs (default: from ``denominators``, else 1 + the
            largest :attr:`Batch.replica`).

    Returns: :class:`LossOutput`.
    """
    cfg = config or LossConfig()
    if logprobs.shape != batch.tokens.shape:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}, expected {tuple(batch.tokens.shape)}")
    if ref_logprobs is None and cfg.kl_coef > 0:
        raise ValueError("ref_logprobs is None but LossConfig.kl_coef > 0")
    if n_replicas is None:
        given = None if denominators is None else np.atleast_1d(np.asarray(denominators[MAIN]))
        n_replicas = len(given) if given is not None else (int(batch.replica.max()) + 1 if len(batch) else 1)
    R = n_replicas
    if denominators is None:
        denominators = replica_denominators(batch, cfg, R)
    den = {k: torch.as_tensor(np.broadcast_to(np.asarray(v, dtype=np.float64), (R,)).copy())
           for k, v in denominators.items()}
    # padded positions may hold garbage (NaN, ±inf) log-probs: neutralise them before exp();
    # torch.where also gives them an exactly-zero gradient
    mask = batch.trainable_mask & batch.response_mask  # [B, T]
    lp = torch.where(batch.response_mask, logprobs, torch.zeros_like(logprobs))
    old = torch.where(batch.response_mask, batch.old_logprobs, torch.zeros_like(logprobs))
    tis_weight = None
    if cfg.tis_cap is not None:
        # truncated importance sampling: ratio against the trainer's own log-probs, each token
        # weighted by min(π_trainer / π_rollout, cap) (detached)
        tis_weight = torch.exp((lp.detach() - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cfg.tis_cap)
        old = lp.detach()
    pg, was_clipped, was_dual = clipped_surrogate(lp, old, batch.advantages.to(lp.dtype),
                                        cfg.clip_low, cfg.clip_high, cfg.dual_clip)  # [B, T]
    if tis_weight is not None:
        pg = pg * tis_weight
    if cfg.kl_coef > 0:
        ref = torch.where(batch.response_mask, ref_logprobs, torch.zeros_like(logprobs))
        kl = kl_penalty(lp, ref, cfg.kl_estimator)  # [B, T]
    else:
        kl = None
    key = batch.replica * 2 + batch.stream  # [B] (run, stream) of each row
    m = mask.to(lp.dtype)
    count = m.sum(-1)  # [B] trainable tokens per row

    def per_run(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([R], [R])``: each run's main- and aux-stream aggregate of ``values`` [B, T]."""
        rows = (values * m).sum(-1)  # [B]
        if cfg.aggregation == "seq-mean-token-mean":
            rows = rows / count.clamp(min=1.0)
        elif cfg.aggregation not in ("token-mean", "seq-mean-token-sum-norm"):
            raise ValueError(f"aggregation {cfg.aggregation!r} is invalid: expected token-mean, "
                             "seq-mean-token-mean or seq-mean-token-sum-norm")
        num = torch.zeros(2 * R, dtype=rows.dtype).index_add(0, key, rows).view(R, 2)
        return (num[:, MAIN] / den[MAIN].clamp(min=1e-12).to(rows.dtype),
                num[:, AUX] / den[AUX].clamp(min=1e-12).to(rows.dtype))

    pg_main, pg_aux = per_run(pg)
    if kl is not None:
        kl_main, kl_aux = per_run(kl)
    else:
        kl_main = kl_aux = torch.zeros(R, dtype=lp.dtype)
    kl_lam = cfg.lam if cfg.kl_weighted_by_lambda else 1.0
    loss_r = pg_main + cfg.lam * pg_aux + cfg.kl_coef * (kl_main + kl_lam * kl_aux)  # [R]
    loss = loss_r.sum()
    with torch.no_grad():
        rep = batch.replica

        def tokens_per_run(flags: torch.Tensor) -> torch.Tensor:
            return torch.zeros(R, dtype=torch.float64).index_add(0, rep, (flags & mask).sum(-1).double())

        n_tok_r = tokens_per_run(mask)
        clipped_r = tokens_per_run(was_clipped)
        dual_r = tokens_per_run(was_dual)
        n_tok = mask.sum().clamp(min=1)
        clip_frac = (was_clipped & mask).sum() / n_tok
        dual_frac = (was_dual & mask).sum() / n_tok
        ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        parts = {"loss": loss_r, "pg_main": pg_main, "pg_aux": pg_aux, "kl_main": kl_main, "kl_aux": kl_aux}
        sums = {k: v.sum() for k, v in parts.items()}
        metrics = {
            **{k: float(v) for k, v in sums.items()}, "clip_fraction": float(clip_frac),
            "dual_clip_fraction": float(dual_frac),
            "ratio_mean": float((ratio * mask).sum() / n_tok),
            "ratio_max": float(ratio[mask].max()) if mask.any() else 1.0,
            "tis_weight_mean": float((tis_weight * mask).sum() / n_tok) if tis_weight is not None else 1.0,
            "tis_capped_fraction": (float(((tis_weight >= cfg.tis_cap) & mask).sum() / n_tok)
                                    if tis_weight is not None else 0.0),
            "trainable_tokens_main": int(mask[batch.stream == MAIN].sum()),
            "trainable_tokens_aux": int(mask[batch.stream == AUX].sum()),
        }
    replica_parts = {**parts, "trainable_tokens": n_tok_r, "clipped_tokens": clipped_r, "dual_clipped_tokens": dual_r}
    return LossOutput(loss, pg_main.sum(), pg_aux.sum(), kl_main.sum(), kl_aux.sum(), clip_frac, dual_frac, metrics,
                      replica_parts)
