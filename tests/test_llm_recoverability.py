"""``deepgrpo study llm-recoverability`` in quick mode on a micro Llama that half-memorised the
sample arithmetic problems: Monte Carlo recoverability of failed chains' candidate pivots,
calibration of the estimators, first errors vs pivots, and the E[s(X_k) | fail] <= p fact."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.llm_recoverability import (
    ESTIMATORS,
    SINGLE_ESTIMATORS,
    STRATEGIES,
    STUDY,
    auc_score,
    calibration_metrics,
    last_clean_candidates,
    report_section,
    unbiased_pass_at_k,
)
from deepgrpo.cli import main as deepgrpo_main
from llm.tasks import DATA_DIR, arithmetic_first_error, load_problems

SAMPLE = DATA_DIR / "arith_sample.jsonl"


def test_last_clean_is_the_candidate_just_before_the_first_error():
    """Constructed chains (step segmenter: candidate i = i steps, the final segment end is never a
    candidate). Chain 0 goes wrong at step 2; chain 1 is every step right but cut at a step
    boundary (first error = its missing step 3, past candidates 0-2); chain 2 is wrong only in its
    last segment (step 2, candidates 0-1); chain 3 has no known first error."""
    question = "55+45+1+2+3="
    cut = "55+45=100,100+1=101,101+2=103,"  # the reference solution cut after its third step
    assert arithmetic_first_error(question, cut) == 3
    assert arithmetic_first_error(question, "55+45=100,100+1=102,") == 1
    probes = pd.DataFrame({
        "chain":        [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3],
        "index":        [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1],
        "prefix_steps": [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1],
        "first_error":  [2, 2, 2, 2, 3, 3, 3, 2, 2, np.nan, np.nan],
    })
    w = last_clean_candidates(probes)
    assert w.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    # shuffled rows give the same answer row by row
    order = np.random.default_rng(0).permutation(len(probes))
    assert last_clean_candidates(probes.iloc[order].reset_index(drop=True)).tolist() == w[order].tolist()



@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """Run the study through the command line on a micro model (a few seconds)."""
    from llm.testing import save_micro_model
    root = tmp_path_factory.mktemp("llm_recov")
    model = save_micro_model(root / "model", load_problems(SAMPLE), steps=80, seed=0)
    code = deepgrpo_main(["study", STUDY, "--model", str(model), "--data", str(SAMPLE), "--quick", "--threads", "1",
                          "--max-response-tokens", "40", "--out", str(root / "results"), "--no-progress"])
    assert code == 0
    return root / "results"


def _read(study_dir, name):
    return pd.read_csv(study_dir / STUDY / name)


def test_outputs_and_probe_table(study_dir):
    d = study_dir / STUDY
    for name in ("probes.csv", "chains.csv", "summary.csv", "calibration.csv", "first_error.csv", "section.md",
                 "study.json", f"{STUDY}.png"):
        assert (d / name).is_file(), name
    meta = json.loads((d / "study.json").read_text())
    assert meta["config"]["n_continuations"] == 16 and meta["config"]["prompts"] == 8 and meta["quick"]
    chains, probes = _read(study_dir, "chains.csv"), _read(study_dir, "probes.csv")
    assert len(chains) == 8 * 8
    failed = chains[chains.failed]
    assert 0 < len(failed) < len(chains)  # mixed rewards: something to probe and a root to compare with
    # one probe row per candidate pivot of every failed chain: i = 0..L-1, r = (i+1)/(L+1)
    assert len(probes) == failed.n_segments.sum() == meta["sizes"]["candidates"]
    for c, g in probes.groupby("chain"):
        L = int(failed.set_index("chain").loc[c, "n_segments"])
        assert g["index"].tolist() == list(range(L))
        assert np.allclose(g.rel_depth, (g["index"] + 1) / (L + 1))
    assert set(probes.chain) == set(failed.chain)
    assert (probes.n == 16).all() and np.allclose(probes.s, probes.successes / 16)
    assert probes.label.isin([0, 1]).all()
    assert (probes.target >= probes.s - 1e-12).all() and (probes.target <= 1).all()
    # y = any of the first K continuations succeeded: never 1 without a success, P(y) ~ target
    assert (probes.label <= (probes.successes > 0)).all()
    assert abs(probes.label.mean() - probes.target.mean()) < 4 * math.sqrt(0.25 / len(probes)) + 0.05
    assert meta["sizes"]["continuations"] == 16 * (len(probes) + 8)


def test_root_monte_carlo_matches_main_chain_success_rate(study_dir):
    """The independent root probe and the failed chains' root candidates estimate the same p as
    the main chains, within sampling error."""
    meta = json.loads((study_dir / STUDY / "study.json").read_text())
    root = meta["root_check"]
    assert abs(root["z"]) < 3.5, root
    assert root["diff_low"] <= 0 <= root["diff_high"]
    depth = _read(study_dir, "summary.csv")
    k0 = depth[depth.k == 0].iloc[0]
    assert k0.gap_low <= 0 <= k0.gap_high  # E[s(X_0) | fail] = p: the root is the root
    assert k0.s_fail == pytest.approx(k0.s_alive)


def test_failed_states_never_beat_the_root(study_dir):
    """E[s(X_k) | fail] <= p at every depth k >= 1 (no interval of p − E[s | fail] below 0), and
    ended chains count as 0 so E[s | fail] reaches 0 at the longest chain's end."""
    depth = _read(study_dir, "summary.csv")
    chains = _read(study_dir, "chains.csv")
    assert depth.k.tolist() == list(range(int(chains[chains.failed].n_segments.max()) + 1))
    rest = depth[depth.k > 0]
    assert (rest.s_fail < rest.p).all()
    assert (rest.gap_high >= 0).all()
    assert depth.s_fail.iloc[-1] == 0 and depth.chains_alive.iloc[-1] == 0
    assert (depth.s_fail <= depth.s_alive.fillna(0) + 1e-12).all()
    assert depth.chains_alive.is_monotonic_decreasing


