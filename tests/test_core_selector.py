"""The learned informative selector (estimator kind ``selector``, method ``learned-informative``):
its binomial fit, the counts the core hands it, the ``next_entropy`` candidate feature of the
simulator, and an end-to-end run."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgrpo import explore, method_config
from deepgrpo.config import ConfigError, EstimatorConfig
from deepgrpo.distributed import GatheredEstimator
from deepgrpo.estimators import (
    BACKEND_FEATURES,
    PositionLogistic,
    SelectorLogistic,
    StateLogistic,
    fit_logistic,
    make_estimator,
)
from deepgrpo.explore import build_candidates
from sims.backend import SimBackend
from sims.policy import TokenTreePolicy
from sims.runner import RunnerConfig, run_streams, train
from sims.spec import TokenTreeSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _old_fit_logistic(X, y, l2=1e-3, w0=None, max_iter=50, tol=1e-8):
    """fit_logistic as it was before row weights were added (the reference for bit-identity)."""
    N, F = X.shape
    Xb = np.concatenate([X, np.ones((N, 1))], axis=1)
    w = np.zeros(F + 1) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    reg = np.full(F + 1, l2)
    reg[-1] = 0.0

    def objective(v):
        z = Xb @ v
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * v * v)), z

    f, z = objective(w)
    diag, ridge = np.diag(reg), 1e-9 * np.eye(F + 1)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        grad = Xb.T @ (p - y) + reg * w
        s = p * (1 - p)
        H = (Xb * s[:, None]).T @ Xb + diag + ridge
        step = np.linalg.solve(H, grad)
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


@pytest.mark.parametrize("seed", range(4))
def test_unweighted_fit_is_bit_for_bit_the_old_one(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 3))
    y = (rng.random(300) < 1 / (1 + np.exp(-(X @ [1.0, -2.0, 0.5] + 0.3)))).astype(float)
    w0 = rng.normal(size=4) if seed % 2 else None
    assert np.array_equal(fit_logistic(X, y, 1e-3, w0=w0), _old_fit_logistic(X, y, 1e-3, w0=w0))
    assert np.array_equal(fit_logistic(X[:, :1], y, 0.0), _old_fit_logistic(X[:, :1], y, 0.0))


def _expanded(X, k, n):
    """The Bernoulli rows the counts stand for: point j gives k_j ones and n_j - k_j zeros."""
    rows = np.repeat(np.arange(len(n)), n.astype(int))
    y = np.concatenate([np.r_[np.ones(int(kj)), np.zeros(int(nj - kj))] for kj, nj in zip(k, n)])
    return X[rows], y


def test_binomial_fit_equals_the_fit_on_the_expanded_bernoulli_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    n = rng.integers(1, 9, size=200).astype(float)
    q = 1 / (1 + np.exp(-(X @ [1.5, -0.7] - 0.4)))
    k = rng.binomial(n.astype(int), q).astype(float)
    w = fit_logistic(X, k / n, 1e-3, weights=n)
    Xe, ye = _expanded(X, k, n)
    np.testing.assert_allclose(w, fit_logistic(Xe, ye, 1e-3), atol=1e-8, rtol=0)
    # unit weights give the unweighted fit (to rounding)
    y1 = (rng.random(200) < q).astype(float)
    np.testing.assert_allclose(fit_logistic(X, y1, weights=np.ones(200)), fit_logistic(X, y1), atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_binomial_fit_equals_expanded_fit_property(data):
    M = data.draw(st.integers(3, 25))
    seed = data.draw(st.integers(0, 2 ** 31))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(M, 2))
    n = np.array(data.draw(st.lists(st.integers(1, 8), min_size=M, max_size=M)), dtype=float)
    k = np.array([data.draw(st.integers(0, int(nj))) for nj in n], dtype=float)
    l2 = data.draw(st.sampled_from([1e-3, 0.1, 1.0]))  # a penalty keeps separable data bounded
    Xe, ye = _expanded(X, k, n)
    np.testing.assert_allclose(fit_logistic(X, k / n, l2, weights=n, max_iter=200),
                               fit_logistic(Xe, ye, l2, max_iter=200), atol=1e-6, rtol=0)


def _features(rng, N):
    return {"rel_depth": rng.uniform(0.05, 0.95, N), "group_success_rate": rng.choice([0.0, 0.25, 0.5, 0.75], N),
            "prefix_logprob": -rng.gamma(2.0, 5.0, N), "prefix_mean_logprob": -rng.gamma(2.0, 0.3, N),
            "next_surprisal": rng.gamma(2.0, 1.0, N), "next_entropy": rng.uniform(0, 2, N),
            "prefix_len": rng.integers(0, 60, N).astype(float),
            "remaining_tokens": rng.integers(1, 60, N).astype(float)}


def test_selector_recovers_a_known_logistic_q_and_is_calibrated():
    """Points drawn with q = σ(2·entropy − 3·r + 1), K = 8 continuations each: the fitted q̂ is
    close to q and calibrated (mean q̂ per decile of q̂ against the mean true q)."""
    rng = np.random.default_rng(1)
    est = SelectorLogistic(EstimatorConfig(kind="selector"))
    K = 8
    for _ in range(10):  # ten online updates of 400 points (warm-started refits)
        f = _features(rng, 400)
        q = 1 / (1 + np.exp(-(2.0 * f["next_entropy"] - 3.0 * f["rel_depth"] + 1.0)))
        k = rng.binomial(K, q).astype(float)
        est.update(f, (k > 0).astype(float), successes=k, trials=np.full(400, float(K)))
    assert est.ready and est.buffer_len == 4000
    c = est.coefficients()
    assert c["next_entropy"] == pytest.approx(2.0, abs=0.15) and c["rel_depth"] == pytest.approx(-3.0, abs=0.25)
    assert c["intercept"] == pytest.approx(1.0, abs=0.3)
    assert "next_surprisal" not in c  # not a default feature
    for other in ("group_success_rate", "prefix_mean_logprob", "prefix_logprob", "remaining_tokens"):
        assert abs(c[other]) < 0.25, other
    f = _features(rng, 20_000)
    q = 1 / (1 + np.exp(-(2.0 * f["next_entropy"] - 3.0 * f["rel_depth"] + 1.0)))
    p = est.predict(f)
    assert np.mean(np.abs(p - q)) < 0.02
    edges = np.quantile(p, np.linspace(0, 1, 11))
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    gap = [abs(p[b == i].mean() - q[b == i].mean()) for i in range(10)]
    assert max(gap) < 0.02


def test_selector_readiness_counts_continuations_and_predicts_one_before():
    est = SelectorLogistic(EstimatorConfig(kind="selector", min_per_class=10))
    rng = np.random.default_rng(0)
    f = _features(rng, 2)
    # 2 points of 8: 3 + 4 successes, 5 + 4 failures -> not ready (7 <= 10)
    est.update(f, np.ones(2), successes=np.array([3.0, 4.0]), trials=np.array([8.0, 8.0]))
    assert not est.ready and est.coef is None
    assert np.array_equal(est.predict(f), np.ones(2))
    est.update(f, np.array([1.0, 0.0]), successes=np.array([5.0, 0.0]), trials=np.array([8.0, 8.0]))
    assert est.ready  # 12 successes, 20 failures
    assert est.coef is not None and np.all(est.predict(f) < 1)
    # a PositionLogistic on the same points would still wait (4 points, one failed)
    assert not PositionLogistic().ready


def test_selector_inputs_are_checked():
    est = make_estimator(EstimatorConfig(kind="selector"))
    assert isinstance(est, SelectorLogistic) and est.per_continuation and est.learns_from_counts
    f = _features(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="successes and trials"):
        est.update(f, np.ones(3))
    with pytest.raises(ValueError, match="labels must be 1 exactly where"):
        est.update(f, np.ones(3), successes=np.array([1.0, 0.0, 2.0]), trials=np.full(3, 8.0))
    with pytest.raises(ValueError, match="integers in"):
        est.update(f, np.ones(3), successes=np.array([1.0, 9.0, 2.0]), trials=np.full(3, 8.0))
    missing = {k: v for k, v in f.items() if k != "next_entropy"}
    with pytest.raises(ConfigError, match="next_entropy"):
        est.predict(missing)
    with pytest.raises(ConfigError, match="oracle_success"):
        SelectorLogistic(feature_names=("rel_depth", "oracle_success"))
    # a backend without the entropy: a selector built without it
    without = [n for n in SelectorLogistic.DEFAULT_FEATURES if n != "next_entropy"]
    assert np.array_equal(SelectorLogistic(feature_names=without).predict(missing), np.ones(3))
    assert "next_entropy" in BACKEND_FEATURES and "oracle_success" in BACKEND_FEATURES
    est.update({k: np.zeros(0) for k in f}, np.zeros(0), successes=np.zeros(0), trials=np.zeros(0))  # empty: no-op
    assert est.buffer_len == 0 and est.n_updates == 0


def test_selector_state_dict_roundtrip_and_fifo():
    rng = np.random.default_rng(3)
    est = SelectorLogistic(EstimatorConfig(kind="selector", buffer_size=50))
    for _ in range(3):
        f = _features(rng, 30)
        k = rng.binomial(8, 0.3, 30).astype(float)
        est.update(f, (k > 0).astype(float), successes=k, trials=np.full(30, 8.0))
    assert est.buffer_len == 50
    clone = SelectorLogistic(EstimatorConfig(kind="selector", buffer_size=50))
    clone.load_state_dict(est.state_dict())
    f = _features(rng, 30)
    k = rng.binomial(8, 0.3, 30).astype(float)
    assert np.array_equal(clone.predict(f), est.predict(f))
    for e in (est, clone):
        e.update(f, (k > 0).astype(float), successes=k, trials=np.full(30, 8.0))
    assert np.array_equal(clone.coef, est.coef)
    assert np.array_equal(est.state_dict()["successes"][-30:], k)


def test_method_learned_informative():
    algo = method_config("learned-informative")
    assert algo.explore.strategy == "informative" and algo.estimator.kind == "selector"


class _Recorder:
    """Records every update call's arguments (positional and keyword)."""

    def __init__(self, counts: bool) -> None:
        self.learns_from_counts = counts
        self.calls: list[tuple[tuple, dict]] = []

    def update(self, *args, **kwargs):
        self.calls.append((args, kwargs))

    def predict(self, features):
        return np.ones(len(features["rel_depth"]))


