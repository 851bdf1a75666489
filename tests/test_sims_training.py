"""Training in the simulator through the core: determinism, learning, budgets, pivot placement."""

import json

import numpy as np
import pytest
import torch

from deepgrpo import BudgetLedger, explore, make_estimator, method_config, update_policy
from deepgrpo.batch import AUX
from sims.backend import SimBackend
from sims.optim import LogitAdam, LogitSGD
from sims.oracle import ExactOracle, exact_pass_at_k
from sims.policy import TokenTreePolicy
from sims.runner import RunnerConfig, StepContext, train, write_run
from sims.spec import TokenTreeSpec

# a spec where the paper's position-only assumption holds: every problem has its single crux at
# the same mid depth, errors are fatal, so P(success | pivot) is a step function of depth
POSITION_SPEC = dict(n_crux=1, ability_mean=6.0, crux_hardness_mean=6.0, crux_depth_low=0.3,
                     crux_depth_high=0.5, heterogeneity=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_same_seed_gives_an_identical_history_csv(tmp_path):
    spec, algo, runner = TokenTreeSpec(), method_config("deep-grpo"), RunnerConfig(steps=4)
    files, results = [], []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        results.append(train(spec, algo, runner, seed=seed, method="deep-grpo"))
        write_run(tmp_path / name, spec, algo, runner, seed, "deep-grpo", results[-1])
        files.append((tmp_path / name / "history.csv").read_bytes())
    res = results[0]
    assert files[0] == files[1] and files[0] != files[2]
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["seed"] == 3 and rec["config"]["spec"] == spec.to_dict()
    assert rec["config"]["algo"]["explore"]["strategy"] == "deep" and rec["config"]["runner"]["steps"] == 4
    assert rec["budget"]["rollouts"] == res.history[-1]["rollouts"] > 0 and "torch" in rec["versions"]
    assert len(rec["step_wall_time_s"]) == 4 and rec["wall_time_s"] > 0


@pytest.mark.parametrize("method", ["grpo", "deep-grpo"])
def test_grpo_and_deep_grpo_raise_exact_pass1_on_the_default_spec(method):
    for seed in (0, 1):
        h = train(TokenTreeSpec(), method_config(method), RunnerConfig(steps=5), seed=seed).history
        assert h[-1]["pass1"] > h[0]["pass1"] + 0.02, (seed, h[0]["pass1"], h[-1]["pass1"])
        assert h[-1]["pass8"] > h[0]["pass8"]


def test_history_rows_and_budget_are_consistent():
    runner = RunnerConfig(steps=3, batch_problems=5)
    seen = []
    h = train(TokenTreeSpec(), method_config("grpo", G=16), runner, seed=0, on_step=seen.append).history
    assert seen == h and [r["step"] for r in h] == [0, 1, 2, 3]
    assert [r["rollouts"] for r in h] == [0, 80, 160, 240]  # P·N per step, no branches
    assert h[-1]["tokens"] == 240 * TokenTreeSpec().depth and h[-1]["rollouts_aux"] == 0
    d = train(TokenTreeSpec(), method_config("deep-grpo"), runner, seed=0).history
    for r in d[1:]:
        assert r["rollouts_main"] == r["step"] * 5 * 8
        assert 0 <= r["pivot_before_error"] <= 1 and 0 < r["pivot_depth_mean"] < 1
    assert d[-1]["rollouts_aux"] > 0 and d[-1]["tokens_aux"] < d[-1]["rollouts_aux"] * TokenTreeSpec().depth


def test_probes_see_the_exact_table_of_the_sampling_policy():
    calls = []

    def probe(res, ctx: StepContext):
        p1 = ExactOracle(ctx.problems, ctx.policy).pass1()  # policy not yet updated in this step
        calls.append(float((ctx.W[:, 0, 0] - p1).abs().max()))
        return {"probe_pivots": float(len(res.plan))}

    h = train(TokenTreeSpec(), method_config("deep-grpo"), RunnerConfig(steps=3), probes=[probe]).history
    assert max(calls) < 1e-12 and len(calls) == 3
    assert [r["probe_pivots"] for r in h[1:]] == [r["pivots"] for r in h[1:]]


def test_grpo_groups_on_hard_problems_are_all_fail_at_the_exact_rate():
    spec = TokenTreeSpec()
    problems = spec.build()
    policy = TokenTreePolicy(problems)
    p1 = ExactOracle(problems, policy).pass1().numpy()  # [n]
    backend = SimBackend(problems, policy, torch.Generator().manual_seed(0))
    cfg = method_config("grpo", G=8)
    reps, prompts = 60, list(range(problems.n))
    all_fail = np.zeros(problems.n)
    for _ in range(reps):
        res = explore(backend, prompts, cfg, None, np.random.default_rng(0))
        all_fail += res.main.rewards.reshape(problems.n, 8).amax(1).numpy() == 0
    expected = 1 - exact_pass_at_k(torch.from_numpy(p1), 8).numpy()  # (1 - p)^8
    se = np.sqrt(expected * (1 - expected) / reps).clip(min=0.02)
    assert np.max(np.abs(all_fail / reps - expected) / se) < 5
    hard = p1 < np.quantile(p1, 0.25)
    assert expected[hard].mean() > 0.5  # GRPO with N = 8 mostly gets no signal on the hardest quarter


def test_deep_grpo_gets_signal_where_every_main_chain_failed():
    spec = TokenTreeSpec()
    problems = spec.build()
    backend = SimBackend(problems, TokenTreePolicy(problems), torch.Generator().manual_seed(1))
    cfg = method_config("deep-grpo")
    est, rng = make_estimator(cfg.estimator), np.random.default_rng(0)
    rescued = 0
    for _ in range(10):
        res = explore(backend, list(range(problems.n)), cfg, est, rng, BudgetLedger())
        failed_prompts = np.flatnonzero(res.main.rewards.reshape(problems.n, 8).amax(1).numpy() == 0)
        aux_prompts = res.batch.prompt_index[res.batch.stream == AUX].numpy()  # non-zero advantage only
        rescued += len(set(failed_prompts) & set(aux_prompts.tolist()))
    assert rescued > 0


def _before_error_once_fitted(method: str, seeds=(0, 1, 2)) -> float:
    out = []
    for seed in seeds:
        h = train(TokenTreeSpec(**POSITION_SPEC), method_config(method), RunnerConfig(steps=12), seed=seed).history
        # DEEP-GRPO's P̂ is 1 until its buffer holds > 10 labels of each class (paper §3.2)
        rows = [r for r in h[1:] if method != "deep-grpo" or r["est_rel_depth"] == r["est_rel_depth"]]
        assert len(rows) >= 5
        out.append(np.mean([r["pivot_before_error"] for r in rows]))
    return float(np.mean(out))


def test_deep_grpo_pivots_land_before_the_first_error_far_more_often_than_uniform_cut_points():
    deep = _before_error_once_fitted("deep-grpo")
    for uniform in ("deep-random", "tree-uniform"):
        other = _before_error_once_fitted(uniform)
        assert deep > other + 0.15, (deep, uniform, other)
        assert deep > 1.3 * other


def test_logit_adam_matches_torch_adam():
    a = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = torch.optim.Adam([a], lr=0.07), LogitAdam([b], lr=0.07)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        grad = torch.randn(4, 3, generator=g) * (step % 3)  # includes all-zero gradients
        for p, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            (p * grad).sum().backward()
            opt.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("unit", ["tokens", "rollouts"])
def test_a_run_stopped_at_a_budget_spends_within_one_step_of_it(unit, one_torch_thread):
    """Equal-budget comparisons: cheap methods take more steps, and no run overshoots its
    budget by a whole step."""
    spec = TokenTreeSpec(n_problems=8, depth=6)
    budget = 5_000 if unit == "tokens" else 700
    spent = {}
    for method in ("grpo", "deep-grpo"):
        hist = train(spec, method_config(method), RunnerConfig(steps=1000, batch_problems=4, budget=budget,
                                                               budget_unit=unit), seed=1).history
        last, before = hist[-1][unit], hist[-2][unit]
        per_step = last - before
        assert before < budget <= last < budget + per_step  # stopped at the first boundary past it
        spent[method] = (len(hist) - 1, last)
    assert spent["grpo"][0] > spent["deep-grpo"][0]  # the cheaper method took more steps


def test_logit_sgd_matches_torch_sgd():
    a = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = torch.optim.SGD([a], lr=0.3), LogitSGD([b], lr=0.3)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        grad = torch.randn(4, 3, generator=g)
        for p, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            (p * grad).sum().backward()
            opt.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_runs_draw_their_own_problem_set_per_seed_and_record_it(tmp_path):
    spec, runner = TokenTreeSpec(n_problems=8, n_heldout=4), RunnerConfig(steps=1, batch_problems=4)
    algo = method_config("grpo")
    a, b = (train(spec, algo, runner, seed=s) for s in (0, 1))
    assert a.problem_set_seed != b.problem_set_seed and not a.problem_set_pinned
    assert not torch.equal(a.problems.correct, b.problems.correct)
    assert a.history[0]["pass1"] != b.history[0]["pass1"]  # different sets start at different pass@1
    pinned = TokenTreeSpec(n_problems=8, n_heldout=4, seed=a.problem_set_seed)
    c, d = (train(pinned, algo, runner, seed=s) for s in (0, 5))
    assert c.problem_set_pinned and c.problem_set_seed == d.problem_set_seed == a.problem_set_seed
    assert torch.equal(c.problems.correct, a.problems.correct) and torch.equal(d.problems.correct, a.problems.correct)
    assert c.history[0]["pass1"] == d.history[0]["pass1"] == a.history[0]["pass1"]
    write_run(tmp_path / "a", spec, algo, runner, 0, "grpo", a)
    write_run(tmp_path / "c", pinned, algo, runner, 0, "grpo", c)
    ra, rc = (json.loads((tmp_path / x / "run.json").read_text()) for x in "ac")
    assert ra["problem_set_seed"] == a.problem_set_seed and ra["problem_set_pinned"] is False
    assert rc["problem_set_seed"] == a.problem_set_seed and rc["problem_set_pinned"] is True
    assert ra["config"]["spec"]["seed"] is None and rc["config"]["spec"]["seed"] == a.problem_set_seed
    assert ra["config"]["runner"]["policy"] == "tabular" and ra["config"]["runner"]["optimizer"] == "adam"
    assert ra["config"]["runner"]["feature_dim"] == 256
    assert a.history[0]["problem_set_seed"] == a.problem_set_seed


def test_held_out_problems_are_never_trained_on_and_logged_exactly():
    spec = TokenTreeSpec(n_problems=8, n_heldout=6)
    seen = []

    def batch_prompts(res, ctx):
        seen.extend(res.batch.prompts)
        seen.extend(int(p) for p in res.main.extras["problem"])
        return {}

    res = train(spec, method_config("deep-grpo"), RunnerConfig(steps=6, batch_problems=8), seed=3,
                probes=[batch_prompts])
    assert seen and set(seen) == set(range(8))  # every training problem, no held-out one
    oracle = ExactOracle(res.problems, res.policy)
    p1 = oracle.pass1()
    last = res.history[-1]
    assert last["pass1"] == pytest.approx(float(p1[:8].mean()), abs=1e-12)
    assert last["heldout_pass1"] == pytest.approx(float(p1[8:].mean()), abs=1e-12)
    assert last["heldout_pass8"] == pytest.approx(float(exact_pass_at_k(p1[8:], 8).mean()), abs=1e-12)
    none = train(TokenTreeSpec(n_problems=8, n_heldout=0), method_config("grpo"), RunnerConfig(steps=1), seed=0)
    assert all(np.isnan(r["heldout_pass1"]) for r in none.history)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.2), ("sgd", 100.0)])
