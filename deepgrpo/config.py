"""Typed configuration of the DEEP-GRPO core.

One dataclass per component; defaults equal the reference values of the DEEP-GRPO paper
(arXiv 2602.14169, "Deep Dense Exploration"). Every field is validated at construction:
an invalid value raises :class:`ConfigError` naming the field, the value and the allowed
range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value.

    The message names the owner, the field, the value and what is allowed; the same facts are
    attributes, so that a caller (e.g. a command line mapping a field to its flag) never parses
    the message:

    owner: the config class (``"ExploreConfig"``) or the option's context (``"--set"``), or None.
    field: the field's name (``"G"``), or None when the error is not about one field.
    value: the offending value as given.
    allowed: what would have been accepted (``"an integer in [1, inf)"``), or None.
    """

    def __init__(self, message: str, *, owner: str | None = None, field: str | None = None,
                 value: Any = None, allowed: str | None = None) -> None:
        super().__init__(message)
        self.owner, self.field, self.value, self.allowed = owner, field, value, allowed


def invalid(owner: str, name: str, value: Any, allowed: str) -> ConfigError:
    """The :class:`ConfigError` for ``owner.name = value`` with ``allowed`` (one message format
    for every check of the project)."""
    return ConfigError(f"{owner}.{name} = {short_repr(value)} is invalid: expected {allowed}",
                       owner=owner, field=name, value=value, allowed=allowed)


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, built without walking all of a huge
    or deeply shared value (an error message must never cost more than the error)."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_range(owner: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number with ``lo <= value <= hi``
    (open ends if asked). NaN and ±inf are always rejected, booleans are not numbers, and with
    ``integer`` only an ``int`` passes (``8.0`` is converted to 8 by the typed override path,
    :mod:`deepgrpo.overrides`, before it reaches a dataclass).

    Used by every config dataclass of the project (core and backends) so that messages look
    alike: ``ExploreConfig.K = 0 is invalid: expected an integer in [1, inf)``.
    """
    bad = isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)
    if not bad:
        v = float(value)
        bad = (not math.isfinite(v)
               or (lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
    if bad:  # the message only when it is needed (configs are checked thousands of times in a study)
        lb = "(" if lo_open else "["
        rb = ")" if hi_open or hi is None else "]"
        kind = "an integer" if integer else "a finite number"
        raise invalid(owner, name, value, f"{kind} in {lb}{'-inf' if lo is None else lo}, "
                      f"{'inf' if hi is None else hi}{rb}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise invalid(owner, name, value, f"one of {', '.join(map(str, choices))}")


BRANCHING_STRATEGIES = ("root", "deep", "random-pivot", "depth-only", "root-only", "informative",
                        "max-surprisal", "low-prob", "uniform")
"""Names accepted by :attr:`ExploreConfig.strategy` (see :mod:`deepgrpo.branching`)."""

DENSE_STRATEGIES = ("deep", "random-pivot", "depth-only", "root-only", "informative")
"""Strategies that spend K continuations at each chosen pivot (one advantage group per pivot)."""

DISPERSED_STRATEGIES = ("max-surprisal", "low-prob", "uniform")
"""Tree-style strategies that split n_pivots·K continuations over ``n_cut_points`` points."""

ESTIMATOR_KINDS = ("position", "state", "oracle", "selector")
"""Names accepted by :attr:`EstimatorConfig.kind` (see :func:`deepgrpo.estimators.make_estimator`)."""

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
INFORMATIVE_COSTS = ("tokens", "rollouts")
"""What the ``informative`` strategy's chance of a mixed group is divided by (``ExploreConfig.informative_cost``)."""


