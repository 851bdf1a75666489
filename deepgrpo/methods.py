"""Named methods: the algorithm presets both backends run through the same core.

Each name maps to an :class:`~deepgrpo.config.AlgoConfig` built from the reference defaults
with a few overrides; callers may override further (e.g. GRPO's N via ``G``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepgrpo.config import AlgoConfig, ConfigError
from deepgrpo.overrides import apply_overrides, leaf_values

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
    # the paper's root-only ablation: K extra root samples per failed chain, in their own group
    "root-only": {"explore": {"strategy": "root-only"}},
    "deep-state": {"explore": {"strategy": "deep"}, "estimator": {"kind": "state"}},
    # the ladder's learned informative selector: the candidate most likely to give a mixed K-group
    # per generated token, 1 - q^K - (1 - q)^K, with q learned from what an LLM backend observes
    # (a binomial fit of each pivot's successes among its K continuations; no oracle input)
    "learned-informative": {"explore": {"strategy": "informative"}, "estimator": {"kind": "selector"}},
    # the decomposition ladder's top rungs (simulator only: the backend must supply the exact
    # P(success | prefix) as the candidate feature oracle_success): the paper's utility with the
    # true recoverability, and the candidate most likely to give a mixed K-group per token
    "oracle-pivot": {"explore": {"strategy": "deep"}, "estimator": {"kind": "oracle"}},
    "oracle-informative": {"explore": {"strategy": "informative"}, "estimator": {"kind": "oracle"}},
    # dispersed tree-style baselines at DEEP-GRPO's budget (n_pivots·K spread over M points)
    "tree-surprisal": {"explore": {"strategy": "max-surprisal"}},
    "tree-lowprob": {"explore": {"strategy": "low-prob"}},
    "tree-uniform": {"explore": {"strategy": "uniform"}},
}
"""Method name -> per-section overrides of the reference :class:`AlgoConfig`."""


def method_config(name: str, overrides: Mapping[str, Any] | None = None, **flat: Any) -> AlgoConfig:
    """The :class:`AlgoConfig` of method ``name`` with overrides applied through the typed path
    (:func:`deepgrpo.overrides.apply_overrides`).

    Keys are dotted (``explore.G``, ``loss.lam``) or bare field names (``G``, ``lam``), given as
    a mapping and/or keywords; values may be text (``"8"``, ``"off"``) or Python values.
    Unknown methods, keys or invalid values raise :class:`~deepgrpo.config.ConfigError`.
    """
    if name not in METHODS:
        raise ConfigError(f"method = {name!r} is invalid: expected one of {', '.join(METHODS)}",
                          owner=None, field="method", value=name, allowed=f"one of {', '.join(METHODS)}")
    base = AlgoConfig.from_dict(METHODS[name])
    return apply_overrides(base, {**(overrides or {}), **flat})


def preset_overrides(name: str, config: AlgoConfig) -> dict[str, Any]:
    """``{dotted key: value}`` of the fields where ``config`` differs from method ``name``'s
    preset (what a run must record to rebuild ``config`` from the method's name)."""
    base = leaf_values(method_config(name))
    return {k: v for k, v in leaf_values(config).items() if base[k] != v}
