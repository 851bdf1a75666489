"""Typed configuration of the DEEP-GRPO core.

One dataclass per component; defaults equal the reference values of the DEEP-GRPO paper
(arXiv 2602.14169, "Deep Dense Exploration"). Every field is validated at construction:
an invalid value raises :class:`ConfigError` naming the field, the value and the allowed
range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """An invalid configuration value (the message names field, value and allowed range)."""


def check_range(owner: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``lo <= value <= hi`` (open ends if asked).

    Used by every config dataclass of the project (core and backends) so that messages look
    alike: ``ExploreConfig.K = 0 is invalid: expected an integer in [1, inf)``.
    """
    lb = "(" if lo_open else "["
    rb = ")" if hi_open or hi is None else "]"
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if integer and not bad:
        bad = isinstance(value, float) and not float(value).is_integer()
    if not bad:
        v = float(value)
        bad = (math.isnan(v)
               or (lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
    if bad:
        raise ConfigError(f"{owner}.{name} = {value!r} is invalid: expected {allowed}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{owner}.{name} = {value!r} is invalid: expected one of {', '.join(map(str, choices))}")


BRANCHING_STRATEGIES = ("root", "deep", "random-pivot", "depth-only", "root-pivot",
                        "max-surprisal", "low-prob", "uniform")
"""Names accepted by :attr:`ExploreConfig.strategy` (see :mod:`deepgrpo.branching`)."""

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class ExploreConfig:
    """How one exploration step spends its sampling budget.

    Main chain (paper §3.1)
        G: trajectories sampled from the root per prompt (paper: G = 8). With
            ``strategy="root"`` this is GRPO's group size N.

    Pivots and branches (paper §3.2-3.3)
        strategy: how branch points are chosen in failed trajectories; one of
            :data:`BRANCHING_STRATEGIES`. ``deep`` is DEEP-GRPO's utility
            Q(i) ∝ P̂(success | r_i) · r_i^γ; ``depth-only`` drops P̂; ``random-pivot`` is uniform
            over candidates; ``root-pivot`` always branches at the root (the paper's
            "root-only" ablation); ``max-surprisal``/``low-prob``/``uniform`` are dispersed tree-style
            baselines (TreeRL-, FR3E-like and uniform) that spread the same continuations over
            ``n_cut_points`` points.
        K: continuations per pivot (paper: K = 8).
        gamma: depth exponent γ of the utility (paper: γ = 2 is best of {0.1, 1, 2, 3}).
        n_pivots: pivots per failed trajectory (paper: 1).
        n_cut_points: M, cut points per failed trajectory of the dispersed strategies; the
            n_pivots · K continuations are split over them as evenly as possible.
        aux_budget: optional cap on aux rollouts per prompt (None = no cap), used to compare
            methods at equal budget (see :mod:`deepgrpo.ledger`).
        failure_threshold: a trajectory with reward <= this is failed (paper: reward <= 0).
    """

    G: int = 8
    K: int = 8
    strategy: str = "deep"
    gamma: float = 2.0
    n_pivots: int = 1
    n_cut_points: int = 4
    aux_budget: int | None = None
    failure_threshold: float = 0.0

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "G", self.G, 1, None, integer=True)
        check_range(o, "K", self.K, 1, None, integer=True)
        check_choice(o, "strategy", self.strategy, BRANCHING_STRATEGIES)
        check_range(o, "gamma", self.gamma, 0.0, None)
        check_range(o, "n_pivots", self.n_pivots, 1, None, integer=True)
        check_range(o, "n_cut_points", self.n_cut_points, 1, None, integer=True)
        if self.aux_budget is not None:
            check_range(o, "aux_budget", self.aux_budget, 0, None, integer=True)
        check_range(o, "failure_threshold", self.failure_threshold)


@dataclass
class AdvantageConfig:
    """Group-relative advantages (paper §3.4).

    scale_std: divide by the group's standard deviation (GRPO's original rule; the paper and
        Dr.GRPO use no std scaling, the default).
    leave_one_out: baseline is the mean of the *other* group members (RLOO) instead of the
        whole group's mean.
    drop_zero: drop samples with |A| < ``zero_eps``: they carry no policy-gradient signal.
    zero_eps: threshold for ``drop_zero`` (paper: 1e-8).
    std_eps: added to the std when ``scale_std`` is on.
    """

    scale_std: bool = False
    leave_one_out: bool = False
    drop_zero: bool = True
    zero_eps: float = 1e-8
    std_eps: float = 1e-6

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "zero_eps", self.zero_eps, 0.0, None)
        check_range(o, "std_eps", self.std_eps, 0.0, None, lo_open=True)