def test_held_out_pass1_moves_with_the_features_policy_and_stays_exactly_fixed_with_the_tabular_one(optimizer, lr):
    spec = TokenTreeSpec(n_problems=8, n_heldout=8)
    out = {}
    for policy in ("tabular", "features"):
        h = train(spec, method_config("deep-grpo"), RunnerConfig(steps=6, batch_problems=8, policy=policy,
                                                                 feature_dim=64, optimizer=optimizer, lr=lr),
                  seed=2).history
        assert h[-1]["pass1"] > h[0]["pass1"] + 0.02  # both learn their training problems
        out[policy] = [r["heldout_pass1"] for r in h]
    assert out["tabular"] == [out["tabular"][0]] * 7  # bit-for-bit unchanged
    assert out["features"][0] == out["tabular"][0]  # same pre-trained policy
    assert max(abs(x - out["features"][0]) for x in out["features"]) > 1e-3


def test_drgrpo_differs_from_grpo_only_on_variable_length_problems():
    """Dr.GRPO divides token sums by rows x the batch's padded length, GRPO (token mean) by the
    number of tokens: equal when every chain has the same length, not otherwise."""
    runner = RunnerConfig(steps=5, batch_problems=8, optimizer="sgd", lr=100.0)
    for min_depth, equal in ((None, True), (4, False)):
        spec = TokenTreeSpec(n_problems=16, n_heldout=0, min_depth=min_depth)
        g, d = (train(spec, method_config(m), runner, seed=0).history for m in ("grpo", "drgrpo"))
        same = [a["pass1"] == b["pass1"] for a, b in zip(g, d)]
        assert all(same) == equal, (min_depth, same)
    # one update on the same batch: the gradients differ exactly by tokens / (rows x width)
    spec = TokenTreeSpec(n_problems=16, n_heldout=0, min_depth=4, seed=1)
    grads = {}
    for m in ("grpo", "drgrpo"):
        problems = spec.build()
        policy = TokenTreePolicy(problems)
        backend = SimBackend(problems, policy, torch.Generator().manual_seed(0))
        cfg = method_config(m, kl_coef=0.0)
        res = explore(backend, list(range(16)), cfg, None, np.random.default_rng(0))
        update_policy(backend, res.batch, cfg.loss, LogitSGD([policy.delta], lr=0.0), [policy.delta],
                      max_grad_norm=None)
        grads[m] = policy.delta.grad.clone()
        mask = res.batch.trainable_mask & res.batch.response_mask
        ratio = float(mask.sum()) / (len(res.batch) * mask.shape[1])
    assert ratio < 0.95
    torch.testing.assert_close(grads["drgrpo"], grads["grpo"] * ratio, rtol=1e-5, atol=1e-9)


def test_variable_length_runs_count_tokens_per_problem():
    spec = TokenTreeSpec(n_problems=8, n_heldout=0, min_depth=3, depth=9)
    seen = []
    res = train(spec, method_config("deep-grpo"), RunnerConfig(steps=3, batch_problems=8), seed=0,
                probes=[lambda r, ctx: seen.append(r) or {}])
    lengths = res.problems.lengths
    for r, row in zip(seen, res.history[1:]):
        assert row["step_tokens_main"] == int(lengths[r.main.extras["problem"]].sum())
        prefix = torch.from_numpy(np.repeat(r.plan.prefix_len, r.plan.n))  # [A] prefix of each branch
        assert row["step_tokens_aux"] == int((lengths[r.aux.extras["problem"]] - prefix).sum())
        # candidate pivots of each failed chain: its own problem's segments, r = (i+1)/(L+1)
        c = r.candidates
        L = lengths[r.main.extras["problem"][c.traj]].numpy()
        np.testing.assert_allclose(c.rel_depth, (c.index + 1) / (L + 1))