def test_first_errors_are_fatal_and_pivots_are_placed(study_dir):
    chains, probes = _read(study_dir, "chains.csv"), _read(study_dir, "probes.csv")
    # the recorded first error is the task checker's, recomputed from the chain's text (the
    # study keeps all 8 problems of the file, in file order)
    file_order = [p.question for p in load_problems(SAMPLE)]
    assert json.loads((study_dir / STUDY / "study.json").read_text())["sizes"]["prompts"] == len(file_order)
    for row in chains[chains.failed].itertuples():
        e = arithmetic_first_error(file_order[row.prompt], "" if pd.isna(row.text) else row.text)
        assert (np.isnan(row.first_error) and e is None) or row.first_error == e
    known = probes.dropna(subset=["first_error"])
    assert (known.prefix_steps == known["index"]).all()  # char tokens + step segmenter: candidate i = i steps
    clean, dirty = known[known.clean == 1], known[known.clean == 0]
    assert len(clean) and len(dirty)
    assert dirty.s.mean() <= 0.05 < clean.s.mean()  # a wrong partial sum carries to the answer

    piv = _read(study_dir, "first_error.csv").set_index("strategy")
    assert list(piv.index) == [*STRATEGIES, "last-clean", "root"]
    assert piv.loc["last-clean", "clean"] == 1 and piv.loc["last-clean", "offset"] == 0
    assert piv.loc["root", "clean"] == 1 and piv.loc["root", "rel_depth"] < piv.loc["random-pivot", "rel_depth"]
    assert piv.loc["depth-only", "rel_depth"] > piv.loc["random-pivot", "rel_depth"]  # r^2 pushes pivots deeper
    assert piv.loc["last-clean", "s"] > piv.loc["depth-only", "s"]
    assert ((piv.clean >= 0) & (piv.clean <= 1)).all()


def test_calibration_table(study_dir):
    cal = _read(study_dir, "calibration.csv").set_index("estimator")
    probes = _read(study_dir, "probes.csv")
    assert list(cal.index) == [*ESTIMATORS, *SINGLE_ESTIMATORS]
    assert list(cal.event) == ["any"] * len(ESTIMATORS) + ["one"] * len(SINGLE_ESTIMATORS)
    assert (cal.candidates == len(probes)).all() and (cal.prompts == 8).all()
    for e in ESTIMATORS:
        row = cal.loc[e]
        m = calibration_metrics(probes[f"p_{e}"].to_numpy(), probes.target.to_numpy(), probes.label.to_numpy())
        for k in ("ece", "brier", "brier_labels"):
            assert row[k] == pytest.approx(m[k])
            assert row[f"{k}_low"] <= row[f"{k}_high"]
    for e in ("position", "state"):
        assert 0 <= cal.loc[e, "auc_low"] <= cal.loc[e, "auc_high"] <= 1
    assert cal.loc["position", "d_ece"] == 0
    assert cal.loc["state", "d_ece"] == pytest.approx(cal.loc["state", "ece"] - cal.loc["position", "ece"])
    # the position-only estimator learned that failed chains' deep states recover less
    meta = json.loads((study_dir / STUDY / "study.json").read_text())
    assert meta["estimators"]["position"]["coefficients"]["rel_depth"] < 0


