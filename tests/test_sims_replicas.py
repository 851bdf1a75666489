"""Many runs in lockstep (the core's replica axis, :func:`sims.runner.train_replicas`).

A run's numbers depend on its own seed and configuration only: alone, or inside batches of any
size and companions, it has the same history to the last bit. The pieces that make this so are
checked on their own: the vectorised candidate builder and the per-prompt cap against plain
per-row references, each replica's plan against planning it alone, micro-batches split per run,
the branch requests given as tensors, and one batched update against each run's own update.
"""

import copy
import dataclasses
import itertools
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.studies import run_sim_cell, run_sim_cells, sim_batch_key, sim_run_complete
from analysis.sweep import Cell, run_sweep
from deepgrpo import BudgetLedger, method_config
from deepgrpo.batch import Rollouts
from deepgrpo.branching import BranchPlan, CandidateSet, cap_plan, plan_branches
from deepgrpo.config import ExploreConfig
from deepgrpo.estimators import make_estimator
from deepgrpo.explore import build_candidates, explore_replicas, plan_replicas
from deepgrpo.pivots import candidate_depths, candidate_prefix_lengths
from deepgrpo.step import step_record, update_policy, update_replicas
from sims.backend import SimBackend
from sims.optim import DEFAULT_LR, make_optimizer
from sims.policy import TokenTreePolicy
from sims.runner import RunnerConfig, run_streams, train, train_replicas
from sims.spec import ProblemSet, TokenTreeSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = (TokenTreeSpec(n_problems=8, n_heldout=4), TokenTreeSpec(n_problems=8, n_heldout=4, recovery="constant"),
         TokenTreeSpec(n_problems=8, n_heldout=4, recovery="decay", heterogeneity=0.0))
"""Three problem-set rules of one shape: companions in a batch may differ in their rules."""
SKILL_SPECS = tuple(dataclasses.replace(s, n_skills=3, skill_consistency=0.8) for s in SPECS)
"""The same rules with skills (the skills policy's problem sets)."""


def _specs(policy: str) -> tuple[TokenTreeSpec, ...]:
    return SKILL_SPECS if policy == "skills" else SPECS


def _bits(history: list[dict]) -> list[dict]:
    """History rows with every float as its exact bits (NaN included)."""
    return [{k: (struct.pack("<d", v).hex() if isinstance(v, float) else v) for k, v in r.items()} for r in history]


def _alone_and_together(policy: str, optimizer: str, method: str, steps: int, runs: int = 3) -> None:
    """``runs`` runs (other rules, rates and seeds) alone, together, and (three runs) the last two
    together in the reverse order: every run's history is the same in each."""
    algo = method_config(method)
    cfgs = [RunnerConfig(steps=steps, batch_problems=4, policy=policy, feature_dim=32, optimizer=optimizer,
                         lr=DEFAULT_LR[optimizer] * f) for f in (1.0, 2.0, 0.5)][:runs]
    seeds = [3, 5, 7][:runs]
    specs = _specs(policy)[:runs]
    alone = [_bits(train(s, algo, c, seed=sd, method=method).history) for s, c, sd in zip(specs, cfgs, seeds)]
    together = [_bits(r.history) for r in train_replicas(specs, algo, cfgs, seeds, [method] * runs)]
    assert together == alone, (policy, optimizer, method)
    if runs == 3:  # other companions, in another order
        pair = [_bits(r.history) for r in train_replicas(_specs(policy)[1:][::-1], algo, cfgs[1:][::-1],
                                                         seeds[1:][::-1], [method] * 2)]
        assert pair[::-1] == alone[1:], (policy, optimizer, method)
    assert alone[0][-1]["pass1"] != alone[0][0]["pass1"]  # the runs did learn


@pytest.mark.parametrize("policy,optimizer", [("tabular", "adam"), ("features", "sgd"), ("skills", "adam")])
def test_a_run_alone_and_in_batches_has_the_same_history(policy, optimizer):
    _alone_and_together(policy, optimizer, "deep-grpo", 8)


