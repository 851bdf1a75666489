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
