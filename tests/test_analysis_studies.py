"""The studies: smoke grids in the default tier (every study's pipeline, its parameter columns
and the numbers they imply), the quick grids in the slow tier."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.report import write_report
from analysis.studies import QUICK, SMOKE, STUDIES, final_rows, run_study
from sims.spec import TokenTreeSpec

SEEDS = [0, 1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("smoke")
    for name in STUDIES:
        run_study(name, out, seeds=len(SEEDS), size="smoke", workers=1, progress=False)
    return out


def _runs(root, name):
    return pd.read_csv(root / name / "runs.csv")


def _same(a, b) -> bool:
    """Equal, with None/NaN equal to NaN (how a CSV reads an empty cell)."""
    if b is None or (isinstance(b, float) and np.isnan(b)):
        return bool(pd.isna(a))
    return a == b


def _check_tables(root, name, size, size_name):
    """Shared checks of a finished study directory: one run per cell with the cell's parameter
    columns on every row, one summary row per variant with n = seeds, figure, record."""
    study = STUDIES[name]
    d = root / name
    runs = pd.read_csv(d / "runs.csv")
    cells = study.grid(SEEDS, size_name)
    assert runs.groupby(["variant", "seed"]).ngroups == len(cells)
    assert set(runs.seed) == set(SEEDS)
    assert (runs.groupby(["variant", "seed"]).step.max() == size.steps).all()
    assert (runs.groupby(["variant", "seed"]).size() == size.steps + 1).all()
    assert runs.pass1.between(0, 1).all()
    for cell in cells:
        rows = runs[(runs.variant == cell.variant) & (runs.seed == cell.seed)]
        assert set(cell.columns) <= set(runs.columns)
        for col, value in cell.columns.items():
            assert all(_same(v, value) for v in rows[col]), (cell.variant, col, value)
        assert (rows.method == cell.params["method"]).all()
    summary = pd.read_csv(d / "summary.csv")
    variants = list(dict.fromkeys(c.variant for c in cells))
    assert sorted(summary.variant) == sorted(variants) and summary.n.eq(len(SEEDS)).all()
    for cell in cells:  # the summary carries each variant's parameters
        row = summary[summary.variant == cell.variant].iloc[0]
        for col in study.params:
            value = cell.columns.get(col, cell.params["method"] if col == "method" else None)
            assert _same(row[col], value), (cell.variant, col)
    png = (d / f"{name}.png").read_bytes()
    assert png[:8] == PNG and len(png) > 20_000
    meta = json.loads((d / "study.json").read_text())
    assert meta["cells"] == len(cells) and meta["size"] == size_name and meta["params"] == list(study.params)
    assert not list(d.rglob("*.tmp"))
    return runs, summary


# -- default tier: smoke grids ----------------------------------------------------------------

def test_smoke_variants_are_two_of_each_full_grid():
    for name, study in STUDIES.items():
        full = {c.variant for c in study.cells(SEEDS, QUICK)}
        assert len(study.smoke) == 2 and set(study.smoke) <= full, name
        assert len(study.grid(SEEDS, "smoke")) == 2 * len(SEEDS)


@pytest.mark.parametrize("name", list(STUDIES))
def test_smoke_study_tables_columns_and_figure(smoke_results, name):
    runs, summary = _check_tables(smoke_results, name, SMOKE, "smoke")
    # the summary's value columns are the means over seeds of the run values
    if "pass1" in summary and name in ("root-saturation", "lambda-k", "budget-frontier"):
        fin = final_rows(runs).groupby("variant").pass1.mean()
        assert np.allclose(summary.set_index("variant").pass1.loc[fin.index], fin)


def test_smoke_root_saturation_budget_follows_N(smoke_results):
    runs = _runs(smoke_results, "root-saturation")
    P = SMOKE.batch_problems
    grpo = runs[runs.method == "grpo"]
    assert (grpo.rollouts == grpo.step * P * grpo.N).all() and (grpo.rollouts_aux == 0).all()
    deep = runs[runs.method == "deep-grpo"]
    assert (deep.rollouts_main == deep.step * P * deep.N).all()
    pivots = deep.pivots.fillna(0).groupby([deep.seed]).cumsum()
    assert (deep.rollouts_aux == deep.K * pivots).all() and deep.rollouts_aux.max() > 0


def test_smoke_depth_bias_pivot_rule_and_recovery(smoke_results):
    runs = _runs(smoke_results, "depth-bias")
    train = runs[runs.step > 0]
    root = train[train.pivot_rule == "root-only"]
    deep = train[train.gamma == 2.0]
    assert len(root) and len(deep)
    spec = TokenTreeSpec()
    # root-only branches from candidate 0 (relative depth 1 / (L + 1)), whose prefix is empty:
    # every pivot sits before the chain's first error
    assert np.allclose(root.pivot_depth_mean, 1 / (spec.depth // spec.segment_len + 1))
    assert (root.pivot_before_error == 1.0).all()
    assert deep.pivot_depth_mean.mean() > 3 * root.pivot_depth_mean.mean()
    assert deep.pivot_before_error.mean() < 1.0
    # recovery is a column of the spec: before any update, chains that may recover succeed more often
    start = runs[runs.step == 0].set_index(["recovery", "seed"]).pass1
    for s in SEEDS:
        assert start["decay", s] > start["fatal", s]


def test_smoke_dilution_equal_budget_and_baseline_variance(smoke_results):
    runs = _runs(smoke_results, "dilution")
    train = runs[runs.step > 0]
    # dense (1 point x K) and dispersed (M points x K/M) spend the same K = 8 per failed chain
    assert (train.step_rollouts_aux == 8 * train.failed).all()
    by_rule = train.groupby("rule").baseline_var.mean()
    assert by_rule["dense"] < by_rule["uniform"]
    assert set(runs.groupby("rule").M.first().items()) == {("dense", 1), ("uniform", 4)}


def test_smoke_lambda_k_budget_follows_K(smoke_results):
    runs = _runs(smoke_results, "lambda-k")
    cum_pivots = runs.pivots.fillna(0).groupby([runs.variant, runs.seed]).cumsum()
    assert (runs.rollouts_aux == runs.K * cum_pivots).all()
    assert set(map(tuple, runs[["knob", "value", "lam", "K"]].drop_duplicates().to_numpy().tolist())) == {
        ("lambda", 1.0, 1.0, 8), ("K", 4.0, 1.0, 4)}


def test_smoke_frontier_metrics(smoke_results):
    runs = _runs(smoke_results, "budget-frontier")
    summary = pd.read_csv(smoke_results / "budget-frontier" / "summary.csv").set_index("variant")
    for v, g in runs.groupby("variant"):
        # an AUC (mean of pass@1 over a budget range) lies within the run's pass@1 values
        assert g.pass1.min() - 1e-9 <= summary.loc[v, "auc_rollouts"] <= g.pass1.max() + 1e-9
        assert summary.loc[v, "reached_target"] <= len(SEEDS)
    fin = final_rows(runs).set_index("variant")
    assert (fin.loc["grpo N=8"].rollouts == SMOKE.steps * SMOKE.batch_problems * 8).all()
    assert np.isnan(summary.loc["grpo N=8", "K"]) and summary.loc["deep-grpo", "K"] == 8


def test_smoke_recoverability_estimator_column_drives_the_estimator(smoke_results):
    runs = _runs(smoke_results, "recoverability")
    assert (runs.heterogeneity == 1.0).all()
    state = runs[runs.estimator == "state"]
    pos = runs[runs.estimator == "position"]
    # only the state-aware estimator has state features; both get fitted within 4 steps
    assert state.est_group_success_rate.notna().any() and pos.est_group_success_rate.isna().all()
    assert pos.est_rel_depth.notna().any()
    late = runs[runs.step == SMOKE.steps]
    assert late.ece_pos.between(0, 1).all() and late.ece_state.between(0, 1).all()


def test_the_reference_cell_gives_the_same_numbers_in_every_study(smoke_results):
    """deep-grpo with default settings on the default spec appears in five smoke grids: the same
    configuration and seed must give the same run wherever it is."""
    ref = {"root-saturation": "deep-grpo G=8 K=8", "depth-bias": "fatal | gamma=2", "dilution": "dense M=1",
           "lambda-k": "lambda=1", "budget-frontier": "deep-grpo", "recoverability": "h=1 | position"}
    finals = []
    for name, variant in ref.items():
        runs = _runs(smoke_results, name)
        finals.append(final_rows(runs[runs.variant == variant]).sort_values("seed")[["pass1", "rollouts"]].to_numpy())
    for f in finals[1:]:
        assert np.array_equal(f, finals[0])


def test_rerun_does_no_repeated_work(smoke_results):
    d = smoke_results / "lambda-k" / "cells"
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    run_study("lambda-k", smoke_results, seeds=len(SEEDS), size="smoke", workers=1, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before


def _check_report(root):
    text = write_report(root).read_text()
    for name in STUDIES:
        assert f"## {name}" in text and f"({name}/{name}.png)" in text
        runs = _runs(root, name)
        assert f"{runs.groupby(['variant', 'seed']).ngroups} runs ({runs.variant.nunique()} variants x 2 seeds" in text
    assert "Not run in this directory" not in text
    for bad in ("TODO", "TBD", "placeholder", "XXX", " nan", "{", "}"):
        assert bad not in text
    assert text.count("**Findings**") == len(STUDIES)
    return text


def test_report_of_smoke_results(smoke_results):
    text = _check_report(smoke_results)
    assert text.count("smoke size") == len(STUDIES)
    init = _runs(smoke_results, "root-saturation").query("step == 0").pass1.mean()
    assert f"Initial exact pass@1 is {init:.3f}" in text


def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys):
    from deepgrpo.cli import main
    assert main(["study", "root-saturation", "--seeds", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--seeds = 0" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
    assert main(["report", "--results", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no study results" in err and len(err.strip().splitlines()) == 1


# -- slow tier: the quick grids ---------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("quick")
    for name in STUDIES:
        run_study(name, out, seeds=len(SEEDS), size="quick", workers=2, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_study_tables_columns_and_figure(quick_results, name):
    _check_tables(quick_results, name, QUICK, "quick")


@pytest.mark.slow
def test_quick_study_specific_measurements(quick_results):
    dil = _runs(quick_results, "dilution")
    late = dil[dil.step > 0]
    assert late.found_rate.dropna().between(0, 1).all() and (late.baseline_var.dropna() >= 0).all()
    # K continuations at one point estimate the local baseline with less variance than K/8 at each of 8
    by = late.groupby(["rule", "M"]).baseline_var.mean()
    assert by["dense", 1] < by["uniform", 8]
    rec = _runs(quick_results, "recoverability")
    fitted = rec.dropna(subset=["ece_pos", "ece_state"])
    assert len(fitted) > 0 and fitted.ece_pos.between(0, 1).all()
    assert set(rec.heterogeneity) == {0.0, 0.5, 1.0}
    root = _runs(quick_results, "root-saturation")
    fin = final_rows(root[root.method == "grpo"]).groupby("N").rollouts.mean()
    assert fin[64] == 16 * fin[4] == 64 * QUICK.steps * QUICK.batch_problems  # budget scales with N exactly
    depth = _runs(quick_results, "depth-bias")
    assert depth.groupby(["recovery", "pivot_rule"]).ngroups == 3 * 9


@pytest.mark.slow
def test_report_of_quick_results(quick_results):
    text = _check_report(quick_results)
    assert text.count("quick size") == len(STUDIES) and "Doubling N from 32 to 64" in text
