"""``deepgrpo study theory``: the exact curves that say where a depth bias can pay off.

For each regime (recovery model x heterogeneity) the simulator's oracle gives, for the
pre-trained policy and without any sampling, as functions of the depth k (steps into a chain):

- ``s_fail``: E[s(X_k) | the chain fails], the mean exact recoverability of the state a failed
  chain reached after k steps, with the root's success rate ``p`` beside it. The identity
  E[s(X_k) | fail] = (p - E[s(X_k)^2]) / (1 - p) <= p (column ``identity``) says that a pivot
  chosen by position alone never finds successes more often per continuation than the root;
- ``mixed``: P(K continuations from that state form a mixed group) = E[1 - s^K - (1 - s)^K | fail],
  the chance that a branch group carries any gradient signal;
- ``success_per_token`` and ``mixed_per_token``: the same per generated token (a branch from
  depth k generates only the remaining L - k tokens), against the root's (``root_*``): where
  depth pays, it pays through token cost.

All expectations pool the problems of the set (uniform over problems, then over chains), so the
identity holds for the pooled quantities. Outputs in ``OUT/theory/``: ``curves.csv`` (one row per
regime and depth), ``theory.png``, ``section.md`` (atomic writes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepgrpo.config import ConfigError, check_range
from deepgrpo.flags import OneLineParser, OptionSet
from deepgrpo.records import atomic_write, write_csv_atomic, write_text_atomic

STUDY = "theory"
RECOVERY_MODELS: dict[str, dict[str, Any]] = {
    "fatal": {"recovery": "fatal"},
    "constant": {"recovery": "constant", "recovery_prob": 0.05},
    "decay": {"recovery": "decay", "recovery_prob": 0.2, "recovery_decay": 3.0},
}
"""Recovery models of the regimes (the settings of the depth-bias study)."""
HETEROGENEITY = (0.0, 1.0)
"""Between-problem variation of the cruxes: 0 (the position-only assumption is exact) and 1."""


def regime_curves(spec_overrides: dict[str, Any], K: int = 8, seed: int = 0) -> pd.DataFrame:
    """The exact curves of one regime (see the module docstring), one row per depth k = 0..T."""
    import torch

    from sims.oracle import failed_state_recoverability, status_distribution, success_table
    from sims.policy import TokenTreePolicy
    from sims.spec import TokenTreeSpec
    problems = TokenTreeSpec(**{"n_heldout": 0, **spec_overrides}).build(run_seed=seed)
    policy = TokenTreePolicy(problems)
    with torch.no_grad():
        q = policy.correct_probs()
        W, D = success_table(problems, q), status_distribution(problems, q)  # [n, T+1, 2] each
    per = failed_state_recoverability(W, D)  # [n, T+1] per problem
    p = per["p"][:, 0].numpy()  # [n]
    fail = 1.0 - p
    w, d = W.numpy(), D.numpy()
    mixed_state = 1.0 - w ** K - (1.0 - w) ** K  # [n, T+1, 2]
    # pooled over problems: E[f(X_k) 1{fail}] / P(fail), with E[f(X_k) 1{fail}] = Σ_x P(x) f(x) (1 - s(x))
    joint_fail = (d * (1.0 - w)).sum(-1)  # [n, T+1] P(X_k and fail) summed over states: = 1 - p
    s_fail = (d * w * (1.0 - w)).sum(-1).sum(0) / fail.sum()  # [T+1]
    mixed = (d * mixed_state * (1.0 - w)).sum(-1).sum(0) / fail.sum()
    p_bar = float(p.mean())
    mean_s2 = (d * w * w).sum(-1).mean(0)  # [T+1]
    identity = (p_bar - mean_s2) / (1.0 - p_bar)
    lengths = problems.lengths.numpy().astype(np.float64)  # [n]
    T = problems.T
    k = np.arange(T + 1)
    remaining = np.maximum(lengths[:, None] - k[None, :], 0.0)  # [n, T+1]
    remaining_fail = (joint_fail * remaining).sum(0) / fail.sum()  # E[L - k | fail]
    root_tokens = float(lengths.mean())
    root_mixed = float((1.0 - p ** K - (1.0 - p) ** K).mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pd.DataFrame({
            "k": k, "rel_depth": k / T, "p": p_bar, "s_fail": s_fail, "identity": identity, "mixed": mixed,
            "root_mixed": root_mixed,
            "success_per_token": np.where(remaining_fail > 0, s_fail / remaining_fail, np.nan),
            "mixed_per_token": np.where(remaining_fail > 0, mixed / remaining_fail, np.nan),
            "root_success_per_token": p_bar / root_tokens, "root_mixed_per_token": root_mixed / root_tokens,
        })
    return out


def theory_table(K: int = 8, seed: int = 0, spec: dict[str, Any] | None = None) -> pd.DataFrame:
    """The curves of every regime (``recovery`` and ``heterogeneity`` columns), on problem sets
    of ``spec`` (TokenTreeSpec overrides; default: the simulator's default spec)."""
    frames = []
    for rec, over in RECOVERY_MODELS.items():
        for h in HETEROGENEITY:
            c = regime_curves({**(spec or {}), **over, "heterogeneity": h}, K=K, seed=seed)
            c.insert(0, "heterogeneity", h)
            c.insert(0, "recovery", rec)
            frames.append(c)
    return pd.concat(frames, ignore_index=True)


def figure(table: pd.DataFrame, path: Path) -> None:
    """The three panels of :func:`theory_table`'s curves, one line per regime, saved to ``path``.

    Plain matplotlib drawn as seaborn's ``lineplot`` drew it (one line per regime in the colour
    cycle, NaN points left out, small white-edged markers), with a fixed layout: importing seaborn
    (it imports scipy.stats) and ``tight_layout``'s extra draw took most of the figure's time."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    fig.subplots_adjust(left=0.048, right=0.99, bottom=0.13, top=0.919, wspace=0.167)
    t = table.assign(regime=table.recovery + ", h=" + table.heterogeneity.map("{:g}".format))
    groups = list(t.groupby("regime", sort=False))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {"marker": "o", "markersize": 3, "markeredgewidth": 0.75, "markeredgecolor": "w"}
    for ax, y, dotted in ((axes[0], "s_fail", "p"), (axes[1], "mixed", None),
                          (axes[2], "success_per_token", "root_success_per_token")):
        for k, (regime, g) in enumerate(groups):
            d = g[["k", y]].dropna().sort_values("k", kind="stable")
            ax.plot(d.k.to_numpy(), d[y].to_numpy(), color=colors[k % len(colors)], label=regime, **style)
        if dotted:
            for k, (_, g) in enumerate(groups):
                ax.axhline(g[dotted].iloc[0], color=colors[k % len(colors)], ls=":", lw=1)
    axes[0].set(xlabel="depth k (steps)", ylabel="E[s(X_k) | fail]",
                title="Recoverability of failed chains' states (dotted: root p)")
    axes[1].set(xlabel="depth k (steps)", ylabel="P(mixed K-group | fail)", title="Chance of an informative group")
    axes[2].set(xlabel="depth k (steps)", ylabel="successes per generated token",
                title="Successes per token from depth k (dotted: root)")
    axes[0].legend(fontsize=7)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def section(table: pd.DataFrame, K: int, heading: str = f"## {STUDY}", image: str = "theory/theory.png") -> list[str]:
    """Findings computed from the curves (markdown lines) under ``heading``, showing ``image``."""
    lines = [heading, "", "Exact curves from the oracle for the pre-trained policy (no sampling): "
             f"E[s(X_k) | fail] against the root's p, the chance of a mixed K = {K} group, and both per generated "
             "token (a branch from depth k generates only the remaining tokens).", "",
             f"![theory]({image})", ""]
    for (rec, h), g in table.groupby(["recovery", "heterogeneity"], sort=False):
        inner = g[(g.k > 0) & (g.k < g.k.max())]
        gap = float((inner.identity - inner.s_fail).abs().max())
        worst = float((inner.s_fail - inner.p).max())
        ratio = inner.success_per_token / inner.root_success_per_token
        best = inner.loc[ratio.idxmax()]
        below = "below p at every depth" if worst <= 1e-12 else f"ABOVE p at some depth (by {worst:.3g})"
        lines.append(
            f"- {rec}, h = {h:g}: p = {g.p.iloc[0]:.3f}; E[s(X_k) | fail] is {below} (smallest gap "
            f"{-worst:.3f}; the identity holds to {gap:.1e}). Per generated token the best depth is k = "
            f"{int(best.k)} (r = {best.rel_depth:.2f}): {float(ratio.max()):.2f}x the root's successes per token, "
            f"with P(mixed K-group) {best.mixed:.2f} against the root's {g.root_mixed.iloc[0]:.2f}.")
    return lines + [""]


def run(out: str | Path, K: int = 8, seed: int = 0) -> Path:
    """Compute the curves and write ``OUT/theory/``; returns that directory."""
    d = Path(out) / STUDY
    table = theory_table(K=K, seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(d / "curves.csv", table)
    figure(table, d / "theory.png")
    write_text_atomic(d / "section.md", "\n".join(section(table, K)) + "\n")
    return d


DESCRIPTION = ("The exact curves that say where a depth bias can pay off: for each regime (recovery model x "
               "heterogeneity), the simulator's oracle gives the recoverability of a failed chain's state, the "
               "chance of a mixed K-group and both per generated token, against the depth, without sampling.")
"""What ``deepgrpo study theory`` does, for its ``--help``."""


@dataclass
class TheoryOptions:
    """Settings of the theory curves.

    K: continuations per pivot (the K of the mixed-group chance), at least 2.
    seed: run seed the problem sets are drawn from (as in sim run).
    """

    K: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_range(type(self).__name__, "K", self.K, 2, None, integer=True)
        check_range(type(self).__name__, "seed", self.seed, 0, None, integer=True)


OPTIONS = OptionSet(TheoryOptions, reserved=("out", "config", "set", "help"))


def add_arguments(p: Any) -> None:
    """The options of ``deepgrpo study theory`` (on parser ``p``)."""
    p.add_argument("--out", default="results", help="results directory (default: ./results)")
    OPTIONS.add_arguments(p)


def main(argv: Sequence[str], prog: str = f"deepgrpo study {STUDY}") -> int:
    """Entry point of ``deepgrpo study theory``."""
    from deepgrpo.records import claim_output
    p = OneLineParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    a = p.parse_args(list(argv))
    try:
        opts = OPTIONS.resolve_named(a, TheoryOptions())
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    claim_output(a.out)
    d = run(a.out, K=opts.K, seed=opts.seed)
    print(f"{STUDY}: {d}")
    return 0
