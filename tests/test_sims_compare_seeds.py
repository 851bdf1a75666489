"""``sim compare`` over several seeds: each method's seeds are trained in lockstep, each run is
the run its seed gives alone, and the table reports means with 95 % t-intervals."""

import math
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy import stats

from sims.compare import (
    COMPARE_METHODS,
    figure_svg,
    format_table,
    run_compare,
    run_row,
    summary_rows,
)
from sims.runner import RunnerConfig
from sims.spec import TokenTreeSpec, explain

SPEC = TokenTreeSpec(n_problems=8, n_heldout=4)
RUNNER = RunnerConfig(steps=100, batch_problems=4, budget=3000, budget_unit="tokens")
METHODS = (COMPARE_METHODS[0], COMPARE_METHODS[-1])  # GRPO N=8 and DEEP-GRPO


def _bits(history: list[dict]) -> list[dict]:
    """History rows with floats as their bit patterns (NaN equals NaN, -0.0 differs from 0.0)."""
    return [{k: (struct.pack("<d", v).hex() if isinstance(v, float) else v) for k, v in r.items()} for r in history]


@pytest.fixture(scope="module")
def three_seeds():
    return run_compare(SPEC, RUNNER, seed=4, methods=METHODS, seeds=3)


def test_each_seed_is_the_run_it_gives_alone(three_seeds):
    assert three_seeds.seeds == [4, 5, 6]
    assert three_seeds.problem_set_seeds == [SPEC.problem_set_seed(s) for s in (4, 5, 6)]
    for j, seed in enumerate(three_seeds.seeds):
        alone = run_compare(SPEC, RUNNER, seed=seed, methods=METHODS)
        for i in range(len(METHODS)):
            assert _bits(three_seeds.runs[i][j].history) == _bits(alone.runs[i][0].history)


def test_summary_is_the_mean_and_t_interval_over_seeds(three_seeds):
    rows = summary_rows(three_seeds)
    assert [r["label"] for r in rows] == [m[0] for m in METHODS]
    for (label, name, _), runs, row in zip(METHODS, three_seeds.runs, rows):
        own = [run_row(label, name, run, RUNNER) for run in runs]
        p1 = np.array([r["pass1_at_budget"] for r in own])
        assert row["seeds"] == 3 and row["reached_budget"]
        assert row["pass1_at_budget"] == pytest.approx(p1.mean(), abs=1e-12)
        half = stats.t.ppf(0.975, 2) * p1.std(ddof=1) / math.sqrt(3)
        assert row["pass1_at_budget_ci95"] == pytest.approx(half, rel=1e-9)
        assert row["tokens"] == pytest.approx(np.mean([r["tokens"] for r in own]))
    one = summary_rows(run_compare(SPEC, RUNNER, seed=4, methods=METHODS))
    assert all(r["seeds"] == 1 and r["pass1_at_budget_ci95"] != r["pass1_at_budget_ci95"] for r in one)
    table = format_table(rows)
    first = rows[0]
    assert f"{first['pass1_at_budget']:.3f}±{first['pass1_at_budget_ci95']:.3f}" in table
    assert "±" not in format_table(one)


def test_figure_draws_a_mean_and_a_band_per_method_and_says_why_held_out_is_flat(three_seeds):
    root = ET.fromstring(figure_svg(three_seeds))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polygon")) == 2 * len(METHODS)  # training and held-out panels
    assert len(root.findall(f"{ns}polyline")) == 2 * len(METHODS)
    text = " ".join(t.text or "" for t in root.iter(f"{ns}text"))
    assert "nothing between problems" in text  # tabular policy: the held-out panel is flat, and why
    assert "8 training + 4 held-out problems" in text and "a wrong token is fatal" in text
    assert "crux=" not in text
    assert explain(TokenTreeSpec(recovery="decay")).endswith("(chance 0.3 at the start, decay 2)")


def test_seeds_must_be_positive():
    with pytest.raises(ValueError, match="seeds = 0"):
        run_compare(SPEC, RUNNER, methods=METHODS, seeds=0)


def test_the_command_takes_seeds_and_refuses_none(tmp_path, capsys):
    import pandas as pd

    from deepgrpo.cli import main
    out = tmp_path / "cmp"
    assert main(["sim", "compare", "--seeds", "2", "--seed", "3", "--budget", "2000", "--n-problems", "8",
                 "--prompts-per-step", "4", "--no-figure", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seeds 3-4 (2 runs per method" in printed and "±" in printed
    assert "8 training + 16 held-out problems" in printed and "crux=" not in printed  # plain words, as in the figure
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["seeds"] == 2).all() and summary["pass1_at_budget_ci95"].notna().all()
    assert main(["sim", "compare", "--seeds", "0", "--out", str(tmp_path / "none")]) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "none").exists()
