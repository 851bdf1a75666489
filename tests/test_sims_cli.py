"""``deepgrpo sim run|compare``: outputs, and one-line errors (exit 2, nothing written) on bad input."""

import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
import torch

from deepgrpo.cli import main as deepgrpo_main
from sims.cli import main
from sims.compare import COMPARE_METHODS, SUMMARY_COLUMNS
from sims.figure import nice_ticks
from sims.spec import TokenTreeSpec


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    n = torch.get_num_threads()  # sims.cli.main sets one thread (tiny tensors)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("argv,option", [
    (["run", "--method", "deep-grpo", "--depth", "-1"], "--depth"),
    (["run", "--method", "grpo", "--vocab-size", "1"], "--vocab-size"),
    (["run", "--method", "grpo", "--recovery-prob", "1.5"], "--recovery-prob"),
    (["run", "--method", "no-such-method"], "--method"),
    (["run", "--method", "grpo", "--G", "0"], "--G"),
    (["run", "--method", "grpo", "--steps", "-2"], "--steps"),
    (["run", "--method", "grpo", "--depth", "deep"], "--depth"),
    (["run", "--method", "grpo", "--set", "bogus=1"], "--set"),
    (["compare", "--heterogeneity", "1.5"], "--heterogeneity"),
    (["compare", "--recovery", "sometimes"], "--recovery"),
    (["compare", "--crux-depth-low", "-0.5"], "--crux-depth-low"),
    (["run", "--method", "tree-uniform", "--n-cut-points", "8"], "--n-cut-points"),
    (["run", "--method", "grpo", "--policy", "mlp"], "--policy"),
    (["run", "--method", "grpo", "--optimizer", "rmsprop"], "--optimizer"),
    (["run", "--method", "grpo", "--min-depth", "20"], "--min-depth"),
    (["run", "--method", "grpo", "--policy", "features", "--feature-dim", "1000000"], "--feature-dim"),
    (["compare", "--n-heldout", "-1"], "--n-heldout"),
    (["compare", "--budget-unit", "seconds"], "--budget-unit"),
    # sizes that cannot fit in memory (sims.memory): refused at once, before any allocation
    (["run", "--method", "grpo", "--G", str(10**9)], "--G"),
    (["run", "--method", "deep-grpo", "--depth", str(10**9)], "--depth"),
    (["run", "--method", "grpo", "--vocab-size", str(10**9)], "--vocab-size"),
    (["run", "--method", "grpo", "--n-problems", str(10**9), "--prompts-per-step", "4"], "--n-problems"),
    (["run", "--method", "grpo", "--n-heldout", str(10**9)], "--n-heldout"),
    (["run", "--method", "deep-grpo", "--K", str(10**9)], "--K"),
    (["compare", "--n-problems", str(10**9)], "--n-problems"),
])
def test_bad_input_is_one_line_naming_the_option_exit_2_and_writes_nothing(tmp_path, capsys, argv, option):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and err.startswith("deepgrpo sim: error:")
    assert not out.exists()


def test_bad_input_through_the_deepgrpo_command(tmp_path, capsys):
    out = tmp_path / "out"
    assert deepgrpo_main(["sim", "run", "--method", "grpo", "--vocab-size", "1", "--out", str(out)]) == 2
    assert "--vocab-size" in capsys.readouterr().err and not out.exists()


def test_run_writes_history_and_run_record(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--method", "deep-grpo", "--steps", "3", "--seed", "2", "--n-problems", "12", "--depth", "8",
            "--K", "4", "--set", "aggregation=seq-mean-token-mean", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "deep-grpo: exact pass@1" in capsys.readouterr().out
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["step"]) == [0, 1, 2, 3]
    for col in ("pass1", "pass8", "rollouts", "tokens", "pivot_depth_mean", "pivot_before_error",
                "branch_success", "est_rel_depth", "entropy", "nonzero_main", "nonzero_aux"):
        assert col in hist.columns
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["spec"]["depth"] == 8 and rec["config"]["spec"]["n_problems"] == 12
    assert rec["config"]["algo"]["explore"]["K"] == 4
    assert rec["config"]["algo"]["loss"]["aggregation"] == "seq-mean-token-mean"
    assert rec["seed"] == 2 and rec["budget"]["rollouts"] == int(hist["rollouts"].iloc[-1])
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "run.json"]  # no temp files left


