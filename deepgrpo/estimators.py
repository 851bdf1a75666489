"""Online recoverability estimators P̂(success | candidate pivot).

All estimators share one interface so callers never change when a richer one is added:

* ``update(features, labels)``: ``features`` maps feature names to ``[N]`` arrays (one entry per
  branched pivot), ``labels`` is ``[N]`` in {0, 1} (1 = at least one continuation succeeded);
  an estimator with a class attribute ``learns_from_counts = True`` is instead called
  ``update(features, labels, successes=k, trials=n)`` with each point's counts ``[N]`` (how
  many of its n continuations succeeded), and every other estimator exactly as before;
* ``predict(features) -> [N]`` probabilities;
* ``state_dict()`` / ``load_state_dict()`` (plain numpy / Python values, picklable and
  JSON-friendly after ``tolist``).

The exploration step (:mod:`deepgrpo.explore`) computes every feature in
:data:`CANDIDATE_FEATURES` for each candidate, and carries the backend's own
(:data:`BACKEND_FEATURES`); an estimator picks the ones it uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from deepgrpo.config import ConfigError, EstimatorConfig

CANDIDATE_FEATURES = {
    "rel_depth": "r_i = (i+1)/(L+1), relative depth of the candidate (the paper's only input)",
    "prefix_len": "number of response tokens in the prefix",
    "prefix_logprob": "sum of sampling log-probs of the prefix tokens",
    "prefix_mean_logprob": "mean sampling log-prob of the prefix tokens (0 for the root)",
    "next_surprisal": "-log p of the first token after the cut (the token a branch resamples)",
    "group_success_rate": "fraction of the prompt's G main chains that succeeded",
    "prompt_index": "index of the prompt within the step's batch (for per-prompt effects)",
    "remaining_tokens": "tokens of the failed chain after the cut (what a branch regenerates, about)",
}
"""Per-candidate features the exploration step provides (name -> meaning). A backend may add
its own through :data:`deepgrpo.explore.CANDIDATE_EXTRA_PREFIX` (:data:`BACKEND_FEATURES`)."""

BACKEND_FEATURES = {
    "oracle_success": "the exact P(success | prefix) under the sampling policy (the simulator only; for the "
                      "oracle rungs and for evaluation, never an input of a learned estimator)",
    "next_entropy": "entropy (nats) of the policy's next-token distribution in the state the prefix reaches (the "
                    "distribution a branch resamples from; 0 where the chain has ended): the simulator, and the "
                    "LLM backend (of the sampling distribution: temperature and nucleus applied; reported by the HF "
                    "engine, computed by a forward pass for an engine that reports none when the estimator uses it) "
                    "and the TRL trainer",
}
"""Candidate features that come from a backend (main-rollout extras ``cand_NAME``), name -> meaning
and who supplies them; a backend without one simply does not hand it over."""

ORACLE_FEATURE = "oracle_success"
"""The candidate feature the ``oracle`` estimator reads: exact P(success | prefix)."""


@runtime_checkable
class RecoverabilityEstimator(Protocol):
    """P̂(success | candidate features); see the module docstring.

    The core labels a branch point y = 1 when *any* of its continuations succeeded, so an
    estimator that learns from those labels estimates P(at least one of K succeeds). One that
    returns the chance that a *single* continuation succeeds (the oracle, the selector) says so
    with a class attribute ``per_continuation = True`` (the ``informative`` strategy needs that
    chance and converts any other P̂ to it: :func:`deepgrpo.pivots.single_continuation`). One
    that learns from each point's counts of successes among its continuations says so with
    ``learns_from_counts = True``; the core then passes ``successes`` and ``trials`` ``[N]`` to
    ``update`` as keywords (see the module docstring).
    """

    def update(self, features: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
        """Learn from ``labels`` ``[N]`` in {0, 1} of candidates with ``features`` (name -> ``[N]``)."""

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[N]`` P̂(success) of candidates with ``features`` (name -> ``[N]``)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain numpy / Python values)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, w0: np.ndarray | None = None,
                 max_iter: int = 50, tol: float = 1e-8, weights: np.ndarray | None = None) -> np.ndarray:
    """L2-regularised logistic regression by damped Newton's method (IRLS with a line search).

    Minimises Σ_j c_j·[log(1 + e^{z_j}) − y_j·z_j] + λ·||w||² / 2 with z = X·w + b and c_j = 1, or
    the row weights ``weights``. With y_j = k_j / n_j (k_j successes of n_j trials) and c_j = n_j
    this is the binomial likelihood of the counts: the same objective, and so the same fit, as
    the n_j Bernoulli rows (k_j ones, n_j − k_j zeros) it stands for.

    Args:
        X: ``[N, F]`` features (no intercept column; one is added).
        y: ``[N]`` labels in {0, 1}, or targets in [0, 1] (fractions of successes) with ``weights``.
        l2: penalty λ·||w||² / 2 on the weights (not the intercept).
        w0: ``[F + 1]`` warm start (weights then intercept).
        weights: ``[N]`` non-negative row weights (None: all 1, computed without them: the
            numbers of an unweighted fit do not depend on this argument).

    Returns: ``[F + 1]`` = (weights..., intercept).
    """
    N, F = X.shape
    Xb = np.concatenate([X, np.ones((N, 1))], axis=1)  # [N, F+1]
    w = np.zeros(F + 1) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    reg = np.full(F + 1, l2)
    reg[-1] = 0.0
    c = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)  # [N]

    def objective(v: np.ndarray) -> tuple[float, np.ndarray]:  # penalised negative log-likelihood (stable form)
        z = Xb @ v
        nll = np.logaddexp(0.0, z) - y * z  # [N]
        return float(np.sum(nll if c is None else c * nll) + 0.5 * np.sum(reg * v * v)), z

    f, z = objective(w)
    diag, ridge = np.diag(reg), 1e-9 * np.eye(F + 1)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow  [N]
        resid = p - y  # [N]
        grad = Xb.T @ (resid if c is None else c * resid) + reg * w  # [F+1]
        s = p * (1 - p) if c is None else c * (p * (1 - p))
        H = (Xb * s[:, None]).T @ Xb + diag + ridge
        step = np.linalg.solve(H, grad)
        # damped Newton: halve the step until the objective decreases enough (Armijo), so that
        # (nearly) separable data cannot make the iterates diverge
        t, slope = 1.0, float(grad @ step)
        while True:
            w_new = w - t * step
            f_new, z_new = objective(w_new)
            if f_new <= f - 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        w, f, z = w_new, f_new, z_new
        if np.max(np.abs(t * step)) < tol:
            break
    return w


class LogisticEstimator:
    """Logistic regression on named features over a FIFO buffer, refitted on every update.

    Predicts 1 until the buffer holds more than ``min_per_class`` points of each class.
    Features are standardised by fixed ``scales`` (not by data) so that coefficients are
    comparable over time. Fitted to the core's labels, P̂ estimates the chance that at least one
    of a point's K continuations succeeds.
    """

    per_continuation = False
    """P̂ is the chance that any of K continuations succeeds (the labels), not one."""

    def __init__(self, feature_names: Sequence[str], config: EstimatorConfig | None = None,
                 scales: Mapping[str, float] | None = None) -> None:
        if not feature_names:
            raise ConfigError("LogisticEstimator.feature_names is empty: expected at least one feature")
        unknown = [f for f in feature_names if f not in CANDIDATE_FEATURES and f not in BACKEND_FEATURES]
        if unknown:
            raise ConfigError(f"LogisticEstimator.feature_names has unknown {unknown}; "
                              f"known: {', '.join([*CANDIDATE_FEATURES, *BACKEND_FEATURES])}")
        self.config = config or EstimatorConfig()
        self.feature_names = list(feature_names)
        self.scales = np.array([float((scales or {}).get(f, 1.0)) for f in self.feature_names])
        F = len(self.feature_names)
        self._X = np.zeros((0, F))
        self._y = np.zeros(0)
        self.coef: np.ndarray | None = None  # [F + 1]: weights..., intercept
        self.n_updates = 0

    # -- interface -------------------------------------------------------------------------
    def _matrix(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [f for f in self.feature_names if f not in features]
        if missing:
            raise KeyError(f"{type(self).__name__} needs features {missing}; got {sorted(features)}")
        cols = [np.asarray(features[f], dtype=np.float64).reshape(-1) for f in self.feature_names]
        return np.stack(cols, axis=1) / self.scales  # [N, F]

    def update(self, features: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
        """Append ``(features, labels)`` to the FIFO buffer and refit when both classes have
        more than ``min_per_class`` points."""
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if y.size == 0 and all(np.size(features.get(f, 0)) == 0 for f in self.feature_names):
            return  # nothing to learn (e.g. a step without branches)
        X = self._matrix(features)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows but {y.shape[0]} labels")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0 or 1")
        if y.size == 0:
            return
        cap = self.config.buffer_size
        self._X = np.concatenate([self._X, X])[-cap:]
        self._y = np.concatenate([self._y, y])[-cap:]
        self.n_updates += 1
        if self.ready:
            self.coef = fit_logistic(self._X, self._y, self.config.l2, w0=self.coef)

    @property
    def ready(self) -> bool:
        """True once each class has more than ``min_per_class`` points in the buffer."""
        pos = int(self._y.sum())
        neg = self._y.shape[0] - pos
        return pos > self.config.min_per_class and neg > self.config.min_per_class

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[N]`` P̂(success); all ones before the first fit."""
        X = self._matrix(features)
        if self.coef is None:
            return np.ones(X.shape[0])
        z = np.clip(X @ self.coef[:-1] + self.coef[-1], -35, 35)
        return 1.0 / (1.0 + np.exp(-z))

    def coefficients(self) -> dict[str, float]:
        """Current coefficients by feature name (in scaled units) plus ``intercept``; NaN before a fit."""
        names = self.feature_names + ["intercept"]
        if self.coef is None:
            return {n: float("nan") for n in names}
        return dict(zip(names, map(float, self.coef)))

    @property
    def buffer_len(self) -> int:
        """Number of (features, label) pairs in the FIFO buffer."""
        return int(self._y.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """Buffer, coefficients and feature names (numpy arrays)."""
        return {"feature_names": list(self.feature_names), "scales": self.scales.copy(),
                "X": self._X.copy(), "y": self._y.copy(),
                "coef": None if self.coef is None else self.coef.copy(), "n_updates": self.n_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the feature names must match."""
        if list(state["feature_names"]) != self.feature_names:
            raise ValueError(f"state has features {list(state['feature_names'])}, estimator has {self.feature_names}")
        self.scales = np.asarray(state["scales"], dtype=np.float64)
        self._X = np.asarray(state["X"], dtype=np.float64).reshape(-1, len(self.feature_names))
        self._y = np.asarray(state["y"], dtype=np.float64)
        self.coef = None if state["coef"] is None else np.asarray(state["coef"], dtype=np.float64)
        self.n_updates = int(state["n_updates"])


class PositionLogistic(LogisticEstimator):
    """The paper's estimator: P̂(success | r) = σ(w·r + b) on relative depth r alone."""

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        super().__init__(["rel_depth"], config)


class StateLogistic(LogisticEstimator):
    """A state-aware estimator: logistic regression on relative depth plus state features.

    Default features: r, the prompt's main-chain success rate (how hard the problem is for the
    current policy) and the prefix's mean sampling log-prob (how typical the prefix is).
    """

    DEFAULT_FEATURES = ("rel_depth", "group_success_rate", "prefix_mean_logprob")

    def __init__(self, config: EstimatorConfig | None = None,
                 feature_names: Sequence[str] = DEFAULT_FEATURES) -> None:
        super().__init__(feature_names, config)


class SelectorLogistic(LogisticEstimator):
    """The learned informative selector: q̂ = σ(w·x + b), the chance that *one* continuation from
    a candidate succeeds, by logistic regression on what an LLM backend can observe too.

    The ``informative`` strategy ranks candidates by the chance of a mixed K-group,
    1 − q^K − (1 − q)^K, of the single-continuation chance q (DESIGN.md, "Units"), so this
    estimator fits q itself: each branched point j with k_j successes among its n_j continuations
    enters the likelihood as k_j of n_j Bernoulli trials (the binomial likelihood,
    :func:`fit_logistic` with targets k_j / n_j and weights n_j), not as the one any-of-K label
    the position-only and state-aware P̂ are fitted to (which would need
    :func:`deepgrpo.pivots.single_continuation` to be converted, and throws away how many of
    the K succeeded). As for P̂ (paper §3.2) the model is shared across prompts, the buffer is a
    FIFO of the last ``buffer_size`` points and it is refitted on every update, warm-started at
    the previous coefficients.

    Features (:data:`DEFAULT_FEATURES`, each divided by a fixed scale, :data:`SCALES`, so that
    coefficients compare over time and across runs): relative depth r, the prompt's main-chain
    success rate, the prefix's log-probability (sum, in units of 10 nats, and mean per token),
    the entropy of the policy's next-token distribution at the cut (``next_entropy``, a backend
    feature: the simulator, the LLM backend and the TRL trainer supply it), and the prefix
    length and remaining tokens (units of 100 tokens). Never the oracle's ``oracle_success``. The next segment's
    surprisal (``next_surprisal``, the token the main chain drew after the cut, which a branch
    resamples) is left out by default: on the simulator it made q̂ worse on the candidates the
    selector ranks (mean |q̂ − q| over the second half of six-seed learned-informative runs, with
    it and without: 0.085 and 0.076 on the tabular policy, 0.086 and 0.080 on the features policy,
    0.199 and 0.188 with recoverable errors); pass ``feature_names`` to add it. A backend that
    does not supply a feature in the list (an LLM backend on the vLLM engine built without
    ``entropy_feature=True`` and ``next_entropy``) makes ``update`` and ``predict`` raise a
    :class:`~deepgrpo.config.ConfigError` naming it: supply it, or build the estimator with
    ``feature_names`` without it for such a backend.

    Ready, and fitted, once the buffer holds more than ``min_per_class`` successful and more
    than ``min_per_class`` failed *continuations*; until then it predicts q̂ = 1, for which every
    candidate's mixed-group chance is 0, so ``informative`` picks pivots uniformly at random
    (the ``random-pivot`` rule) until the first fit.
    """

    per_continuation = True
    """q̂ is the chance that one continuation succeeds."""

    learns_from_counts = True
    """``update`` takes each point's successes and trials (the core passes them)."""

    DEFAULT_FEATURES = ("rel_depth", "group_success_rate", "prefix_logprob", "prefix_mean_logprob",
                        "next_entropy", "prefix_len", "remaining_tokens")

    SCALES = {"rel_depth": 1.0, "group_success_rate": 1.0, "prefix_logprob": 10.0, "prefix_mean_logprob": 1.0,
              "next_surprisal": 5.0, "next_entropy": 1.0, "prefix_len": 100.0, "remaining_tokens": 100.0}
    """Fixed feature scales (a feature is divided by its scale; 1 for any other feature)."""

    def __init__(self, config: EstimatorConfig | None = None,
                 feature_names: Sequence[str] = DEFAULT_FEATURES) -> None:
        if ORACLE_FEATURE in feature_names:
            raise ConfigError(f"SelectorLogistic.feature_names holds {ORACLE_FEATURE!r}: the selector learns from "
                              "what any backend observes, never from the simulator's exact truth")
        super().__init__(feature_names, config, scales={f: self.SCALES.get(f, 1.0) for f in feature_names})
        self._k = np.zeros(0)  # [M] successes of each buffered point
        self._n = np.zeros(0)  # [M] its continuations

    def _matrix(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [f for f in self.feature_names if f not in features]
        if missing:
            from_backend = ", ".join(m for m in missing if m in BACKEND_FEATURES) or "none of them"
            raise ConfigError(f"EstimatorConfig.kind = 'selector' is invalid here: the candidate features lack "
                              f"{', '.join(map(repr, missing))} (got {', '.join(sorted(features))}); a backend "
                              f"supplies {from_backend} as a main-rollout extra (the simulator, the TRL trainer and "
                              "the LLM backend do, the latter with an engine that reports entropies or with "
                              "entropy_feature=True; for another backend build SelectorLogistic with "
                              "feature_names without it)",
                              owner="EstimatorConfig", field="kind", value="selector",
                              allowed="position, state or oracle")
        return super()._matrix(features)

    def update(self, features: Mapping[str, np.ndarray], labels: np.ndarray,
               successes: np.ndarray | None = None, trials: np.ndarray | None = None) -> None:
        """Append each point's features and counts (``successes`` of ``trials`` continuations,
        ``[N]`` each; ``labels`` ``[N]`` must be ``successes > 0``) to the FIFO buffer and refit
        when :attr:`ready`."""
        if successes is None or trials is None:
            raise ValueError("SelectorLogistic.update needs successes and trials per point (the binomial counts), "
                             "not only the any-of-K labels")
        k = np.asarray(successes, dtype=np.float64).reshape(-1)
        n = np.asarray(trials, dtype=np.float64).reshape(-1)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if k.size == 0 and n.size == 0 and all(np.size(features.get(f, 0)) == 0 for f in self.feature_names):
            return  # nothing to learn (a step without branches)
        X = self._matrix(features)
        if not X.shape[0] == k.shape[0] == n.shape[0] == y.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows, {y.shape[0]} labels, {k.shape[0]} successes and "
                             f"{n.shape[0]} trials")
        if np.any(n < 1) or np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)) or np.any(n != np.round(n)):
            raise ValueError("trials must be integers >= 1 and successes integers in [0, trials]")
        if np.any(y != (k > 0)):
            raise ValueError("labels must be 1 exactly where successes > 0 (any continuation succeeded)")
        if k.size == 0:
            return
        cap = self.config.buffer_size
        self._X = np.concatenate([self._X, X])[-cap:]
        self._k = np.concatenate([self._k, k])[-cap:]
        self._n = np.concatenate([self._n, n])[-cap:]
        self._y = self._k / self._n
        self.n_updates += 1
        if self.ready:
            self.coef = fit_logistic(self._X, self._y, self.config.l2, w0=self.coef, weights=self._n)

    @property
    def ready(self) -> bool:
        """True once the buffer holds more than ``min_per_class`` successful and more than
        ``min_per_class`` failed continuations."""
        pos = float(self._k.sum())
        return pos > self.config.min_per_class and float(self._n.sum()) - pos > self.config.min_per_class

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[N]`` q̂, the chance that one continuation succeeds; all ones before the first fit."""
        return super().predict(features)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`LogisticEstimator.state_dict` plus the buffer's ``successes`` and ``trials``."""
        return {**super().state_dict(), "successes": self._k.copy(), "trials": self._n.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        super().load_state_dict(state)
        self._k = np.asarray(state["successes"], dtype=np.float64)
        self._n = np.asarray(state["trials"], dtype=np.float64)
        self._y = self._k / np.maximum(self._n, 1)


class FeatureEstimator:
    """P̂ = a candidate feature supplied by the backend, clipped to [0, 1]; learns nothing.

    With ``oracle_success`` (the simulator's exact P(success | prefix)) it is the decomposition
    ladder's oracle pivot: DEEP-GRPO's utility Q = q·r^γ with q, the exact chance that *one*
    continuation from the candidate succeeds, in place of P̂ (which the learned rungs fit to the
    chance that *any* of K continuations succeeds, 1 - (1 - q)^K); and, with strategy
    ``informative``, the oracle informative pivot, whose mixed-group chance uses q directly.
    """

    per_continuation = True
    """The feature is the exact chance that one continuation succeeds."""

    def __init__(self, feature: str = ORACLE_FEATURE) -> None:
        self.feature = feature

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[N]`` the feature's values; a :class:`ConfigError` if the backend did not supply it."""
        if self.feature not in features:
            raise ConfigError(f"EstimatorConfig.kind = 'oracle' is invalid here: this backend does not supply the "
                              f"candidate feature {self.feature!r} (the simulator does)", owner="EstimatorConfig",
                              field="kind", value="oracle", allowed="position or state")
        return np.clip(np.asarray(features[self.feature], dtype=np.float64), 0.0, 1.0)

    def update(self, features: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
        """Nothing to learn."""

    def coefficients(self) -> dict[str, float]:
        """No coefficients."""
        return {}

    @property
    def buffer_len(self) -> int:
        """Always 0: no buffer."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


def make_estimator(config: EstimatorConfig | None = None) -> LogisticEstimator | FeatureEstimator:
    """The estimator named by ``config.kind`` (``position``, ``state``, ``selector`` or ``oracle``)."""
    cfg = config or EstimatorConfig()
    if cfg.kind == "oracle":
        return FeatureEstimator(ORACLE_FEATURE)
    if cfg.kind == "selector":
        return SelectorLogistic(cfg)
    return PositionLogistic(cfg) if cfg.kind == "position" else StateLogistic(cfg)
