"""Guards of ``deepgrpo study ...`` and ``deepgrpo report``: one writer per output directory, an
output path that cannot be written, one-line argument errors, the workers cap, damaged cell
files, and an LLM comparison rerun under other settings (refused; its report states what each
run used). All before any work is done, so every test here is fast."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from analysis.sweep import Cell, cells_done, load_cell, run_sweep, usable_cpus
from deepgrpo.cli import main as deepgrpo_main

HOLDER = textwrap.dedent("""
    import sys
    from deepgrpo.records import lock_output
    for path in sys.argv[1:]:
        lock_output(path)
    print("locked", flush=True)
    sys.stdin.read()  # hold the locks until the test closes stdin
""")


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    from llm.models import save_pretrained_dir
    from llm.testing import micro_model
    model, tok = micro_model(seed=0)
    return save_pretrained_dir(model, tok, tmp_path_factory.mktemp("micro") / "model")


def _one_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "usage:" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


def _llm_run(d, seed: int) -> None:
    """A minimal run directory of `deepgrpo llm train` (what `report --llm-runs` reads)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"method": "grpo", "seed": seed}}))
    rows = [{"step": 0, "eval/greedy_mean@1": 0.5}]
    rows += [{"step": t, "rollouts": 8 * t, "tokens": 80 * t, "step_rollouts_main": 8, "step_rollouts_aux": 0,
              "step_tokens_main": 80, "step_tokens_aux": 0, "reward_main": 0.1 * t} for t in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _commands(root, model) -> dict[str, list[str]]:
    """Every study and report command, each with its own output directory under ``root``."""
    llm_compare = ["study", "llm-compare", "--quick", "--model", str(model), "--threads", "1"]
    return {
        "study": ["study", "lambda-k", "--smoke", "--seeds", "1", "--no-progress", "--out", str(root / "study")],
        "study all": ["study", "all", "--smoke", "--seeds", "1", "--no-progress", "--out", str(root / "all")],
        "regime-map": ["study", "regime-map", "--quick", "--seeds", "2", "--no-progress", "--out", str(root / "map")],
        "theory": ["study", "theory", "--out", str(root / "theory")],
        "llm-recoverability": ["study", "llm-recoverability", "--model", str(model), "--quick", "--threads", "1",
                               "--no-progress", "--out", str(root / "recov")],
        "llm-compare": [*llm_compare, "--out", str(root / "compare")],
        "report": ["report", "--results", str(root / "report")],
        "report --llm-runs": ["report", "--llm-runs", str(root / "llm-run-0"), str(root / "llm-run-1"),
                              "--out", str(root / "llm-report")],
    }


def test_a_second_process_on_the_same_out_is_refused_in_one_line(micro_dir, tmp_path, capsys):
    commands = _commands(tmp_path, micro_dir)
    (tmp_path / "report").mkdir()
    for seed in (0, 1):
        _llm_run(tmp_path / f"llm-run-{seed}", seed)
    # llm-compare's runs share --out with --shard, so each run directory is its unit of one writer
    held = [tmp_path / n for n in ("study", "all", "map", "theory", "recov", "report", "llm-report")]
    held.append(tmp_path / "compare" / "runs" / "grpo-n-8-s0")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, held)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for name, argv in commands.items():
            assert deepgrpo_main(argv) == 2, name
            _one_line(capsys, f"in use by process {holder.pid}", "one process writes to a directory at a time")
        assert not (tmp_path / "study").exists() and not (tmp_path / "map").exists()
        assert not (tmp_path / "llm-report").exists()
        assert not (tmp_path / "compare" / "runs" / "grpo-n-8-s0").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_an_out_that_is_a_file_is_one_line_before_any_work(micro_dir, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a directory\n")
    for name, argv in _commands(tmp_path, micro_dir).items():
        if name == "report --llm-runs":
            continue  # below
        option = "--results" if name == "report" else "--out"
        argv = [*argv[:argv.index(option) + 1], str(file), *argv[argv.index(option) + 2:]]
        assert deepgrpo_main(argv) == 2, name
        _one_line(capsys, f"{option} = {str(file)!r} is invalid", "not a directory")
    for out in (str(file), str(file / "sub")):
        assert deepgrpo_main(["report", "--llm-runs", str(tmp_path), "--out", out]) == 2
        _one_line(capsys, "--out", "not a directory")
    assert file.read_text() == "not a directory\n" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("argv,fragment", [
    (["study"], "the following arguments are required: {root-saturation,"),
    (["study", "lambda-k", "--seeds", "two"], "--seeds: SimStudyOptions.seeds = 'two' is invalid"),
    (["study", "lambda-k", "--bogus"], "unrecognized arguments: --bogus"),
    (["study", "lambda-k", "--quick", "--smoke"], "not allowed with argument"),
    (["study", "regime-map", "--workers", "x"], "--workers: RegimeMapOptions.workers = 'x' is invalid"),
    (["study", "theory", "--bogus"], "unrecognized arguments: --bogus"),
    (["study", "llm-compare", "--model", "m"], "the following arguments are required: --out"),
    (["study", "llm-recoverability", "--out", "x"], "the following arguments are required: --model"),
    (["report"], "one of the arguments --results --llm-runs is required"),
])
def test_argument_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    assert deepgrpo_main(argv) == 2
    assert "error:" in _one_line(capsys, fragment)
    assert not any(tmp_path.iterdir())


def test_workers_are_capped_at_the_usable_cpus_with_a_note(tmp_path, capsys, monkeypatch):
    import analysis.regime_map
    import analysis.studies
    asked = []
    monkeypatch.setattr(analysis.studies, "run_study", lambda *a, workers=None, **k: asked.append(workers) or tmp_path)
    monkeypatch.setattr(analysis.regime_map, "run_regime_map",
                        lambda *a, workers=None, **k: asked.append(workers) or tmp_path)
    cpus = usable_cpus()
    assert deepgrpo_main(["study", "lambda-k", "--smoke", "--workers", str(cpus + 22), "--out", str(tmp_path)]) == 0
    assert deepgrpo_main(["study", "regime-map", "--workers", "999", "--out", str(tmp_path)]) == 0
    assert deepgrpo_main(["study", "lambda-k", "--smoke", "--workers", str(cpus), "--out", str(tmp_path)]) == 0
    assert asked == [cpus, cpus, cpus]
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [f"deepgrpo study: note: --workers {cpus + 22} is more than the {cpus} CPUs this process may "
                     f"use; using {cpus}",
                     f"deepgrpo study regime-map: note: --workers 999 is more than the {cpus} CPUs this process may "
                     f"use; using {cpus}"]


# -- damaged cell files ----------------------------------------------------------------------------

CALLS: list[str] = []


def counting_worker(cell: Cell):
    CALLS.append(cell.key)
    return [{"step": t, "value": cell.params["x"] * t + cell.seed} for t in range(3)]


def test_damaged_cell_files_are_not_finished_and_are_computed_again(tmp_path, capsys):
    cells = [Cell("s", f"x={x}", seed, {"x": x}, {"rule": "dense"}) for x in (1, 2, 3) for seed in (0, 1)]
    CALLS.clear()
    first = run_sweep(cells, counting_worker, tmp_path, "runs", workers=1, progress=False)
    reference = (tmp_path / "runs.csv").read_bytes()
    paths = {c.key: tmp_path / "cells" / f"{c.key}.csv" for c in cells}
    text = {k: p.read_text() for k, p in paths.items()}
    damaged = {
        cells[0].key: "",  # 0 bytes
        cells[1].key: text[cells[1].key][:-7],  # cut in the middle of its last line
        cells[2].key: "\x00\xff garbage \x89PNG\n",  # not a table
        cells[3].key: text[cells[3].key].replace("x=2", "x=9"),  # another cell's rows
        cells[4].key: text[cells[4].key].splitlines()[0] + "\n",  # the header only
    }
    for key, body in damaged.items():
        paths[key].write_bytes(body.encode("latin-1"))
    assert cells_done(cells, tmp_path) == 1
    assert [load_cell(tmp_path, c) is None for c in cells] == [True] * 5 + [False]
    CALLS.clear()
    capsys.readouterr()
    again = run_sweep(cells, counting_worker, tmp_path, "runs", workers=1, progress=False)
    assert sorted(CALLS) == sorted(damaged) and cells_done(cells, tmp_path) == len(cells)
    assert again.equals(first) and (tmp_path / "runs.csv").read_bytes() == reference
    assert "5 cell file(s)" in capsys.readouterr().err


def test_a_study_cell_cut_at_a_line_boundary_is_computed_again(tmp_path):
    from analysis.protocol import with_protocol
    from analysis.studies import SMOKE, _cell, run_sim_cell, sim_run_complete
    cell = with_protocol(_cell("t", "grpo", 0, SMOKE, "grpo"), lr=0.2, budget=1500, unit="tokens", max_steps=50)
    run_sweep([cell], run_sim_cell, tmp_path, "runs", workers=1, progress=False, complete=sim_run_complete)
    reference = (tmp_path / "runs.csv").read_bytes()
    path = tmp_path / "cells" / f"{cell.key}.csv"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) > 3 and cells_done([cell], tmp_path, sim_run_complete) == 1
    path.write_text("".join(lines[:-1]))  # whole lines, but the run's last steps are missing
    assert load_cell(tmp_path, cell) is not None  # a well-formed table...
    assert cells_done([cell], tmp_path, sim_run_complete) == 0  # ...that is not the whole run
    run_sweep([cell], run_sim_cell, tmp_path, "runs", workers=1, progress=False, complete=sim_run_complete)
    assert (tmp_path / "runs.csv").read_bytes() == reference


