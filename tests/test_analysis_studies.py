import json
import subprocess
import sys

import pandas as pd
import pytest

from analysis.report import write_report
from analysis.studies import QUICK, STUDIES, run_study


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    for name in STUDIES:
        run_study(name, out, seeds=2, quick=True, workers=2, progress=False)
    return out


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_study_writes_well_formed_tables_and_figure(quick_results, name):
    d = quick_results / name
    runs = pd.read_csv(d / "runs.csv")
    cells = STUDIES[name].cells([0, 1], QUICK)
    assert runs.groupby(["variant", "seed"]).ngroups == len(cells)
    assert set(runs.seed) == {0, 1}
    assert (runs.groupby(["variant", "seed"]).step.max() == QUICK.steps).all()
    assert {"pass1", "rollouts", "tokens", "method"} <= set(runs.columns)
    assert runs.pass1.between(0, 1).all()
    summary = pd.read_csv(d / "summary.csv")
    assert len(summary) == runs.variant.nunique() and summary.n.eq(2).all()
    png = (d / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    meta = json.loads((d / "study.json").read_text())
    assert meta["cells"] == len(cells) and meta["quick"] is True
    assert not list(d.rglob("*.tmp"))


def test_study_specific_measurements(quick_results):
    dil = pd.read_csv(quick_results / "dilution" / "runs.csv")
    late = dil[dil.step > 0]
    assert late.found_rate.dropna().between(0, 1).all() and (late.baseline_var.dropna() >= 0).all()
    # K continuations at one point estimate the local baseline with less variance than K/8 at each of 8
    by = late.groupby("variant").baseline_var.mean()
    assert by["dense M=1"] < by["uniform M=8"]
    rec = pd.read_csv(quick_results / "recoverability" / "runs.csv")
    fitted = rec.dropna(subset=["ece_pos", "ece_state"])
    assert len(fitted) > 0 and fitted.ece_pos.between(0, 1).all()
    root = pd.read_csv(quick_results / "root-saturation" / "runs.csv")
    fin = root[root.step == QUICK.steps]
    grpo = fin[fin.variant.str.startswith("grpo")].groupby("variant").rollouts.mean()
    assert grpo["grpo N=64"] == 16 * grpo["grpo N=4"]  # budget scales with N exactly


def test_rerun_does_no_repeated_work(quick_results):
    d = quick_results / "lambda-k" / "cells"
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    run_study("lambda-k", quick_results, seeds=2, quick=True, workers=2, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert before == after


def test_report_has_every_study_and_no_placeholder(quick_results):
    text = write_report(quick_results).read_text()
    for name in STUDIES:
        assert f"## {name}" in text and f"({name}/{name}.png)" in text
    assert "Not run in this directory" not in text
    for bad in ("TODO", "TBD", "placeholder", "XXX", " nan", "{", "}"):
        assert bad not in text
    assert text.count("**Findings**") == len(STUDIES)


def test_cli_bad_input_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "deepgrpo.cli", "study", "root-saturation", "--seeds", "0",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "--seeds = 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
    p = subprocess.run([sys.executable, "-m", "deepgrpo.cli", "report", "--results", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no study results" in p.stderr
