"""Advantages (pure tensor functions): group-relative (GRPO / DEEP-GRPO) and TreeRL-style
tree advantages."""

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


def tree_advantages(rewards: torch.Tensor, path: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """TreeRL-style advantages of the leaves of a sampling tree (Hou et al. 2025, "TreeRL: LLM
    Reinforcement Learning with On-Policy Tree Search", §3: global and local advantages).

    Every row is a leaf (a complete response); ``path[b]`` lists the nodes from its tree's root
    (column 0) down to its own leaf node, so two rows share a node exactly when they share that
    part of the response (a prefix before a branch point). For every node n:

        V(n) = mean reward of the leaves below n (the rows whose path holds n)
        R(n) = (V(n) - V(root)) + (V(n) - V(parent(n)))     global term + local term

    and row b's advantage is the weighted mean of R over the nodes of its path below the root:
    A_b = Σ_{d>=1} w[b, d] · R(path[b, d]) / Σ_{d>=1} w[b, d] (0 if the weights sum to 0). TreeRL
    gives each token the R of the node it belongs to; one scalar per row is that rule's
    token-weighted average when ``weight`` holds the tokens the row trains in each node (the
    core passes that: a branch row trains only its own leaf, its prefix nodes weigh 0). With
    ``weight=None`` every node below the root counts once (the plain average over the leaf's
    ancestors and itself). TreeRL divides R(n) by √(leaves below n) because a shared node's
    tokens are trained once per leaf; here each node's tokens are trained in one row only, so
    there is no such division.

    Args:
        rewards: ``FloatTensor [B]`` leaf rewards.
        path: ``LongTensor [B, D]`` node ids (any non-negative integers, unique across trees),
            root first, padded with -1 after the leaf. Every node must have one parent.
        weight: ``FloatTensor [B, D]`` non-negative weights (column 0 and padding ignored), or None.

    Returns: ``FloatTensor [B]``. A tree whose leaves all have the same reward gives exactly 0.
    """
    if rewards.ndim != 1 or path.ndim != 2 or path.shape[0] != rewards.shape[0]:
        raise ValueError(f"rewards [B] and path [B, D] expected, got {tuple(rewards.shape)} and {tuple(path.shape)}")
    B, D = path.shape
    if B == 0 or D < 2:
        return torch.zeros_like(rewards)
    valid = path >= 0  # [B, D]
    if not bool(valid[:, 0].all()):
        raise ValueError("every row's path must start at its root (column 0 >= 0)")
    r = rewards.to(torch.float64)
    ids, inv = torch.unique(path.clamp(min=0), return_inverse=True)  # inv [B, D] -> dense node index
    U = ids.numel()
    flat, vflat = inv.reshape(-1), valid.reshape(-1)
    r_flat = r.unsqueeze(1).expand(B, D).reshape(-1)
    count = torch.zeros(U, dtype=torch.float64).index_add_(0, flat[vflat], torch.ones_like(r_flat[vflat]))  # [U]
    total = torch.zeros(U, dtype=torch.float64).index_add_(0, flat[vflat], r_flat[vflat])  # [U]
    value = total / count.clamp(min=1)  # [U] V(n)
    # parents: node (b, d) has parent (b, d-1); a node with two different parents is malformed
    child = inv[:, 1:][valid[:, 1:]]
    parent = inv[:, :-1][valid[:, 1:]]
    lo = torch.full((U,), U, dtype=torch.long).scatter_reduce(0, child, parent, "amin")
    hi = torch.full((U,), -1, dtype=torch.long).scatter_reduce(0, child, parent, "amax")
    if bool((lo[child] != hi[child]).any()):
        raise ValueError("malformed tree: a node appears under two different parents")
    v = value[inv]  # [B, D] V of every path node
    # all-equal trees: exact zeros (a mean can differ from the rewards by rounding)
    R = 2.0 * v[:, 1:] - v[:, :1] - v[:, :-1]  # [B, D-1] global + local term of nodes 1..D-1
    root_min = torch.full((U,), float("inf"), dtype=torch.float64).scatter_reduce(0, inv[:, 0], r, "amin")
    root_max = torch.full((U,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inv[:, 0], r, "amax")
    constant = (root_min == root_max)[inv[:, 0]]  # [B]
    w = valid[:, 1:].to(torch.float64) if weight is None else weight[:, 1:].to(torch.float64) * valid[:, 1:]
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    den = w.sum(1)  # [B]
    adv = torch.where(den > 0, (w * R.masked_fill(~valid[:, 1:], 0.0)).sum(1) / den.clamp(min=1e-300),
                      torch.zeros_like(den))
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)
