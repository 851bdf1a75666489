"""The regime map (analysis/regime_map.py): the quick map in the default tier (its tables, the
protocol they imply, rerun without repeated work, the report and the README block), the claim
rule, and the README's simulator results against the committed full map."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import regime_map as rm
from analysis.stats import holm
from deepgrpo.cli import main as deepgrpo_main
from deepgrpo.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "reports" / "sim-regime-map"
PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = 2


@pytest.mark.parametrize("rule, verdicts, expected", [
    ("beats", ["higher", "higher"], "holds"),
    ("beats", ["higher", "inconclusive"], "partly"),
    ("beats", ["higher", "equivalent"], "partly"),
    ("beats", ["higher", "lower"], "fails"),
    ("beats", ["equivalent", "equivalent"], "fails"),
    ("beats", ["equivalent", "inconclusive"], "inconclusive"),
    ("beats", ["inconclusive"], "inconclusive"),
    ("saturates", ["lower"], "holds"),
    ("saturates", ["equivalent"], "holds"),
    ("saturates", ["higher"], "fails"),
    ("saturates", ["inconclusive"], "inconclusive"),
])
def test_claim_verdict_rules(rule, verdicts, expected):
    assert rm.claim_verdict(rule, verdicts) == expected


def test_claim_verdict_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        rm.claim_verdict("wins", ["higher"])


def test_boolean_columns_read_back_from_text():
    col = pd.Series(["True", "False", True])
    assert rm._as_bool(col, "chosen").tolist() == [True, False, True]
    with pytest.raises(ValueError, match="'edge'"):
        rm._as_bool(pd.Series(["True", "maybe"]), "edge")


def test_the_grid_is_the_product_of_the_axes_and_every_claim_names_map_methods():
    cells = rm.base_cells(rm.QUICK)
    assert len(cells) == len(rm.SPREADS) * len(rm.RECOVERY) * len(rm.LEARNERS) * len(rm.METHODS)
    assert len({c.variant for c in cells}) == len(cells)
    names = set(rm.METHOD_NAMES)
    for c in rm.CLAIMS:
        assert {c.reference, *c.others} <= names
    assert set(rm.LADDER) - {rm.BEST_GRPO} <= names
    # the spread axis is the spec's heterogeneity, the learner axis the runner's policy and optimizer
    c = next(c for c in cells if c.columns["spread"] == "h=0" and c.columns["learner"] == "features/sgd")
    assert c.params["spec"]["heterogeneity"] == 0.0
    assert c.params["runner"]["policy"] == "features" and c.params["runner"]["optimizer"] == "sgd"
    assert rm.budgets(rm.FULL) == {"tokens": 100_000, "rollouts": 100_000 // 12}


@pytest.fixture(scope="module")
def quick_map(tmp_path_factory):
    out = tmp_path_factory.mktemp("map")
    assert deepgrpo_main(["study", "regime-map", "--quick", "--seeds", str(SEEDS), "--out", str(out),
                          "--no-progress"]) == 0
    return out


def _read(root, name):
    return pd.read_csv(root / rm.STUDY / name)


def test_quick_map_has_one_row_per_cell_and_method_with_unit_seeds_and_intervals(quick_map):
    table = _read(quick_map, "map.csv")
    n_regimes = len(rm.SPREADS) * len(rm.RECOVERY) * len(rm.LEARNERS)
    assert len(table) == n_regimes * 2 * (len(rm.METHODS) - len(rm.PER_UNIT))
    assert not table.duplicated([*rm.CELL, "name"]).any()
    assert set(table.unit) == {"tokens", "rollouts"}
    assert (table.seeds == SEEDS).all()
    ends = rm.budgets(rm.QUICK)
    assert (table.budget == table.unit.map(ends)).all()
    for v in ("pass1_at", "heldout_pass1_at", "pass1_auc"):
        assert table[v].between(0, 1).all()
        assert np.isfinite(table[f"{v}_low"]).all() and (table[f"{v}_low"] <= table[v] + 1e-12).all()
        assert (table[f"{v}_high"] >= table[v] - 1e-12).all()
    # a rung read from another method in one unit (PER_UNIT): the oracle informative pivot per rollout
    per = _read(quick_map, "per_run.csv")
    for rung, (unit, alt) in rm.PER_UNIT.items():
        assert alt not in set(per.name)
        rows = per[per.name == rung]
        assert len(rows) == n_regimes * 2 * SEEDS
        assert (rows.variant.str.endswith(f"| {alt}") == (rows.unit == unit)).all()
        assert (rows.family == "ladder").all()
    cells = _read(quick_map, "cells.csv")
    assert len(cells) == n_regimes * 2 and set(cells.winner) <= set(rm.WINNER_POOL)
    for f in ("heatmap.png", "waterfall_tokens.png", "waterfall_rollouts.png", "theory/theory.png"):
        data = (quick_map / rm.STUDY / f).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, f


def test_quick_map_equal_budget_in_both_units_at_the_rates_tuned_per_unit(quick_map):
    per = _read(quick_map, "per_run.csv")
    tuned = _read(quick_map, "tuned_lr.csv")
    ends = rm.budgets(rm.QUICK)
    assert per.reached.all() and (per.budget == per.unit.map(ends)).all()
    # whole-chain methods reach both budgets at the same step; suffix-only branching reaches rollouts first
    wide = per.pivot_table(index=["variant", "seed"], columns="unit", values="steps").dropna()  # PER_UNIT's
    # variants are read in one unit only
    fam = per.groupby("variant").family.first().reindex(wide.index.get_level_values(0)).to_numpy()
    name = per.groupby("variant").name.first().reindex(wide.index.get_level_values(0)).to_numpy()
    whole = (fam == "grpo") | (name == rm.ROOT_ONLY)
    assert (wide.rollouts[whole] == wide.tokens[whole]).all()
    assert (wide.rollouts <= wide.tokens).all() and (wide.rollouts[~whole] < wide.tokens[~whole]).any()
    # each reading uses the rate chosen for its unit on the tuning seeds, and the tuning grid is the
    # optimizer's default times the size's factors
    chosen = tuned[tuned.chosen].set_index(["variant", "unit"]).lr
    assert np.allclose(per.lr, chosen.reindex(pd.MultiIndex.from_frame(per[["variant", "unit"]])).to_numpy())
    from sims.optim import DEFAULT_LR
    for (learner, variant), g in tuned.groupby(["learner", "variant"]):
        base = DEFAULT_LR[learner.split("/")[1]]
        assert sorted(set(g.lr)) == pytest.approx(sorted(base * f for f in rm.QUICK.lr_factors)), variant
    # every seed trains on its own problem set, the same one for every method of the seed
    sets = per.groupby("seed").problem_set_seed.nunique()
    assert (sets == 1).all() and per.groupby("problem_set_seed").seed.nunique().max() == 1
    # root sampling has no branch points; the oracle rungs branch from states with a known chance
    roots = per[per.family == "grpo"]
    assert roots.pivot_oracle_success.isna().all()
    assert per[per.name == "oracle-pivot"].pivot_oracle_success.between(0, 1).all()


def test_quick_map_best_grpo_and_holm_come_from_their_definitions(quick_map):
    tuned = _read(quick_map, "tuned_lr.csv")
    per = _read(quick_map, "per_run.csv")
    effects = _read(quick_map, "effects.csv")
    cells = _read(quick_map, "cells.csv")
    # best GRPO-N: the N with the best tuning criterion at its chosen rate (tuning seeds only)
    grpo = tuned[tuned.chosen & (tuned.family == "grpo")]
    for key, g in grpo.groupby(list(rm.CELL)):
        best = int(g.loc[g.criterion.idxmax(), "name"].split("=")[1])
        row = cells[np.logical_and.reduce([cells[c] == v for c, v in zip(rm.CELL, key)])]
        assert int(row.best_N.iloc[0]) == best
    e = effects[effects.metric == "pass1_at"]
    head = e[e.family == "headline"]
    assert len(head) == 2 * len(cells)
    # within a cell the two headline p-values are one Holm family; map-wide, all of a unit's
    for _, g in head.groupby(list(rm.CELL)):
        assert np.allclose(g.p_holm, holm(g.p.to_numpy()), equal_nan=True)
    for _, g in head.groupby("unit"):
        assert np.allclose(g.p_holm_map, holm(g.p.to_numpy()), equal_nan=True)
    # a difference is the paired mean over seeds of the two methods' readings
    r = head.iloc[0]
    sel = per[np.logical_and.reduce([per[c] == r[c] for c in rm.CELL])]
    a = sel[sel.name == r.reference].set_index("seed").pass1_at
    b = sel[sel.name == r.other].set_index("seed").pass1_at
    assert r["diff"] == pytest.approx(float((a - b).mean()))
    # a material difference is a significant one at least the equivalence margin in size
    from analysis.stats import EQUIVALENCE_MARGIN
    for tag in ("best_grpo", "root_only"):
        sig = cells[f"deep_minus_{tag}_verdict"].isin(["higher", "lower"])
        big = cells[f"deep_minus_{tag}"].abs() >= EQUIVALENCE_MARGIN
        assert (cells[f"deep_minus_{tag}_material"] == (sig & big)).all()
    # the ladder family has one step per rung in every cell, and the claims their own families
    assert (e[e.family == "ladder"].groupby(list(rm.CELL)).size() == len(rm.LADDER) - 1).all()
    for c in rm.CLAIMS:
        assert (e[e.family == f"claim {c.key}"].groupby(list(rm.CELL)).size() == len(c.others)).all()


def _budget_to_half(spend, value, budget):
    """The capped budget-to-threshold of one run, written out step by step."""
    goal = value[0] + 0.5 * (1.0 - value[0])
    for k in range(len(spend)):
        if spend[k] > budget:
            break
        if value[k] >= goal:
            j = max(k - 1, 0)
            w = (goal - value[j]) / (value[k] - value[j]) if value[k] > value[j] else 1.0
            return (spend[j] + min(max(w, 0.0), 1.0) * (spend[k] - spend[j])) / budget
    return 1.0


def test_quick_map_readouts_come_from_their_definitions(quick_map):
    """pass@1 at 1/8, 1/4 and 1/2 of the budget and the budget to halfway are each run's own
    curve read there; every readout has the headline and ladder comparisons of every cell, one
    headline readout per cell chosen by the saturation rule, and the whole-budget readout's
    comparisons are effects.csv's."""
    from analysis.protocol import value_and_auc
    per = _read(quick_map, "per_run.csv")
    runs = _read(quick_map, "runs.csv")
    readouts = _read(quick_map, "readouts.csv")
    effects = _read(quick_map, "effects.csv")
    rng = np.random.default_rng(0)
    for i in rng.choice(len(per), size=12, replace=False):
        r = per.iloc[i]
        run = runs[(runs.variant == r.variant) & np.isclose(runs.lr, r.lr) & (runs.seed == r.seed)].sort_values("step")
        spend, value = run[r.unit].to_numpy(np.float64), run.pass1.to_numpy(np.float64)
        for col, frac in rm.READOUT_FRACTIONS.items():
            assert r[col] == value_and_auc(spend, value, frac * r.budget)[0], (col, r.variant)
        assert r.budget_to_half == pytest.approx(_budget_to_half(spend, value, r.budget), rel=1e-12, abs=1e-12)
    assert per.budget_to_half.between(0, 1).all() and (per.budget_to_half < 1).any()
    n_cells = per.groupby(list(rm.CELL)).ngroups
    assert set(readouts.readout) == set(rm.READOUTS.values())
    per_readout = readouts.groupby("readout").size()
    claims = {c.key: c for c in rm.CLAIMS}
    n_claim_rows = sum(len(claims[k].others) for k in rm.HEADLINE_CLAIMS)
    assert (per_readout == n_cells * (2 + len(rm.LADDER) - 1 + n_claim_rows)).all()
    # one headline readout per cell and comparison: the largest budget where the best mean is below the rule's level
    assert (readouts.groupby([*rm.CELL, "pair"]).headline.sum() == 1).all()
    budgets = [*rm.READOUT_FRACTIONS, "pass1_at"]
    pool = per[per.name.isin(rm.WINNER_POOL)]
    best = pool.groupby([*rm.CELL, "name"])[budgets].mean().groupby(level=list(range(len(rm.CELL)))).max()
    for key, row in best.iterrows():
        below = [b for b in budgets if row[b] < rm.HEADLINE_SATURATION]
        label = rm.READOUTS[below[-1] if below else budgets[0]]
        sel = readouts[np.logical_and.reduce([readouts[c] == v for c, v in zip(rm.CELL, key)]) & readouts.headline]
        assert set(sel.readout) == {label}, key
    # the whole-budget readout is effects.csv's; "better" reads a lower-is-better readout downward
    whole = readouts[readouts.readout == rm.READOUTS["pass1_at"]]
    families = ["headline", "ladder", *(f"claim {k}" for k in rm.HEADLINE_CLAIMS)]
    e = effects[(effects.metric == "pass1_at") & effects.family.isin(families)]
    assert whole["diff"].to_numpy() == pytest.approx(e["diff"].to_numpy(), nan_ok=True)
    slow = readouts[readouts.readout == rm.READOUTS["budget_to_half"]]
    assert ((slow.better == "better") == (slow.verdict == "lower")).all()


