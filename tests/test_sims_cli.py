"""``deepgrpo sim run|compare``: outputs, and one-line errors (exit 2, nothing written) on bad input."""

import json

import pandas as pd
import pytest
import torch

from deepgrpo.cli import main as deepgrpo_main
from sims.cli import main
from sims.compare import COMPARE_METHODS, SUMMARY_COLUMNS


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
            "--K", "4", "--set", "aggregation=seq-mean-token-mean", "--quiet", "--out", str(out)]
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


def test_compare_writes_summary_history_and_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert deepgrpo_main(["sim", "compare", "--steps", "3", "--n-problems", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label, _, _ in COMPARE_METHODS:
        assert label in printed
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == list(SUMMARY_COLUMNS) and list(summary["label"]) == [m[0] for m in COMPARE_METHODS]
    grpo = summary[summary["method"] == "grpo"]
    assert list(grpo["rollouts"]) == [3 * 8 * n for n in (8, 16, 32, 64)]
    assert (summary["initial_pass1"] == summary["initial_pass1"].iloc[0]).all()  # same problem set and start
    gain = 1000 * (summary["final_pass1"] - summary["initial_pass1"]) / summary["rollouts"]
    assert (gain - summary["gain_per_1k_rollouts"]).abs().max() < 1e-12
    hist = pd.read_csv(out / "history.csv")
    assert set(hist["label"]) == set(summary["label"]) and len(hist) == 6 * 4
    png = (out / "pass1_vs_rollouts.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    rec = json.loads((out / "run.json").read_text())
    assert [m["method"] for m in rec["methods"]] == [m[1] for m in COMPARE_METHODS]
    assert all(m["budget"]["rollouts"] > 0 for m in rec["methods"])