def test_compare_runs_every_method_to_the_same_token_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    budget = 3000
    assert deepgrpo_main(["sim", "compare", "--budget", str(budget), "--n-problems", "8", "--prompts-per-step", "4",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"equal budget: {budget:,} generated tokens" in printed and "held-out" in printed
    assert "drawn from the seed" in printed
    for label, _, _ in COMPARE_METHODS:
        assert label in printed
    assert "root-only" in {m[1] for m in COMPARE_METHODS}
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == list(SUMMARY_COLUMNS) and list(summary["label"]) == [m[0] for m in COMPARE_METHODS]
    assert (summary["budget_unit"] == "tokens").all() and (summary["budget"] == budget).all()
    assert (summary["initial_pass1"] == summary["initial_pass1"].iloc[0]).all()  # same problem set and start
    hist = pd.read_csv(out / "history.csv")
    assert set(hist["label"]) == set(summary["label"])
    for _, row in summary.iterrows():  # each ran until the budget: it stopped at the first step at or past it
        h = hist[hist["label"] == row["label"]].sort_values("step")
        assert row["tokens"] == h["tokens"].iloc[-1] >= budget > h["tokens"].iloc[-2]
        assert row["steps"] == h["step"].iloc[-1] == len(h) - 1
        x0, x1 = h["tokens"].iloc[-2], h["tokens"].iloc[-1]
        y0, y1 = h["pass1"].iloc[-2], h["pass1"].iloc[-1]
        assert row["pass1_at_budget"] == pytest.approx(y0 + (budget - x0) / (x1 - x0) * (y1 - y0), abs=1e-12)
        assert 0 <= row["heldout_pass1_at_budget"] <= 1
    grpo = summary[summary["method"] == "grpo"]
    assert grpo["steps"].is_monotonic_decreasing and grpo["steps"].iloc[0] > grpo["steps"].iloc[-1]  # cheap: more steps
    svg = ET.parse(out / "pass1_vs_budget.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 * len(COMPARE_METHODS)  # training and held-out panels
    assert sorted(len(p.get("points").split()) for p in lines[:len(COMPARE_METHODS)]) == sorted(
        hist.groupby("label").size().tolist())
    rec = json.loads((out / "run.json").read_text())
    assert [m["method"] for m in rec["methods"]] == [m[1] for m in COMPARE_METHODS]
    assert rec["budget"] == {"unit": "tokens", "total": budget} and rec["problem_set_pinned"] is False
    assert rec["problem_set_seed"] == TokenTreeSpec().problem_set_seed(0) == int(hist["problem_set_seed"].iloc[0])
    assert all(m["budget"]["tokens"] >= budget for m in rec["methods"])


def test_compare_without_a_budget_runs_equal_steps_on_a_pinned_problem_set(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--budget", "none", "--steps", "2", "--n-problems", "8", "--n-heldout", "0",
                 "--spec-seed", "11", "--no-figure", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "equal steps (2 per method" in printed and "problem set 11 (pinned by --spec-seed)" in printed
    summary = pd.read_csv(out / "summary.csv")
    grpo = summary[summary["method"] == "grpo"]
    assert list(grpo["rollouts"]) == [2 * 8 * n for n in (8, 16, 32, 64)] and (summary["steps"] == 2).all()
    assert summary["pass1_at_budget"].isna().all() and summary["final_heldout_pass1"].isna().all()
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "run.json", "summary.csv"]


def test_compare_with_a_step_cap_below_the_budget_reports_what_each_run_reached(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--steps", "2", "--n-problems", "8", "--prompts-per-step", "4", "--no-figure",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower()
    summary = pd.read_csv(out / "summary.csv")
    assert not summary["reached_budget"].any() and summary["pass1_at_budget"].isna().all()
    for r in summary.itertuples():  # each run's values after its last step, marked, at what it spent
        line = next(x for x in printed.splitlines() if x.startswith(r.label))
        assert f"{r.final_pass1:.3f}*" in line and f"{r.final_heldout_pass1:.3f}*" in line
        assert f"{r.tokens:,}" in line
    assert "* stopped by the step cap (2 steps) before the budget of 50,000 tokens: 7 of 7 runs" in printed
    # a cap the budget binds first marks nothing
    assert main(["compare", "--steps", "50", "--budget", "2000", "--n-problems", "8", "--prompts-per-step", "4",
                 "--no-figure", "--out", str(tmp_path / "ok")]) == 0
    printed = capsys.readouterr().out
    assert "*" not in printed and pd.read_csv(tmp_path / "ok" / "summary.csv")["reached_budget"].all()


def test_figure_ticks_are_round_and_inside_the_range():
    assert nice_ticks(0, 61440) == [0, 20000, 40000, 60000]  # steps of 1, 2 or 5 x 10^k, about 5 ticks
    assert nice_ticks(0, 50000) == [0, 10000, 20000, 30000, 40000, 50000]
    assert nice_ticks(0.1, 0.8) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert nice_ticks(0.15, 0.5) == pytest.approx([0.2, 0.3, 0.4, 0.5])
