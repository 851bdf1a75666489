import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import ci_errorbar, mean_ci, paired_by_seed, paired_difference, paired_rows, summarize
from analysis.sweep import Cell, cells_done, run_sweep
from analysis.tables import markdown_table


def test_mean_ci_matches_scipy_on_known_input():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    e = mean_ci(x)
    half = stats.t.ppf(0.975, 4) * np.std(x, ddof=1) / np.sqrt(5)
    assert e.mean == 3.0 and e.n == 5
    assert e.half_width == pytest.approx(half) and half == pytest.approx(1.9632, abs=1e-4)
    assert e.fmt(2) == "3.00 ± 1.96"
    single = mean_ci([0.4])
    assert single.mean == 0.4 and np.isnan(single.half_width)
    const = mean_ci([0.2, 0.2, 0.2])
    assert const.low == const.high == 0.2


def test_paired_difference_matches_ttest_rel():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.1, 8)
    b = a - 0.05 + rng.normal(0, 0.02, 8)
    e = paired_difference(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert e.mean == pytest.approx(np.mean(a - b))
    assert (e.low, e.high) == pytest.approx((ci.low, ci.high))
    # pairing matters: the paired CI is much narrower than the unpaired one here
    unpaired = stats.ttest_ind(a, b).confidence_interval(0.95)
    assert e.high - e.low < (unpaired.high - unpaired.low) / 2
    with pytest.raises(ValueError, match="equal shapes"):
        paired_difference([1, 2], [1])


def test_summarize_and_paired_by_seed():
    f = pd.DataFrame({"variant": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                      "v": [1.0, 2.0, 3.0, 0.5, 1.5, 2.0]})
    s = summarize(f, ["variant"], "v")
    assert s.set_index("variant").loc["a", "mean"] == 2.0 and (s.n == 3).all()
    d = paired_by_seed(f, "variant", "v", "a", "b")
    assert d.mean == pytest.approx(np.mean([0.5, 0.5, 1.0]))
    # paired_rows matches on seed whatever the row order, and drops unpaired seeds
    a = f[f.variant == "a"].iloc[::-1]
    b = pd.concat([f[f.variant == "b"], pd.DataFrame({"variant": ["b"], "seed": [7], "v": [9.0]})])
    e = paired_rows(a, b, "v")
    assert (e.mean, e.n) == (pytest.approx(d.mean), 3) and (e.low, e.high) == pytest.approx((d.low, d.high))
    with pytest.raises(ValueError, match="one row per seed"):
        paired_rows(f, b, "v")
    assert ci_errorbar([1.0, 2.0, 3.0]) == pytest.approx((mean_ci([1.0, 2.0, 3.0]).low, mean_ci([1.0, 2.0, 3.0]).high))
    assert ci_errorbar([0.4]) == (0.4, 0.4)


CALLS = []


def counting_worker(cell: Cell):
    CALLS.append(cell.key)
    return [{"step": t, "value": cell.params["x"] * t + cell.seed} for t in range(3)]


def test_sweep_skips_finished_cells_and_writes_tidy_table(tmp_path):
    cells = [Cell("s", f"x={x}", seed, {"x": x}) for x in (1, 2) for seed in (0, 1)]
    CALLS.clear()
    t1 = run_sweep(cells, counting_worker, tmp_path, "runs", workers=1, progress=False)
    assert len(CALLS) == 4 and len(t1) == 12
    assert list(t1.columns[:2]) == ["study", "variant"] and {"seed", "step", "value"} <= set(t1.columns)
    CALLS.clear()
    t2 = run_sweep(cells, counting_worker, tmp_path, "runs", workers=1, progress=False)
    assert CALLS == [] and t2.equals(t1)
    more = cells + [Cell("s", "x=3", 0, {"x": 3})]
    assert cells_done(more, tmp_path) == 4
    run_sweep(more, counting_worker, tmp_path, "runs", workers=1, progress=False)
    assert len(CALLS) == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_markdown_table():
    md = markdown_table(pd.DataFrame({"a": ["x|y"], "b": [0.12345], "c": [float("nan")]}), digits=2)
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x\\|y | 0.12 | – |"]


def seed_worker(cell: Cell):
    return [{"step": t, "value": cell.params["x"] * t} for t in range(2)]


def clashing_worker(cell: Cell):
    return [{"step": 0, "rule": "from the worker"}]


def test_sweep_writes_cell_parameters_as_columns(tmp_path):
    cells = [Cell("s", f"{rule} M={m}", seed, {"x": m}, {"rule": rule, "M": m, "gamma": None})
             for rule, m in (("dense", 1), ("uniform", 4)) for seed in (0, 1)]
    t = run_sweep(cells, seed_worker, tmp_path, "runs", workers=1, progress=False)
    assert list(t.columns[:5]) == ["study", "variant", "rule", "M", "gamma"]
    reread = pd.read_csv(tmp_path / "runs.csv")
    for c in cells:
        rows = reread[(reread.variant == c.variant) & (reread.seed == c.seed)]
        assert len(rows) == 2 and (rows.rule == c.columns["rule"]).all() and (rows.M == c.columns["M"]).all()
        assert rows.gamma.isna().all() and (rows.value == c.columns["M"] * rows.step).all()
    # the columns are part of the cell's identity (a different parameter is a different run)
    assert Cell("s", "v", 0, {}, {"M": 1}).key != Cell("s", "v", 0, {}, {"M": 2}).key
    with pytest.raises(ValueError, match="both study parameters and worker columns"):
        run_sweep([Cell("s", "v", 0, {}, {"rule": "dense"})], clashing_worker, tmp_path / "clash", "runs",
                  workers=1, progress=False)
    assert not list((tmp_path / "clash").rglob("*.csv"))
    for bad in ({"seed": 1}, {"variant": "x"}, {"M": [1, 2]}):
        with pytest.raises(ValueError, match="Cell column"):
            Cell("s", "v", 0, {}, bad)


# -- Holm, TOST and families: hand-computed numbers ----------------------------------------------

from analysis.stats import Comparison, compare_family, holm, holm_confidence, paired_pvalue, tost_pvalue  # noqa: E402


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # NaN is not counted: m = 2; 0.001 x 2 = 0.002, 0.5 x 1 = 0.5
    out = holm([0.5, 0.001, float("nan")])
    assert out[:2] == pytest.approx([0.5, 0.002]) and np.isnan(out[2])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    # interval levels: the i-th smallest p is tested at alpha / (m - i + 1) until Holm stops:
    # 0.01 < 0.05/3 is rejected, 0.03 >= 0.05/2 is not, so 0.04 keeps the level of 0.03
    assert holm_confidence([0.01, 0.04, 0.03], 0.05) == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05 / 2])
    # all rejected: every rank its own level
    assert holm_confidence([0.001, 0.02, 0.01], 0.05) == pytest.approx([1 - 0.05 / 3, 0.95, 1 - 0.05 / 2])