@dataclass
class LossConfig:
    """Dual-stream clipped policy-gradient loss (paper §3.4, Eq. for L = L_main + λ·L_aux).

    Surrogate
        clip_low, clip_high: PPO ratio clip range [1 - clip_low, 1 + clip_high] (paper: 0.2).
        dual_clip: optional dual-clip constant c > 1 bounding the loss of negative-advantage
            tokens at -c·A (None = off).
    Streams
        lam: λ, weight of the aux (branch) stream (paper: λ = 1, best of {0.1, 0.5, 1, 2}).
        aggregation: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum-norm``
            (Dr.GRPO: token sums over a constant normaliser). Each stream is aggregated
            separately.
        norm_length: constant normaliser of ``seq-mean-token-sum-norm`` (None = the batch's
            padded response length).
    KL to the reference policy
        kl_coef: coefficient β (paper: 1e-4). 0 disables the reference pass.
        kl_estimator: ``k1`` | ``k2`` | ``k3`` (paper: k3).
        kl_weighted_by_lambda: whether the aux stream's KL is also multiplied by λ.
    Rollout/trainer mismatch
        tis_cap: truncated importance sampling for rollouts drawn by a separate engine (vLLM):
            the ratio is taken against the trainer's own (detached) log-probs and each token's
            loss is weighted by min(π_trainer / π_rollout, tis_cap) (None = off: the ratio is
            against the rollout engine's log-probs, as in plain PPO).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    lam: float = 1.0
    aggregation: str = "token-mean"
    norm_length: int | None = None
    kl_coef: float = 1e-4
    kl_estimator: str = "k3"
    kl_weighted_by_lambda: bool = True
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

    kind: ``position`` (logistic regression on relative depth r, the paper's choice) or
        ``state`` (logistic regression on r plus state features; see
        :class:`deepgrpo.estimators.StateLogistic`).
    buffer_size: FIFO buffer of (features, label) pairs (paper: 10,000).
    min_per_class: the model is fitted only once the buffer holds more than this many points
        of each class; before that it predicts 1 (paper: 10).
    l2: L2 penalty on the weights (not the intercept).
    """

    kind: str = "position"
    buffer_size: int = 10_000
    min_per_class: int = 10
    l2: float = 1e-3

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "kind", self.kind, ("position", "state"))
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
    def from_dict(cls, d: Mapping[str, Any]) -> "AlgoConfig":
        """Inverse of :meth:`to_dict`; missing sections/fields take defaults, unknown ones raise."""
        known = {"explore", "advantage", "loss", "estimator"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"AlgoConfig: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(explore=dataclass_from_dict(ExploreConfig, d.get("explore", {})),
                   advantage=dataclass_from_dict(AdvantageConfig, d.get("advantage", {})),
                   loss=dataclass_from_dict(LossConfig, d.get("loss", {})),
                   estimator=dataclass_from_dict(EstimatorConfig, d.get("estimator", {})))


def parse_flat_value(text: str) -> Any:
    """A command-line ``NAME=VALUE`` value: ``'8'`` -> 8, ``'0.5'`` -> 0.5, ``'true'`` -> True,
    ``'none'`` -> None, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def dataclass_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``d``, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    return cls(**d)
