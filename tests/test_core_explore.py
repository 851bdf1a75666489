import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_backend import ToyBackend

from deepgrpo.batch import AUX, MAIN
from deepgrpo.estimators import PositionLogistic
from deepgrpo.explore import explore
from deepgrpo.ledger import BudgetLedger, aux_cap_for_budget, expected_rollouts_per_prompt, grpo_group_size_for_budget
from deepgrpo.methods import method_config
from deepgrpo.step import update_policy

PROMPTS = [0, 1, 2, 3]


def run_step(method="deep-grpo", seed=0, **kw):
    be = ToyBackend(seed=seed)
    est = PositionLogistic()
    ledger = BudgetLedger()
    res = explore(be, PROMPTS, method_config(method, **kw), est, np.random.default_rng(seed), ledger)
    return be, est, ledger, res


@pytest.mark.parametrize("method", ["deep-grpo", "deep-random", "tree-surprisal", "tree-lowprob", "tree-uniform"])
def test_ledger_counts_equal_what_the_plan_generated(method):
    be, est, ledger, res = run_step(method, drop_zero=False)
    G, K = 8, 8
    n_failed = int((res.main.rewards <= 0).sum())
    aux_requests = be.sample_calls[1] if len(be.sample_calls) > 1 else []
    assert sum(r.n for r in be.sample_calls[0]) == len(PROMPTS) * G == ledger.totals()["rollouts_main"]
    assert sum(r.n for r in aux_requests) == res.plan.total_continuations == ledger.totals()["rollouts_aux"]
    assert res.plan.total_continuations == n_failed * K  # rollouts = G + |failed| · n_pivots · K
    # branches generate suffixes only
    expected_aux_tokens = sum(r.n * (be.T - r.prefix.numel()) for r in aux_requests)
    assert ledger.totals()["tokens_aux"] == expected_aux_tokens == int(res.aux.lengths.sum())
    assert ledger.totals()["tokens_main"] == len(PROMPTS) * G * be.T
    assert len(res.batch) == len(PROMPTS) * G + res.plan.total_continuations  # drop_zero off


def test_branches_continue_exactly_from_the_parent_prefix():
    be, est, ledger, res = run_step("deep-grpo", drop_zero=False)
    b = res.batch
    aux_rows = torch.nonzero(b.stream == AUX).flatten()
    assert len(aux_rows) > 0
    for row in aux_rows.tolist():
        parent = int(b.extras["parent"][row])
        pl = int(b.prefix_len[row])
        assert b.stream[parent] == MAIN
        assert torch.equal(b.tokens[row, :pl], res.main.tokens[parent, :pl])
        assert torch.equal(b.old_logprobs[row, :pl], res.main.logprobs[parent, :pl])
        assert not b.trainable_mask[row, :pl].any() and b.trainable_mask[row, pl:be.T].all()
        assert b.pivot_depth[row] == pytest.approx((res.plan.rel_depth[res.plan.traj == parent]).item())
    # the requests the backend received carry exactly those prefixes
    for req, j in zip(be.sample_calls[1], range(len(res.plan))):
        assert torch.equal(req.prefix, res.main.tokens[res.plan.traj[j], :res.plan.prefix_len[j]])


def test_groups_advantages_and_estimator_updates():
    be, est, ledger, res = run_step("deep-grpo", drop_zero=False)
    b = res.batch
    for g in b.group.unique():
        sel = b.group == g
        assert abs(float(b.advantages[sel].sum())) < 1e-6
        assert b.stream[sel].unique().numel() == 1  # a group never mixes streams
    n_aux_groups = b.group[b.stream == AUX].unique().numel()
    assert n_aux_groups == len(res.plan) == est.buffer_len
    # labels: 1 iff any continuation of the point succeeded
    point = np.repeat(np.arange(len(res.plan)), res.plan.n)
    any_ok = np.array([res.aux.rewards.numpy()[point == j].max() > 0 for j in range(len(res.plan))])
    np.testing.assert_array_equal(res.labels, any_ok.astype(float))


def test_zero_advantage_samples_are_dropped_by_default():
    *_, res = run_step("deep-grpo")
    assert (res.batch.advantages.abs() >= 1e-8).all()
    assert res.stats["nonzero_main"] + res.stats["nonzero_aux"] == len(res.batch)


def test_root_strategy_never_branches():
    be, est, ledger, res = run_step("grpo", G=16)
    assert len(be.sample_calls) == 1 and res.aux is None and ledger.totals()["rollouts"] == 64
    assert (res.batch.stream == MAIN).all() and est.buffer_len == 0


