"""The simulator's model: spec validation, sampler, status replay, continuations, backend,
and the exact oracle against Monte Carlo."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from deepgrpo import ConfigError, SampleRequest, explore, make_estimator, method_config
from sims.backend import SimBackend
from sims.oracle import ExactOracle, exact_pass_at_k, success_table
from sims.policy import TokenTreePolicy, feature_bank, feature_map, random_features
from sims.sampler import replay_status, sample_chains, suffixes
from sims.spec import DERAILED, ON_TRACK, TokenTreeSpec, derived_problem_set_seed

Z = 5.0  # Monte Carlo tolerance: |estimate - exact| < Z standard errors (max over problems)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturbed(spec: TokenTreeSpec, scale: float = 1.0, seed: int = 1):
    """A problem set and a policy moved away from the pre-trained one (so that every
    (step, status, token) probability matters)."""
    problems = spec.build()
    policy = TokenTreePolicy(problems)
    with torch.no_grad():
        policy.delta.normal_(0.0, scale, generator=torch.Generator().manual_seed(seed))
    return problems, policy


def reference_rollout(problems, problem: int, tokens: list[int]) -> tuple[list[int], int]:
    """Statuses after each step and the reward, by the rules of sims.spec written out plainly
    (the chain ends after its problem's length; later tokens are ignored)."""
    status, out = ON_TRACK, []
    for t, tok in enumerate(tokens[:int(problems.lengths[problem])]):
        ok = tok == int(problems.correct[problem, t])
        status = ON_TRACK if ok and (status == ON_TRACK or bool(problems.recovery_allowed[t])) else DERAILED
        out.append(status)
    return out, int(status == ON_TRACK)


# -- spec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("depth", -3), ("depth", 0), ("vocab_size", 1), ("recovery_prob", 1.5), ("recovery_prob", -0.1),
    ("heterogeneity", 2.0), ("crux_depth_low", -0.2), ("n_crux", -1), ("recovery", "sometimes"),
    ("segment_len", 0), ("n_problems", 0), ("depth", 2.5), ("n_heldout", -1), ("min_depth", 0), ("seed", -1),
])
def test_spec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"TokenTreeSpec\.{field} = "):
        TokenTreeSpec(**{field: value})


def test_problem_set_is_deterministic_in_the_spec_seed_and_shaped_as_documented():
    a, b, c = TokenTreeSpec(seed=3).build(), TokenTreeSpec(seed=3).build(), TokenTreeSpec(seed=4).build()
    assert torch.equal(a.correct, b.correct) and torch.equal(a.p_correct, b.p_correct)
    assert not torch.equal(a.correct, c.correct)
    spec = TokenTreeSpec(depth=10, vocab_size=5, n_problems=7, n_heldout=3, segment_len=4)
    ps = spec.build()
    assert ps.correct.shape == (10, 10) and ps.n_train == 7 and ps.n_heldout == 3 and int(ps.correct.max()) < 5
    assert all(e.tolist() == [4, 8, 10] for e in ps.segment_ends) and ps.lengths.tolist() == [10] * 10
    base = torch.softmax(ps.base_logits().double(), -1)  # [n, T, 2, V]
    picked = base.gather(-1, ps.correct[:, :, None, None].expand(10, 10, 2, 1)).squeeze(-1)
    assert torch.allclose(picked[:, :, ON_TRACK], ps.p_correct, atol=1e-6)


def test_each_run_seed_draws_its_own_problem_set_and_a_pinned_seed_fixes_it():
    free = TokenTreeSpec()
    assert free.seed is None and not free.pinned
    a, b = free.build(run_seed=0), free.build(run_seed=1)
    assert a.seed != b.seed and not torch.equal(a.correct, b.correct)
    assert not torch.equal(a.p_correct, b.p_correct)
    assert torch.equal(free.build(run_seed=1).correct, b.correct)  # deterministic in the run seed
    assert a.seed == derived_problem_set_seed(0) == free.problem_set_seed(0)
    pinned = TokenTreeSpec(seed=a.seed)  # the recorded seed rebuilds the same set for any run seed
    for run_seed in (0, 1, 7):
        ps = pinned.build(run_seed=run_seed)
        assert ps.seed == a.seed and torch.equal(ps.correct, a.correct) and torch.equal(ps.p_correct, a.p_correct)