def test_quick_map_claims_at_every_readout_and_the_headline_from_their_definitions(quick_map):
    """At the whole budget the claims' verdicts by readout are claim_table's; the headline table
    counts and pools only the features learners' cells at their headline readout, each unit on
    its own, with the regime as block."""
    per, tuned = _read(quick_map, "per_run.csv"), _read(quick_map, "tuned_lr.csv")
    readouts = _read(quick_map, "readouts.csv")
    by_readout = rm.claim_readouts(readouts)
    whole = by_readout[by_readout.readout == rm.READOUTS["pass1_at"]]
    table = rm.claim_table(rm.effects_table(per, tuned))
    table = table[table.claim.isin(rm.HEADLINE_CLAIMS)]
    merged = whole.merge(table, on=["claim", *rm.CELL], suffixes=("", "_budget"))
    assert len(merged) == len(table) > 0
    assert (merged.verdict == merged.verdict_budget).all() and (merged.why == merged.why_budget).all()
    assert set(by_readout.readout) == set(rm.READOUTS.values())

    ht = rm.headline_table(readouts)
    n_regimes = len(rm.SPREADS) * len(rm.RECOVERY) * len(rm.HEADLINE_LEARNERS)
    assert (ht.cells == n_regimes).all() and set(ht.unit) == set(rm.BUDGET_UNITS)
    heads = rm.headline_readouts(per)
    effects = {}
    for metric in set(heads.values()):
        e = rm.effects_table(per, tuned, metric)
        e = e[e.family.isin(["headline", "ladder"])]
        effects[metric] = e.assign(pair=e.comparison.str.replace(r" \(N=\d+\)$", "", regex=True)).set_index(
            [*rm.CELL, "pair"])
    for r in ht[ht.kind != "claim"].itertuples():
        diffs, better, worse = [], 0, 0
        for key, metric in heads.items():
            cell = dict(zip(rm.CELL, key))
            if cell["learner"] not in rm.HEADLINE_LEARNERS or cell["unit"] != r.unit:
                continue
            e = effects[metric].loc[[(*key, r.what)]]
            assert len(e) == 1
            diffs.append(float(e["diff"].iloc[0]))
            good = "lower" if metric in rm.LOWER_IS_BETTER else "higher"
            better += int(e.verdict.iloc[0] == good)
            worse += int(e.verdict.iloc[0] not in (good, "equivalent", "inconclusive"))
        assert (r.better, r.worse) == (better, worse), r.what
        assert r.diff == pytest.approx(np.mean(diffs), nan_ok=True)
    claims = ht[ht.kind == "claim"]
    assert len(claims) == len(rm.HEADLINE_CLAIMS) * len(rm.BUDGET_UNITS)
    assert set(claims.pooled_verdict) <= {"holds", "partly", "fails (reversed)", "inconclusive"}