def test_a_learned_informative_run_alone_and_in_batches_has_the_same_history():
    """The selector's state (its buffer of counts, its fit) is each run's own."""
    _alone_and_together("tabular", "adam", "learned-informative", 8)


@pytest.mark.slow
@pytest.mark.parametrize("policy,optimizer,method", list(itertools.product(
    ("tabular", "features", "skills"), ("adam", "sgd"), ("grpo", "deep-grpo", "root-only", "tree-surprisal",
                                               "oracle-informative", "learned-informative"))))
def test_every_learner_and_method_for_30_steps_alone_and_in_batches(policy, optimizer, method):
    _alone_and_together(policy, optimizer, method, 30, runs=2)


def test_runs_with_different_budgets_drop_out_and_the_others_go_on():
    algo = method_config("deep-grpo")
    cfgs = [RunnerConfig(steps=50, batch_problems=4, budget=b) for b in (2_000, 6_000)]
    finished = []
    res = train_replicas(SPECS[:2], algo, cfgs, [1, 2], on_finish=lambda r, out: finished.append(r))
    assert finished == [0, 1]
    assert res[0].ledger.totals()["tokens"] >= 2_000 and len(res[0].history) < len(res[1].history)
    assert _bits(res[0].history) == _bits(train(SPECS[0], algo, cfgs[0], seed=1).history)



@pytest.mark.parametrize("policy,optimizer,method", [("tabular", "adam", "deep-grpo"), ("features", "sgd", "deep-grpo"),
                                                     ("features", "adam", "grpo"), ("skills", "sgd", "deep-grpo")])
def test_runs_that_stop_at_different_steps_keep_their_histories_when_the_batch_is_compacted(policy, optimizer,
                                                                                            method):
    """Eight runs with step caps 2..9: as they stop, the batch drops them from its tensors
    (several times, COMPACT_FRACTION), and every run's history is still the one it has alone."""
    from sims.runner import COMPACT_FRACTION
    algo = method_config(method)
    caps = [9, 2, 7, 3, 8, 4, 6, 5]
    cfgs = [RunnerConfig(steps=s, batch_problems=4, policy=policy, feature_dim=32, optimizer=optimizer,
                         lr=DEFAULT_LR[optimizer] * (1.0 + 0.25 * i)) for i, s in enumerate(caps)]
    specs = [_specs(policy)[i % 3] for i in range(len(caps))]
    seeds = list(range(11, 11 + len(caps)))
    together = train_replicas(specs, algo, cfgs, seeds, [method] * len(caps))
    rows = {r: (res.policy.weight if policy == "features" else res.policy.delta).shape[0]
            for r, res in enumerate(together)}
    assert rows[0] <= COMPACT_FRACTION * len(caps) and len(set(rows.values())) > 2  # compacted, more than once
    for spec, cfg, seed, res in zip(specs, cfgs, seeds, together):
        assert len(res.history) == cfg.steps + 1
        assert _bits(res.history) == _bits(train(spec, algo, cfg, seed=seed, method=method).history), cfg.steps

def test_runs_trained_together_must_share_the_loop_settings():
    with pytest.raises(ValueError, match="batch_problems"):
        train_replicas(SPECS[:2], method_config("grpo"),
                       [RunnerConfig(steps=1, batch_problems=4), RunnerConfig(steps=1, batch_problems=2)], [0, 1])
    with pytest.raises(ValueError, match="cannot be stacked"):
        train_replicas([SPECS[0], TokenTreeSpec(n_problems=6)], method_config("grpo"), [RunnerConfig(steps=1)] * 2,
                       [0, 1])


def _two_runs(policy: str = "tabular"):
    sets = [s.build(run_seed=seed) for s, seed in zip(_specs(policy)[:2], (11, 12))]
    stacked = ProblemSet.stack(sets)
    pol = TokenTreePolicy(sets, policy, 16)
    with torch.no_grad():  # a policy that is not the pre-trained one
        for p in pol.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    gens = [run_streams(s)[0] for s in (11, 12)]
    return sets, stacked, pol, SimBackend(stacked, pol, gens)