def test_the_batched_completeness_check_answers_as_the_per_cell_one():
    """``sim_run_complete.many`` (what the sweep's reader uses for files read together) gives
    every table the answer :func:`sim_run_complete` gives it alone: whole runs, runs cut short,
    a missing pass@1, steps out of order, a step cap reached before the budget."""
    import numpy as np
    import pandas as pd

    from analysis.protocol import with_protocol
    from analysis.studies import SMOKE, _cell, run_sim_cell, sim_run_complete
    budget = with_protocol(_cell("t", "grpo", 0, SMOKE, "grpo"), lr=0.2, budget=1500, unit="tokens", max_steps=50)
    capped = with_protocol(_cell("t", "grpo", 1, SMOKE, "grpo"), lr=0.2, budget=10 ** 9, unit="tokens", max_steps=3)
    tables = {c.seed: pd.DataFrame(run_sim_cell(c)) for c in (budget, capped)}
    cases = []
    for cell in (budget, capped):
        whole = tables[cell.seed]
        cases += [(cell, whole), (cell, whole.iloc[:-1]), (cell, whole.iloc[:1]), (cell, whole.iloc[1:])]
        cases.append((cell, whole.assign(pass1=whole.pass1.where(whole.step != 1))))
        cases.append((cell, whole.assign(step=whole.step.to_numpy()[::-1])))
    frame = pd.concat([t for _, t in cases], ignore_index=True)
    ends = np.cumsum([len(t) for _, t in cases])
    bounds = list(zip((ends - [len(t) for _, t in cases]).tolist(), ends.tolist()))
    alone = [sim_run_complete(c, t.reset_index(drop=True)) for c, t in cases]
    assert alone[0] and alone[6] and not any(alone[1:6]) and not alone[7]  # the two whole runs, and only they
    assert alone == [True, False, False, False, False, False] * 2
    assert sim_run_complete.many([c for c, _ in cases], frame, bounds) == alone
    shuffled = [5, 0, 9, 3]  # any subset, in any order
    assert (sim_run_complete.many([cases[i][0] for i in shuffled], frame, [bounds[i] for i in shuffled])
            == [alone[i] for i in shuffled])