def test_holm_intervals_agree_with_holm_verdicts():
    """An interval excludes 0 exactly when Holm rejects (also past Holm's first non-rejection)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        m, n = int(rng.integers(1, 6)), int(rng.integers(3, 8))
        ref = pd.DataFrame({"seed": range(n), "v": rng.normal(0, 1, n)})
        others = [(f"o{i}", pd.DataFrame({"seed": range(n), "v": ref.v - rng.normal(rng.normal(0, 1), 0.7, n)}))
                  for i in range(m)]
        for c in compare_family(ref, others, "v"):
            assert (c.diff.low > 0 or c.diff.high < 0) == (c.p_holm < 0.05), c


def test_paired_t_and_tost_by_hand():
    """d = a - b = (0.01, 0.02, 0.03): mean 0.02, sd 0.01, se 0.01/sqrt(3), 2 degrees of freedom,
    where Student's t has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2))."""
    a, b = [0.51, 0.52, 0.53], [0.5, 0.5, 0.5]
    F = lambda t: 0.5 + t / (2 * np.sqrt(2 + t * t))  # noqa: E731
    t0 = 0.02 / (0.01 / np.sqrt(3))  # 2 sqrt(3)
    assert paired_pvalue(a, b) == pytest.approx(2 * (1 - F(t0)), abs=1e-9)
    assert paired_pvalue(a, b) == pytest.approx(0.0741799, abs=1e-6)
    # margin 0.03: upper test t = (0.02 - 0.03) / se = -sqrt(3) -> p = F(-sqrt 3) = 0.1127017 (not shown)
    assert tost_pvalue(a, b, 0.03) == pytest.approx(0.1127017, abs=1e-6)
    # margin 0.05: t = -3 sqrt(3) -> 0.0175485 (lower test: t = 7 sqrt(3) -> 0.0033671): equivalent at 5 %
    assert tost_pvalue(a, b, 0.05) == pytest.approx(0.0175485, abs=1e-6)
    assert np.isnan(tost_pvalue([0.1], [0.2], 0.05)) and np.isnan(paired_pvalue([0.1], [0.2]))
    assert tost_pvalue([0.1, 0.1], [0.1, 0.1], 0.01) == 0.0 and paired_pvalue([0.1, 0.1], [0.1, 0.1]) == 1.0
    with pytest.raises(ValueError, match="margin"):
        tost_pvalue(a, b, 0.0)