@pytest.mark.parametrize("low, high, expected", [
    ((0.01, 0.02), (0.1, 0.1), "holds"), ((0.01, -0.1), (0.1, 0.1), "partly"),
    ((0.01, -0.1), (0.1, -0.01), "fails (reversed)"), ((-0.1, -0.1), (0.1, 0.1), "inconclusive")])
def test_pooled_claim_verdict_rule(low, high, expected):
    assert rm._pooled_verdict(low, high) == expected


def test_quick_map_equal_steps_read_each_grpo_run_after_the_fewest_steps(quick_map):
    eq = _read(quick_map, "equal_steps.csv")
    runs = _read(quick_map, "runs.csv")
    tuned = _read(quick_map, "tuned_lr.csv")
    rate = tuned[tuned.chosen & (tuned.unit == "tokens")].set_index("variant").lr
    n_regimes = len(rm.SPREADS) * len(rm.RECOVERY) * len(rm.LEARNERS)
    assert len(eq) == n_regimes * SEEDS * len(rm.SATURATION_NS)
    for key, g in eq.groupby([*rm.REGIME, "seed"]):
        lasts, values = [], {}
        for n in rm.SATURATION_NS:
            variant = rm._variant(dict(zip(rm.REGIME, key[:3])), f"grpo N={n}")
            run = runs[(runs.variant == variant) & np.isclose(runs.lr, rate[variant]) & (runs.seed == key[3])]
            lasts.append(int(run.step.max()))
            values[n] = run.set_index("step").pass1
        S = min(lasts)
        assert (g.steps == S).all()
        assert g.set_index("N").pass1_at_steps.to_dict() == {n: values[n][S] for n in rm.SATURATION_NS}