@pytest.mark.parametrize("policy,optimizer", [("tabular", "adam"), ("features", "sgd"), ("skills", "sgd")])
def test_one_batched_update_equals_each_runs_own_update(policy, optimizer):
    """For one step with fixed sampled chains, the batched update gives each run what its own
    single-run update gives (parameters, loss parts and step record, to 1e-6)."""
    algo = method_config("deep-grpo")
    sets, stacked, pol, backend = _two_runs(policy)
    n = sets[0].n
    prompts = [0, 2, 4, 6, n + 1, n + 3, n + 5, n + 7]
    replica = np.repeat([0, 1], 4)
    ests = [make_estimator(algo.estimator) for _ in range(2)]
    ledgers = [BudgetLedger(), BudgetLedger()]
    step = explore_replicas(backend, prompts, replica, algo, ests, [np.random.default_rng(s) for s in (1, 2)],
                            ledgers)
    params = [p for p in pol.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = make_optimizer(optimizer, params, [DEFAULT_LR[optimizer], 2 * DEFAULT_LR[optimizer]])
    batched = update_replicas(backend, step.batch, algo.loss, opt, params, 2, micro_batch_size=7)
    for r in range(2):
        own = TokenTreePolicy(sets[r], policy, 16)
        own_params = [p for p in own.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, p0 in zip(own_params, start):
                p.copy_(p0[r:r + 1])
        rows = step.batch.select(step.batch.replica == r)
        rows.replica = torch.zeros(len(rows), dtype=torch.long)
        rows.prompts = [int(p) - r * n for p in rows.prompts]  # the run's own problem ids
        rows.prompts = [p if 0 <= p < n else 0 for p in rows.prompts]
        own_backend = SimBackend(sets[r], own, torch.Generator())
        own_opt = make_optimizer(optimizer, own_params, (1.0 + r) * DEFAULT_LR[optimizer])
        alone = update_policy(own_backend, rows, algo.loss, own_opt, own_params, micro_batch_size=7)
        for p, q in zip(params, own_params):
            torch.testing.assert_close(p.detach()[r], q.detach()[0], atol=1e-6, rtol=0)
        assert batched[r] == pytest.approx(alone, abs=1e-6, nan_ok=True)
        rec_b = step_record(step.results[r], batched[r], ledgers[r], ests[r])
        rec_a = step_record(step.results[r], alone, ledgers[r], ests[r])
        assert rec_b == pytest.approx(rec_a, abs=1e-6, nan_ok=True)
    assert any(abs(b["loss"]) > 0 for b in batched)


@pytest.mark.parametrize("method", ["deep-grpo", "tree-surprisal", "learned-informative"])
def test_a_runs_exploration_result_in_a_batch_is_the_one_it_gets_alone(method):
    """Every field of a run's ExploreResult in a lockstep step (its rollouts, candidates, plan,
    labels, predictions and stats; the rollouts and candidates are sliced when first read) is
    the one the run gets when it explores alone."""
    algo = method_config(method)
    sets, stacked, pol, backend = _two_runs()
    n = sets[0].n
    local = [0, 2, 4, 6]
    step = explore_replicas(backend, local + [n + p for p in local], np.repeat([0, 1], 4), algo,
                            [make_estimator(algo.estimator) for _ in range(2)],
                            [np.random.default_rng(s) for s in (1, 2)], [BudgetLedger(), BudgetLedger()])
    for r in range(2):
        own = TokenTreePolicy(sets[r], "tabular", 16)
        with torch.no_grad():
            for p, p0 in zip(own.parameters(), pol.parameters()):
                p.copy_(p0[r:r + 1])
        alone = explore_replicas(SimBackend(sets[r], own, run_streams(11 + r)[0]), local, np.zeros(4, np.int64), algo,
                                 [make_estimator(algo.estimator)], [np.random.default_rng(1 + r)],
                                 [BudgetLedger()]).results[0]
        # copies taken before any field is read read their fields on their own; replace makes an eager one
        first = step.results[r]
        copies = [copy.copy(first), copy.deepcopy(first), dataclasses.replace(first)]
        for mine in (*copies, first):
            _same_exploration(mine, alone)


def _same_exploration(mine, alone):
    """Every field of one ExploreResult equals the other's (problem ids apart)."""
    assert len(mine.plan) > 0 and mine.aux is not None
    for got, want in ((mine.main, alone.main), (mine.aux, alone.aux)):
        for f in ("tokens", "logprobs", "mask", "rewards", "truncated"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert [e.tolist() for e in got.segment_ends] == [e.tolist() for e in want.segment_ends]
        assert set(got.extras) == set(want.extras)
        for k in set(got.extras) - {"problem"}:  # problem ids are the stack's
            assert torch.equal(got.extras[k], want.extras[k]), k
    for f in ("traj", "index", "n_candidates", "prefix_len", "prompt"):
        assert np.array_equal(getattr(mine.candidates, f), getattr(alone.candidates, f)), f
    assert mine.candidates.features.keys() == alone.candidates.features.keys()
    for k, v in alone.candidates.features.items():
        assert np.array_equal(mine.candidates.features[k], v, equal_nan=True), k
    for f in ("candidate", "traj", "prompt", "prefix_len", "rel_depth", "n"):
        assert np.array_equal(getattr(mine.plan, f), getattr(alone.plan, f)), f
    assert np.array_equal(mine.labels, alone.labels)
    assert (mine.p_hat is None) == (alone.p_hat is None)
    if mine.p_hat is not None:
        assert np.array_equal(mine.p_hat, alone.p_hat)
    assert mine.stats == pytest.approx(alone.stats, abs=0, nan_ok=True) and mine.budget == alone.budget


def test_branch_requests_as_tensors_give_the_rollouts_of_request_objects():
    algo = method_config("deep-grpo")
    sets, stacked, pol, backend = _two_runs()
    n = sets[0].n
    prompts = [0, 1, 2, 3, n, n + 1, n + 2, n + 3]
    from deepgrpo.batch import SampleRequest
    main = backend.sample([SampleRequest(p, None, algo.explore.G) for p in prompts])
    planned = plan_replicas(main, np.repeat([0, 1], 4), algo, [None, None],
                            [np.random.default_rng(0), np.random.default_rng(1)])
    assert len(planned.plan) > 4
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    state = [g.get_state() for g in gens]
    backend.generators = gens
    a = backend.sample(planned.requests(prompts, main))
    for g, s in zip(gens, state):
        g.set_state(s)
    plan = planned.plan
    b = backend.sample_branches([prompts[p] for p in plan.prompt], main.tokens[plan.traj],
                                torch.from_numpy(plan.prefix_len), torch.from_numpy(plan.n))
    for name in ("tokens", "logprobs", "mask", "rewards", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(torch.equal(x, y) for x, y in zip(a.segment_ends, b.segment_ends))
    assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def _reference_candidates(main: Rollouts, failed_rows, prompt_index, group_success):
    """The per-row construction of candidates (as the core did before it was vectorised)."""
    lp_all = main.logprobs.double().numpy()
    rows = []
    for b in failed_rows:
        ends = main.segment_ends[b].numpy().astype(np.int64)
        L = ends.shape[0]
        if L == 0:
            continue
        starts = candidate_prefix_lengths(ends)
        length = int(ends[-1])
        surprisal = -lp_all[b, :length]
        cum = np.concatenate([[0.0], np.cumsum(lp_all[b, :length])])
        seg_max = np.maximum.reduceat(surprisal, starts)
        for i in range(L):
            rows.append({"traj": b, "index": i, "prefix_len": starts[i], "rel_depth": candidate_depths(L)[i],
                         "prefix_logprob": cum[starts[i]], "next_surprisal": seg_max[i],
                         "prev_surprisal": -np.inf if i == 0 else seg_max[i - 1],
                         "remaining_tokens": float(length - starts[i]),
                         "group_success_rate": group_success[prompt_index[b]]})
    return rows


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_vectorised_candidates_equal_the_per_row_construction(data):
    B, T = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 9))
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    seg = data.draw(st.integers(1, 4))
    ends = [torch.tensor(sorted(set(min(e, L) for e in range(seg, L + seg, seg)))) for L in lengths]
    lp = torch.tensor(data.draw(st.lists(st.floats(-9, 0, width=32), min_size=B * T, max_size=B * T))).view(B, T)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    main = Rollouts(tokens=torch.zeros(B, T, dtype=torch.long), logprobs=lp, mask=mask, rewards=torch.zeros(B),
                    segment_ends=ends)
    failed = np.array(sorted(data.draw(st.sets(st.integers(0, B - 1)))), dtype=np.int64)
    prompt_index = np.arange(B) // 2
    gs = np.linspace(0, 1, B)
    cands = build_candidates(main, failed, prompt_index, gs)
    ref = _reference_candidates(main, failed, prompt_index, gs)
    assert len(cands) == len(ref)
    for j, r in enumerate(ref):
        assert cands.traj[j] == r["traj"] and cands.index[j] == r["index"] and cands.prefix_len[j] == r["prefix_len"]
        for k in ("rel_depth", "prefix_logprob", "next_surprisal", "prev_surprisal", "remaining_tokens",
                  "group_success_rate"):
            assert cands.features[k][j] == r[k] or (np.isnan(r[k]) and np.isnan(cands.features[k][j])), k


def _sequential_cap(plan: BranchPlan, cap: int, order: np.ndarray) -> np.ndarray:
    n = plan.n.copy()
    used: dict[int, int] = {}
    for j in order:
        p = int(plan.prompt[j])
        left = cap - used.get(p, 0)
        planned = int(n[j])
        n[j] = max(0, min(planned, left))
        if n[j] == 1 and planned > 1:
            n[j] = 0
        used[p] = used.get(p, 0) + int(n[j])
    return n


@pytest.mark.parametrize("least", [2, 1])  # every point planned with >= 2 continuations, or some with one
@settings(max_examples=60, deadline=None)
@given(data=st.data(), cap=st.integers(0, 20), seed=st.integers(0, 2 ** 31))
def test_the_per_prompt_cap_equals_the_sequential_rule(least, data, cap, seed):
    points = sorted(data.draw(st.lists(st.tuples(st.integers(0, 3), st.integers(least, 9)), min_size=1,
                                       max_size=20)))  # prompts grouped, as plans are
    prompt = np.array([p for p, _ in points])
    plan = BranchPlan(candidate=np.arange(len(points)), traj=prompt * 2, prompt=prompt,
                      prefix_len=np.zeros(len(points), np.int64), rel_depth=np.full(len(points), 0.5),
                      n=np.array([n for _, n in points]))
    out = cap_plan(plan, cap, np.random.default_rng(seed))
    expected = _sequential_cap(plan, cap, np.random.default_rng(seed).permutation(len(points)))
    np.testing.assert_array_equal(out.n, expected[expected > 0])
    np.testing.assert_array_equal(out.candidate, plan.candidate[expected > 0])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["deep", "depth-only", "random-pivot", "informative", "root-only", "uniform",
                        "max-surprisal", "low-prob"]),
       st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1, max_size=3), st.integers(0, 999))