def _sim(seed=0, n=8):
    spec = TokenTreeSpec(n_problems=n, n_heldout=0)
    problems = spec.build(run_seed=seed)
    policy = TokenTreePolicy(problems, "tabular", 16)
    return problems, policy, SimBackend(problems, policy, run_streams(seed)[0])


@pytest.mark.parametrize("counts", [True, False])
def test_the_core_hands_each_point_its_successes_and_trials(counts):
    """Through ``explore``: an estimator with learns_from_counts gets, per plan point, the number
    of its continuations whose reward passed the threshold and the number drawn; any other is
    called with (features, labels) only, as before."""
    _, _, backend = _sim()
    for method, overrides in (("deep-grpo", {}), ("tree-uniform", {"n_cut_points": 3, "K": 8})):
        rec = _Recorder(counts)
        res = explore(backend, list(range(8)), method_config(method, **overrides), rec, np.random.default_rng(0))
        (args, kwargs), = rec.calls
        assert len(args) == 2 and len(res.plan) > 0
        feats, labels = args
        n = res.plan.n
        rewards = res.aux.rewards.numpy()
        start = np.concatenate([[0], np.cumsum(n)])
        k = np.array([(rewards[start[j]:start[j + 1]] > 0).sum() for j in range(len(n))], dtype=float)
        assert np.array_equal(labels, (k > 0).astype(float))
        assert np.array_equal(feats["rel_depth"], res.candidates.rel_depth[res.plan.candidate])
        if counts:
            assert set(kwargs) == {"successes", "trials"}
            assert np.array_equal(kwargs["successes"], k) and np.array_equal(kwargs["trials"], n.astype(float))
            assert 0 < k.sum() < n.sum()  # some continuations succeeded, some failed
        else:
            assert kwargs == {}
        if method == "tree-uniform":
            assert len(set(n.tolist())) > 1 or n[0] != 8  # dispersed: not K per point