def test_same_seed_same_batch():
    *_, a = run_step("deep-grpo", seed=4)
    *_, b = run_step("deep-grpo", seed=4)
    assert torch.equal(a.batch.tokens, b.batch.tokens) and torch.equal(a.batch.advantages, b.batch.advantages)
    np.testing.assert_array_equal(a.plan.candidate, b.plan.candidate)


def test_equal_budget_helpers():
    assert expected_rollouts_per_prompt(8, 8, 1, 0.5) == 8 + 8 * 0.5 * 8
    assert grpo_group_size_for_budget(39.6, multiple_of=8) == 40
    cap = aux_cap_for_budget(24, 8)
    be, est, ledger, res = run_step("deep-grpo", aux_budget=cap)
    per_prompt = np.bincount(res.plan.prompt, weights=res.plan.n, minlength=4)
    assert per_prompt.max() <= cap == 16
    assert ledger.rollouts_per_prompt() <= 24
    with pytest.raises(ValueError, match="rollouts_per_prompt"):
        grpo_group_size_for_budget(0)


@pytest.mark.parametrize("method", ["grpo", "deep-grpo",
                                    pytest.param("drgrpo", marks=pytest.mark.slow),
                                    pytest.param("deep-random", marks=pytest.mark.slow),
                                    pytest.param("deep-depth-only", marks=pytest.mark.slow),
                                    pytest.param("deep-state", marks=pytest.mark.slow),
                                    pytest.param("tree-surprisal", marks=pytest.mark.slow),
                                    pytest.param("tree-lowprob", marks=pytest.mark.slow),
                                    pytest.param("tree-uniform", marks=pytest.mark.slow)])
def test_training_through_the_core_raises_reward(method):
    be = ToyBackend(seed=1, p_correct=0.6)
    cfg = method_config(method, kl_coef=0.0)
    est, rng = PositionLogistic(), np.random.default_rng(1)
    opt = torch.optim.Adam([be.logits], lr=0.05)

    def exact() -> float:
        return float(torch.softmax(be.logits.detach(), -1).gather(2, be.correct[..., None]).squeeze(-1).prod(1).mean())
    before = exact()
    for _ in range(15):
        res = explore(be, PROMPTS, cfg, est, rng)
        m = update_policy(be, res.batch, cfg.loss, opt, [be.logits], micro_batch_size=16)
    assert exact() > before + 0.2
    assert np.isfinite(m["grad_norm"])


