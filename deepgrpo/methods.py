"""Named methods: the algorithm presets both backends run through the same core.

Each name maps to an :class:`~deepgrpo.config.AlgoConfig` built from the reference defaults
with a few overrides; callers may override further (e.g. GRPO's N via ``G``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deepgrpo.config import AdvantageConfig, AlgoConfig, ConfigError, EstimatorConfig, ExploreConfig, LossConfig

METHODS: dict[str, dict[str, dict[str, Any]]] = {
    # plain GRPO: root sampling only, otherwise identical to deep-grpo (advantages and loss), so
    # a comparison isolates exploration; pass scale_std=True / aggregation="seq-mean-token-mean"
    # for GRPO's original normalisation
    "grpo": {"explore": {"strategy": "root"}},
    # Dr.GRPO: no std scaling, token sums over a constant normaliser
    "drgrpo": {"explore": {"strategy": "root"}, "loss": {"aggregation": "seq-mean-token-sum-norm"}},
    # DEEP-GRPO (paper defaults): utility P̂(r)·r^γ, dense K continuations at 1 pivot
    "deep-grpo": {"explore": {"strategy": "deep"}},
    "deep-random": {"explore": {"strategy": "random-pivot"}},
    "deep-depth-only": {"explore": {"strategy": "depth-only"}},
    "deep-root": {"explore": {"strategy": "root-pivot"}},
    "deep-state": {"explore": {"strategy": "deep"}, "estimator": {"kind": "state"}},
    # dispersed tree-style baselines at DEEP-GRPO's budget (n_pivots·K spread over M points)
    "tree-surprisal": {"explore": {"strategy": "max-surprisal"}},
    "tree-lowprob": {"explore": {"strategy": "low-prob"}},
    "tree-uniform": {"explore": {"strategy": "uniform"}},
}
"""Method name -> per-section overrides of the reference :class:`AlgoConfig`."""


def method_config(name: str, **overrides: Any) -> AlgoConfig:
    """The :class:`AlgoConfig` of method ``name`` with flat ``overrides`` applied.

    Flat keys are routed to the section that has them (``G``, ``K``, ``gamma``... to
    ``explore``; ``lam``, ``kl_coef``... to ``loss``; etc.). Unknown names or keys raise
    :class:`~deepgrpo.config.ConfigError`.
    """
    if name not in METHODS:
        raise ConfigError(f"method = {name!r} is invalid: expected one of {', '.join(METHODS)}")
    sections = {"explore": ExploreConfig, "advantage": AdvantageConfig, "loss": LossConfig,
                "estimator": EstimatorConfig}
    values = {s: dict(v) for s, v in METHODS[name].items()}
    for key, value in overrides.items():
        owners = [s for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if not owners:
            raise ConfigError(f"{key} = {value!r} is not a config field of any section")
        values.setdefault(owners[0], {})[key] = value
    return AlgoConfig.from_dict(values)