def test_a_gathered_selector_gets_the_counts():
    """One process: GatheredEstimator passes the counts on (and still plain updates to others)."""
    _, _, backend = _sim(1)
    _, _, twin = _sim(1)  # the same draws
    algo = method_config("learned-informative")
    inner = SelectorLogistic(algo.estimator)
    plain = SelectorLogistic(algo.estimator)
    gathered = GatheredEstimator(inner)
    assert gathered.learns_from_counts and gathered.per_continuation
    for step in range(3):
        r1 = explore(backend, list(range(8)), algo, gathered, np.random.default_rng(step))
        r2 = explore(twin, list(range(8)), algo, plain, np.random.default_rng(step))
        assert np.array_equal(r1.labels, r2.labels)
    assert np.array_equal(inner.state_dict()["successes"], plain.state_dict()["successes"])
    assert np.array_equal(inner.coef, plain.coef)
    g2 = GatheredEstimator(StateLogistic())
    explore(backend, list(range(8)), method_config("deep-state"), g2, np.random.default_rng(0))
    assert g2.buffer_len > 0


def test_sim_next_entropy_is_the_policy_entropy_at_the_state_after_each_prefix():
    """cand_next_entropy[b, t] = H(π(· | problem, t, status after t tokens)) from the policy's own
    entropy (recomputed, not the snapshot's), with the status read from the on-track flags; 0 from
    the chain's end on. The candidate feature next_entropy is its value at each candidate's
    prefix length."""
    problems, policy, backend = _sim(2)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.7, generator=torch.Generator().manual_seed(0))
    G = 8
    from deepgrpo.batch import SampleRequest
    main = backend.sample([SampleRequest(p, None, G) for p in range(problems.n)])
    ent = main.extras["cand_next_entropy"].numpy()
    T = problems.T
    assert ent.shape == (problems.n * G, T + 1)
    H = policy.entropy().double().numpy()  # [n, T, 2]
    on_track = main.extras["on_track"].numpy()
    problem = main.extras["problem"].numpy()
    L = problems.lengths.numpy()
    for b in range(ent.shape[0]):
        p = problem[b]
        for t in range(T + 1):
            if t >= L[p]:
                assert ent[b, t] == 0.0
                continue
            status = 0 if t == 0 or on_track[b, t - 1] else 1
            assert ent[b, t] == pytest.approx(H[p, t, status], abs=1e-6)
    derailed = ~on_track[:, :-1]
    assert derailed.any()  # the check saw both statuses
    rewards = main.rewards.numpy()
    failed = np.flatnonzero(rewards <= 0)
    gsr = (rewards > 0).reshape(problems.n, G).mean(1)
    cands = build_candidates(main, failed, np.repeat(np.arange(problems.n), G), gsr)
    assert np.array_equal(cands.features["next_entropy"], ent[cands.traj, cands.prefix_len])
    # branches (requests with a prefix) do not carry it: the batch keeps the main chains' columns only
    aux = backend.sample([SampleRequest(0, main.tokens[0, :2], 3)])
    assert "cand_next_entropy" not in aux.extras and "cand_oracle_success" not in aux.extras