# -- llm-compare: the settings a comparison started with -------------------------------------------


def _fake_run(d, train: dict) -> None:
    """A finished run directory as the trainer leaves it (the files the tables read), trained
    with the TrainConfig ``train`` (as a dict)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": train}))
    metrics = {"greedy_mean@1": 0.5, "sampled_mean@1": 0.25 + 0.1 * train["seed"], "pass@2": 0.5}
    (d / "summary.json").write_text(json.dumps({"steps": 3, "budget": {"rollouts": 100,
                                                                       "tokens": train["budget"] + 10},
                                                "before": metrics, "after": metrics}))


def test_llm_compare_refuses_other_settings_and_reports_what_the_runs_used(micro_dir, tmp_path, capsys):
    from analysis.llm_compare import (
        DEFAULT_METHODS,
        LLMCompareConfig,
        check_settings,
        comparison_markdown,
        comparison_table,
        final_table,
        metrics,
        run_configs,
        run_dir,
    )
    from deepgrpo import ConfigError
    cfg = LLMCompareConfig(model=str(micro_dir), budget=3000, seeds=2, prompts_per_step=4, eval_problems=8,
                           eval_samples=2, methods=[DEFAULT_METHODS[0], DEFAULT_METHODS[4]])
    out = tmp_path / "cmp"
    check_settings(cfg, out)  # records the settings
    assert json.loads((out / "settings.json").read_text())["compare"]["lr"] == cfg.lr
    check_settings(LLMCompareConfig(**{**vars(cfg), "threads": 1}), out)  # threads may change
    with pytest.raises(ConfigError, match=r"--lr = 0.001 is invalid: the comparison in .* was started with "
                                          r"lr = 0.0001 \(settings.json\)"):
        check_settings(LLMCompareConfig(**{**vars(cfg), "lr": 1e-3}), out)
    with pytest.raises(ConfigError, match="--budget = 5000 is invalid"):
        check_settings(LLMCompareConfig(**{**vars(cfg), "budget": 5000}), out)
    # through the command line: one line, exit 2, and nothing trained
    argv = ["study", "llm-compare", "--model", str(micro_dir), "--budget", "3000", "--seeds", "2",
            "--prompts-per-step", "4", "--eval-problems", "8", "--eval-samples", "2", "--out", str(out)]
    assert deepgrpo_main([*argv, "--quick", "--lr", "0.001"]) == 2
    _one_line(capsys, "deepgrpo study llm-compare: error:", "was started with", "choose another --out")
    assert not (out / "runs").exists()
    # a directory made before settings.json: each run's own config.json is compared
    old = tmp_path / "old"
    labels = [m[0] for m in cfg.methods]
    for label, seed, tc in run_configs(cfg):
        _fake_run(run_dir(old, label, seed), {**tc.to_dict(), "lr": 2e-4 if label == labels[1] else 1e-4})
    with pytest.raises(ConfigError, match=r"run .*deep-grpo-position-p-s0.* was started with lr = 0.0002, these "
                                          r"settings would resume it with 0.0001"):
        check_settings(cfg, old)
    # the tables state the settings each run used (from its config.json), not the command's
    dirs = [run_dir(old, label, seed) for label in labels for seed in range(2)]
    final = final_table(cfg, dirs)
    assert list(final.lr) == [1e-4, 1e-4, 2e-4, 2e-4] and (final.budget == 3000).all()
    md = comparison_markdown(cfg, final, comparison_table(final, metrics(cfg)))
    assert f"AdamW lr 0.0001 ({labels[0]} s0, {labels[0]} s1); 0.0002 ({labels[1]} s0, {labels[1]} s1)" in md
    assert "generated 3,000 tokens" in md and "2 training seeds, 4 prompts/step" in md
    assert "8 held-out problems, 2 samples" in md
    for d in dirs[2:]:
        (d / "config.json").write_text(json.dumps({"train": {**json.loads((d / "config.json").read_text())["train"],
                                                             "lr": 1e-4}}))
    final = final_table(cfg, dirs)
    md = comparison_markdown(cfg, final, comparison_table(final, metrics(cfg)))
    assert "AdamW lr 0.0001 (5-step warm-up)" in md
    assert np.isclose(pd.Series(final.lr).unique(), [1e-4]).all()