def test_compare_family_verdicts_and_holm_intervals():
    seeds = [0, 1, 2]
    ref = pd.DataFrame({"seed": seeds, "v": [0.51, 0.52, 0.53]})
    same = pd.DataFrame({"seed": seeds[::-1], "v": [0.5, 0.5, 0.5]})  # row order does not matter
    low = pd.DataFrame({"seed": seeds, "v": [0.11, 0.10, 0.12]})
    [c] = compare_family(ref, [("same", same)], "v", margin=0.05)
    assert c.verdict == "equivalent" and c.p_tost_holm == pytest.approx(0.0175485, abs=1e-6)
    assert c.diff.confidence == 0.95 and c.diff.mean == pytest.approx(0.02)
    assert "equivalent within ±0.05" in c.fmt()
    [c] = compare_family(ref, [("same", same)], "v", margin=0.03)
    assert c.verdict == "inconclusive" and "not shown" in c.fmt()
    fam = compare_family(ref, [("same", same), ("low", low)], "v", margin=0.03)
    assert [c.verdict for c in fam] == ["inconclusive", "higher"]
    # two comparisons: raw p-values Holm-adjusted, the smaller one's interval at 97.5 %
    assert fam[1].p < fam[0].p and fam[1].p_holm == pytest.approx(2 * fam[1].p)
    assert fam[0].p_holm == pytest.approx(max(fam[0].p, 2 * fam[1].p))
    assert fam[1].diff.confidence == pytest.approx(0.975) and fam[0].diff.confidence == pytest.approx(0.95)
    d = np.array([0.40, 0.42, 0.41])
    half = stats.t.ppf(1 - 0.025 / 2, 2) * d.std(ddof=1) / np.sqrt(3)
    assert (fam[1].diff.low, fam[1].diff.high) == pytest.approx((d.mean() - half, d.mean() + half))
    one = compare_family(ref.iloc[:1], [("low", low)], "v")[0]
    assert one.verdict == "inconclusive" and "n = 1" in one.fmt()
    assert isinstance(one, Comparison)


# -- the equal-budget protocol --------------------------------------------------------------------

from analysis.protocol import budget_table, choose_rates, common_end, value_and_auc  # noqa: E402


def test_value_at_budget_and_auc_by_hand():
    spend, value = np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 1.0])
    # at 15: value 1; area = triangle 0-10 (5) + rectangle 10-15 (5) = 10, / 15
    assert value_and_auc(spend, value, 15.0) == pytest.approx((1.0, 10 / 15))
    # at 5: value 0.5; area = 0.5 * 5 * 0.5 = 1.25, / 5
    assert value_and_auc(spend, value, 5.0) == pytest.approx((0.5, 0.25))
    assert value_and_auc(spend, value, 20.0) == pytest.approx((1.0, 0.75))