def test_each_replicas_plan_is_the_plan_it_gets_alone(strategy, runs, seed):
    """Replicas' candidates side by side (rows of different widths): each replica's picks and
    continuation counts are those of planning it alone with its own generator."""
    cfg = ExploreConfig(strategy=strategy, K=4, n_pivots=2, n_cut_points=2)
    sets = []
    for r, widths in enumerate(runs):
        rng = np.random.default_rng([seed, r])
        traj = np.repeat(np.arange(len(widths)), widths)
        index = np.concatenate([np.arange(w) for w in widths])
        L = np.repeat(widths, widths)
        N = traj.shape[0]
        feats = {"rel_depth": (index + 1) / (L + 1), "remaining_tokens": (L - index).astype(float),
                 "next_surprisal": rng.random(N), "prev_surprisal": np.where(index == 0, -np.inf, rng.random(N))}
        sets.append(CandidateSet(traj=traj, index=index, n_candidates=L, prefix_len=index, prompt=traj // 2,
                                 features=feats))
    p_hats = [np.random.default_rng([seed, 9, r]).random(len(c)) for r, c in enumerate(sets)]
    alone = [plan_branches(c, cfg, p, np.random.default_rng([seed, 7, r]))
             for r, (c, p) in enumerate(zip(sets, p_hats))]
    t0 = np.cumsum([0] + [int(c.traj.max()) + 1 for c in sets])
    p0 = np.cumsum([0] + [int(c.prompt.max()) + 1 for c in sets])
    c0 = np.cumsum([0] + [len(c) for c in sets])
    joint = CandidateSet(traj=np.concatenate([c.traj + t0[r] for r, c in enumerate(sets)]),
                         index=np.concatenate([c.index for c in sets]),
                         n_candidates=np.concatenate([c.n_candidates for c in sets]),
                         prefix_len=np.concatenate([c.prefix_len for c in sets]),
                         prompt=np.concatenate([c.prompt + p0[r] for r, c in enumerate(sets)]),
                         features={k: np.concatenate([c.features[k] for c in sets]) for k in sets[0].features},
                         replica=np.concatenate([np.full(len(c), r) for r, c in enumerate(sets)]))
    together = plan_branches(joint, cfg, np.concatenate(p_hats),
                             [np.random.default_rng([seed, 7, r]) for r in range(len(sets))])
    for r, plan in enumerate(alone):
        mine = together.replica == r
        np.testing.assert_array_equal(together.candidate[mine] - c0[r], plan.candidate)
        np.testing.assert_array_equal(together.n[mine], plan.n)