def test_training_problems_do_not_depend_on_the_number_of_held_out_ones():
    few, many, none = (TokenTreeSpec(seed=5, n_heldout=h).build() for h in (4, 16, 0))
    assert torch.equal(few.correct[:32], many.correct[:32]) and torch.equal(few.correct[:32], none.correct)
    assert torch.equal(few.correct[32:], many.correct[32:36])  # held-out problems: their own stream
    assert none.n == 32 and many.n == 48


def test_variable_lengths_are_drawn_in_range_with_cruxes_and_segments_inside_each_problem():
    ps = TokenTreeSpec(depth=12, min_depth=5, segment_len=3, n_problems=64, n_heldout=0, seed=2).build()
    L = ps.lengths
    assert int(L.min()) == 5 and int(L.max()) == 12 and len(set(L.tolist())) == 8 and ps.variable_length
    assert (ps.crux_step < L.unsqueeze(1)).all()
    for p in range(ps.n):
        ends = ps.segment_ends[p].tolist()
        assert ends[-1] == int(L[p]) and ends == sorted(set(list(range(3, int(L[p]), 3)) + [int(L[p])]))
    assert torch.equal(ps.step_mask().sum(1), L)
    with pytest.raises(ConfigError, match=r"TokenTreeSpec\.min_depth = 13"):
        TokenTreeSpec(depth=12, min_depth=13)


def test_heterogeneity_zero_gives_identical_cruxes_and_one_gives_varied():
    same = TokenTreeSpec(heterogeneity=0.0).build()
    assert (same.crux_step == same.crux_step[0]).all() and torch.allclose(same.crux_hardness, same.crux_hardness[0])
    varied = TokenTreeSpec(heterogeneity=1.0).build()
    assert len({tuple(r) for r in varied.crux_step.tolist()}) > 5


def test_recovery_models_set_the_base_derailed_probability():
    T = 10
    for rec, rho_t in [("constant", lambda t: 0.3), ("decay", lambda t: 0.3 * math.exp(-2.0 * t / T))]:
        ps = TokenTreeSpec(depth=T, recovery=rec, recovery_prob=0.3, recovery_decay=2.0).build()
        expected = torch.tensor([rho_t(t) for t in range(T)], dtype=torch.float64) * ps.p_correct
        assert torch.allclose(ps.p_recover, expected.clamp(1e-6, 1 - 1e-6))
        assert bool(ps.recovery_allowed.all())
    assert not bool(TokenTreeSpec(recovery="fatal").build().recovery_allowed.any())


# -- sampler and replay ------------------------------------------------------------------------

@pytest.mark.parametrize("recovery,min_depth", [("fatal", None), ("constant", None), ("fatal", 3), ("constant", 3)])
def test_sampler_follows_the_rules_and_replay_reproduces_every_status(recovery, min_depth):
    problems, policy = perturbed(TokenTreeSpec(depth=8, min_depth=min_depth, recovery=recovery, recovery_prob=0.5),
                                 scale=1.5)
    g = torch.Generator().manual_seed(0)
    problem = torch.arange(400) % problems.n
    with torch.no_grad():
        lp = policy.log_probs()
    ch = sample_chains(problems, lp, problem, g)
    assert torch.equal(replay_status(problems, problem, ch.tokens), ch.status)
    assert torch.equal(ch.lengths, problems.lengths[problem])
    for b in range(0, 400, 37):  # an independent, plain-Python reading of the rules
        L = int(problems.lengths[problem[b]])
        statuses, reward = reference_rollout(problems, int(problem[b]), ch.tokens[b].tolist())
        assert ch.status[b, 1:L + 1].tolist() == statuses and int(ch.rewards[b]) == reward
        assert (ch.status[b, L:] == ch.status[b, L]).all()  # frozen over padding
        wrong = [t for t, tok in enumerate(ch.tokens[b, :L].tolist()) if tok != int(problems.correct[problem[b], t])]
        assert int(ch.first_error[b]) == (wrong[0] if wrong else L)
    status = ch.status[:, :-1]
    expect = lp[problem.unsqueeze(1), torch.arange(8).unsqueeze(0), status, ch.tokens]
    visited = problems.step_mask()[problem]  # [B, T]
    assert torch.allclose(ch.logprobs[visited], expect[visited])
    assert (ch.logprobs[~visited] == 0).all() and (ch.tokens[~visited] == 0).all()
    assert (min_depth is None) == bool(visited.all())