def test_saturation_claim_rule_on_constructed_increments():
    rng = np.random.default_rng(1)
    rows = []
    for learner, inc in (("tabular/adam", (0.10, 0.05, 0.02)), ("tabular/sgd", (0.10, 0.05, -0.05)),
                         ("features/adam", (0.02, 0.05, 0.10)), ("features/sgd", (0.0, 0.0, 0.0))):
        for seed in range(8):
            level = 0.3 + rng.normal(0, 0.05)
            for n, total in zip(rm.SATURATION_NS, np.cumsum((0.0, *inc))):
                rows.append({"spread": "h=1", "recovery": "fatal", "learner": learner, "seed": seed,
                             "name": f"grpo N={n}", "N": n, "steps": 5,
                             "pass1_at_steps": level + total + rng.normal(0, 0.002)})
    sat = rm.saturation_table(pd.DataFrame(rows))
    claim = sat.groupby("learner", sort=False).claim.first().to_dict()
    assert claim == {"tabular/adam": "holds", "tabular/sgd": "fails (reversed)",
                     "features/adam": "fails (not shrinking)", "features/sgd": "inconclusive"}
    first = sat[(sat.learner == "tabular/adam") & (sat.increment == "16 - 8")].iloc[0]
    assert first["diff"] == pytest.approx(0.10, abs=0.003) and first.verdict == "higher"