def test_micro_batches_split_each_run_as_it_would_be_split_alone():
    algo = method_config("deep-grpo")
    sets, stacked, pol, backend = _two_runs()
    n = sets[0].n
    step = explore_replicas(backend, [0, 1, n, n + 1], np.array([0, 0, 1, 1]), algo, [None, None],
                            [np.random.default_rng(0), np.random.default_rng(1)], [BudgetLedger(), BudgetLedger()])
    batch = step.batch
    chunks = batch.chunks(5)
    for r in range(2):
        own = batch.select(batch.replica == r)
        mine = [c.extras["row"][c.replica == r] for c in chunks]
        mine = [m for m in mine if len(m)]
        expected = [c.extras["row"] for c in own.chunks(5)] if len(own) > 5 else [own.extras["row"]]
        assert [m.tolist() for m in mine] == [e.tolist() for e in expected]


def test_a_batched_sweep_writes_the_tables_of_one_run_at_a_time(tmp_path):
    """The same cells run batched and one by one give byte-identical tables (the studies' worker)."""
    runner = {"batch_problems": 4, "steps": 60, "budget": 3_000, "budget_unit": "tokens"}
    cells = [Cell("t", f"{m} | {i}", seed, {"method": m, "algo": {}, "spec": spec.to_dict(), "runner":
                                             {**runner, "lr": lr}, "probes": []}, {"m": m})
             for m in ("grpo", "deep-grpo") for i, spec in enumerate(SPECS[:2]) for seed in (0, 1)
             for lr in (0.2, 0.4)]
    assert len({sim_batch_key(c) for c in cells}) == 2
    one = run_sweep(cells, run_sim_cell, tmp_path / "one", "runs", workers=1, progress=False,
                    complete=sim_run_complete)
    batched = run_sweep(cells, run_sim_cell, tmp_path / "batched", "runs", workers=1, progress=False,
                        complete=sim_run_complete, batch_worker=run_sim_cells, batch_key=sim_batch_key)
    assert (tmp_path / "one" / "runs.csv").read_bytes() == (tmp_path / "batched" / "runs.csv").read_bytes()
    assert len(one) == len(batched) > len(cells)