def test_single_continuation_calibration_rows(study_dir):
    """The selector and the converted P̂ are scored against s = c / n, the Monte Carlo chance that
    one continuation succeeds; the selector was fitted to the successes among the first K."""
    from deepgrpo.pivots import single_continuation
    cal = _read(study_dir, "calibration.csv").set_index("estimator")
    probes = _read(study_dir, "probes.csv")
    meta = json.loads((study_dir / STUDY / "study.json").read_text())
    K = meta["config"]["K"]
    assert ((probes.successes_k >= 0) & (probes.successes_k <= K) & (probes.successes_k <= probes.successes)).all()
    assert ((probes.successes_k > 0) == (probes.label == 1)).all()
    np.testing.assert_allclose(probes["p_position-q"], single_continuation(probes.p_position.to_numpy(), K))
    sel = meta["estimators"]["selector"]
    assert "next_entropy" in sel["features"] and "oracle_success" not in sel["features"]  # the HF engine's entropy
    assert sel["ready"] and np.isfinite(sel["coefficients"]["next_entropy"])
    for e in SINGLE_ESTIMATORS:
        row = cal.loc[e]
        m = calibration_metrics(probes[f"p_{e}"].to_numpy(), probes.s.to_numpy(), probes.label.to_numpy())
        for k in ("ece", "brier"):
            assert row[k] == pytest.approx(m[k])
            assert row[f"{k}_low"] <= row[f"{k}_high"]
        assert np.isnan(row["brier_labels"])
        assert row["mean_truth"] == pytest.approx(probes.s.mean())
        assert row["mean_prediction"] == pytest.approx(probes[f"p_{e}"].mean())
    assert cal.loc["position-q", "d_ece"] == 0
    sel = cal.loc["selector"]
    assert sel["d_brier"] == pytest.approx(sel["brier"] - cal.loc["position-q", "brier"])
    # fitted out of fold to the counts, the selector's q is close to the truth on average
    assert abs(cal.loc["selector", "mean_prediction"] - cal.loc["selector", "mean_truth"]) < 0.1
    assert 0 <= cal.loc["selector", "auc_low"] <= cal.loc["selector", "auc_high"] <= 1


def test_section_is_rebuilt_from_the_tables(study_dir):
    lines = report_section(study_dir)
    assert lines is not None and lines[0] == f"## {STUDY}"
    text = "\n".join(lines)
    assert (study_dir / STUDY / "section.md").read_text() == text + "\n"
    for needle in ("**Findings**", "E[s(X_k) | fail] <= p", "| position |", "| last-clean |", f"{STUDY}.png",
                   "| selector |", "learned informative selector"):
        assert needle in text
    assert report_section(study_dir / "nowhere") is None


def test_bad_input_names_the_option(tmp_path, capsys):
    assert deepgrpo_main(["study", STUDY, "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]
    from llm.testing import save_micro_model
    model = save_micro_model(tmp_path / "m")
    assert deepgrpo_main(["study", STUDY, "--model", str(model), "--n-continuations", "4", "--out", str(tmp_path)]) == 2
    assert "n_continuations" in capsys.readouterr().err
    assert deepgrpo_main(["study", STUDY, "--model", str(model), "--data", str(tmp_path / "x.jsonl"),
                          "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / STUDY).exists()


def test_helpers():
    assert arithmetic_first_error("3+4+5=", "3+4=7,7+5=12;12") is None
    assert arithmetic_first_error("3+4+5=", "3+4=8,8+5=13;13") == 0
    assert arithmetic_first_error("3+4+5=", "3+4=7,7+5=12;13") == 2
    assert arithmetic_first_error("3+4+5=", "3+4=7,7+") == 1
    assert arithmetic_first_error("3+4+5=", "3+4=7,7+5=12,12") == 1  # wrong separator
    with pytest.raises(ValueError, match="addition chain"):
        arithmetic_first_error("What is 3+4?", "7")
    n, c = np.array([16, 16, 16, 8]), np.array([0, 16, 3, 1])
    exact = [1 - math.comb(16 - 0, 8) / math.comb(16, 8), 1.0, 1 - math.comb(13, 8) / math.comb(16, 8), 1.0]
    assert np.allclose(unbiased_pass_at_k(n, c, 8), exact)
    rng = np.random.default_rng(0)
    s, y = rng.random(200), rng.random(200) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auc_score(s, y) == pytest.approx(np.mean(pairs))
    perfect = calibration_metrics(np.array([0.1, 0.9]), np.array([0.1, 0.9]), np.array([0, 1]))
    assert perfect["ece"] == 0 and perfect["brier"] == 0 and perfect["auc"] == 1
