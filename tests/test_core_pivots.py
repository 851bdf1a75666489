import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from deepgrpo.branching import CandidateSet, cap_plan, plan_branches
from deepgrpo.config import ConfigError, ExploreConfig
from deepgrpo.pivots import (
    candidate_depths,
    candidate_prefix_lengths,
    gumbel_top_k,
    pivot_utility,
    split_evenly,
    utility_scores,
)


def sample_pivots(utility, n, rng):
    """Pivots of one trajectory the way the plan draws them (Gumbel-top-k on log-utilities)."""
    out = gumbel_top_k(utility_scores(utility)[None, :], min(n, len(utility)), rng)[0]
    return out[out >= 0]


def test_candidates_and_depths():
    np.testing.assert_allclose(candidate_depths(4), [0.2, 0.4, 0.6, 0.8])
    np.testing.assert_array_equal(candidate_prefix_lengths(np.array([3, 7, 9, 12])), [0, 3, 7, 9])
    assert candidate_depths(0).size == 0
    np.testing.assert_allclose(pivot_utility(np.array([1.0, 0.5]), np.array([0.5, 0.5]), 2.0), [0.25, 0.125])


def test_sampled_pivot_frequencies_match_utility_chi_square():
    L = 9
    r = candidate_depths(L)
    p_hat = 1 / (1 + np.exp(-(2.0 - 4.0 * r)))  # a decreasing recoverability curve
    q = pivot_utility(p_hat, r, 2.0)
    rng = np.random.default_rng(123)
    n = 20_000
    draws = np.array([sample_pivots(q, 1, rng)[0] for _ in range(n)])
    observed = np.bincount(draws, minlength=L)
    res = stats.chisquare(observed, q / q.sum() * n)
    assert res.pvalue > 1e-3
    # and a clearly wrong distribution (uniform) is rejected
    assert stats.chisquare(observed, np.full(L, n / L)).pvalue < 1e-6


def test_plan_deep_frequencies_match_utility_chi_square():
    # the vectorised plan over many trajectories uses the same distribution
    F, L = 5000, 6
    cands = CandidateSet(traj=np.repeat(np.arange(F), L), index=np.tile(np.arange(L), F),
                         n_candidates=np.full(F * L, L), prefix_len=np.tile(np.arange(L), F),
                         prompt=np.repeat(np.arange(F), L), features={"rel_depth": np.tile(candidate_depths(L), F)})
    p_hat = np.tile([0.9, 0.8, 0.6, 0.4, 0.2, 0.05], F)
    plan = plan_branches(cands, ExploreConfig(strategy="deep", gamma=2.0), p_hat, np.random.default_rng(0))
    assert len(plan) == F and np.all(plan.n == 8)
    idx = cands.index[plan.candidate]
    q = pivot_utility(p_hat[:L], candidate_depths(L), 2.0)
    assert stats.chisquare(np.bincount(idx, minlength=L), q / q.sum() * F).pvalue > 1e-3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=12), st.integers(1, 15), st.integers(0, 2**31))
def test_pivots_are_distinct_and_complete(util, n, seed):
    q = np.array(util)
    picks = sample_pivots(q, n, np.random.default_rng(seed))
    assert len(picks) == min(n, len(q)) and len(set(picks.tolist())) == len(picks)
    positive = np.flatnonzero(q > 0)
    # positive-utility candidates always come before zero-utility ones
    k = min(len(picks), len(positive))
    assert set(picks[:k].tolist()) <= set(positive.tolist())


