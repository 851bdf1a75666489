"""Clipped policy-gradient surrogate, KL estimators, aggregation and the dual-stream loss.

Pure tensor functions in the style of verl's ``core_algos``. ``B`` rows, ``T`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def loss_denominators(batch: Batch, config: LossConfig | None = None, floor: bool = True) -> dict[int, float]:
    """Per-stream aggregation denominators of a whole batch, ``{MAIN: d, AUX: d}``.

    Pass them to :func:`dual_stream_loss` for every micro-batch of ``batch``: the sum of the
    micro-batch losses then equals the loss of the whole batch. With ``floor=False`` an empty
    stream gives 0 (raw counts: sum them over data-parallel ranks, then floor the sum; see
    :func:`deepgrpo.distributed.global_denominators`).
    """
    cfg = config or LossConfig()
    mask = batch.trainable_mask & batch.response_mask
    T = mask.shape[1]
    return {s: aggregation_denominator(mask[batch.stream == s], cfg.aggregation, cfg.norm_length or T, floor)
            for s in (MAIN, AUX)}


@dataclass
class LossOutput:
    """The dual-stream loss and its parts (all scalar tensors; ``loss`` has gradient)."""

    loss: torch.Tensor
    pg_main: torch.Tensor
    pg_aux: torch.Tensor
    kl_main: torch.Tensor
    kl_aux: torch.Tensor
    clip_fraction: torch.Tensor
    dual_clip_fraction: torch.Tensor
    metrics: dict[str, float]


def dual_stream_loss(batch: Batch, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                     config: LossConfig | None = None,
                     denominators: dict[int, float] | None = None) -> LossOutput:
    """DEEP-GRPO's loss  L = L_main + λ·L_aux + β·(KL_main + λ'·KL_aux)  (λ' = 1 by default,
    the authors' loss).

    Each stream's clipped surrogate and KL are aggregated separately over its own trainable
    tokens (``batch.trainable_mask``: aux rows exclude their frozen prefix, so prefix tokens get
    exactly zero gradient). λ' = λ if ``config.kl_weighted_by_lambda`` else 1.

    Args:
        batch: the loss-ready :class:`Batch` (B rows).
        logprobs: ``[B, T]`` policy log-probs of ``batch.tokens`` (with gradient).
        ref_logprobs: ``[B, T]`` reference log-probs, or None when ``kl_coef == 0``.
        config: :class:`LossConfig`.
        denominators: per-stream denominators of the whole batch when ``batch`` is a
            micro-batch (see :func:`loss_denominators`); None = this batch's own.

    Returns: :class:`LossOutput`.
    """
    cfg = config or LossConfig()
    if logprobs.shape != batch.tokens.shape:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}, expected {tuple(batch.tokens.shape)}")
    if ref_logprobs is None and cfg.kl_coef > 0:
        raise ValueError("ref_logprobs is None but LossConfig.kl_coef > 0")
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
        kl = torch.zeros_like(lp)
    T = lp.shape[1]

    def stream_agg(values: torch.Tensor, stream: int) -> torch.Tensor:
        rows = batch.stream == stream  # [B]
        den = None if denominators is None else denominators[stream]
        return aggregate(values[rows], mask[rows], cfg.aggregation, cfg.norm_length or T, den)

    pg_main, pg_aux = stream_agg(pg, MAIN), stream_agg(pg, AUX)
    kl_main, kl_aux = stream_agg(kl, MAIN), stream_agg(kl, AUX)
    kl_lam = cfg.lam if cfg.kl_weighted_by_lambda else 1.0
    loss = pg_main + cfg.lam * pg_aux + cfg.kl_coef * (kl_main + kl_lam * kl_aux)
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        clip_frac = (was_clipped & mask).sum() / n_tok
        dual_frac = (was_dual & mask).sum() / n_tok
        ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        metrics = {
            "loss": float(loss), "pg_main": float(pg_main), "pg_aux": float(pg_aux),
            "kl_main": float(kl_main), "kl_aux": float(kl_aux), "clip_fraction": float(clip_frac),
            "dual_clip_fraction": float(dual_frac),
            "ratio_mean": float((ratio * mask).sum() / n_tok),
            "ratio_max": float(ratio[mask].max()) if mask.any() else 1.0,
            "tis_weight_mean": float((tis_weight * mask).sum() / n_tok) if tis_weight is not None else 1.0,
            "tis_capped_fraction": (float(((tis_weight >= cfg.tis_cap) & mask).sum() / n_tok)
                                    if tis_weight is not None else 0.0),
            "trainable_tokens_main": int(mask[batch.stream == MAIN].sum()),
            "trainable_tokens_aux": int(mask[batch.stream == AUX].sum()),
        }
    return LossOutput(loss, pg_main, pg_aux, kl_main, kl_aux, clip_frac, dual_frac, metrics)
