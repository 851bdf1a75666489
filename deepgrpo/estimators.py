"""Online recoverability estimators P̂(success | candidate pivot).

All estimators share one interface so callers never change when a richer one is added:

* ``update(features, labels)``: ``features`` maps feature names to ``[N]`` arrays (one entry per
  branched pivot), ``labels`` is ``[N]`` in {0, 1} (1 = at least one continuation succeeded);
* ``predict(features) -> [N]`` probabilities;
* ``state_dict()`` / ``load_state_dict()`` (plain numpy / Python values, picklable and
  JSON-friendly after ``tolist``).

The exploration step (:mod:`deepgrpo.explore`) computes every feature in
:data:`CANDIDATE_FEATURES` for each candidate; an estimator picks the ones it uses.
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
its own through :data:`deepgrpo.explore.CANDIDATE_EXTRA_PREFIX` (the simulator adds
``oracle_success``, the exact P(success | prefix))."""

ORACLE_FEATURE = "oracle_success"
"""The candidate feature the ``oracle`` estimator reads: exact P(success | prefix)."""


@runtime_checkable
class RecoverabilityEstimator(Protocol):
    """P̂(success | candidate features); see the module docstring.

    The core labels a branch point y = 1 when *any* of its continuations succeeded, so an
    estimator that learns from those labels estimates P(at least one of K succeeds). One that
    returns the chance that a *single* continuation succeeds (the oracle) says so with a class
    attribute ``per_continuation = True`` (the ``informative`` strategy needs that chance and
    converts any other P̂ to it: :func:`deepgrpo.pivots.single_continuation`).
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
                 max_iter: int = 50, tol: float = 1e-8) -> np.ndarray:
    """L2-regularised logistic regression by damped Newton's method (IRLS with a line search).

    Args:
        X: ``[N, F]`` features (no intercept column; one is added).
        y: ``[N]`` labels in {0, 1}.
        l2: penalty λ·||w||² / 2 on the weights (not the intercept).
        w0: ``[F + 1]`` warm start (weights then intercept).

    Returns: ``[F + 1]`` = (weights..., intercept).
    """
    N, F = X.shape
    Xb = np.concatenate([X, np.ones((N, 1))], axis=1)  # [N, F+1]
    w = np.zeros(F + 1) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    reg = np.full(F + 1, l2)
    reg[-1] = 0.0

    def objective(v: np.ndarray) -> tuple[float, np.ndarray]:  # penalised negative log-likelihood (stable form)
        z = Xb @ v
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * v * v)), z

    f, z = objective(w)
    diag, ridge = np.diag(reg), 1e-9 * np.eye(F + 1)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow  [N]
        grad = Xb.T @ (p - y) + reg * w  # [F+1]
        s = p * (1 - p)
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
        unknown = [f for f in feature_names if f not in CANDIDATE_FEATURES]
        if unknown:
            raise ConfigError(f"LogisticEstimator.feature_names has unknown {unknown}; "
                              f"known: {', '.join(CANDIDATE_FEATURES)}")
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
    """The estimator named by ``config.kind`` (``position``, ``state`` or ``oracle``)."""
    cfg = config or EstimatorConfig()
    if cfg.kind == "oracle":
        return FeatureEstimator(ORACLE_FEATURE)
    return PositionLogistic(cfg) if cfg.kind == "position" else StateLogistic(cfg)