def test_seeded_sampling_is_reproducible():
    q = np.arange(1, 11, dtype=float)
    a = [sample_pivots(q, 3, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert gumbel_top_k(np.zeros((2, 3)), 5, np.random.default_rng(0)).shape == (2, 5)


def random_candidates(rng, F=40, Lmax=9):
    rows = []
    for f in range(F):
        L = int(rng.integers(1, Lmax + 1))
        for i in range(L):
            rows.append((f, i, L))
    traj, idx, Ls = map(np.array, zip(*rows))
    ns = rng.exponential(1.0, len(traj))
    prev = np.concatenate([[-np.inf], ns[:-1]])
    prev[idx == 0] = -np.inf
    return CandidateSet(traj=traj, index=idx, n_candidates=Ls, prefix_len=idx * 2, prompt=traj // 4,
                        features={"rel_depth": (idx + 1) / (Ls + 1), "next_surprisal": ns, "prev_surprisal": prev})


@pytest.mark.parametrize("strategy", ["deep", "random-pivot", "depth-only", "root-only", "max-surprisal",
                                      "low-prob", "uniform"])
def test_every_strategy_spends_n_pivots_times_K_per_failed_trajectory(strategy):
    rng = np.random.default_rng(1)
    cands = random_candidates(rng)
    cfg = ExploreConfig(strategy=strategy, K=8, n_pivots=1, n_cut_points=4)
    plan = plan_branches(cands, cfg, None, rng)
    per_traj = np.bincount(plan.traj, weights=plan.n, minlength=40)
    np.testing.assert_array_equal(per_traj, 8)
    for f in range(40):
        mine = plan.n[plan.traj == f]
        L = int(cands.n_candidates[cands.traj == f][0])
        expected_points = 1 if strategy in ("deep", "random-pivot", "depth-only", "root-only") else min(4, L)
        if strategy == "root-only":
            assert cands.index[plan.candidate[plan.traj == f]].tolist() == [0]
        if strategy == "low-prob":
            expected_points = min(4, L)  # the root ranks last but still fills a slot when L is small
        assert len(mine) == expected_points
        assert mine.max() - mine.min() <= 1
        assert len(set(plan.candidate[plan.traj == f].tolist())) == len(mine)


def test_dispersed_rules_pick_the_extreme_tokens():
    rng = np.random.default_rng(2)
    cands = random_candidates(rng, F=20)
    for strategy, key in (("max-surprisal", "next_surprisal"), ("low-prob", "prev_surprisal")):
        plan = plan_branches(cands, ExploreConfig(strategy=strategy, n_cut_points=2), None, rng)
        for f in range(20):
            mine = cands.features[key][cands.traj == f]
            chosen = cands.features[key][plan.candidate[plan.traj == f]]
            top = np.sort(mine)[::-1][:len(chosen)]
            np.testing.assert_allclose(np.sort(chosen)[::-1], top)
    plan = plan_branches(cands, ExploreConfig(strategy="root"), None, rng)
    assert len(plan) == 0


def test_cap_plan_respects_per_prompt_budget():
    rng = np.random.default_rng(3)
    cands = random_candidates(rng)
    plan = plan_branches(cands, ExploreConfig(strategy="uniform"), None, rng)
    capped = cap_plan(plan, 13, rng)
    per_prompt = np.bincount(capped.prompt, weights=capped.n)
    # never a one-continuation group: a point the cap would leave with 1 is dropped instead
    assert per_prompt.max() <= 13 and np.all(capped.n >= 2)
    full = np.bincount(plan.prompt, weights=plan.n, minlength=len(per_prompt))
    want = np.minimum(full[:len(per_prompt)], 13)
    assert np.all((per_prompt == want) | (per_prompt == want - 1)) and np.any(per_prompt == want - 1)


def test_split_evenly():
    np.testing.assert_array_equal(split_evenly(8, 3), [3, 3, 2])
    assert split_evenly(8, 3).sum() == 8 and split_evenly(2, 4).tolist() == [1, 1, 0, 0]


def test_second_draw_follows_successive_sampling_without_replacement():
    # P(first = i, second = j) = q_i / S · q_j / (S - q_i)  (Plackett-Luce)
    q = np.array([4.0, 2.0, 1.0, 1.0])
    S = q.sum()
    n = 40_000
    picks = gumbel_top_k(np.tile(np.log(q), (n, 1)), 2, np.random.default_rng(9))
    L = len(q)
    cells = [(i, j) for i in range(L) for j in range(L) if i != j]
    observed = np.array([np.sum((picks[:, 0] == i) & (picks[:, 1] == j)) for i, j in cells])
    expected = np.array([q[i] / S * q[j] / (S - q[i]) for i, j in cells]) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_informative_utility_hand_computed_and_the_plan_takes_its_argmax():
    from deepgrpo.pivots import informative_utility
    # K = 2: P(mixed) = 1 - p^2 - (1-p)^2 = 2p(1-p); per suffix token
    u = informative_utility(np.array([0.5, 0.1, 1.0, 0.0, 0.5]), 2, np.array([4, 1, 3, 3, 0]))
    np.testing.assert_allclose(u, [0.5 / 4, 0.18 / 1, 0.0, 0.0, 0.5 / 1])
    # one failed trajectory, 4 candidates: the plan picks the best utility every time
    cands = CandidateSet(traj=np.zeros(4, np.int64), index=np.arange(4), n_candidates=np.full(4, 4),
                         prefix_len=np.arange(4), prompt=np.zeros(4, np.int64),
                         features={"rel_depth": candidate_depths(4), "remaining_tokens": np.array([8., 6., 4., 2.])})
    p_hat = np.array([0.9, 0.5, 0.5, 0.02])  # utilities (K=8): 0.57/8, 0.99/6, 0.99/4, 0.15/2
    cfg = ExploreConfig(strategy="informative", K=8)
    for seed in range(20):
        plan = plan_branches(cands, cfg, p_hat, np.random.default_rng(seed))
        assert plan.candidate.tolist() == [2] and plan.n.tolist() == [8]


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(1, 64))
def test_single_continuation_inverts_any_of_k(q, K):
    from deepgrpo.pivots import single_continuation
    p_any = 1.0 - (1.0 - q) ** K
    assume(p_any < 1.0 - 1e-9)  # beyond, 1 - p_any has lost the digits that hold q
    assert single_continuation(np.array([p_any]), K)[0] == pytest.approx(q, abs=1e-6)


def test_informative_cost_per_rollout_ignores_the_suffix_length():
    # K = 8, one failed trajectory: mixed-group chances 0.570, 0.992, 0.942, 0.149; per suffix token
    # 0.071, 0.165, 0.236, 0.075 (argmax 2), per rollout the chances themselves (argmax 1)
    cands = CandidateSet(traj=np.zeros(4, np.int64), index=np.arange(4), n_candidates=np.full(4, 4),
                         prefix_len=np.arange(4), prompt=np.zeros(4, np.int64),
                         features={"rel_depth": candidate_depths(4), "remaining_tokens": np.array([8., 6., 4., 2.])})
    q = np.array([0.9, 0.5, 0.3, 0.02])
    for cost, best in (("tokens", 2), ("rollouts", 1)):
        cfg = ExploreConfig(strategy="informative", K=8, informative_cost=cost)
        picks = {plan_branches(cands, cfg, q, np.random.default_rng(seed)).candidate.item() for seed in range(10)}
        assert picks == {best}
    with pytest.raises(ConfigError, match="informative_cost"):
        ExploreConfig(informative_cost="seconds")