@dataclass
class ExploreConfig:
    """How one exploration step spends its sampling budget.

    Main chain (paper §3.1)
        G: trajectories sampled from the root per prompt (paper: G = 8). With
            strategy ``root`` this is GRPO's group size N. At least 2: a group of one has
            advantage 0 by construction and carries no signal.

    Pivots and branches (paper §3.2-3.3)
        strategy: how branch points are chosen in failed trajectories: ``root`` (none: GRPO),
            ``deep``, ``random-pivot``, ``depth-only``, ``root-only``, ``informative``,
            ``max-surprisal``, ``low-prob`` or ``uniform``. ``deep`` is DEEP-GRPO's utility
            Q(i) ∝ P̂(success | r_i) · r_i^γ; ``depth-only`` drops P̂; ``random-pivot`` is uniform
            over candidates; ``informative`` picks the candidate that maximises the chance of a
            mixed (informative) K-group per unit of cost, (1 - q^K - (1 - q)^K) / cost, where q is
            the chance that one continuation succeeds (the oracle estimator's exact value; a
            learned P̂, fitted to "any of the K continuations succeeded", is converted to
            q = 1 - (1 - P̂)^(1/K)) and the cost is set by ``informative_cost``; with the oracle
            estimator it is the decomposition ladder's top rung;
            ``root-only`` always branches at the root (the paper's
            root-only ablation: K extra root samples per failed chain, in their own group);
            ``max-surprisal``/``low-prob``/``uniform`` are dispersed tree-style
            baselines (TreeRL-, FR3E-like and uniform) that spread the same continuations over
            ``n_cut_points`` points.
        K: continuations per pivot (paper: K = 8); at least 2 for every branching strategy (an
            aux group of one has advantage 0).
        gamma: depth exponent γ of the utility (paper: γ = 2 is best of {0.1, 1, 2, 3}).
        n_pivots: pivots per failed trajectory (paper: 1).
        n_cut_points: M, cut points per failed trajectory of the dispersed strategies; the
            n_pivots · K continuations are split over them as evenly as possible, and every
            point must get at least 2 (a group of one has advantage 0 and would only spend
            budget): M <= n_pivots · K / 2, e.g. M = 4 for K = 8, never M = 8.
        aux_budget: optional cap on aux rollouts per prompt (None = no cap), used to compare
            methods at equal budget (see :mod:`deepgrpo.ledger`).
        failure_threshold: a trajectory with reward <= this is failed (paper: reward <= 0).
        informative_cost: what strategy ``informative`` divides a candidate's chance of a mixed
            group by: ``tokens``, the tokens left to generate after it (for budgets counted in
            tokens), or ``rollouts``, nothing (for budgets counted in rollouts, where every
            candidate's K continuations cost the same K rollouts).
    """

    G: int = 8
    K: int = 8
    strategy: str = "deep"
    gamma: float = 2.0
    n_pivots: int = 1
    n_cut_points: int = 4
    aux_budget: int | None = None
    failure_threshold: float = 0.0
    informative_cost: str = "tokens"

    def __post_init__(self) -> None:
        o = type(self).__name__
        # a group of one has advantage 0 by construction: it would spend budget and learn nothing
        check_range(o, "G", self.G, 2, None, integer=True)
        check_range(o, "K", self.K, 1 if self.strategy == "root" else 2, None, integer=True)
        check_choice(o, "strategy", self.strategy, BRANCHING_STRATEGIES)
        check_range(o, "gamma", self.gamma, 0.0, None)
        check_range(o, "n_pivots", self.n_pivots, 1, None, integer=True)
        check_range(o, "n_cut_points", self.n_cut_points, 1, None, integer=True)
        if self.strategy in DISPERSED_STRATEGIES and (self.n_pivots * self.K) // self.n_cut_points < 2:
            # split_evenly gives some point floor(n_pivots·K / M) continuations: never a group of one
            hi = self.n_pivots * self.K // 2  # >= 1: K >= 2 above
            raise invalid(o, "n_cut_points", self.n_cut_points,
                          f"an integer in [1, {hi}] with K = {self.K} and n_pivots = {self.n_pivots}: "
                          f"the n_pivots·K = {self.n_pivots * self.K} continuations split over n_cut_points "
                          f"points must give every point >= 2 (a one-continuation group carries no signal); "
                          f"lower n_cut_points or raise K")
        if self.aux_budget is not None:
            check_range(o, "aux_budget", self.aux_budget, 0, None, integer=True)
        check_range(o, "failure_threshold", self.failure_threshold)
        check_choice(o, "informative_cost", self.informative_cost, INFORMATIVE_COSTS)