def _calibration_probe(res, ctx):
    """The selector's mean q̂ and the exact q (oracle_success, evaluation only) over the step's candidates."""
    if res.p_hat is None or not len(res.candidates):
        return {"q_hat": float("nan"), "q_true": float("nan"), "q_abs_err": float("nan")}
    q = res.candidates.features["oracle_success"]
    return {"q_hat": float(res.p_hat.mean()), "q_true": float(q.mean()),
            "q_abs_err": float(np.abs(res.p_hat - q).mean())}


def test_learned_informative_trains_end_to_end_and_learns_a_calibrated_q():
    spec = TokenTreeSpec(n_problems=16, n_heldout=4)
    res = train(spec, method_config("learned-informative"), RunnerConfig(steps=10, batch_problems=8), seed=0,
                method="learned-informative", probes=[_calibration_probe])
    h = res.history
    assert h[-1]["pass1"] > h[0]["pass1"]
    assert all(r["pivots"] > 0 for r in h[1:])
    assert np.isfinite(h[-1]["est_next_entropy"]) and res.estimator.ready
    # once fitted, q̂ tracks the exact q of the candidates (the first step is before any fit: q̂ = 1)
    assert h[1]["q_hat"] == 1.0
    late = h[5:]
    assert np.mean([r["q_abs_err"] for r in late]) < 0.15
    assert abs(np.mean([r["q_hat"] - r["q_true"] for r in late])) < 0.1
