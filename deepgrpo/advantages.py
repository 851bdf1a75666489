"""Group-relative advantages (pure tensor functions)."""

from __future__ import annotations

import torch

from deepgrpo.config import AdvantageConfig


def group_advantages(rewards: torch.Tensor, group: torch.Tensor,
                     config: AdvantageConfig | None = None) -> torch.Tensor:
    """Reward minus the mean of its group.

    Args:
        rewards: ``FloatTensor [B]``.
        group: ``LongTensor [B]`` group id of each sample (any integers).
        config: options (std scaling, leave-one-out); defaults to :class:`AdvantageConfig`.

    Returns:
        ``FloatTensor [B]``. Groups whose rewards are all equal (including groups of one)
        give exactly 0, never NaN. With ``leave_one_out`` the baseline of sample i is the mean
        of the other members, i.e. A_i = n/(n-1) · (r_i - mean). With ``scale_std`` the result
        is divided by (the group's *sample* std, Σ(r - mean)²/(n - 1), + ``std_eps``), as verl
        and TRL do; a group of one has no sample std and gets advantage 0 (it carries no signal).
    """
    cfg = config or AdvantageConfig()
    if rewards.ndim != 1 or group.shape != rewards.shape:
        raise ValueError(f"rewards [B] and group [B] expected, got {tuple(rewards.shape)} and {tuple(group.shape)}")
    if rewards.numel() == 0:
        return rewards.clone()
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group, return_inverse=True)  # [B] -> dense ids 0..U-1
    U = int(inv.max()) + 1
    count = torch.zeros(U, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))  # [U]
    total = torch.zeros(U, dtype=torch.float64).index_add_(0, inv, r)  # [U]
    mean = total / count  # [U]
    centred = r - mean[inv]  # [B]
    # all-equal groups: exact zeros (floating-point mean may differ from r by rounding)
    rmin = torch.full((U,), float("inf"), dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    rmax = torch.full((U,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    constant = (rmax == rmin)[inv]  # [B]
    adv = torch.where(constant, torch.zeros_like(centred), centred)
    n = count[inv]
    if cfg.leave_one_out:
        adv = torch.where(n > 1, adv * n / (n - 1).clamp(min=1), torch.zeros_like(adv))
    if cfg.scale_std:
        # sample variance (n - 1); groups of one are constant (A = 0) whatever the divisor
        var = torch.zeros(U, dtype=torch.float64).index_add_(0, inv, centred ** 2) / (count - 1).clamp(min=1)  # [U]
        adv = adv / (var.sqrt()[inv] + cfg.std_eps)
    return adv.to(rewards.dtype)


def nonzero_advantage(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``BoolTensor [B]``: samples with |A| >= eps (the ones that carry a gradient signal)."""
    return advantages.abs() >= eps