@dataclass
class AdvantageConfig:
    """Group-relative advantages (paper §3.4).

    tree: TreeRL-style tree advantages instead of group-relative ones (meant for the dispersed
        strategies, defined for every plan): the G main chains of a prompt and their branches
        form a tree whose nodes are the segments between branch points; a node's value V is
        the mean reward of the leaves below it, its reward is (V - V(root)) + (V - V(parent))
        (TreeRL's global plus local terms), and a row's advantage is the mean of the rewards of
        the nodes it trains, weighted by their tokens (:func:`deepgrpo.advantages.tree_advantages`).
        ``scale_std`` and ``leave_one_out`` do not apply to it.
    scale_std: divide by the group's *sample* standard deviation (n - 1 in the denominator,
        as verl and TRL do) plus ``std_eps`` (GRPO's original rule; the paper and Dr.GRPO use
        no std scaling, the default). A group of one, or a group whose rewards are all equal,
        gets advantage exactly 0 either way: it carries no signal.
    leave_one_out: baseline is the mean of the *other* group members (RLOO) instead of the
        whole group's mean.
    drop_zero: drop samples with |A| < ``zero_eps``: they carry no policy-gradient signal.
    zero_eps: threshold for ``drop_zero`` (paper: 1e-8).
    std_eps: added to the std when ``scale_std`` is on.
    """

    tree: bool = False
    scale_std: bool = False
    leave_one_out: bool = False
    drop_zero: bool = True
    zero_eps: float = 1e-8
    std_eps: float = 1e-6

    def __post_init__(self) -> None:
        o = type(self).__name__
        for name in ("tree", "scale_std", "leave_one_out", "drop_zero"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(o, name, getattr(self, name), "true or false")
        check_range(o, "zero_eps", self.zero_eps, 0.0, None)
        check_range(o, "std_eps", self.std_eps, 0.0, None, lo_open=True)


@dataclass
class LossConfig:
    """Dual-stream clipped policy-gradient loss (paper §3.4, Eq. for L = L_main + λ·L_aux).

    Surrogate
        clip_low: lower PPO ratio clip: the ratio is clipped below at 1 - clip_low (paper: 0.2).
        clip_high: upper PPO ratio clip: the ratio is clipped above at 1 + clip_high (paper: 0.2).
        dual_clip: dual-clip constant c > 1 bounding the loss of negative-advantage tokens at
            -c·A (the authors' verl runs: c = 3; None = off). The log-ratio is clamped to
            [-20, 20] before ``exp`` (as verl does), so extreme log-prob gaps stay finite.
    Streams
        lam: λ, weight of the aux (branch) stream (paper: λ = 1, best of {0.1, 0.5, 1, 2}).
        aggregation: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum-norm``
            (Dr.GRPO: token sums over a constant normaliser). Each stream is aggregated
            separately.
        norm_length: constant normaliser of ``seq-mean-token-sum-norm`` (None = the batch's
            padded response length).
    KL to the reference policy
        kl_coef: coefficient β (paper: 1e-4). 0 disables the reference pass.
        kl_estimator: ``k1`` | ``k2`` | ``k3`` (paper: k3; its per-token value is clamped to
            [-10, 10] as in verl).
        kl_weighted_by_lambda: whether the aux stream's KL is also multiplied by λ. The
            authors' loss is L_main + λ·L_aux + β·(KL_main + KL_aux): off by default.
    Rollout/trainer mismatch
        tis_cap: truncated importance sampling for rollouts drawn by a separate engine (vLLM):
            the ratio is taken against the trainer's own (detached) log-probs and each token's
            loss is weighted by min(π_trainer / π_rollout, tis_cap) (None = off: the ratio is
            against the rollout engine's log-probs, as in plain PPO).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    lam: float = 1.0
    aggregation: str = "token-mean"
    norm_length: int | None = None
    kl_coef: float = 1e-4
    kl_estimator: str = "k3"
    kl_weighted_by_lambda: bool = False
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "clip_low", self.clip_low, 0.0, 1.0, hi_open=True)
        check_range(o, "clip_high", self.clip_high, 0.0, None)
        if self.dual_clip is not None:
            check_range(o, "dual_clip", self.dual_clip, 1.0, None, lo_open=True)
        check_range(o, "lam", self.lam, 0.0, None)
        check_choice(o, "aggregation", self.aggregation, AGGREGATIONS)
        if self.norm_length is not None:
            check_range(o, "norm_length", self.norm_length, 1, None, integer=True)
        check_range(o, "kl_coef", self.kl_coef, 0.0, None)
        check_choice(o, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.tis_cap is not None:
            check_range(o, "tis_cap", self.tis_cap, 0.0, None, lo_open=True)


@dataclass
class EstimatorConfig:
    """Online recoverability estimator P̂(success | candidate) (paper §3.2).

    Which estimator
        kind: ``position`` (logistic regression on relative depth r, the paper's choice),
            ``state`` (logistic regression on r plus state features: the prompt's main-chain
            success rate and the prefix's mean sampling log-prob), ``oracle`` (the candidate
            feature ``oracle_success``, the exact P(success | prefix), which only a backend that
            knows it supplies: the simulator) or ``selector`` (the learned informative selector,
            :class:`deepgrpo.estimators.SelectorLogistic`: the chance that *one* continuation
            succeeds, fitted to each pivot's count of successes among its K continuations by a
            binomial likelihood, on features an LLM backend observes too: r, the main-chain
            success rate, the prefix's log-prob (sum and mean), the policy's entropy at the cut
            and the prefix and remaining lengths). ``position`` and
            ``state`` are fitted to the paper's labels, y = 1 if any of the K continuations
            succeeded (paper §3.2), so they estimate that event; ``oracle`` and ``selector``
            give the single-continuation chance the ``informative`` strategy needs.
    Online fit (paper §3.2: refitted on every update over a FIFO buffer)
        buffer_size: size of the estimator's FIFO buffer of (features, label) pairs, one per
            branched pivot (paper: 10,000).
        min_per_class: the model is fitted only once the buffer holds more than this many
            points of each class (``selector``: more than this many successful and failed
            continuations); before that it predicts 1 (paper: 10).
        l2: the estimator's L2 penalty on its weights (not the intercept).
    """

    kind: str = "position"
    buffer_size: int = 10_000
    min_per_class: int = 10
    l2: float = 1e-3

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "kind", self.kind, ESTIMATOR_KINDS)
        check_range(o, "buffer_size", self.buffer_size, 1, None, integer=True)
        check_range(o, "min_per_class", self.min_per_class, 0, None, integer=True)
        check_range(o, "l2", self.l2, 0.0, None)


@dataclass
class AlgoConfig:
    """Everything the core needs for one training step: exploration, advantages, loss, estimator."""

    explore: ExploreConfig = field(default_factory=ExploreConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON-ready) of all four sections."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlgoConfig:
        """Inverse of :meth:`to_dict` through the typed path (:func:`deepgrpo.overrides.from_dict`):
        missing sections/fields take defaults, unknown ones raise :class:`ConfigError`."""
        from deepgrpo.overrides import from_dict
        return from_dict(cls, d)


def dataclass_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``d`` through the typed path (values converted by their
    annotations, unknown keys rejected with a clear message)."""
    from deepgrpo.overrides import from_dict
    return from_dict(cls, d)
