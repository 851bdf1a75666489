"""The studies: smoke grids in the default tier (every study's pipeline under the equal-budget
protocol, its tuning stage, its parameter columns and the numbers they imply), the quick grids in
the slow tier."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.protocol import TUNING_SEED_BASE, budget_table
from analysis.report import write_report
from analysis.studies import QUICK, SMOKE, STUDIES, final_rows, lr_grid, run_study
from sims.spec import TokenTreeSpec

SEEDS = [0, 1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
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


def _check_budget_stops(runs, size):
    """Every run stopped at the first step at which it had spent at least the budget."""
    unit = runs.budget_unit.iloc[0]
    budget = size.budget[unit]
    assert (runs.budget == budget).all() and runs.budget_unit.nunique() == 1
    for _, g in runs.groupby(["variant", "lr", "seed"]):
        spend = g.sort_values("step")[unit].to_numpy()
        assert spend[-1] >= budget and (spend[:-1] < budget).all()
        assert g.step.max() <= size.max_steps


def _check_tuning(d, cells, size):
    """The tuning runs: every variant x rate on tuning seeds only (disjoint from the evaluation
    seeds, with their own problem sets); the chosen rate is the best mean AUC of training pass@1
    over the budget, recomputed here from the tuning runs; the evaluation runs use it."""
    tuning = pd.read_csv(d / "tuning" / "runs.csv")
    variants = list(dict.fromkeys(c.variant for c in cells))
    seeds = {TUNING_SEED_BASE + i for i in range(size.tuning_seeds)}
    assert set(tuning.seed) == seeds and not seeds & set(SEEDS)
    grid = lr_grid(size)
    lo, hi = grid[0] / 2 ** size.max_extensions, grid[-1] * 2 ** size.max_extensions
    for _, g in tuning.groupby("variant"):
        tried = sorted(g.lr.unique())
        assert set(grid) <= set(tried) and lo - 1e-12 <= tried[0] and tried[-1] <= hi + 1e-12
        assert all(np.isclose(b, 2 * a) for a, b in zip(tried, tried[1:]))  # extended by factors of 2
        assert g.groupby("lr").seed.nunique().eq(len(seeds)).all()
    assert set(tuning.variant) == set(variants)
    _check_budget_stops(tuning, size)
    table = pd.read_csv(d / "tuned_lr.csv")
    assert table.groupby("variant").chosen.sum().eq(1).all()
    for r in table[table.chosen].itertuples():  # a rate at an end of its grid only at the limit
        tried = table[table.variant == r.variant].lr
        if r.lr in (tried.min(), tried.max()) and len(tried) > 1:
            assert r.edge and (np.isclose(r.lr, hi) or np.isclose(r.lr, lo)), (r.variant, r.lr)
    unit, budget = tuning.budget_unit.iloc[0], tuning.budget.iloc[0]
    for v, g in tuning.groupby("variant"):
        auc = {}
        for (lr, _), run in g.groupby(["lr", "seed"]):
            run = run.sort_values("step")
            x, y = run[unit].to_numpy(float), run.pass1.to_numpy(float)
            grid = np.linspace(0, budget, 20001)
            auc.setdefault(lr, []).append(np.interp(grid, x, y).mean())
        best = max(auc, key=lambda lr: np.mean(auc[lr]))
        assert table[(table.variant == v) & table.chosen].lr.iloc[0] == pytest.approx(best)
        assert table[(table.variant == v) & (table.lr == best)].criterion.iloc[0] == pytest.approx(
            np.mean(auc[best]), abs=1e-4)
    return dict(zip(table[table.chosen].variant, table[table.chosen].lr))


def _check_tables(root, name, size, size_name):
    """Shared checks of a finished study directory: one run per cell, stopped at the budget, with
    the cell's parameter and protocol columns on every row, its tuned rate, its own problem set
    per seed; one summary row per variant with n = seeds, figure, record."""
    study = STUDIES[name]
    d = root / name
    runs = pd.read_csv(d / "runs.csv")
    cells = study.grid(SEEDS, size_name)
    assert runs.groupby(["variant", "seed"]).ngroups == len(cells)
    assert set(runs.seed) == set(SEEDS)
    _check_budget_stops(runs, size)
    assert runs.pass1.between(0, 1).all() and runs.heldout_pass1.between(0, 1).all()
    chosen = _check_tuning(d, cells, size)
    for cell in cells:
        rows = runs[(runs.variant == cell.variant) & (runs.seed == cell.seed)]
        assert set(cell.columns) <= set(runs.columns)
        for col, value in cell.columns.items():
            assert all(_same(v, value) for v in rows[col]), (cell.variant, col, value)
        assert (rows.method == cell.params["method"]).all()
        assert (rows.lr == chosen[cell.variant]).all()
    # each seed draws its own problem set; every variant of a seed trains on the same one
    sets = runs.groupby("seed").problem_set_seed.unique()
    assert all(len(x) == 1 for x in sets) and len({x[0] for x in sets}) == len(SEEDS)
    summary = pd.read_csv(d / "summary.csv")
    variants = list(dict.fromkeys(c.variant for c in cells))
    assert sorted(summary.variant) == sorted(variants) and summary.n.eq(len(SEEDS)).all()
    assert summary.reached.eq(len(SEEDS)).all()
    for cell in cells:  # the summary carries each variant's parameters and tuned rate
        row = summary[summary.variant == cell.variant].iloc[0]
        for col in study.params:
            value = cell.columns.get(col, cell.params["method"] if col == "method" else None)
            assert _same(row[col], value), (cell.variant, col)
        assert row.lr == chosen[cell.variant]
    png = (d / f"{name}.png").read_bytes()
    assert png[:8] == PNG and len(png) > 20_000
    meta = json.loads((d / "study.json").read_text())
    assert meta["cells"] == len(cells) and meta["size"] == size_name and meta["params"] == list(study.params)
    assert meta["protocol"]["budget_unit"] == "tokens" and meta["protocol"]["budget"] == size.budget["tokens"]
    assert meta["protocol"]["tuning_seeds"] == sorted(set(pd.read_csv(d / "tuning" / "runs.csv").seed))
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
    # the summary's value columns are the means over seeds of the per-run values at the budget
    per = budget_table(runs)
    fin = per.groupby("variant").pass1_at_tokens.mean()
    assert np.allclose(summary.set_index("variant").pass1_at_budget.loc[fin.index], fin)
    fin = per.groupby("variant").pass1_auc_rollouts.mean()
    assert np.allclose(summary.set_index("variant").pass1_auc_rollouts.loc[fin.index], fin)


def test_smoke_root_saturation_budget_follows_N(smoke_results):
    runs = _runs(smoke_results, "root-saturation")
    P = SMOKE.batch_problems
    grpo = runs[runs.method == "grpo"]
    assert (grpo.rollouts == grpo.step * P * grpo.N).all() and (grpo.rollouts_aux == 0).all()
    deep = runs[runs.method == "deep-grpo"]
    assert (deep.rollouts_main == deep.step * P * deep.N).all()
    pivots = deep.pivots.fillna(0).groupby([deep.seed]).cumsum()
    assert (deep.rollouts_aux == deep.K * pivots).all() and deep.rollouts_aux.max() > 0
    # at equal tokens the cheaper method takes more steps
    steps = final_rows(runs).groupby("method").step.min()
    assert steps["grpo"] > 2 * final_rows(runs).groupby("method").step.max()["deep-grpo"]


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
    per = budget_table(runs)
    for (v, s), g in runs.groupby(["variant", "seed"]):
        # an AUC (mean of pass@1 over a budget range) lies within the run's pass@1 values
        row = per[(per.variant == v) & (per.seed == s)].iloc[0]
        for unit in ("rollouts", "tokens"):
            assert g.pass1.min() - 1e-9 <= row[f"pass1_auc_{unit}"] <= g.pass1.max() + 1e-9
        assert summary.loc[v, "reached_target"] <= len(SEEDS)
    # GRPO N = 8 spends P * N * T tokens per step (fixed-length chains) until the budget
    grpo = final_rows(runs).set_index("variant").loc["grpo N=8"]
    per_step = SMOKE.batch_problems * 8 * TokenTreeSpec().depth
    assert (grpo.tokens == np.ceil(SMOKE.budget["tokens"] / per_step) * per_step).all()
    assert np.isnan(summary.loc["grpo N=8", "K"]) and summary.loc["deep-grpo", "K"] == 8


def test_smoke_ladder_rungs_in_order_and_the_oracle_rung_branches_from_recoverable_states(smoke_results):
    runs = _runs(smoke_results, "ladder")
    assert dict(zip(runs.variant, runs.rung)) == {"grpo N=8": 0, "oracle-pivot": 6}
    train = runs[runs.step > 0]
    grpo, oracle = train[train.method == "grpo"], train[train.method == "oracle-pivot"]
    assert (grpo.rollouts_aux == 0).all() and oracle.rollouts_aux.max() > 0
    # the oracle pivot picks states that are recoverable more often than a random continuation of a failed chain
    assert oracle.pivot_oracle_success.dropna().mean() > 0


def test_smoke_recoverability_estimator_column_drives_the_estimator(smoke_results):
    runs = _runs(smoke_results, "recoverability")
    assert (runs.heterogeneity == 1.0).all()
    state = runs[runs.estimator == "state"]
    pos = runs[runs.estimator == "position"]
    # only the state-aware estimator has state features; both get fitted within the smoke budget
    assert state.est_group_success_rate.notna().any() and pos.est_group_success_rate.isna().all()
    assert pos.est_rel_depth.notna().any()
    fitted = runs.dropna(subset=["ece_pos", "ece_state"])
    assert len(fitted) and fitted.ece_pos.between(0, 1).all() and fitted.ece_state.between(0, 1).all()


def test_the_reference_cell_gives_the_same_numbers_in_every_study(smoke_results):
    """deep-grpo with default settings on the default spec appears in six smoke grids (GRPO N = 8
    in two): the same configuration and seed must give the same run wherever it is."""
    ref = {"root-saturation": "deep-grpo G=8 K=8", "depth-bias": "fatal | gamma=2", "dilution": "dense M=1",
           "lambda-k": "lambda=1", "budget-frontier": "deep-grpo", "recoverability": "h=1 | position"}
    ref_grpo = {"budget-frontier": "grpo N=8", "ladder": "grpo N=8"}  # GRPO N = 8 in two smoke grids
    a, b = [final_rows(runs[runs.variant == v]).sort_values("seed")[["pass1", "tokens"]].to_numpy()
            for runs, v in ((_runs(smoke_results, n), v) for n, v in ref_grpo.items())]
    assert np.array_equal(a, b)
    finals = []
    for name, variant in ref.items():
        runs = _runs(smoke_results, name)
        finals.append(final_rows(runs[runs.variant == variant]).sort_values("seed")[["pass1", "rollouts"]].to_numpy())
    for f in finals[1:]:
        assert np.array_equal(f, finals[0])


def test_rerun_does_no_repeated_work(smoke_results):
    d = smoke_results / "lambda-k"
    files = [*(d / "cells").iterdir(), *(d / "tuning" / "cells").iterdir()]
    before = {p: p.stat().st_mtime_ns for p in files}
    run_study("lambda-k", smoke_results, seeds=len(SEEDS), size="smoke", workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert len(list((d / "cells").iterdir())) + len(list((d / "tuning" / "cells").iterdir())) == len(files)


def _check_report(root, size):
    text = write_report(root).read_text()
    for name in STUDIES:
        assert f"## {name}" in text and f"({name}/{name}.png)" in text
        runs = _runs(root, name)
        assert f"{runs.groupby(['variant', 'seed']).ngroups} runs ({runs.variant.nunique()} variants x 2 seeds" in text
        section = text[text.index(f"## {name}"):]
        section = section[:section.find("\n## ", 4) if "\n## " in section[4:] else len(section)]
        start = runs[runs.step == 0].groupby("seed").first()
        assert f"evaluation seeds 0, 1 with 2 distinct problem sets; initial exact pass@1 (training problems) " \
               f"mean {start.pass1.mean():.3f}, sd {start.pass1.std():.3f}" in section
        assert f"held-out problems mean {start.heldout_pass1.mean():.3f}" in section
        tuned = pd.read_csv(root / name / "tuned_lr.csv").query("chosen")
        for r in tuned.itertuples():
            assert f"{r.variant}: {r.lr:g}" in section
        assert f"every run stops at {size.budget['tokens']:,} tokens" in section
        findings = section[section.index("**Findings**"):].split("\n\n")[1].splitlines()
        for line in findings:  # every finding about pass@1 names its budget unit
            if "pass@1" in line:
                assert "tokens" in line or "rollouts" in line, line
    assert "Not run in this directory" not in text
    for bad in ("TODO", "TBD", "placeholder", "XXX", " nan", "{", "}"):
        assert bad not in text
    assert text.count("**Findings**") == len(STUDIES)
    assert "Holm" in text and "TOST" in text
    return text


def test_report_of_smoke_results(smoke_results):
    text = _check_report(smoke_results, SMOKE)
    assert text.count("smoke size") == len(STUDIES)
    assert "held-out exact pass@1 at the budget (4,000 tokens per run)" in text


def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys):
    from deepgrpo.cli import main
    assert main(["study", "root-saturation", "--seeds", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--seeds: SimStudyOptions.seeds = 0 is invalid" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
    assert main(["report", "--results", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no study results" in err and len(err.strip().splitlines()) == 1
    for args, what in ((["--budget", "0"], "--budget: SimStudyOptions.budget = 0"),
                       (["--lr-grid", "0.1,x"], "--lr-grid"), (["--lr-grid", "-1"], "--lr-grid"),
                       (["--seeds", "1001"], "--seeds: SimStudyOptions.seeds = 1001")):
        assert main(["study", "lambda-k", "--smoke", "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


# -- slow tier: the quick grids ---------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
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
    # K continuations at one point estimate the local baseline with less variance than K/4 at each of 4
    by = late.groupby(["rule", "M", "advantage"]).baseline_var.mean()
    assert by["dense", 1, "group"] < by["uniform", 4, "group"]
    # only valid plans (>= 2 continuations per cut point), and TreeRL's tree advantage beside the group one
    assert set(dil.M) == {1, 2, 4} and set(dil.advantage) == {"group", "tree"}
    assert set(dil[dil.advantage == "tree"].rule) == {"max-surprisal"}
    rec = _runs(quick_results, "recoverability")
    fitted = rec.dropna(subset=["ece_pos", "ece_state"])
    assert len(fitted) > 0 and fitted.ece_pos.between(0, 1).all()
    assert set(rec.heterogeneity) == {0.0, 0.5, 1.0}
    root = _runs(quick_results, "root-saturation")
    steps = final_rows(root[root.method == "grpo"]).groupby("N").step.mean()
    assert steps[4] > 8 * steps[64]  # equal tokens: N = 4 takes 16x the steps of N = 64 (up to rounding)
    depth = _runs(quick_results, "depth-bias")
    assert depth.groupby(["recovery", "pivot_rule"]).ngroups == 3 * 9


@pytest.mark.slow
def test_report_of_quick_results(quick_results):
    text = _check_report(quick_results, QUICK)
    assert text.count("quick size") == len(STUDIES) and "Doubling N from 32 to 64" in text
    assert "Holm over 6 comparisons" in text  # DEEP-GRPO against five GRPO sizes and root-only