def _toy_runs(lr_b: float = 0.2) -> pd.DataFrame:
    """Two variants, two seeds: a cheap one (10 tokens, 1 rollout per step) and a dear one (25
    tokens, 5 rollouts per step), both stopped at a 50-token budget."""
    rows = []
    for variant, tok, ro, gain, lr in (("cheap", 10, 1, 0.1, 0.1), ("dear", 25, 5, 0.3, lr_b)):
        for seed in (0, 1):
            steps = int(np.ceil(50 / tok))
            for t in range(steps + 1):
                rows.append({"variant": variant, "seed": seed, "step": t, "tokens": tok * t, "rollouts": ro * t,
                             "pass1": 0.1 + gain * t + 0.01 * seed, "lr": lr, "budget": 50, "budget_unit": "tokens"})
    return pd.DataFrame(rows)


def test_budget_table_on_the_common_grid():
    runs = _toy_runs()
    # tokens (the stopping unit): every run reached 50; rollouts: the cheap runs end at 5, the dear ones at 15
    assert common_end(runs, "tokens") == 50 and common_end(runs, "rollouts") == 5
    t = budget_table(runs).set_index(["variant", "seed"])
    assert t.loc[("cheap", 0), "steps"] == 5 and t.loc[("dear", 0), "steps"] == 2
    assert t.reached_budget.all()
    # cheap, seed 0: pass1 = 0.1 + 0.1 * tokens / 10 -> 0.6 at 50 tokens; mean over 0-50 = 0.35
    assert t.loc[("cheap", 0), "pass1_at_tokens"] == pytest.approx(0.6)
    assert t.loc[("cheap", 0), "pass1_auc_tokens"] == pytest.approx(0.35)
    # dear, seed 1: 0.11 + 0.3 * tokens / 25 -> 0.71 at 50; over rollouts 0-5 (1 step): 0.41 at 5, mean 0.26
    assert t.loc[("dear", 1), "pass1_at_tokens"] == pytest.approx(0.71)
    assert t.loc[("dear", 1), "pass1_at_rollouts"] == pytest.approx(0.41)
    assert t.loc[("dear", 1), "pass1_auc_rollouts"] == pytest.approx(0.26)
    # stopped at 4 rollouts instead: the common rollout range ends at the budget, not at 5
    by_rollouts = runs.assign(budget=4, budget_unit="rollouts")
    assert common_end(by_rollouts, "rollouts") == 4 and common_end(by_rollouts, "tokens") == 50
    t = budget_table(by_rollouts).set_index(["variant", "seed"])
    assert t.loc[("cheap", 0), "pass1_at_rollouts"] == pytest.approx(0.5)  # 0.1 + 0.1 * 4
    assert t.reached_budget.all()


def test_choose_rates_takes_the_best_criterion_and_flags_the_grid_edge():
    runs = pd.concat([_toy_runs(0.2), _toy_runs(0.4).query("variant == 'dear'").assign(
        pass1=lambda f: f.pass1 + 0.05)], ignore_index=True)
    table = choose_rates(runs)
    assert list(table.variant) == ["cheap", "dear", "dear"] and list(table.lr) == [0.1, 0.2, 0.4]
    chosen = table[table.chosen]
    assert dict(zip(chosen.variant, chosen.lr)) == {"cheap": 0.1, "dear": 0.4}
    # criterion = mean over seeds of the tokens AUC: dear at 0.2: 0.1 + 0.3 * 1 + 0.005 = 0.405
    dear = table.set_index(["variant", "lr"]).criterion
    assert dear["dear", 0.2] == pytest.approx(0.405) and dear["dear", 0.4] == pytest.approx(0.455)
    assert table.set_index(["variant", "lr"]).loc[("dear", 0.4), "edge"]
    assert not table.set_index(["variant", "lr"]).loc[("cheap", 0.1), "edge"]  # a grid of one has no edge


CALLS_BEFORE_STOP = []


def interrupting_worker(cell: Cell):
    if cell.seed == 2:
        raise KeyboardInterrupt
    CALLS_BEFORE_STOP.append(cell.seed)
    return [{"step": 0, "value": 1.0}]


