"""``deepgrpo report --llm-runs``: curves of real (micro-model) LLM training runs, grouped by
method and seed, and one-line errors for bad run directories."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from deepgrpo.step import STEP_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = 2
P, G, K = 4, 4, 4


@pytest.fixture(scope="module")
def llm_runs(tmp_path_factory):
    """Four real 2-step runs of the LLM trainer on a micro model that half-memorised the sample
    problems: DEEP-GRPO seeds 0 and 1, GRPO seed 0 at two learning rates. They train on the
    built-in arithmetic problems and are evaluated on the sample ones (a held-out question is
    never trained on, so the two sets are disjoint)."""
    from llm.backend import SamplingConfig
    from llm.evaluate import EvalConfig
    from llm.tasks import DATA_DIR, load_problems
    from llm.testing import save_micro_model
    from llm.trainer import TrainConfig, Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llm-runs")
    data = DATA_DIR / "arith_sample.jsonl"
    model = save_micro_model(root / "micro", load_problems(data), steps=60)
    runs = {"deep-s0": ("deep-grpo", {"G": G, "K": K}, 0, 3e-3), "deep-s1": ("deep-grpo", {"G": G, "K": K}, 1, 3e-3),
            "grpo-s0": ("grpo", {"G": G}, 0, 3e-3), "grpo-s0-lr1e-3": ("grpo", {"G": G}, 0, 1e-3)}
    for name, (method, overrides, seed, lr) in runs.items():
        cfg = TrainConfig(model=str(model), data=None, eval_data=str(data), method=method, overrides=overrides,
                          prompts_per_step=P, steps=STEPS, lr=lr, checkpoint_every=STEPS,
                          sampling=SamplingConfig(max_response_tokens=40),
                          eval=EvalConfig(n_problems=8, samples=2, pass_k=2, max_response_tokens=40),
                          eval_every=1, threads=1, tensorboard=False, seed=seed)
        Trainer(cfg, root / name, progress=False).run()
    torch.set_num_threads(threads)
    return root, list(runs)


def _metrics(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def report(llm_runs, tmp_path_factory):
    """``deepgrpo report --llm-runs RUN... --out OUT`` on the four runs."""
    from deepgrpo.cli import main
    root, names = llm_runs
    out = tmp_path_factory.mktemp("llm-report") / "report"
    assert main(["report", "--llm-runs", *(str(root / n) for n in names), "--out", str(out)]) == 0
    return root, names, out, out / "REPORT.md"


def test_runs_table_groups_by_method_and_seed(report):
    root, names, out, _ = report
    runs = pd.read_csv(out / "runs.csv")
    assert runs.groupby("run").ngroups == 4
    assert all(steps == list(range(STEPS + 1)) for steps in runs.groupby("run").step.apply(list))
    first = runs.groupby("run").first().rename(lambda p: p.rsplit("/", 1)[-1])
    label = first.variant
    assert label["deep-s0"] == label["deep-s1"] == "deep-grpo G=4 K=4"
    # runs of one method and overrides that differ in another config field are told apart by it
    assert label["grpo-s0"] == "grpo G=4 (lr=0.003)" and label["grpo-s0-lr1e-3"] == "grpo G=4 (lr=0.001)"
    assert first["train.lr"]["grpo-s0"] == 0.003 and first["train.lr"]["grpo-s0-lr1e-3"] == 0.001
    assert first["train.lr"][["deep-s0", "deep-s1"]].isna().all()  # no other difference between the DEEP-GRPO runs
    assert first.seed.to_dict() == {"deep-s0": 0, "deep-s1": 1, "grpo-s0": 0, "grpo-s0-lr1e-3": 0}
    assert "lr" in runs  # the trainer's own per-step column survives beside it
    # the trainer's rows carry the core's step record, which the report reads
    assert set(STEP_COLUMNS) <= set(runs.columns)
    grpo = runs[(runs.method == "grpo") & (runs.step > 0)]
    assert (grpo.rollouts == grpo.step * P * G).all() and (grpo.rollouts_aux == 0).all()


def test_curves_place_each_point_at_the_budget_its_policy_had_consumed(report):
    root, names, out, _ = report
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves.quantity) == {"reward_main", "eval/greedy_mean@1", "eval/sampled_mean@1", "eval/pass@2"}
    for name in names:
        rows = {r["step"]: r for r in _metrics(root / name)}
        c = curves[curves.run.str.endswith("/" + name)]
        reward = c[c.quantity == "reward_main"].set_index("step")
        assert list(reward.index) == list(range(1, STEPS + 1))
        for s in reward.index:  # sampled before step s's update: at the budget after step s - 1
            before = rows[s - 1].get("rollouts", 0)
            assert reward.loc[s, "value"] == pytest.approx(rows[s]["reward_main"])
            assert reward.loc[s, "rollouts"] == before and reward.loc[s, "tokens"] == rows[s - 1].get("tokens", 0)
        greedy = c[c.quantity == "eval/greedy_mean@1"].set_index("step")
        assert list(greedy.index) == list(range(STEPS + 1))
        for s in greedy.index:  # evaluated after step s: at the budget after step s
            assert greedy.loc[s, "value"] == pytest.approx(rows[s]["eval/greedy_mean@1"])
            assert greedy.loc[s, "rollouts"] == (rows[s]["rollouts"] if s else 0)


def test_summary_and_common_budget(report):
    root, names, out, path = report
    summary = pd.read_csv(out / "summary.csv").set_index("variant")
    deep = [_metrics(root / n) for n in ("deep-s0", "deep-s1")]
    row = summary.loc["deep-grpo G=4 K=4"]
    assert row.n == 2 and row.steps == STEPS
    assert row.rollouts == pytest.approx(np.mean([m[-1]["rollouts"] for m in deep]))
    start = np.mean([m[0]["eval/greedy_mean@1"] for m in deep])
    end = np.mean([m[-1]["eval/greedy_mean@1"] for m in deep])
    assert row["eval/greedy_mean@1@start"] == pytest.approx(start)
    assert row["eval/greedy_mean@1_change"] == pytest.approx(end - start)
    assert summary.loc["grpo G=4 (lr=0.003)", "n"] == 1
    assert np.isnan(summary.loc["grpo G=4 (lr=0.003)", "eval/greedy_mean@1_change_pm"])
    # the common budget of the held-out curves is the smallest final budget (a GRPO run's):
    # there, each GRPO run's value is its final evaluation
    at = pd.read_csv(out / "at_budget.csv")
    greedy = at[(at.budget == "rollouts") & (at.quantity == "eval/greedy_mean@1")].set_index("variant")
    assert (greedy["at"] == STEPS * P * G).all()
    grpo = _metrics(root / "grpo-s0")
    assert greedy.loc["grpo G=4 (lr=0.003)", "mean"] == pytest.approx(grpo[-1]["eval/greedy_mean@1"])
    assert greedy.loc["deep-grpo G=4 K=4", "n"] == 2
    # figures and the markdown
    for png in ("reward.png", "heldout.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
    text = path.read_text()
    assert path == out / "REPORT.md" and "![reward](reward.png)" in text and "![held-out accuracy](heldout.png)" in text
    assert f"deep-grpo G=4 K=4: {start:.3f} -> {end:.3f}" in text
    for bad in (" nan", "TODO"):
        assert bad not in text
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def _cli(args, capsys):
    from deepgrpo.cli import main
    code = main(["report", *map(str, args)])
    return code, capsys.readouterr().err


def test_bad_run_directories_are_one_line_errors(llm_runs, tmp_path, capsys):
    root, names = llm_runs
    out = tmp_path / "out"
    good = root / names[0]
    no_metrics = tmp_path / "no-metrics"
    no_metrics.mkdir()
    shutil.copy(good / "config.json", no_metrics / "config.json")
    malformed = tmp_path / "malformed"
    shutil.copytree(good, malformed, ignore=shutil.ignore_patterns("checkpoint"))
    with open(malformed / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rollouts": \n')
    cases = [(tmp_path / "missing", "no such run directory"), (no_metrics, "metrics.jsonl: missing"),
             (malformed, f"metrics.jsonl: line {STEPS + 2} is not valid JSON")]
    for bad, message in cases:
        code, err = _cli(["--llm-runs", good, bad, "--out", out], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err and str(bad) in err
        assert not out.exists()  # nothing is written when any input is bad
    code, err = _cli(["--llm-runs", good, good, "--out", out], capsys)
    assert code == 2 and "a copy?" in err and len(err.strip().splitlines()) == 1
    code, err = _cli(["--llm-runs", good], capsys)
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_mean_band_is_mean_ci_per_point():
    from analysis.llm_runs import mean_band
    from analysis.stats import mean_ci
    grid = pd.DataFrame({"variant": ["a"] * 6 + ["b"] * 2, "quantity": "q", "rollouts": [0, 0, 0, 1, 1, 1, 0, 1],
                         "value": [0.1, 0.4, 0.3, 0.5, 0.5, 0.5, 0.2, 0.6]})
    band = mean_band(grid, "rollouts").set_index(["variant", "rollouts"])
    e = mean_ci([0.1, 0.4, 0.3])
    assert band.loc[("a", 0), ["mean", "low", "high"]].tolist() == pytest.approx([e.mean, e.low, e.high])
    assert band.loc[("a", 1), ["low", "high"]].tolist() == pytest.approx([0.5, 0.5])  # equal values: no width
    assert band.loc[("b", 1), ["mean", "low", "high", "n"]].tolist() == pytest.approx([0.6, 0.6, 0.6, 1])