def test_sampler_token_frequencies_match_the_policy():
    problems, policy = perturbed(TokenTreeSpec(depth=3, vocab_size=5, n_problems=2), scale=1.0)
    with torch.no_grad():
        lp = policy.log_probs()
    B = 200_000
    ch = sample_chains(problems, lp, torch.zeros(B, dtype=torch.long), torch.Generator().manual_seed(2))
    freq = torch.bincount(ch.tokens[:, 0], minlength=5).double() / B  # step 0 is always on-track
    p = lp[0, 0, ON_TRACK].double().exp()
    assert (freq - p).abs().max() < Z * (p * (1 - p) / B).sqrt().max()


def test_same_generator_seed_gives_the_same_chains():
    problems, policy = perturbed(TokenTreeSpec())
    lp = policy.log_probs().detach()
    prob = torch.arange(64) % problems.n
    a = sample_chains(problems, lp, prob, torch.Generator().manual_seed(5))
    b = sample_chains(problems, lp, prob, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("recovery,min_depth", [("fatal", None), ("decay", None), ("decay", 4)])
def test_continuation_keeps_the_prefix_exactly_and_replays_its_state(recovery, min_depth):
    problems, policy = perturbed(TokenTreeSpec(depth=10, min_depth=min_depth, recovery=recovery, recovery_prob=0.6),
                                 scale=1.5)
    backend = SimBackend(problems, policy, torch.Generator().manual_seed(0))
    main = backend.sample([SampleRequest(p, None, 6) for p in range(5)])
    assert torch.equal(main.lengths, problems.lengths[main.extras["problem"]])  # budgets count real steps
    requests, sources = [], []
    for row in range(len(main)):
        k = row % int(problems.lengths[main.extras["problem"][row]])
        requests.append(SampleRequest(int(main.extras["problem"][row]), main.tokens[row, :k].clone(), 3))
        sources.append((row, k))
    aux = backend.sample(requests)
    for j, (row, k) in enumerate(sources):
        for r in range(3 * j, 3 * j + 3):
            L = int(problems.lengths[aux.extras["problem"][r]])
            n_suffix = L - k
            assert int(aux.mask[r].sum()) == n_suffix and aux.segment_ends[r].tolist()[-1] == L
            full = torch.cat([main.tokens[row, :k], aux.tokens[r, :n_suffix]])
            # the state after the prefix equals the state the original chain was in at step k
            start = ON_TRACK if k == 0 else (ON_TRACK if bool(main.extras["on_track"][row, k - 1]) else DERAILED)
            assert int(aux.extras["start_status"][r]) == start
            assert torch.equal(aux.extras["on_track"][r, :k], main.extras["on_track"][row, :k])
            statuses, reward = reference_rollout(problems, int(aux.extras["problem"][r]), full.tolist())
            assert int(aux.rewards[r]) == reward
            assert aux.extras["on_track"][r, :L].tolist() == [s == ON_TRACK for s in statuses]


def test_suffixes_left_align_the_tail():
    full = torch.arange(12).reshape(2, 6)
    out = suffixes(full, torch.tensor([2, 5]), fill=-1)
    assert out.tolist() == [[2, 3, 4, 5, -1, -1], [11, -1, -1, -1, -1, -1]]


def test_backend_logprobs_match_sampling_logprobs_and_carry_gradient():
    problems, policy = perturbed(TokenTreeSpec(recovery="constant"))
    backend = SimBackend(problems, policy, torch.Generator().manual_seed(0))
    cfg = method_config("tree-uniform")
    res = explore(backend, list(range(6)), cfg, make_estimator(cfg.estimator), np.random.default_rng(0))
    batch = res.batch
    assert (batch.stream == 1).any()  # aux rows present: prefix + suffix spliced by the core
    lp = backend.logprobs(batch, "policy")
    m = batch.response_mask
    assert torch.allclose(lp[m], batch.old_logprobs[m], atol=1e-6)
    ref = backend.logprobs(batch, "reference")
    assert not ref.requires_grad and lp.requires_grad
    lp[m].sum().backward()
    touched = policy.delta.grad[0].abs().sum(-1) > 0  # [n, T, 2] (the one run's table)
    assert touched.any() and not touched[[p for p in range(problems.n) if p not in batch.prompts]].any()


def test_features_policy_never_reads_the_correct_tokens():
    """Swapping the correct tokens of a problem set changes the pre-trained logits but not the
    features policy's trainable deltas: same weights give the same deltas."""
    problems = TokenTreeSpec(n_problems=6, n_heldout=2, seed=4).build()
    swapped = dataclasses.replace(problems, correct=(problems.correct + 1) % problems.V)
    a, b = TokenTreePolicy(problems, "features", 32), TokenTreePolicy(swapped, "features", 32)
    assert torch.equal(a.logit_delta(), torch.zeros(8, problems.T, 2, problems.V))  # starts at the base
    assert torch.allclose(a.logits(), a.base)
    with torch.no_grad():
        a.weight.normal_(generator=torch.Generator().manual_seed(0))
        b.weight.copy_(a.weight)
    assert not torch.equal(a.base, b.base)  # the swap did change the problem set
    assert torch.equal(a.logit_delta(), b.logit_delta()) and a.logit_delta().abs().min() > 0
    assert torch.equal(a.feature_column, b.feature_column) and torch.equal(a.feature_sign, b.feature_sign)
    phi = random_features(problems, 32)  # [n·T·2·V, D]
    assert torch.equal(phi, random_features(swapped, 32)) and phi.shape == (8 * problems.T * 2 * problems.V, 32)
    assert abs(float(phi.pow(2).sum(1).mean()) - 1.0) < 0.05  # ||φ||² ≈ 1 (variance 1/D)
    # the deltas are φ · w, whatever the order the bank's products are computed in
    assert torch.allclose(a.logit_delta().reshape(-1), phi @ a.weight[0].detach(), atol=1e-6)


def test_features_policy_couples_problems_and_tabular_does_not():
    problems = TokenTreeSpec(n_problems=4, n_heldout=2, seed=1).build()
    moved = {}
    for kind in ("tabular", "features"):
        policy = TokenTreePolicy(problems, kind, 64)
        policy.log_probs()[0, 3, ON_TRACK, int(problems.correct[0, 3])].backward()  # raise one entry of problem 0
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(p.grad, alpha=1.0)
        moved[kind] = (policy.logits() - policy.base).detach().abs().amax(dim=(1, 2, 3))  # [n]
    assert moved["tabular"][0] > 0 and torch.equal(moved["tabular"][1:], torch.zeros(5))
    assert (moved["features"] > 1e-3).all()  # every problem moved, held-out ones included


# -- exact oracle ------------------------------------------------------------------------------

@pytest.mark.parametrize("recovery,min_depth", [("fatal", None), ("constant", None), ("decay", None),
                                                ("fatal", 3), ("decay", 3)])
def test_oracle_pass1_agrees_with_monte_carlo(recovery, min_depth):
    problems, policy = perturbed(TokenTreeSpec(n_problems=8, n_heldout=0, min_depth=min_depth, recovery=recovery,
                                               recovery_prob=0.5), scale=1.0)
    assert (min_depth is None) != problems.variable_length
    exact = ExactOracle(problems, policy).pass1()  # [n]
    B = 20_000
    prob = torch.arange(B * problems.n) % problems.n
    ch = sample_chains(problems, policy.log_probs().detach(), prob, torch.Generator().manual_seed(3))
    mc = torch.zeros(problems.n, dtype=torch.float64).index_add_(0, prob, ch.rewards.double()) / B
    se = (exact * (1 - exact) / B).sqrt().clamp(min=1e-4)
    assert ((mc - exact).abs() / se).max() < Z
    groups = ch.rewards.reshape(-1, problems.n).T.reshape(problems.n, -1, 8)  # [n, B/8, 8] same problem
    mc8 = (groups.amax(-1) > 0).double().mean(-1)
    exact8 = exact_pass_at_k(exact, 8)
    assert ((mc8 - exact8).abs() / (exact8 * (1 - exact8) / (B // 8)).sqrt().clamp(min=1e-4)).max() < Z


@pytest.mark.parametrize("recovery,min_depth", [("fatal", None), ("constant", None), ("constant", 4)])
def test_oracle_success_given_prefix_agrees_with_continuations(recovery, min_depth):
    problems, policy = perturbed(TokenTreeSpec(n_problems=6, n_heldout=0, min_depth=min_depth, recovery=recovery,
                                               recovery_prob=0.5), scale=1.0)
    oracle = ExactOracle(problems, policy)
    backend = SimBackend(problems, policy, torch.Generator().manual_seed(4))
    main = backend.sample([SampleRequest(p, None, 2) for p in range(problems.n)])
    n = 4000
    rows = list(range(len(main)))
    ks = [(3 * r) % int(problems.lengths[main.extras["problem"][r]]) for r in rows]
    aux = backend.sample([SampleRequest(int(main.extras["problem"][r]), main.tokens[r, :k].clone(), n)
                          for r, k in zip(rows, ks)])
    mc = aux.rewards.double().reshape(len(rows), n).mean(1)
    exact = oracle.success_given_prefix(main.extras["problem"], main.tokens, torch.tensor(ks))
    se = (exact * (1 - exact) / n).sqrt().clamp(min=1e-4)
    assert ((mc - exact).abs() / se).max() < Z


def test_fatal_errors_leave_no_chance_from_a_derailed_state():
    problems, policy = perturbed(TokenTreeSpec(recovery="fatal"), scale=2.0)
    W = ExactOracle(problems, policy).table()
    assert torch.equal(W[:, :, DERAILED], torch.zeros_like(W[:, :, DERAILED]))
    assert (W[:, :-1, ON_TRACK] > 0).all()
    backend = SimBackend(problems, policy, torch.Generator().manual_seed(0))
    main = backend.sample([SampleRequest(p, None, 4) for p in range(problems.n)])
    derailed_rows = (~main.extras["on_track"][:, problems.T // 2]).nonzero().flatten()
    assert len(derailed_rows) > 5
    k = problems.T // 2 + 1
    aux = backend.sample([SampleRequest(int(main.extras["problem"][r]), main.tokens[r, :k].clone(), 50)
                          for r in derailed_rows.tolist()])
    assert float(aux.rewards.sum()) == 0.0
    rec = perturbed(TokenTreeSpec(recovery="constant", recovery_prob=0.5), scale=2.0)
    assert (ExactOracle(*rec).table()[:, :-1, DERAILED] > 0).all()


def test_success_table_closed_forms():
    spec = TokenTreeSpec(depth=5, n_problems=3, recovery="fatal")
    problems = spec.build()
    q = torch.rand(3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    W = success_table(problems, q)
    # fatal: success from the root = product of on-track correctness of every step
    assert torch.allclose(W[:, 0, ON_TRACK], q[:, :, ON_TRACK].prod(1))
    assert torch.allclose(exact_pass_at_k(torch.tensor([0.0, 0.5, 1.0]), 3), torch.tensor([0.0, 0.875, 1.0]))


@pytest.mark.parametrize("spec", [
    TokenTreeSpec(n_problems=6, n_heldout=0, depth=8, recovery="fatal", seed=3),
    TokenTreeSpec(n_problems=6, n_heldout=0, depth=10, min_depth=6, recovery="constant", recovery_prob=0.4,
                  ability_mean=2.0, seed=4),
], ids=["fatal", "constant-variable-length"])
def test_failed_chains_states_are_never_more_recoverable_than_the_root(spec):
    """E[s(X_k) | fail] = (p - E[s(X_k)^2]) / (1 - p) <= p at every depth k, exactly (oracle), and
    as measured on sampled failed chains (Monte Carlo, same policy)."""
    from sims.oracle import failed_state_recoverability
    problems = spec.build()
    policy = TokenTreePolicy(problems)
    oracle = ExactOracle(problems, policy)
    W, D = oracle.table(), oracle.status_distribution()
    r = failed_state_recoverability(W, D)
    ok = torch.isfinite(r["given_fail"])
    assert ok.any()
    assert torch.allclose(r["given_fail"][ok], r["identity"][ok], atol=1e-12)  # the identity, exactly
    assert torch.allclose(r["mean_s"], r["p"], atol=1e-12)  # s(X_k) is a martingale: E[s(X_k)] = p
    assert (r["given_fail"][ok] <= r["p"][ok] + 1e-12).all()
    assert torch.allclose(D.sum(-1), torch.ones_like(D.sum(-1)), atol=1e-12)
    # Monte Carlo: failed chains of problem 0 visit states whose mean exact recoverability is the identity's
    n = 40_000
    with torch.no_grad():
        chains = sample_chains(problems, policy.log_probs(), torch.zeros(n, dtype=torch.long),
                               torch.Generator().manual_seed(0))
    failed = chains.rewards == 0
    assert 100 < int(failed.sum()) < n - 100
    L = int(problems.lengths[0])
    for k in range(L + 1):
        s_k = W[0, k][chains.status[failed, k]]  # [F] exact s at the state each failed chain reached
        se = float(s_k.std()) / np.sqrt(len(s_k)) + 1e-9
        assert abs(float(s_k.mean()) - float(r["identity"][0, k])) < 5 * se + 1e-9, k


def test_oracle_estimator_reads_the_exact_prefix_success_the_simulator_supplies():
    """The ladder's oracle rung: the simulator hands the core P(success | prefix) as the candidate
    feature oracle_success; the oracle estimator's P̂ is exactly the oracle's value."""
    from deepgrpo.estimators import FeatureEstimator
    from deepgrpo.explore import build_candidates
    from sims.oracle import prefix_success
    problems = TokenTreeSpec(n_problems=6, n_heldout=0, depth=8, recovery="constant", recovery_prob=0.3,
                             seed=2).build()
    policy = TokenTreePolicy(problems)
    be = SimBackend(problems, policy, torch.Generator().manual_seed(0))
    main = be.sample([SampleRequest(p, None, 8) for p in range(6)])
    failed = np.flatnonzero(main.rewards.numpy() == 0)
    cands = build_candidates(main, failed, np.repeat(np.arange(6), 8), np.zeros(6))
    assert len(cands) > 10
    W = ExactOracle(problems, policy).table()
    exact = prefix_success(W, main.extras, torch.from_numpy(cands.traj), torch.from_numpy(cands.prefix_len))
    p_hat = FeatureEstimator().predict(cands.features)
    np.testing.assert_allclose(p_hat, exact.numpy(), atol=1e-12)
    assert (p_hat[cands.index == 0] == W[cands.prompt[cands.index == 0], 0, ON_TRACK].numpy()).all()
    # and a backend without it gets a clear error, not a silent P̂
    with pytest.raises(ConfigError, match="oracle_success"):
        FeatureEstimator().predict({"rel_depth": np.ones(3)})


@pytest.mark.parametrize("method", ["oracle-pivot", "oracle-informative"])
def test_oracle_ladder_methods_train_in_the_simulator(method, one_torch_thread):
    from sims.runner import RunnerConfig, train
    hist = train(TokenTreeSpec(n_problems=8, depth=8), method_config(method), RunnerConfig(steps=3, batch_problems=8),
                 seed=0).history
    assert hist[-1]["pivots"] > 0 and hist[-1]["rollouts_aux"] > 0
    assert 0 <= hist[-1]["pivot_oracle_success"] <= 1


def test_feature_maps_are_permutations_with_fair_signs_and_phi_is_distributed_as_a_fresh_draw():
    """Each problem set's φ is the shared bank's columns, permuted and sign-flipped by its own seed:
    every column used once, the maps of different seeds differ, and the entries of φ look i.i.d.
    N(0, 1/D) (mean 0, variance 1/D, features of different entries uncorrelated)."""
    sets = [TokenTreeSpec(n_problems=6, n_heldout=2, seed=s).build() for s in (1, 2)]
    M = 8 * sets[0].T * 2 * sets[0].V
    maps = [feature_map(ps) for ps in sets]
    for column, sign in maps:
        assert torch.equal(column.sort().values, torch.arange(M))
        assert set(sign.tolist()) == {-1.0, 1.0} and abs(float(sign.mean())) < 0.1
    assert not torch.equal(maps[0][0], maps[1][0]) and torch.equal(feature_map(sets[0])[0], maps[0][0])
    D = 64
    phi = random_features(sets[0], D)  # [M, D]
    assert abs(float(phi.mean())) < 3 / (M * D) ** 0.5 * D ** -0.5
    assert abs(float(phi.var()) * D - 1.0) < 0.05
    gram = phi @ phi.t()  # [M, M]: about 1 on the diagonal, O(1/√D) off it
    off = gram[~torch.eye(M, dtype=torch.bool)]
    assert abs(float(off.mean())) < 0.01 and abs(float(off.std()) * D ** 0.5 - 1.0) < 0.1
    bank = feature_bank(M, D)
    assert torch.equal(phi[5], bank[:, maps[0][0][5]] * maps[0][1][5]) and bank is feature_bank(M, D)


def test_features_runs_give_the_same_bits_alone_and_in_any_batch():
    """A run's deltas and weight gradient are bit-identical alone and at any position of batches of
    several sizes (the bank's products are tiled by FEATURE_TILE runs, padded with zero weights)."""
    from sims.policy import FEATURE_TILE
    sets = [TokenTreeSpec(n_problems=5, n_heldout=3, seed=s).build() for s in range(2 * FEATURE_TILE + 3)]
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(len(sets), 48, generator=gen)
    upstream = torch.randn(len(sets), 8, sets[0].T, 2, sets[0].V, generator=gen)

    def run(members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        policy = TokenTreePolicy([sets[i] for i in members], "features", 48)
        with torch.no_grad():
            policy.weight.copy_(weights[members])
        delta = policy.logit_delta()  # [R·n, T, 2, V]
        delta.backward(upstream[members].reshape(delta.shape))
        return delta.detach().view(len(members), -1), policy.weight.grad

    alone_delta, alone_grad = run([4])
    for members in ([4, 0], [0, 1, 2, 3, 4], list(range(len(sets)))[::-1], [9, 8, 7, 6, 5, 4, 3, 2, 1]):
        delta, grad = run(members)
        i = members.index(4)
        assert torch.equal(delta[i], alone_delta[0]) and torch.equal(grad[i], alone_grad[0]), members