def test_update_policy_micro_batches_match_full_batch():
    be, est, ledger, res = run_step("deep-grpo", drop_zero=False)
    cfg = method_config("deep-grpo").loss
    grads = []
    for mb in (None, 7):
        be.logits.grad = None
        opt = torch.optim.SGD([be.logits], lr=0.0)
        update_policy(be, res.batch, cfg, opt, [be.logits], micro_batch_size=mb, max_grad_norm=None)
        grads.append(be.logits.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_step_with_an_infinite_or_nan_gradient_is_skipped(max_grad_norm):
    """As verl's actor: a non-finite gradient norm skips the optimizer step (clipping would turn
    infinite gradients into NaN weights), and the step says so."""
    be, _, _, res = run_step("deep-grpo", drop_zero=False)
    cfg = method_config("deep-grpo").loss
    opt = torch.optim.Adam([be.logits], lr=0.1)
    m = update_policy(be, res.batch, cfg, opt, [be.logits], max_grad_norm=max_grad_norm)
    assert m["skipped"] == 0.0 and math.isfinite(m["grad_norm"])
    state = {k: v.clone() for k, v in opt.state[be.logits].items()}
    before = be.logits.detach().clone()
    for poison in (math.inf, math.nan):
        hook = be.logits.register_hook(lambda g, poison=poison: g * poison)
        m = update_policy(be, res.batch, cfg, opt, [be.logits], max_grad_norm=max_grad_norm)
        hook.remove()
        assert m["skipped"] == 1.0 and not math.isfinite(m["grad_norm"])
        assert torch.equal(be.logits.detach(), before) and be.logits.grad is None
        assert all(torch.equal(opt.state[be.logits][k], v) for k, v in state.items())


@pytest.mark.parametrize("method", ["tree-surprisal", "tree-lowprob", "tree-uniform"])
def test_dispersed_plans_never_form_one_continuation_groups(method):
    for seed in range(3):
        _, _, _, res = run_step(method, seed=seed, drop_zero=False)
        assert len(res.plan) > 0 and res.plan.n.min() >= 2


def test_tree_advantages_follow_the_sampling_tree():
    from deepgrpo.advantages import tree_advantages
    from deepgrpo.branching import plan_tree
    be, _, _, res = run_step("tree-surprisal", tree=True, drop_zero=False)
    b, plan, G = res.batch, res.plan, 8
    path, weight = plan_tree(plan, res.main.lengths, res.aux.lengths, G)
    Bm = len(res.main)
    assert path.shape[0] == len(b) and torch.equal(path[:, 0], b.prompt_index)  # root = the prompt
    torch.testing.assert_close(b.advantages, tree_advantages(b.rewards, path, weight).float())
    for row in range(len(b)):  # a row's weights are the tokens it trains
        assert float(weight[row].sum()) == float((b.trainable_mask[row] & b.response_mask[row]).sum())
    cut = {int(t): sorted(int(c) for c in plan.prefix_len[plan.traj == t]) for t in set(plan.traj.tolist())}
    for row in range(Bm):  # main chain = root + one node per segment between its branch points
        cuts = [c for c in cut.get(row, []) if c > 0]
        assert int((path[row] >= 0).sum()) == 2 + len(cuts)
    for row in range(Bm, len(b)):  # a branch hangs below its parent's segment ending at its prefix
        parent, pl = int(b.extras["parent"][row]), int(b.prefix_len[row])
        mine = path[row][path[row] >= 0].tolist()
        above = sum(1 for c in cut[parent] if 0 < c <= pl)
        assert mine[:-1] == path[parent][:1 + above].tolist() and weight[row, :len(mine) - 1].sum() == 0
    # prompts whose leaves all agree get exactly zero advantage
    for p in range(len(PROMPTS)):
        rows = b.prompt_index == p
        if b.rewards[rows].unique().numel() == 1:
            assert (b.advantages[rows] == 0).all()
    assert (b.advantages != 0).any()


def _plan_tree_by_chain(plan, main_len, aux_len, G):
    """plan_tree's tree built chain by chain and point by point (the reference)."""
    Bm, A, n_prompts = len(main_len), len(aux_len), len(main_len) // G
    cuts = {}
    for t, c in zip(plan.traj.tolist(), plan.prefix_len.tolist()):
        cuts.setdefault(t, []).append(c)
    stride = max(map(len, cuts.values())) + 2 if cuts else 2
    path = np.full((Bm + A, stride + 1), -1)
    weight = np.zeros((Bm + A, stride + 1))
    above = {}
    for b in range(Bm):
        nodes, w, start = [b // G], [0], 0
        above[(b, 0)] = list(nodes)
        bounds = sorted(set(cuts.get(b, []))) + [main_len[b]]
        for k, end in enumerate(bounds):
            if end > start or k == len(bounds) - 1:
                nodes.append(n_prompts + b * stride + k)
                w.append(end - start)
            above[(b, end)] = list(nodes)
            start = end
        path[b, :len(nodes)], weight[b, :len(w)] = nodes, w
    row = Bm
    for b, c, n in zip(plan.traj.tolist(), plan.prefix_len.tolist(), plan.n.tolist()):
        for _ in range(n):
            nodes = above[(b, c)]
            path[row, :len(nodes)] = nodes
            path[row, len(nodes)] = n_prompts + Bm * stride + row - Bm
            weight[row, len(nodes)] = aux_len[row - Bm]
            row += 1
    return path, weight


@given(st.integers(1, 3), st.integers(1, 3), st.data())
@settings(max_examples=150, deadline=None)
def test_sampling_tree_equals_the_tree_built_chain_by_chain(n_prompts, G, data):
    """Any plan (cuts at 0 and at a chain's end, several points at one cut, chains without
    points) gives the paths and weights of the chain-by-chain construction."""
    from deepgrpo.branching import BranchPlan, plan_tree
    Bm = n_prompts * G
    main_len = data.draw(st.lists(st.integers(0, 6), min_size=Bm, max_size=Bm))
    points = data.draw(st.lists(st.tuples(st.integers(0, Bm - 1), st.integers(0, 6), st.integers(1, 3)), max_size=8))
    points = [(b, min(c, main_len[b]), n) for b, c, n in points]
    traj, cut, n = (np.array([p[i] for p in points], dtype=np.int64) for i in range(3))
    aux_len = data.draw(st.lists(st.integers(0, 6), min_size=int(n.sum()), max_size=int(n.sum())))
    plan = BranchPlan(candidate=np.arange(len(points)), traj=traj, prompt=traj // G, prefix_len=cut,
                      rel_depth=np.zeros(len(points)), n=n)
    path, weight = plan_tree(plan, torch.tensor(main_len), torch.tensor(aux_len, dtype=torch.long), G)
    ref_path, ref_weight = _plan_tree_by_chain(plan, main_len, aux_len, G)
    assert path.tolist() == ref_path.tolist() and weight.tolist() == ref_weight.tolist()


@given(st.lists(st.lists(st.integers(1, 12), max_size=9), min_size=1, max_size=12))
@settings(max_examples=120, deadline=None)
def test_each_runs_pivot_summary_is_numpys_over_its_own_points(runs):
    """Runs reduced as rows of one array (those with as many points) get, to the bit, what numpy
    gives each run's points alone: depth mean, std and quantiles, mean prefix length; NaN without
    points."""
    from deepgrpo.branching import BranchPlan
    from deepgrpo.explore import PIVOT_SUMMARIES, _pivot_summaries
    prefix = np.array([p for r in runs for p in r], dtype=np.int64)
    depth = prefix / 13.0 + (np.arange(prefix.size) % 3) * 1e-3  # ties and near-ties
    P = prefix.size
    plan = BranchPlan(candidate=np.arange(P), traj=np.zeros(P, np.int64), prompt=np.zeros(P, np.int64),
                      prefix_len=prefix, rel_depth=depth, n=np.ones(P, np.int64))
    span = np.concatenate([[0], np.cumsum([len(r) for r in runs])])
    got = _pivot_summaries(plan, span)
    for r in range(len(runs)):
        d, pl = depth[span[r]:span[r + 1]], prefix[span[r]:span[r + 1]]
        want = dict(zip(PIVOT_SUMMARIES, (d.mean(), d.std(), *np.quantile(d, [0.1, 0.5, 0.9]), pl.mean())
                        if d.size else [np.nan] * 6))
        for k in PIVOT_SUMMARIES:
            assert (np.isnan(got[k][r]) and np.isnan(want[k])) or got[k][r] == want[k], (k, r)


@given(st.lists(st.tuples(*[st.integers(0, 10**6)] * 5), max_size=30), st.integers(0, 30))
@settings(max_examples=60, deadline=None)
def test_ledger_totals_are_the_sums_of_its_steps_however_it_was_filled(counts, cut):
    """totals() adds only the steps recorded since its last call; a ledger restored from a state
    or given another list of steps is summed anew."""
    keys = ("prompts", "rollouts_main", "rollouts_aux", "tokens_main", "tokens_aux")
    ledger = BudgetLedger()
    for i, c in enumerate(counts):
        ledger.record(*c)
        if i % 3 == 0:
            ledger.totals()
    expect = {k: sum(c[j] for c in counts) for j, k in enumerate(keys)}
    assert {k: ledger.totals()[k] for k in keys} == expect
    assert ledger.totals()["tokens"] == expect["tokens_main"] + expect["tokens_aux"]
    restored = BudgetLedger()
    restored.load_state_dict({"steps": ledger.state_dict()["steps"][:cut]})
    assert restored.totals()["prompts"] == sum(c[0] for c in counts[:cut])
    ledger.load_state_dict({"steps": ledger.state_dict()["steps"][:cut]})
    assert ledger.totals() == restored.totals()


def test_informative_converts_a_learned_any_of_k_estimate_to_one_continuation():
    """A learned P̂ is fitted to "any of K succeeded": the informative plan must rank candidates
    by the mixed-group chance of q = 1 - (1 - P̂)^(1/K), not of P̂ itself (which puts pivots where
    P̂ ≈ 0.5, i.e. q ≈ 0.08: deep, nearly hopeless states)."""
    from deepgrpo.pivots import informative_utility, single_continuation
    K = 8
    est = PositionLogistic()
    est.coef = np.array([-9.0, 6.0])  # P̂(r) = σ(6 - 9r): 0.99 near the root, 0.5 at r = 2/3, 0.05 at r = 1
    res = explore(ToyBackend(seed=3, T=12), PROMPTS, method_config("deep-grpo", strategy="informative", K=K,
                                                                      informative_cost="rollouts", drop_zero=False),
                  est, np.random.default_rng(0), BudgetLedger())
    c, plan = res.candidates, res.plan
    assert len(plan) > 0
    p_hat = est.predict(c.features)
    right = informative_utility(single_continuation(p_hat, K), K)
    wrong = informative_utility(p_hat, K)
    moved = 0
    for j in range(len(plan)):
        own = np.flatnonzero(c.traj == plan.traj[j])
        assert right[plan.candidate[j]] == right[own].max()
        moved += wrong[own].argmax() != right[own].argmax()
    assert moved > 0  # the conversion changes the choice