def test_ctrl_c_in_a_sweep_keeps_finished_cells_and_says_so(tmp_path):
    from deepgrpo.records import Interrupted
    cells = [Cell("s", "v", seed, {}) for seed in range(4)]
    with pytest.raises(Interrupted, match=r"2 of 4 runs are finished and kept in .*cells; rerun the same command"):
        run_sweep(cells, interrupting_worker, tmp_path, "runs", workers=1, progress=False)
    assert CALLS_BEFORE_STOP == [0, 1] and cells_done(cells, tmp_path) == 2
    assert not (tmp_path / "runs.csv").exists()


def test_extend_grids_moves_past_an_end_where_the_best_rate_lies_up_to_the_limits():
    from analysis.protocol import extend_grids
    table = pd.DataFrame({"variant": ["a", "a", "b", "b", "c", "c", "c"], "lr": [0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.4],
                          "chosen": [False, True, True, False, False, True, False]})
    grids = {"a": [0.1, 0.2], "b": [0.1, 0.2], "c": [0.1, 0.2, 0.4]}
    assert extend_grids(table, grids, 0.05, 0.4)
    # a: best at the top -> 0.4; b: best at the bottom -> 0.05; c: best inside -> unchanged
    assert grids == {"a": [0.1, 0.2, 0.4], "b": [0.1, 0.2, 0.05], "c": [0.1, 0.2, 0.4]}
    at_limits = pd.DataFrame({"variant": ["a", "a", "b", "b"], "lr": [0.2, 0.4, 0.05, 0.1],
                              "chosen": [False, True, True, False]})
    grids = {"a": [0.2, 0.4], "b": [0.05, 0.1]}
    assert not extend_grids(at_limits, grids, 0.05, 0.4) and grids == {"a": [0.2, 0.4], "b": [0.05, 0.1]}


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_fast_t_functions_equal_scipy_stats(n):
    """The intervals and p-values go through scipy.special's t ufuncs for speed; they must equal
    scipy.stats' t-interval, ttest_rel and the one-sided t tails."""
    from scipy import stats as st
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    e = mean_ci(a)
    assert np.allclose([e.low, e.high], st.t.interval(0.95, df=n - 1, loc=a.mean(), scale=st.sem(a)), rtol=1e-12)
    d = paired_difference(a, b, 0.99)
    ci = st.ttest_rel(a, b).confidence_interval(0.99)
    assert np.allclose([d.low, d.high], [ci.low, ci.high], rtol=1e-12)
    assert np.isclose(paired_pvalue(a, b), st.ttest_rel(a, b).pvalue, rtol=1e-12)
    diff = a - b
    m, se = diff.mean(), diff.std(ddof=1) / np.sqrt(n)
    ref = max(st.t.sf((m + 0.3) / se, n - 1), st.t.cdf((m - 0.3) / se, n - 1))
    assert np.isclose(tost_pvalue(a, b, 0.3), ref, rtol=1e-12)


def test_minimum_detectable_effect_by_hand_and_its_power():
    from analysis.stats import minimum_detectable_effect
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4)  # differences 1..4: sd 1.29099, n = 4
    q = stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)  # 3.18245 + 0.97847
    assert minimum_detectable_effect(a, b) == pytest.approx(q * 1.2909944487358056 / 2, rel=1e-12)
    # Holm's strictest step over 3 tests is the test at 0.05 / 3
    q3 = stats.t.ppf(1 - 0.05 / 6, 3) + stats.t.ppf(0.8, 3)
    assert minimum_detectable_effect(a, b, tests=3) == pytest.approx(q3 * 1.2909944487358056 / 2, rel=1e-12)
    assert np.isnan(minimum_detectable_effect([1.0], [0.0]))
    assert minimum_detectable_effect([0.3, 0.3], [0.1, 0.1]) == 0.0
    # at n = 20 a true effect equal to the MDE is found about 80 % of the time (exact non-central t power)
    rng = np.random.default_rng(0)
    d = rng.normal(size=20)
    mde = minimum_detectable_effect(d, np.zeros(20))
    ncp = mde / (d.std(ddof=1) / np.sqrt(20))
    crit = stats.t.ppf(0.975, 19)
    power = stats.nct.sf(crit, 19, ncp) + stats.nct.cdf(-crit, 19, ncp)
    assert 0.77 < power < 0.81