@pytest.mark.slow
def test_quick_map_rerun_does_no_repeated_work(quick_map, tmp_path):
    """A second run in the same directory runs nothing and rewrites the same per-run table (slow
    tier: the rerun rebuilds every table and figure, about 25 s)."""
    d = quick_map / rm.STUDY

    def files():
        return sorted(p.name for sub in (d / "cells", d / "tuning" / "cells") for p in sub.iterdir())

    before = files()
    per = (d / "per_run.csv").read_bytes()
    rm.run_regime_map(quick_map, seeds=SEEDS, size="quick", progress=False)
    after = files()
    assert before == after and (d / "per_run.csv").read_bytes() == per


def test_quick_map_report_and_readme_block(quick_map, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{rm.README_BEGIN}\nold text\n{rm.README_END}\nafter\n")
    assert deepgrpo_main(["report", "--results", str(quick_map), "--readme", str(readme)]) == 0
    report = (quick_map / "REPORT.md").read_text()
    assert "## regime-map" in report and "![regime map](regime-map/heatmap.png)" in report
    for c in rm.CLAIMS:
        assert f"#### ({c.key}) {c.title}" in report
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert rm.readme_block(quick_map) in text
    assert "(a) root saturation" in text and "DEEP-GRPO vs the best GRPO-N" in text
    assert "By readout, DEEP-GRPO vs the best GRPO-N" in text and "**How the verdicts move with the readout**" in report
    assert "#### (a) root saturation at equal steps (the paper's form)" in report and "at equal steps" in text
    assert "**Headline: the shared-features learners, each cell at its headline readout**" in report
    assert "**Transfer: the skills learner on held-out problems**" in report
    assert "**Headline** (features/adam and features/sgd" in text and "(a sanity check, not in the headline" in text
    bad = tmp_path / "BAD.md"
    bad.write_text("no markers\n")
    assert deepgrpo_main(["report", "--results", str(quick_map), "--readme", str(bad)]) == 2
    assert "--readme" in capsys.readouterr().err and bad.read_text() == "no markers\n"


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert deepgrpo_main(["study", "regime-map", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert deepgrpo_main(["study", "regime-map", "--workers", "0", "--out", str(tmp_path)]) == 2
    assert "--workers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="size"):
        rm.run_regime_map(tmp_path, size="huge")


def test_readme_simulator_results_are_the_committed_maps():
    """The README's simulator results are generated from the committed full map
    (``deepgrpo report --results docs/reports/sim-regime-map --readme README.md``)."""
    text = (ROOT / "README.md").read_text()
    block = text.split(rm.README_BEGIN)[1].split(rm.README_END)[0].strip()
    assert block == rm.readme_block(COMMITTED).strip()


def test_quick_map_transfer_table_reads_grpo8_held_out_gain_per_cell(quick_map):
    per, _, _ = rm.load(quick_map)
    fig = rm.transfer_table(per)
    assert set(fig.learner) == set(rm.TRANSFER_LEARNERS)
    assert len(fig) == len(rm.SPREADS) * len(rm.RECOVERY) * len(rm.BUDGET_UNITS)
    row = fig.iloc[0]
    g = per[(per.learner == row.learner) & (per.spread == row.spread) & (per.recovery == row.recovery)
            & (per.unit == row.unit) & (per.name == "grpo N=8")]
    gain = g.heldout_pass1_at - g.heldout_pass1_start
    assert row.gain == pytest.approx(gain.mean()) and row.up == pytest.approx((gain > 0).mean())
    assert row.low <= row.gain <= row.high
    # the methods are compared on held-out pass@1 at each cell's headline readout (from training pass@1)
    per, tuned, _ = rm.load(quick_map)
    tr = rm.transfer_readouts(per, tuned)
    heads = rm.headline_readouts(per)
    assert set(tr.learner) == set(rm.TRANSFER_LEARNERS) and len(tr)
    for key, metric in zip(zip(*(tr[c] for c in rm.CELL)), tr.metric):
        assert metric == f"heldout_{heads[key]}" and metric in per
    # the skills learner's problem sets have skills; the other learners' have none
    cells = rm.base_cells(rm.QUICK)
    for c in cells[:: len(rm.METHODS)]:
        has = c.params["spec"].get("n_skills", 0) > 0
        assert has == (c.columns["learner"] in rm.TRANSFER_LEARNERS)


def _headroom_per(gain: float, room: float, seeds: int = 6, jitter: float = 0.0) -> pd.DataFrame:
    """A per-run table of two regimes of one headline learner in the tokens unit: DEEP-GRPO at
    0.5, the selector ``gain`` above it, the oracle informative pivot ``room`` above it (plus
    ``jitter`` x a fixed pattern over seeds)."""
    rows = []
    noise = np.linspace(-1, 1, seeds)
    for spread in ("h=0", "h=1"):
        for seed in range(seeds):
            for name, v in ((rm.DEEP, 0.5), (rm.SELECTOR, 0.5 + gain + jitter * noise[seed]),
                            ("oracle-informative", 0.5 + room), ("grpo N=8", 0.4)):
                rows.append({"spread": spread, "recovery": "fatal", "learner": rm.HEADLINE_LEARNERS[0],
                             "unit": "tokens", "seed": seed, "name": name, **{c: v for c in rm.READOUTS}})
    return pd.DataFrame(rows)


def test_headroom_share_is_the_ratio_of_the_paired_differences_with_a_seed_bootstrap():
    h = rm.headroom_table(_headroom_per(0.05, 0.1))
    assert len(h) == 3 and list(h.spread) == ["h=0", "h=1", "pooled"]
    assert h.share.to_numpy() == pytest.approx([0.5, 0.5, 0.5])
    assert h.share_low.to_numpy() == pytest.approx([0.5] * 3) and h.share_high.to_numpy() == pytest.approx([0.5] * 3)
    assert h.gain.to_numpy() == pytest.approx([0.05] * 3) and h.headroom.to_numpy() == pytest.approx([0.1] * 3)
    noisy = rm.headroom_table(_headroom_per(0.05, 0.1, jitter=0.05))
    assert noisy.share.to_numpy() == pytest.approx([0.5, 0.5, 0.5])  # the noise averages out over the seeds
    assert (noisy.share_low < 0.5).all() and (noisy.share_high > 0.5).all()
    assert rm.headroom_table(_headroom_per(0.05, 0.1).query("name != @rm.SELECTOR")).empty
