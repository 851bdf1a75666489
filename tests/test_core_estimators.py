import numpy as np
import pytest

from deepgrpo.config import ConfigError, EstimatorConfig
from deepgrpo.estimators import LogisticEstimator, PositionLogistic, StateLogistic, fit_logistic, make_estimator


def synthetic(w, b, n, seed):
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(w * r + b)))).astype(float)
    return r, y


@pytest.mark.parametrize("w, b", [(-4.0, 2.0), (3.0, -1.0), (-1.5, 0.5)])
def test_position_logistic_recovers_known_coefficients(w, b):
    r, y = synthetic(w, b, 10_000, seed=int(abs(w * 10)))
    est = PositionLogistic()
    for chunk in range(10):  # fed online, in 10 updates
        sl = slice(chunk * 1000, (chunk + 1) * 1000)
        est.update({"rel_depth": r[sl]}, y[sl])
    c = est.coefficients()
    assert c["rel_depth"] == pytest.approx(w, abs=0.35)
    assert c["intercept"] == pytest.approx(b, abs=0.2)
    p = est.predict({"rel_depth": np.array([0.1, 0.9])})
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(w * np.array([0.1, 0.9]) + b))), atol=0.04)


def test_fit_matches_scipy_minimiser():
    from scipy.optimize import minimize
    r, y = synthetic(-2.0, 1.0, 500, seed=1)
    X = r[:, None]
    l2 = 0.5

    def nll(theta):
        z = X @ theta[:1] + theta[1]
        return np.sum(np.logaddexp(0, z) - y * z) + 0.5 * l2 * theta[0] ** 2

    ref = minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(fit_logistic(X, y, l2=l2), ref, atol=1e-4)


def test_predicts_one_until_more_than_min_per_class_of_each():
    est = PositionLogistic(EstimatorConfig(min_per_class=10))
    est.update({"rel_depth": np.linspace(0.1, 0.9, 60)}, np.array([1.0] * 10 + [0.0] * 50))
    assert not est.ready and np.all(est.predict({"rel_depth": np.array([0.2, 0.8])}) == 1.0)
    est.update({"rel_depth": np.array([0.15])}, np.array([1.0]))
    assert est.ready
    assert np.all(est.predict({"rel_depth": np.array([0.2, 0.8])}) < 1.0)


def test_fifo_buffer_keeps_the_newest_points():
    est = PositionLogistic(EstimatorConfig(buffer_size=100, min_per_class=0))
    est.update({"rel_depth": np.full(80, 0.9)}, np.zeros(80))
    est.update({"rel_depth": np.full(80, 0.1)}, np.ones(80))
    assert est.buffer_len == 100
    state = est.state_dict()
    assert (state["y"] == 0).sum() == 20 and (state["y"] == 1).sum() == 80


def test_state_dict_roundtrip_gives_identical_predictions_and_updates():
    r, y = synthetic(-3.0, 1.0, 400, seed=5)
    a = StateLogistic(feature_names=("rel_depth", "group_success_rate"))
    feats = {"rel_depth": r, "group_success_rate": np.linspace(0, 1, 400)}
    a.update(feats, y)
    b = StateLogistic(feature_names=("rel_depth", "group_success_rate"))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.predict(feats), b.predict(feats))
    a.update({k: v[:50] for k, v in feats.items()}, y[:50])
    b.update({k: v[:50] for k, v in feats.items()}, y[:50])
    np.testing.assert_array_equal(a.coef, b.coef)
    with pytest.raises(ValueError, match="features"):
        PositionLogistic().load_state_dict(a.state_dict())


def test_richer_features_are_ignored_by_position_and_used_by_state():
    rng = np.random.default_rng(0)
    n = 4000
    r = rng.uniform(0, 1, n)
    rate = rng.uniform(0, 1, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(6 * rate - 3)))).astype(float)  # depends on rate only
    feats = {"rel_depth": r, "group_success_rate": rate, "prompt_index": np.zeros(n)}
    pos, state = make_estimator(EstimatorConfig(kind="position")), make_estimator(EstimatorConfig(kind="state"))
    assert isinstance(pos, PositionLogistic) and isinstance(state, StateLogistic)
    with pytest.raises(KeyError, match="prefix_mean_logprob"):
        state.update(feats, y)
    feats["prefix_mean_logprob"] = np.zeros(n)
    pos.update(feats, y)
    state.update(feats, y)
    brier = lambda e: np.mean((e.predict(feats) - y) ** 2)  # noqa: E731
    assert brier(state) < brier(pos) - 0.05


def test_bad_inputs():
    with pytest.raises(ConfigError, match="unknown"):
        LogisticEstimator(["depth"])
    est = PositionLogistic()
    with pytest.raises(ValueError, match="0 or 1"):
        est.update({"rel_depth": np.array([0.5])}, np.array([0.5]))
    with pytest.raises(ValueError, match="labels"):
        est.update({"rel_depth": np.array([0.5, 0.2])}, np.array([1.0]))


def test_fit_is_stable_on_separable_labels():
    # perfectly separable data: plain Newton diverges; the damped fit stays finite and ordered
    r = np.linspace(0.05, 0.95, 200)
    y = (r < 0.5).astype(float)
    w = fit_logistic(r[:, None], y, l2=1e-3)
    assert np.all(np.isfinite(w)) and abs(w[0]) < 1e3
    p = 1 / (1 + np.exp(-(w[0] * np.array([0.2, 0.8]) + w[1])))
    assert p[0] > 0.99 and p[1] < 0.01
