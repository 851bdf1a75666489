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


def test_curves_place_each_point_at_the_budget_spent_through_its_step(report):
    root, names, out, _ = report
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves.quantity) == {"reward_main", "eval/greedy_mean@1", "eval/sampled_mean@1", "eval/pass@2"}
    for name in names:
        rows = {r["step"]: r for r in _metrics(root / name)}
        c = curves[curves.run.str.endswith("/" + name)]
        reward = c[c.quantity == "reward_main"].set_index("step")
        assert list(reward.index) == list(range(1, STEPS + 1))
        for s in reward.index:  # the main chains of step s: at the budget spent through step s
            assert reward.loc[s, "value"] == pytest.approx(rows[s]["reward_main"])
            assert reward.loc[s, "rollouts"] == rows[s]["rollouts"] and reward.loc[s, "tokens"] == rows[s]["tokens"]
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


def _write_run(d, method, seed, overrides, steps, evals):
    """A run directory as ``llm train`` writes it: ``steps`` = [(rollouts_main, rollouts_aux,
    tokens_main, tokens_aux, reward_main)] per step, ``evals`` = {step: greedy accuracy}."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"method": method, "seed": seed, "overrides": overrides}}))
    rows, rollouts, tokens = [{"step": 0, "eval/greedy_mean@1": evals[0]}], 0, 0
    for s, (rm, ra, tm, ta, reward) in enumerate(steps, 1):
        rollouts, tokens = rollouts + rm + ra, tokens + tm + ta
        row = {"step": s, "rollouts": rollouts, "tokens": tokens, "step_rollouts_main": rm, "step_rollouts_aux": ra,
               "step_tokens_main": tm, "step_tokens_aux": ta, "reward_main": reward}
        if s in evals:
            row["eval/greedy_mean@1"] = evals[s]
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_a_value_at_a_budget_is_the_one_measured_once_that_budget_was_spent(tmp_path):
    """Hand-computed: GRPO spends 8 rollouts / 100 tokens per step (rewards 0.25, 0.5, 0.75),
    DEEP-GRPO 6 + 6 rollouts and 150 then 130 tokens (rewards 0.1, 0.3). Each step's reward sits
    at the budget spent through that step, so at the common 24 rollouts the table reads GRPO's
    third step (0.75), not its second (the old placement, at the budget before the step, read
    0.625 at 12 rollouts)."""
    from analysis.llm_runs import write_llm_report
    grpo = _write_run(tmp_path / "grpo", "grpo", 0, {"G": 8}, [(8, 0, 100, 0, 0.25), (8, 0, 100, 0, 0.5),
                                                                (8, 0, 100, 0, 0.75)], {0: 0.40, 3: 0.43})
    deep = _write_run(tmp_path / "deep", "deep-grpo", 0, {}, [(6, 6, 80, 70, 0.1), (6, 6, 70, 60, 0.3)],
                      {0: 0.40, 2: 0.41})
    out = tmp_path / "report"
    write_llm_report([grpo, deep], out)
    curves = pd.read_csv(out / "curves.csv")
    reward = curves[curves.quantity == "reward_main"]
    assert reward[reward.method == "grpo"][["step", "rollouts", "tokens", "value"]].values.tolist() == \
        [[1, 8, 100, 0.25], [2, 16, 200, 0.5], [3, 24, 300, 0.75]]
    assert reward[reward.method == "deep-grpo"][["step", "rollouts", "tokens", "value"]].values.tolist() == \
        [[1, 12, 150, 0.1], [2, 24, 280, 0.3]]
    at = pd.read_csv(out / "at_budget.csv").set_index(["budget", "quantity", "variant"])
    # rollouts: both runs end at 24; tokens: DEEP-GRPO ends at 280, where GRPO is 4/5 of the way from 0.5 to 0.75
    expected = {("rollouts", "reward_main"): (24, 0.75, 0.3), ("tokens", "reward_main"): (280, 0.7, 0.3),
                ("rollouts", "eval/greedy_mean@1"): (24, 0.43, 0.41),
                ("tokens", "eval/greedy_mean@1"): (280, 0.40 + 0.03 * 280 / 300, 0.41)}
    for (budget, q), (where, g, d) in expected.items():
        assert at.loc[(budget, q, "grpo G=8"), "at"] == where == at.loc[(budget, q, "deep-grpo"), "at"]
        assert at.loc[(budget, q, "grpo G=8"), "mean"] == pytest.approx(g)
        assert at.loc[(budget, q, "deep-grpo"), "mean"] == pytest.approx(d)
    text = (out / "REPORT.md").read_text()
    assert "2 runs of 2 variants;" in text
    assert "| reward_main | 24 | 0.750 | 0.300 |" in text and "| reward_main | 280 | 0.700 | 0.300 |" in text
    write_llm_report([grpo], tmp_path / "one")
    assert "1 run of 1 variant;" in (tmp_path / "one" / "REPORT.md").read_text()


def test_panels_are_scaled_to_their_data():
    """A held-out curve moving from 0.40 to 0.43 fills its panel (a 0-1 axis would show a flat
    line); a flat curve gets a range of 0.02 around it; rates stay within [-0.02, 1.02]."""
    from analysis.llm_runs import y_limits
    assert y_limits(pd.Series([0.40, 0.43])) == pytest.approx((0.40 - 0.0024, 0.43 + 0.0024))
    assert y_limits(pd.Series([0.41]), pd.Series([0.39]), pd.Series([0.45])) == pytest.approx((0.3852, 0.4548))
    assert y_limits(pd.Series([0.5, 0.5])) == pytest.approx((0.49 - 0.0016, 0.51 + 0.0016))
    assert y_limits(pd.Series([0.2, 1.0]), pd.Series([0.1]), pd.Series([1.3])) == pytest.approx((0.1 - 0.096, 1.02))
    assert y_limits(pd.Series([3.0, 5.0])) == pytest.approx((2.84, 5.16))  # not a rate: not clipped
    assert y_limits(pd.Series([], dtype=float)) is None
